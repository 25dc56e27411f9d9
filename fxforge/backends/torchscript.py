"""The TorchScript backend: script (or trace) the graph, freeze it, and optimize it for inference.

TorchScript cannot call ATen overloads (``aten.conv2d.default``) nor ``aten.sym_size.int``, so a copy of
the graph calls the overload packets and ``Tensor.size`` instead, with its constants on one flat module
(scripting compiles each submodule separately); scripting keeps the batch dimension dynamic.
``optimize_for_inference`` (oneDNN conv with prepacked weights) is kept only when it is faster and agrees with the
graph; where its fused kernels map a NaN input to numbers (conv → relu), which the graph answers with NaN, the
artifact refuses NaN and Inf in its float inputs (``Signature.finite_inputs``, as an int8 model does); its oneDNN
constants cannot be serialized, so the artifact saves the scripted module and freezes and optimizes it again
on load. At compile time each variant is frozen once and the artifact keeps the one chosen.
"""
from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path
from typing import Any, List, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxforge.compiler.errors import BackendError
from fxforge.compiler.graph import aten, get_tensor, is_op
from fxforge.compiler.timing import measure_latency
from fxforge.compiler.target import Target
from fxforge.compiler.trace import Signature, silenced_warnings
from fxforge.compiler.verify import EXACT_TOLERANCE, compare, fresh_inputs

from .base import Artifact, Backend, register_backend

MODEL_FILE = "model.pt"


class TorchScriptArtifact(Artifact):
    backend = "torchscript"
    portable = True
    files = (MODEL_FILE,)

    def __init__(self, scripted: torch.jit.ScriptModule, signature: Signature, target: Target,
                 info: dict[str, Any] | None = None, frozen: torch.jit.ScriptModule | None = None) -> None:
        """``frozen``: ``scripted`` already frozen (and optimized where ``info`` says so); frozen here if None."""
        super().__init__(signature, target, info)
        self.scripted = scripted
        self.module = frozen if frozen is not None else _frozen(scripted, bool(self.info.get("optimize_for_inference")))

    def run(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        # no warnings.catch_warnings here: it swaps the process's filters, and calls from several threads left
        # "ignore" installed, silencing every later warning of the process (the frozen module warns of nothing)
        with torch.inference_mode():
            out = self.module(*inputs)
        return out if isinstance(out, (tuple, list)) else (out,)

    def stored_bytes(self) -> int:
        buffer = io.BytesIO()
        with silenced_warnings():
            torch.jit.save(self.scripted, buffer)
        return buffer.getbuffer().nbytes

    def write(self, directory: Path) -> None:
        with silenced_warnings():
            torch.jit.save(self.scripted, str(directory / MODEL_FILE))

    @classmethod
    def read(cls, directory: Path, signature: Signature, target: Target, info: dict[str, Any]) -> TorchScriptArtifact:
        with silenced_warnings():
            return cls(torch.jit.load(str(directory / MODEL_FILE)), signature, target, info)


# torch's functions on the symbolic sizes of a graph (a Python number computed from the batch size is an output of
# the graph, trace.SYMBOLIC_SCALARS) → the Python builtins TorchScript compiles (``x.shape[0] * 0.5``: sym_float)
PYTHON_NUMBER_OPS = {torch.sym_float: float}


def scriptable(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` written in the subset of Python TorchScript compiles, with its constants (copied) as
    attributes of one flat module: scripting compiles every submodule on its own, and an exported graph keeps the
    model's module tree (efficientnet_v2_s: 510 submodules, most of the time scripting took)."""
    graph, copies = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    constants: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for original, node in copies.items():
        if node.op == "get_attr":
            if node.target not in renamed:
                value = get_tensor(gm, original)
                if value is None:
                    raise BackendError(f"TorchScript scripting takes tensor constants only; {node.target!r} is not")
                name = node.target.replace(".", "_")
                while name in constants:
                    name += "_"
                constants[name], renamed[node.target] = value.detach().clone(), name
            node.target = renamed[node.target]
    for node in list(graph.nodes):
        if is_op(node, aten.sym_size):
            with graph.inserting_before(node):
                size = graph.call_method("size", node.args)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
        elif isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
        elif node.target in PYTHON_NUMBER_OPS:  # a number computed from a size: TorchScript knows no sym_float
            node.target = PYTHON_NUMBER_OPS[node.target]
    return fx.GraphModule(constants, graph)


@register_backend
class TorchScriptBackend(Backend):
    """torch.jit script/trace → freeze → optimize_for_inference where it is faster (option ``optimize``)."""

    name = "torchscript"
    artifact = TorchScriptArtifact
    cpu_only = True  # saved unfrozen, it runs wherever PyTorch runs on a CPU (x86 or arm64)
    pytorch_kernels = True

    def check_options(self, options: Mapping[str, Any]) -> None:
        """``optimize``: None (the default) applies ``torch.jit.optimize_for_inference`` where it agrees with the
        graph and times faster on the example, so two builds can differ (by float rounding, ~1e-6) when the two are
        near in speed; True (wherever it agrees) or False fixes the choice, for a build that must repeat bit for bit.
        For a target that does not run here None means False: this CPU's timing says nothing of the target's."""
        unknown = sorted(set(options) - {"optimize"})
        if unknown:
            raise BackendError(f"the torchscript backend takes only the option optimize, got {', '.join(unknown)}")
        if not (options.get("optimize") is None or isinstance(options["optimize"], bool)):  # 1 == True
            raise BackendError(f"torchscript option optimize must be None, True or False, got {options['optimize']!r}")

    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], signature: Signature,
              target: Target, **options: Any) -> TorchScriptArtifact:
        self.check_options(options)
        optimize = options.get("optimize")
        if optimize is None and not target.runs_on_host:  # not timed here for another CPU
            optimize = False
        with silenced_warnings():
            module, mode = self._compile(gm, example_inputs)
            if mode != "script" or not signature.dynamic_batch:  # model.pt holds the example's shapes: it says so
                module, mode = self._compile(_guarded(gm, example_inputs), example_inputs)
            chosen, optimized = _frozen(module, optimize=False), False
            try:
                candidate = _frozen(module, optimize=True) if optimize is not False else None
                if candidate is not None and _agrees(candidate, gm, example_inputs) and (optimize or measure_latency(
                        candidate, example_inputs, 0.3) < measure_latency(chosen, example_inputs, 0.3)):
                    chosen, optimized = candidate, True
                    if not _keeps_nan(candidate, gm, example_inputs):  # its calls then refuse NaN and Inf inputs
                        finite = set(signature.finite_inputs) | set(_float_inputs(example_inputs))
                        signature = dataclasses.replace(signature, finite_inputs=tuple(sorted(finite)))
            except RuntimeError:
                pass
        if mode != "script":  # a trace holds the example's shapes and every size computed from them
            signature = signature.with_static_batch(example_inputs, f"torchscript: {mode}")
        return TorchScriptArtifact(module, signature, target, {"torchscript_mode": mode,
                                                               "optimize_for_inference": optimized}, frozen=chosen)

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]):
        try:
            return torch.jit.script(scriptable(gm)), "script"
        except Exception as script_error:
            try:
                return torch.jit.trace(gm, tuple(example_inputs), check_trace=False), "trace (static shapes)"
            except Exception as e:
                raise BackendError(f"TorchScript can neither script ({_line(script_error)}) nor trace "
                                   f"({_line(e)}) this graph") from e


@torch.jit._script_if_tracing
def expect_shape(x: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """``x``, or an error where its shape is not ``shape``: a static-batch model.pt (a trace, a graph that branches on
    its batch size) run by ``torch.jit.load`` at another batch computed with the example's (0.67 relative off),
    silently; fxforge's own artifact checks its signature, a deployment without fxforge did not. Scripted where it
    is traced (``torch.jit._script_if_tracing``), so a trace keeps the check."""
    if list(x.shape) != shape:
        raise RuntimeError("this model.pt was compiled for input shape " + str(shape) + " only, got " +
                           str(list(x.shape)))
    return x


def _guarded(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` whose tensor inputs pass :func:`expect_shape` with the example's shapes first."""
    gm = copy.deepcopy(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.Tensor):
            # right after its own input: a node between two placeholders (an int8 graph's quantize) may read it
            with gm.graph.inserting_after(node):
                checked = gm.graph.call_function(expect_shape, (node, list(x.shape)))
            node.replace_all_uses_with(checked, delete_user_cb=lambda user, checked=checked: user is not checked)
    gm.recompile()
    return gm


def _frozen(module: torch.jit.ScriptModule, optimize: bool) -> torch.jit.ScriptModule:
    """A frozen copy of ``module`` (``module`` itself stays unfrozen and saveable)."""
    with silenced_warnings():
        frozen = torch.jit.freeze(module.eval())
        return torch.jit.optimize_for_inference(frozen) if optimize else frozen


def _agrees(module: Any, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``module`` computes what ``gm`` does on fresh inputs."""
    inputs = fresh_inputs(example_inputs)
    with torch.no_grad():
        return compare(module(*inputs), gm(*inputs)).max_rel <= EXACT_TOLERANCE


def _keeps_nan(module: Any, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``module`` gives NaN where ``gm`` does when the first value of each float input is NaN:
    ``optimize_for_inference``'s oneDNN conv → relu answered a NaN pixel with ordinary logits where the graph (and
    eager PyTorch) gives NaN, and whether a build did so depended on timing."""
    poisoned = [x.clone() for x in fresh_inputs(example_inputs)]
    for x in _float_inputs(poisoned).values():
        x.view(-1)[0] = float("nan")
    with torch.no_grad():
        try:
            got = module(*poisoned)
        except RuntimeError:
            return False
        return all(torch.equal(a.isnan(), b.isnan()) for a, b in zip(pytree.tree_leaves(got),
                                                                      pytree.tree_leaves(gm(*poisoned)))
                   if isinstance(a, torch.Tensor) and a.is_floating_point())


def _float_inputs(inputs: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    return {i: x for i, x in enumerate(inputs) if x.is_floating_point() and x.numel()}


def _line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
