"""The ONNX backend: export the optimized graph to ONNX and run it with ONNX Runtime.

Lowering: a copy of the GraphModule, as an ExportedProgram built from its graph (:func:`_program`, instead of the
exporter's own torch.export of it), goes through ``torch.onnx.export(..., dynamo=True)`` with the batch
dimension dynamic where the Signature says so (without the exporter's re-decomposition where no op needs it, ATen
aliases renamed so that none does (:data:`ALIASES`), nor its type-promotion pass where no node needs a cast, and its
``optimize()`` replaced by a light clean-up outside the transformer path and without quadratic rules inside it: most
of a large model's export time, see :func:`_decomposing_only_when_needed`, :func:`_promoting_only_when_needed`,
:func:`_clean` and :func:`_rewriting_without_multi_output_patterns`), ``onnx.checker`` validates the model, and an ORT
InferenceSession runs it on the target's execution providers (CPU; CUDA for ``target="cuda"`` when this
onnxruntime has it). ``model.onnx`` in the artifact directory is plain, portable ONNX; ORT's graph
optimizations are re-applied when a session is created.

Why the dynamo exporter: the graph is already ATen-level torch.export IR, which is exactly what the dynamo
exporter consumes (it re-exports the GraphModule and translates each ATen op with onnxscript's torchlib).
It keeps ``aten.sym_size`` batch arithmetic symbolic, and it is the only exporter that lowers
``quantized_decomposed.{quantize,dequantize}_per_tensor`` / ``dequantize_per_channel`` with int8 weight
buffers to QuantizeLinear / DequantizeLinear with int8 initializers. The TorchScript exporter
(``dynamo=False``) is deprecated and cannot express that QDQ form.

Fusion groups tagged by ``fuse_activation`` need no special export: they are ordinary Conv/Gemm + Relu/
Clip/Add nodes in ONNX, and ORT's level-"all" optimizations fuse them into one kernel (FusedConv, NCHWc
Conv with an activation). QDQ around a conv/gemm becomes ORT's int8 kernels (QLinearConv, QGemm). Both
are read back from the ORT-optimized model (``SessionOptions.optimized_model_filepath``) and recorded in
``info["ort_fused_kernels"]`` and ``info["ort_int8_ops"]``; the ops ORT still runs in float (in an int8 model: its
float islands) in ``info["ort_float_ops"]``. Global average pooling (``aten.mean`` over the spatial axes) lowers to
GlobalAveragePool, which ORT runs in int8 between Q/DQ (QLinearGlobalAveragePool). On x86 targets an int8 conv whose
input channels are not a multiple of 4 (an RGB stem) gets its uint8 input padded with the zero point and zero weight
columns (exact), so ORT runs it on MLAS's symmetric conv kernel (backends/onnx_int8.py); that uint8 ``Pad`` counts as a
layout op, not a float one.

Option ``fusions`` ("auto", the default; "transformer"; "none"): with "transformer", attention lowers to ORT's
``MultiHeadAttention`` and onnxruntime.transformers' optimizer fuses GELU (on a GPU target also residual
LayerNorms; on CPU the session disables ORT's slower SkipLayerNormalization and BiasGelu fusions, recorded in
``info["ort_options"]["disabled_optimizers"]``; backends/onnx_transformer.py); "auto" chooses it for graphs that
hold an attention. The choice and the fused kernels ORT runs are recorded in ``info["fusions"]`` and
``info["ort_transformer_ops"]``.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxforge.compiler import dynamic_quant, ops
from fxforge.compiler.errors import ANSI, BackendError, TargetError, first_line, missing_dependency
from fxforge.compiler.graph import boolean_arithmetic_as_logic, fusion_groups, get_tensor, shifts_as_arithmetic
from fxforge.compiler.target import Target, host_features, saturates_u8s8
from fxforge.compiler.trace import (EXPORT_LOCK, MAX_BATCH, Signature, batch_dynamic, computed_indices, index_guards,
                                    silenced_warnings)

from . import onnx_int8, onnx_transformer
from .base import INDEX_GUARDS, Artifact, Backend, register_backend, resolved

try:
    import onnx
    import onnxruntime as ort
except ModuleNotFoundError as _e:
    raise missing_dependency(_e.name or "onnxruntime", "onnx", "the onnx backend") from None
if importlib.util.find_spec("onnxscript") is None:
    raise missing_dependency("onnxscript", "onnx", "torch.onnx's dynamo exporter (the onnx backend)")

MODEL_FILE = "model.onnx"
QUIET_RUN = ort.RunOptions()
QUIET_RUN.log_severity_level = 4  # a kernel's failure is raised as a BackendError; ORT need not also log it
EXPORT_OPTIONS = ("opset", "fusions")  # backend options that shape the exported model, not the ORT session
DEFAULT_OPSET = 18
MIN_OPSET = 17
MAX_THREADS = 2 ** 31 - 1  # ORT's SessionOptions hold thread counts as C ints: past it, a pybind11 TypeError
LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
INT8_KERNELS = ("QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                "QAttention", "NhwcMaxPool")  # plus every QLinear* op; ORT's NHWC layout pass makes NhwcMaxPool of
# an 8-bit MaxPool only
CONVERSIONS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
ORT_NODE_FAILURE = re.compile(r"while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.S)
ORT_SOURCE_LOCATION = re.compile(r"^\S+\.(?:cc|h|cpp):\d+ ")  # "/onnxruntime_src/...gather_elements.cc:150 "
LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "ReorderInput", "ReorderOutput", "Pad")


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session options, given as ``fxforge.compile(..., backend="onnx", **options)``.

    ``graph_optimization_level``: "disabled", "basic", "extended" or "all" (ORT's levels: from "extended"
    on, ORT fuses Conv+activation and turns QDQ into int8 kernels; "all" also fuses Conv+Add+Relu in its
    NCHWc layout). ``intra_op_num_threads`` defaults to PyTorch's thread count at compile time (recorded in the
    artifact), so ORT and eager PyTorch run on the same threads; 0 leaves ORT's own default (one per core).
    ``allow_spinning``: ORT's worker threads spin between ops (its default, the lowest latency on idle cores);
    False lets them sleep, which measured 1.15× faster for an int8 MobileNetV2 on 2 cores shared with other jobs
    (docs/benchmarks.md). ``disabled_optimizers``: names of ORT graph optimizers the session must not run
    (``InferenceSession(disabled_optimizers=...)``); the transformer fusions add theirs on CPU
    (:data:`onnx_transformer.CPU_SLOWER_FUSIONS`).
    """

    graph_optimization_level: str = "all"
    intra_op_num_threads: int = field(default_factory=lambda: torch.get_num_threads())
    inter_op_num_threads: int = 0
    allow_spinning: bool = True
    disabled_optimizers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.graph_optimization_level not in LEVELS:
            raise BackendError(f"graph_optimization_level must be one of {', '.join(LEVELS)}, "
                               f"got {self.graph_optimization_level!r}")
        for name in ("intra_op_num_threads", "inter_op_num_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_THREADS:
                raise BackendError(f"{name} must be an int from 0 to {MAX_THREADS} (0: ORT's default), got {value!r}")
        if not isinstance(self.allow_spinning, bool):
            raise BackendError(f"allow_spinning must be True or False, got {self.allow_spinning!r}")
        names = self.disabled_optimizers
        # read twice (compile checks the options, then lowers): an iterator was empty the second time
        names = tuple(names) if isinstance(names, Collection) and not isinstance(names, (str, bytes)) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise BackendError(f"disabled_optimizers must be a sequence of ORT optimizer names, got "
                               f"{self.disabled_optimizers!r}")
        object.__setattr__(self, "disabled_optimizers", names)  # a JSON list when read back from info

    def recorded(self) -> dict[str, Any]:
        """The options as ``info["ort_options"]`` keeps them (JSON types: the optimizer names as a list)."""
        return {**asdict(self), "disabled_optimizers": list(self.disabled_optimizers)}

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = LEVELS[self.graph_optimization_level]
        so.intra_op_num_threads = self.intra_op_num_threads
        so.inter_op_num_threads = self.inter_op_num_threads
        so.log_severity_level = 3  # errors only: ORT's warnings are not the user's concern
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        return so


def _strip_cpp_signature(message: str) -> str:
    """``message`` without a leading C++ function signature ("void onnxruntime::f(const T*, ...) [with T = ...] "),
    the form ORT_ENFORCE puts before its text; other messages unchanged."""
    open_paren = message.find("(")
    if open_paren < 0 or "::" not in message[:open_paren]:
        return message
    depth = 0
    for end, char in enumerate(message[open_paren:], open_paren):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            break
    rest = message[end + 1:].lstrip()
    for qualifier in ("const", "noexcept"):
        rest = rest.removeprefix(qualifier).lstrip()
    if rest.startswith("[with "):
        rest = rest[rest.find("]") + 1:].lstrip()
    return rest or message


class OnnxArtifact(Artifact):
    backend = "onnx"
    files = (MODEL_FILE,)
    owns_outputs = True  # numpy arrays ONNX Runtime allocates for each run
    portable = True  # ONNX Runtime's CPU provider runs it here whatever the target (a cuda one's falls back to it)

    def __init__(self, model: bytes, signature: Signature, target: Target, info: dict[str, Any],
                 session: ort.InferenceSession | None = None) -> None:
        super().__init__(signature, target, info)
        self.model = model
        self.session = session or create_session(model, target, SessionConfig(**info["ort_options"]))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def unrunnable(self) -> str:
        """Where its int8 kernels would saturate 8-bit weights (a model compiled for a VNNI target, run on a CPU
        without: 0.02 relative off on a small CNN, silently), why; else ""."""
        if self.info.get("int8_weight_bits") == 8 and saturates_u8s8(host_features()):
            return (f"this onnx artifact holds 8-bit int8 weights (built for target {self.target.name!r}), and this "
                    "CPU lacks VNNI: ONNX Runtime's uint8 × int8 kernels would sum two products in a saturating int16 "
                    "and compute wrong values; run it on a CPU with VNNI, or compile for this one (target 'x86')")
        return ""

    def run(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """ONNX Runtime's outputs; refused where this CPU cannot compute them right (:meth:`unrunnable`)."""
        if why := self.unrunnable():
            raise TargetError(why)
        feed = {name: resolved(t).cpu().contiguous().numpy() for name, t in zip(self.input_names, inputs)}
        return self.checked_indices(inputs, tuple(torch.from_numpy(out)
                                                  for out in self.session.run(None, feed, QUIET_RUN)))

    def describe_failure(self, e: Exception) -> str:
        """ORT's kernel failures read "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running
        GatherElements node. Name:'node_gather' Status Message: <source file:line> <C++ signature> <cause>": say
        the op, the node and the cause."""
        match = ORT_NODE_FAILURE.search(ANSI.sub("", str(e)))
        if match is None:
            return super().describe_failure(e)
        op, node, message = match.groups()
        return f"{op} node {node!r}: {_strip_cpp_signature(ORT_SOURCE_LOCATION.sub('', message.strip()))}"

    def stored_bytes(self) -> int:
        return len(self.model)

    def write(self, directory: Path) -> None:
        (directory / MODEL_FILE).write_bytes(self.model)

    @classmethod
    def read(cls, directory: Path, signature: Signature, target: Target, info: dict[str, Any]) -> OnnxArtifact:
        return cls((directory / MODEL_FILE).read_bytes(), signature, target, info)


@register_backend
class OnnxBackend(Backend):
    """torch.onnx dynamo export → onnx.checker → ONNX Runtime session with the target's providers."""

    name = "onnx"
    artifact = OnnxArtifact
    folded_biases = True  # ONNX's QuantizeLinear has no int32 grid

    def check_options(self, options: Mapping[str, Any]) -> None:
        _check_opset(options.get("opset", DEFAULT_OPSET))
        _check_fusions(options.get("fusions", "auto"))
        _session_config({k: v for k, v in options.items() if k not in EXPORT_OPTIONS})

    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], signature: Signature,
              target: Target, **options: Any) -> OnnxArtifact:
        wide = _eight_bit_weight(gm)
        if wide is not None and target.saturates_u8s8():  # ORT computed 0.12 relative off on a small CNN
            raise BackendError(f"the onnx backend: node {wide.name!r} reads int8 weights on 8 bits "
                               f"(insert_qdq{{reduce_range=False}}), but target {target.name!r} lacks VNNI: ONNX "
                               "Runtime's uint8 × int8 kernels add two products in a saturating int16 (255 · 127 · 2 "
                               "> 32767) and compute wrong values; drop reduce_range=False (7-bit weights are the "
                               "default there), or compile for a target with VNNI")
        opset = options.pop("opset", DEFAULT_OPSET)
        fusions = onnx_transformer.resolve(_check_fusions(options.pop("fusions", "auto")), gm)
        config = _session_config(options)
        model = export(gm, example_inputs, signature, opset, transformer=fusions == "transformer", target=target)
        failed, fallbacks = None, []
        if fusions == "transformer":
            cpu = providers(target) == ["CPUExecutionProvider"]
            try:
                model = onnx_transformer.optimize(model, cpu=cpu)
            except Exception as e:  # a graph ORT's Python fusions do not expect (seen: a Llama's SiLU MLP)
                failed = f"{type(e).__name__}: {first_line(e)}"
                fallbacks.append(f"onnxruntime.transformers' fusions failed on this model ({failed}); the exported "
                                 "model runs without them (attention stays ORT's MultiHeadAttention)")
            if cpu:
                config = replace(config, disabled_optimizers=tuple(dict.fromkeys(
                    (*config.disabled_optimizers, *onnx_transformer.CPU_SLOWER_FUSIONS))))
        data = model.SerializeToString()
        with tempfile.TemporaryDirectory(prefix="fxforge-ort-") as tmp:
            session = create_session(data, target, config, Path(tmp) / "optimized.onnx")
            optimized = onnx.load(Path(tmp) / "optimized.onnx", load_external_data=False)
        if len(session.get_inputs()) != len(signature.inputs):
            raise BackendError(f"the exported ONNX model takes {len(session.get_inputs())} inputs, the graph "
                               f"{len(signature.inputs)}")
        missing = [p for p in target.ort_providers if p not in session.get_providers()]
        if missing:
            fallbacks.append(f"target {target.name!r}: this onnxruntime lacks {', '.join(missing)}; the artifact "
                             f"runs on {', '.join(session.get_providers())}")
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)  # as exported
        info = {"onnx_file": MODEL_FILE, "exporter": "torch.onnx (dynamo)", "opset": opset,
                "onnx_nodes": len(model.graph.node), "ort_providers": session.get_providers(),
                **({"ort_missing_providers": missing} if missing else {}),
                "ort_options": config.recorded(), "fusion_groups": len(fusion_groups(gm)), "fusions": fusions,
                **({"ort_transformer_optimizer_failed": failed} if failed else {}),
                **({"int8_weight_bits": 8} if wide is not None else {}),  # OnnxArtifact.run checks the CPU
                **ort_kernels(optimized), "ort_transformer_ops": onnx_transformer.transformer_ops(optimized),
                **({INDEX_GUARDS: guards} if (guards := [r.guard() for r in computed_indices(gm)]) else {})}
        artifact = OnnxArtifact(data, signature, target, info, session)
        artifact.fallbacks = tuple(fallbacks)
        return artifact


def _check_opset(opset: Any) -> None:
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise BackendError(f"opset must be an int from {MIN_OPSET} to {newest} (the installed onnx's newest), "
                           f"got {opset!r}")


def _check_fusions(fusions: Any) -> str:
    if fusions not in onnx_transformer.FUSIONS:
        raise BackendError(f"fusions must be one of {', '.join(onnx_transformer.FUSIONS)}, got {fusions!r}")
    return fusions


def _session_config(options: dict[str, Any]) -> SessionConfig:
    valid = {f.name for f in fields(SessionConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise BackendError(f"unknown onnx backend option(s) {', '.join(unknown)}; valid: "
                           f"{', '.join(sorted(valid | set(EXPORT_OPTIONS)))}")
    level = options.get("graph_optimization_level")
    if isinstance(level, ort.GraphOptimizationLevel):  # accept ORT's enum too
        options = {**options, "graph_optimization_level": next(k for k, v in LEVELS.items() if v == level)}
    return SessionConfig(**options)


def _output_names(count: int, inputs: set[str]) -> list[str]:
    """``output`` or ``output_0``, ``output_1``, ... (not the last op's name), with underscores added before the index
    until no input has one of them: a forward argument named ``output`` made the graph fail onnx.checker."""
    stem = "output"
    while True:
        names = [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
        if not inputs & set(names):
            return names
        stem += "_"


def export(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], signature: Signature,
           opset: int = DEFAULT_OPSET, transformer: bool = False, target: Target | None = None) -> onnx.ModelProto:
    """A checked ONNX model of a copy of ``gm`` (the batch dimension dynamic where ``signature`` says so), returning
    the extremes of the indices it computes after its outputs (``trace.index_guards``); with
    ``transformer``, attention becomes ORT's MultiHeadAttention (backends/onnx_transformer.py); for an x86 ``target``,
    int8 convs get the input channels ORT's fastest x86 int8 kernel needs (backends/onnx_int8.py)."""
    _check_opset(opset)
    args, shapes = batch_dynamic(example_inputs, signature.batched())
    # a graph of its own over the same tensors: the rewrites below must not reach gm (they rebind its constants, never
    # write into them), and the exporter never writes into the tensors (a deep copy of efficientnet_v2_s's int8 graph
    # was 1 s of CPU for nothing); the index guards first, on the indices as the model computes them
    own = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="FxforgeGraph")
    index_guards(own)
    shifts_as_arithmetic(own.graph)
    boolean_arithmetic_as_logic(own.graph)
    copied = _distinct_outputs(_unreduced_nll_losses_widened(_cross_entropies_decomposed(
        _global_pools_as_means(_aliases_renamed(own))))).eval()
    names = _output_names(len(ops.graph_outputs(copied.graph)),
                          {n.name for n in gm.graph.find_nodes(op="placeholder")})
    if target is not None:
        onnx_int8.pad_conv_channels(copied, target)
    # the lock first: the others patch process-wide state, which a thread waiting for it would save and restore wrongly
    with EXPORT_LOCK, _quiet(), _decomposing_only_when_needed(), _promoting_only_when_needed(), \
            _rewriting_without_multi_output_patterns():
        try:
            program = torch.onnx.export(_program(copied, args, signature.batched()) or copied, args, dynamo=True,
                                        opset_version=opset, dynamic_shapes=shapes, verbose=False, optimize=transformer, report=False,
                                        output_names=names, custom_translation_table={
                                            **TRANSLATIONS, **(onnx_transformer.TRANSLATIONS if transformer else {})})
        except Exception as e:
            raise lowering_error(e) from None
        if not transformer:
            _clean(program.model)
    model = program.model_proto
    _outputs_in_their_dtypes(model, gm)
    _without_source(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BackendError(f"the exported ONNX model fails onnx.checker: {first_line(e)}") from None
    return model


def _without_source(model: onnx.ModelProto) -> None:
    """Drop what the exporter records of the user's source on each node (the stack trace with file paths and code
    lines, the fx node's name and module path), in place: a deployed file carried the model's code, 40 % of its graph's
    bytes, which running it does not read."""
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""


def _avg_pool2d(self, kernel_size, stride=(), padding=(0, 0), ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    """``avg_pool2d`` with a ``divisor_override`` d as AveragePool counting the padding (the window's sum over its k
    places) × k / d: the exporter's translation dropped d, and the artifact check refused the model, 0.25 off, with
    only a distance. A window that ``ceil_mode`` lets run past the padding has fewer places than k: that pooling
    keeps the exporter's translation and its check."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_avg_pool2d
    if divisor_override is None or ceil_mode:
        return aten_avg_pool2d(self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    mean = aten_avg_pool2d(self, kernel_size, stride, padding, False, True, None)
    places = math.prod(kernel_size) if len(kernel_size) > 1 else kernel_size[0] ** 2
    return op.Mul(mean, op.CastLike(places / divisor_override, self))


# torch dtype → ONNX TensorProto element type, for the outputs' casts
ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6, torch.int64: 7,
              torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


def _outputs_in_their_dtypes(model: onnx.ModelProto, gm: fx.GraphModule) -> None:
    """Cast each output of ``model`` whose type is not the dtype ``gm`` gives it back to that dtype: the exporter
    computes a float16 ``amax``, ``prod`` or ``cumsum`` in float32 and returned it so, a dtype mismatch the artifact
    check refused (the value is PyTorch's, rounded once more to float16 as its kernels round)."""
    leaves = pytree.tree_leaves(gm.graph.output_node().args)
    producers = {name: node for node in model.graph.node for name in node.output}
    for output, leaf in zip(model.graph.output, leaves):
        value = leaf.meta.get("val") if isinstance(leaf, fx.Node) else None
        want = ONNX_TYPES.get(value.dtype) if isinstance(value, torch.Tensor) else None
        tensor_type = output.type.tensor_type
        if want is None or tensor_type.elem_type == want or output.name not in producers:
            continue
        computed = f"{output.name}_computed"
        producer = producers[output.name]
        producer.output[list(producer.output).index(output.name)] = computed
        model.graph.node.append(onnx.helper.make_node("Cast", [computed], [output.name], to=want))
        tensor_type.elem_type = want


def _program(gm: fx.GraphModule, args: Sequence[torch.Tensor], batched: Sequence[bool]) -> Any:
    """``gm`` as the ExportedProgram ``torch.export`` would make of it, built from its graph without a retrace, or
    None where the graph holds something this does not handle (the exporter then captures ``gm`` itself).

    ``gm`` is already what the exporter's capture returns (functional ATen, fxforge's own trace), so the program
    needs only what export adds: constants lifted to inputs (``get_attr`` → placeholder, kept as buffers under their
    attribute names, which become the ONNX initializers' names) and every node's ``meta["val"]`` (passes leave new
    nodes without one), propagated in fake mode with dimension 0 of the ``batched`` inputs one symbol. That is a
    fake-tensor run of the graph instead of ``torch.export``'s trace of it (docs/architecture.md, compile time); the
    artifact check compares ORT's outputs with the graph's and the model's either way. ``gm`` is left as it is."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export import graph_signature as gs
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch.utils._sympy.value_ranges import ValueRanges

    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    graph = gm.graph
    inputs, outputs = list(graph.find_nodes(op="placeholder")), ops.graph_outputs(graph)
    if len(inputs) != len(args) or not all(isinstance(n, fx.Node) for n in outputs) or \
            any(n.op not in ("placeholder", "get_attr", "call_function", "output") for n in graph.nodes):
        return None
    constants = {n: get_tensor(gm, n) for n in graph.find_nodes(op="get_attr")}
    if any(value is None for value in constants.values()):
        return None  # a subgraph of a higher-order op: export's own capture handles it
    lifted: dict[str, fx.Node] = {}
    state: dict[str, torch.Tensor] = {}
    used = {n.target for n in inputs}
    for node, value in constants.items():
        if node.target not in lifted:
            # an argument name of the generated forward: a module named "block1-0" (torchvision's RegNet) gave
            # "c_block1-0_weight", a SyntaxError; names that then coincide get a suffix
            name = "c_" + re.sub(r"\W", "_", node.target)
            while name in used:
                name += "_"
            used.add(name)
            with graph.inserting_before(inputs[0] if inputs else None):
                lifted[node.target] = graph.placeholder(name)
            state[node.target] = value.detach()
        node.replace_all_uses_with(lifted[node.target])
        graph.erase_node(node)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = [StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if b and i == 0 else DimDynamic.STATIC
                                                       for i in range(t.dim())]) for t, b in zip(args, batched)]
    fakes = [mode.from_tensor(t, static_shapes=True) for t in state.values()] + \
            [mode.from_tensor(t, symbolic_context=c, source=ConstantSource(n.name))
             for t, c, n in zip(args, dynamic, inputs)]
    graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    try:
        with enable_python_dispatcher():  # the Python meta kernels, as export's trace uses (the C++ one of
            # constant_pad_nd reads concrete sizes and would fix the batch)
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception:  # an op without a fake kernel, a guard on the batch: export's own capture says what it is
        return None
    input_specs = [gs.InputSpec(gs.InputKind.BUFFER, gs.TensorArgument(n.name), target=t, persistent=True)
                   for t, n in lifted.items()] + \
                  [gs.InputSpec(gs.InputKind.USER_INPUT, gs.TensorArgument(n.name), target=None) for n in inputs]
    output_specs = [gs.OutputSpec(gs.OutputKind.USER_OUTPUT, gs.TensorArgument(n.name), target=None)
                    for n in outputs]
    symbols = {d.node.expr for f in fakes[len(state):] for d in f.shape if isinstance(d, torch.SymInt)}
    if not all(isinstance(s, sympy.Symbol) for s in symbols):
        return None  # an op's fake kernel fixed the batch: export's capture says whether it must
    ranges = {s: ValueRanges(1, MAX_BATCH) for s in symbols}
    call = ModuleCallSignature(inputs=[], outputs=[], in_spec=pytree.tree_structure((tuple(args), {})),
                               out_spec=pytree.tree_structure(tuple(outputs)))
    try:
        return torch.export.ExportedProgram(root=gm, graph=graph, graph_signature=gs.ExportGraphSignature(
            input_specs, output_specs), state_dict=state, range_constraints=ranges,
            module_call_graph=[ModuleCallEntry("", call)])
    except Exception:  # export's verifier refuses it (an op it does not allow): export's own capture says why
        return None


def _distinct_outputs(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each output after the first that is the same node as an earlier one (a tensor returned twice)
    computed by an identity of its own, in place: one value as two graph outputs carried one name twice, and the
    names given for them (``output_0``) were not in the model, so a plain ONNX Runtime user could not fetch them."""
    output = gm.graph.output_node()
    seen: set[fx.Node] = set()
    values = []
    for value in ops.graph_outputs(gm.graph):
        if isinstance(value, fx.Node) and value in seen:
            with gm.graph.inserting_before(output):
                copied = gm.graph.call_function(torch.ops.aten.alias_copy.default, (value,))
            copied.meta.update(value.meta)
            value = copied
        seen.add(value)
        values.append(value)
    ops.set_graph_outputs(gm.graph, values)
    gm.recompile()
    return gm


# ATen ops whose decomposition is one other op on the same arguments, which ONNX translates: ``mask & causal``
# (``__and__.Tensor``) in the attention masks of every transformers text model, ``min.other`` in T5's
ALIASES = {torch.ops.aten.__and__.Tensor: torch.ops.aten.bitwise_and.Tensor,
           torch.ops.aten.__and__.Scalar: torch.ops.aten.bitwise_and.Scalar,
           torch.ops.aten.__or__.Tensor: torch.ops.aten.bitwise_or.Tensor,
           torch.ops.aten.__or__.Scalar: torch.ops.aten.bitwise_or.Scalar,
           torch.ops.aten.__xor__.Tensor: torch.ops.aten.bitwise_xor.Tensor,
           torch.ops.aten.__xor__.Scalar: torch.ops.aten.bitwise_xor.Scalar,
           torch.ops.aten.min.other: torch.ops.aten.minimum.default,
           torch.ops.aten.max.other: torch.ops.aten.maximum.default}


def _aliases_renamed(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each op of :data:`ALIASES` called by the name its decomposition gives it, in place: one such op
    made the exporter re-decompose the whole graph (:func:`_decomposing_only_when_needed`): with
    :func:`_rewriting_without_multi_output_patterns`, half the CPU time of a 24-layer BERT's int8 compile
    (docs/architecture.md, compile time)."""
    for alias, name in ALIASES.items():
        for node in gm.graph.find_nodes(op="call_function", target=alias):
            node.target = name
    gm.recompile()
    return gm


def _global_pools_as_means(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each ``adaptive_avg_pool2d(x, 1)`` as ``mean(x, [-2, -1], keepdim=True)``, in place: what the
    exporter's decomposition makes of it (ONNX has no adaptive pooling), done here so that a CNN's graph needs no
    decomposition at all (:func:`_decomposing_only_when_needed`); ``_mean_dim`` then lowers it to GlobalAveragePool."""
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.adaptive_avg_pool2d.default):
        if list(ops.argument(node, "output_size")) == [1, 1]:
            node.target, node.args, node.kwargs = torch.ops.aten.mean.dim, (ops.data(node), [-2, -1], True), {}
    gm.recompile()
    return gm


def _cross_entropies_decomposed(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each cross-entropy that ONNX's SoftmaxCrossEntropyLoss cannot express written as what torch
    computes, in place: the exporter translates ``cross_entropy_loss`` to that op, whose labels are class indices
    and which has no label smoothing, so a target of class probabilities failed onnx.checker and a smoothing was
    dropped (a loss 0.148 off, accepted within an int8 graph's tolerance). With C classes along dimension d (1, or 0
    for an unbatched input), weights w, smoothing ε and log-probabilities l = log_softmax(x):

        probabilities p:  ℓ = −Σ_c w_c · ((1 − ε) p_c + ε / C) · l_c          mean: over every sample and position
        class labels y:   (1 − ε) · CE(x, y) + ε / C · s,  s = −Σ_c w_c l_c, 0 where y is the ignore_index
                          mean: Σ s / Σ w_y over the labels not ignored (Σ 1 without weights), as nll_loss's mean

    (aten/src/ATen/native/LossNLL.cpp, ``cross_entropy_loss_prob_target`` and ``..._label_smoothing``), the CE
    term keeping the exporter's translation."""
    aten = torch.ops.aten
    graph = gm.graph

    def call(op: Any, *args: Any) -> fx.Node:
        return graph.call_function(op, args)

    for node in graph.find_nodes(op="call_function", target=aten.cross_entropy_loss.default):
        target, x, weight = (ops.argument(node, k) for k in ("target", "self", "weight"))
        smoothing, reduction, ignore = (ops.argument(node, k) for k in ("label_smoothing", "reduction", "ignore_index"))
        value = target.meta.get("val") if isinstance(target, fx.Node) else None
        probabilities = isinstance(value, torch.Tensor) and value.is_floating_point()
        if not (probabilities or smoothing) or not isinstance(x.meta.get("val"), torch.Tensor):
            continue
        rank = x.meta["val"].dim()
        dim = 1 if rank > 1 else 0
        classes = x.meta["val"].shape[dim]
        with graph.inserting_before(node):
            terms = call(aten._log_softmax.default, x, dim, False)
            if weight is not None:
                broadcast = [classes] + [1] * (rank - dim - 1)
                terms = call(aten.mul.Tensor, terms, call(aten.view.default, weight, broadcast))
            if probabilities:
                if smoothing:
                    target = call(aten.add.Scalar, call(aten.mul.Tensor, target, 1.0 - smoothing), smoothing / classes)
                per_sample = call(aten.neg.default, call(aten.sum.dim_IntList, call(aten.mul.Tensor, terms, target),
                                                         [dim]))
                loss = per_sample if reduction == 0 else call(
                    aten.mean.default if reduction == 1 else aten.sum.default, per_sample)
            else:
                ignored = call(aten.eq.Scalar, target, ignore)
                smooth = call(aten.where.ScalarSelf, ignored, 0.0,
                              call(aten.neg.default, call(aten.sum.dim_IntList, terms, [dim])))
                if reduction == 0:
                    spread = smooth
                elif reduction == 2:
                    spread = call(aten.sum.default, smooth)
                else:
                    counted = call(aten.logical_not.default, ignored)
                    if weight is not None:  # the label's weight; an ignored label reads class 0, then counts 0
                        counted = call(aten.mul.Tensor, call(aten.reshape.default, counted, [-1]), call(
                            aten.index_select.default, weight, 0, call(aten.reshape.default, call(
                                aten.where.ScalarSelf, ignored, 0, target), [-1])))
                    spread = call(aten.div.Tensor, call(aten.sum.default, smooth), call(aten.sum.default, counted))
                plain = call(aten.cross_entropy_loss.default, x, target, weight, reduction, ignore, 0.0)
                loss = call(aten.add.Tensor, call(aten.mul.Tensor, plain, 1.0 - smoothing),
                            call(aten.mul.Tensor, spread, smoothing / classes))
        node.replace_all_uses_with(loss)
        graph.erase_node(node)
    gm.recompile()
    return gm


def _unreduced_nll_losses_widened(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each unreduced nll_loss of N × C log-probabilities computed on N × C × 1 (the labels N × 1) and
    squeezed back, in place: the same numbers, and the exporter's translation of the 2-D form declared a 0-d output
    that onnx.checker refused ("Inferred shape and existing shape differ in rank: (1) vs (0)"), a valid model."""
    aten, graph, widened = torch.ops.aten, gm.graph, 0
    for node in [*graph.find_nodes(op="call_function", target=aten.nll_loss_nd.default),
                 *graph.find_nodes(op="call_function", target=aten.nll_loss.default)]:
        x = ops.argument(node, "self")
        value = x.meta.get("val") if isinstance(x, fx.Node) else None
        if ops.argument(node, "reduction") != 0 or not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        with graph.inserting_before(node):
            wide = graph.call_function(node.target, (
                graph.call_function(aten.unsqueeze.default, (x, -1)),
                graph.call_function(aten.unsqueeze.default, (ops.argument(node, "target"), -1)),
                ops.argument(node, "weight"), 0, ops.argument(node, "ignore_index")))
            loss = graph.call_function(aten.squeeze.dim, (wide, -1))
        node.replace_all_uses_with(loss)
        graph.erase_node(node)
        widened += 1
    if widened:  # (every export passes here: no regenerated code for graphs without one)
        gm.recompile()
    return gm


@contextlib.contextmanager
def _decomposing_only_when_needed() -> Iterator[None]:
    """Within it, torch.onnx's exporter re-decomposes its capture only when an op in it has no ONNX translation.

    The exporter always runs ``ExportedProgram.run_decompositions`` with the decompositions of the ops it cannot
    translate; that retraces every op with symbolic shapes even when there is nothing to decompose, which is the rule
    for fxforge's graphs (ATen-level already): 18–25 s of CPU of the 38–47 s export of efficientnet_v2_s's int8
    graph (docs/architecture.md, compile time). The graph it would return is the one it was given, so it is skipped
    when every op of the capture is translatable (a higher-order op counts as not). This patches the exporter's
    private step (``torch.onnx._internal.exporter._fx_passes.decompose_with_registry`` in torch 2.14) for the
    duration; where that step is absent or named otherwise, the exporter runs as it is."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
        decompose = _fx_passes.decompose_with_registry
        implemented = _decomp.get_onnx_implemented_overloads
    except (ImportError, AttributeError):
        yield
        return

    def only_when_needed(program: torch.export.ExportedProgram, registry: Any) -> torch.export.ExportedProgram:
        translatable = set(implemented(registry))
        if all(n.target in translatable for n in program.graph.nodes
               if n.op == "call_function" and isinstance(n.target, torch._ops.OperatorBase)):  # not operator.*
            return program
        return decompose(program, registry)

    _fx_passes.decompose_with_registry = only_when_needed
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = decompose


@contextlib.contextmanager
def _rewriting_without_multi_output_patterns() -> Iterator[None]:
    """Within it, the exporter's ``optimize()`` (which the transformer path keeps, see :func:`_clean`) leaves out
    onnxscript's rewrite rules whose pattern ends in more than one node (``SlicesSplit``: two Slices into a Split).
    onnxscript matches those by trying every pair of (the first output's op, any node of the graph), rebuilding an
    op index of the whole graph for each try: quadratic, a third of a 24-layer BERT int8 graph's backend, and
    minutes at 100 layers (docs/architecture.md, compile time). ORT's and
    onnxruntime.transformers' fusions need no Split there (the census tests of tests/backends/test_onnx_transformer.py).
    This patches onnxscript's private rule list for the duration; where it is absent, ``optimize()`` runs as it is."""
    try:
        from onnxscript import rewriter
        rules = rewriter._DEFAULT_REWRITE_RULES
        single = tuple(r for r in rules if r._target_pattern.has_single_output_node)
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = single
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


@contextlib.contextmanager
def _promoting_only_when_needed() -> Iterator[None]:
    """Within it, torch.onnx's exporter runs its type-promotion pass only when a node of its capture needs a cast.

    The pass (``_fx_passes.insert_type_promotion_nodes``) re-runs every node of the graph in fake mode to find the
    nodes whose inputs' dtypes differ from what the op's promotion rule asks (an integer tensor added to a float one,
    a Python float times a float32 tensor) and casts those inputs: 2.7 s of CPU of the 19.5 s export of
    efficientnet_v2_s's int8 graph, in which no node needs a cast (docs/architecture.md, compile time). The rule's
    verdict needs only each input's dtype, which ``meta["val"]`` of every node of the capture holds, so a look at
    them decides (9 ms there); when a node would be cast, or an input's dtype is unknown, the pass runs as it is.
    A Python int the rule wants as a float (``ne.Scalar(x, 0)`` of a float ``x``: swin_t's attention mask) is
    written as that float in the exporter's copy of the graph instead, which is what the pass would make of it (a
    float scalar tensor; same value, same op): it spared swin_t's int8 export a 2–4 s pass for 12 such nodes.
    Like :func:`_decomposing_only_when_needed`, this patches the exporter's private step for the duration."""
    try:
        from torch.onnx._internal.exporter import _fx_passes
        from torch.onnx._internal.fx import type_utils
        from torch.onnx._internal.fx.passes import type_promotion
        promote = _fx_passes.insert_type_promotion_nodes
        table = type_promotion.TypePromotionTable()
    except (ImportError, AttributeError):
        yield
        return

    def casts(value: Any, dtype: torch.dtype | None) -> bool:
        """Would the pass cast this input (a node's ``meta["val"]``, or a Python number) to ``dtype``?"""
        if dtype is None:
            return False
        if isinstance(value, (tuple, list)):
            return any(casts(v, dtype) for v in value)
        current = value.dtype if isinstance(value, torch.Tensor) else \
            type_utils.from_scalar_type_to_torch_dtype(type(value))
        return current != dtype  # an unknown dtype (None) counts as a cast: the pass decides

    def as_float(node: torch.fx.Node, key: int | str, value: Any, dtype: torch.dtype | None) -> bool:
        """A Python int argument the rule wants as a floating ``dtype``, rewritten as a float: True if it was."""
        if type(value) is not int or dtype is None or not dtype.is_floating_point:
            return False
        if isinstance(key, int):
            node.update_arg(key, float(value))
        else:
            node.update_kwarg(key, float(value))
        return True

    def needed(graph_module: torch.fx.GraphModule) -> bool:
        for module in graph_module.modules():
            if not isinstance(module, torch.fx.GraphModule):
                return True  # the pass names what it cannot handle
            for node in module.graph.nodes:
                rule = type_promotion.get_type_promotion_rule(node, table) if node.op == "call_function" else None
                if rule is None:
                    continue
                args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
                try:
                    wanted = rule.preview_type_promotion(args, kwargs)
                except Exception:
                    return True
                given = [*((i, a, wanted.args_dtypes.get(i)) for i, a in enumerate(args)),
                         *((k, v, wanted.kwargs_dtypes.get(k)) for k, v in kwargs.items())]
                cast = [(key, value, dtype) for key, value, dtype in given if casts(value, dtype)]
                if not all([as_float(node, key, value, dtype) for key, value, dtype in cast]):
                    return True
        return False

    def only_when_needed(graph_module: torch.fx.GraphModule) -> None:
        if needed(graph_module):
            promote(graph_module)

    _fx_passes.insert_type_promotion_nodes = only_when_needed
    try:
        yield
    finally:
        _fx_passes.insert_type_promotion_nodes = promote


def _clean(model: Any) -> None:
    """The exporter's ONNX made plain, in place, instead of its ``optimize()``: constants folded, a Reshape's target
    shape built from ``Shape`` of the dynamic batch made a constant (``0``/``-1``) where it can be, unused nodes
    removed. ``optimize()`` also runs onnxscript's general rewrite rules twice over the graph: 12–19 s of CPU for
    efficientnet_v2_s's int8 graph (docs/architecture.md, compile time), for rewrites (BN and Pad into Conv, no-op
    casts, Min/Max to Clip...) that ORT's own optimizations make when the session is built; ORT makes the same int8
    kernels of the QDQ either way (the census tests in tests/backends/test_onnx.py). The transformer path keeps
    ``optimize()``: onnxruntime.transformers' optimizer matches its patterns on that graph, and fails the checker
    without it (BERT)."""
    import onnxscript
    from onnxscript.rewriter.rules.common import materialize_reshape_shape_rule
    onnxscript.optimizer.fold_constants(model)
    onnxscript.rewriter.rewrite(model, [materialize_reshape_shape_rule])
    onnxscript.optimizer.remove_unused_nodes(model)


def _eight_bit_weight(gm: fx.GraphModule) -> fx.Node | None:
    """The first layer whose int8 weight uses more than 7 bits (a value outside [−64, 63]): a conv or linear reading
    its weight through a dequantize of a folded int8 constant, or a dynamic linear."""
    for n in gm.graph.nodes:
        if ops.is_op(n, dynamic_quant.DYNAMIC_LINEAR):
            w = get_tensor(gm, ops.weight_of(n))
        elif ops.is_op(n, *ops.WEIGHTED) and ops.is_op(ops.weight_of(n), *ops.DEQUANTIZE):
            w = get_tensor(gm, ops.data(ops.weight_of(n)))
        else:
            continue
        if w is not None and w.dtype == torch.int8 and w.numel() and (int(w.max()) > 63 or int(w.min()) < -64):
            return n
    return None


def _dynamic_linear(x, weight, weight_scale, bias=None, lower_bound=None):
    """``fxforge::dynamic_linear`` in ONNX: per-row int8 quantization (with a ``lower_bound`` m: x − m on the unsigned
    grid), MatMulInteger (ORT's integer GEMM), rescale, + m · Σ_k W_q · s_w (a constant) + b."""
    from onnxscript import opset18 as op
    from onnxscript import ir
    import numpy as np
    last = op.Constant(value_ints=[-1])
    if lower_bound is None:
        row_max, qmin, qmax, offset = (op.ReduceMax(op.Abs(x), last, keepdims=1), -dynamic_quant.QMAX,
                                       dynamic_quant.QMAX, 128)
    else:
        x = op.Sub(x, op.Constant(value_float=float(lower_bound)))
        row_max, qmin, qmax, offset = op.ReduceMax(x, last, keepdims=1), 0, dynamic_quant.UQMAX, 0
    scale = op.Div(op.Max(row_max, op.Constant(value_float=dynamic_quant.EPS)), op.Constant(value_float=float(qmax)))
    q = op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax)))
    # symmetric: shifted to uint8 with zero point 128 (the same integers): ORT's u8s8 GEMM is its fast path
    shifted = op.Cast(op.Add(q, op.Constant(value_float=float(offset))), to=ir.DataType.UINT8)
    zero = op.Constant(value=ir.tensor(np.array(offset, dtype=np.uint8)))
    acc = op.MatMulInteger(shifted, op.Transpose(weight, perm=[1, 0]), zero)
    # the per-column scale first, the per-row one last: ORT (1.32) fuses MatMulInteger → Cast → Mul(s_r · s_w) into
    # MatMulIntegerToFloat and gets rows wrong where one quantized input feeds several MatMulIntegers (MiniLM's
    # query/key/value: min cosine 0.53 against 0.996 unfused); this order keeps its integer GEMM and its answer
    y = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), weight_scale), scale)
    if lower_bound is not None:
        bias = onnx_transformer.shifted_bias(weight, weight_scale, bias, lower_bound)
    return y if bias is None else op.Add(y, bias)


def _mean_dim(self, dim, keepdim=False, dtype=None):
    """``aten.mean.dim`` over both spatial axes of an NCHW tensor (global average pooling, what
    adaptive_avg_pool2d(1) becomes) as GlobalAveragePool, which ORT fuses with the Q/DQ around it into
    QLinearGlobalAveragePool (int8, channels-last); ReduceMean, the exporter's own lowering, stays float between a
    DequantizeLinear and a QuantizeLinear. Other means (a norm's mean over the last axis of [B, T, H] included, which
    ORT's LayerNorm fusions look for as ReduceMean) go to the exporter's lowering, given ``self`` already in
    ``dtype``: the lowering casts the mean, so an integer tensor's float mean was an integer mean (2.0 for 2.5)."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_mean_dim
    rank = len(self.shape) if self.shape is not None else 0
    if dtype is None and rank == 4 and dim and sorted(d % rank for d in dim) == [2, 3]:
        pooled = op.GlobalAveragePool(self)
        return pooled if keepdim else op.Squeeze(pooled, op.Constant(value_ints=[2, 3]))
    if dtype is None or dtype == -1 or rank == 0:
        return aten_mean_dim(self, dim, keepdim, dtype)
    cast = op.Cast(self, to=dtype)  # as PyTorch computes it, and as the exporter's own aten.mean does
    return op.ReduceMean(cast, op.Constant(value_ints=list(dim)), keepdims=keepdim) if dim else \
        op.ReduceMean(cast, keepdims=keepdim)


def _div_mode(self, other, rounding_mode=None):
    """``aten.div`` with a rounding mode. On integers, in integer arithmetic: ``trunc`` as ONNX's integer Div (it
    truncates, as C does), ``floor`` as :func:`_floor_divide`; the exporter's own lowering divides in float32, which
    rounds every integer above 2^24 ((2^40 + 3) // 3 came back 10922 off). Division by zero then fails in ONNX Runtime
    ("Integer division by zero") as it raises in eager, instead of giving INT64_MIN. Floats and true division go to
    the exporter's lowering."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_div_mode
    if self.dtype.is_integer() and rounding_mode == "trunc":
        return _truncated_quotient(self, op.CastLike(other, self))
    if self.dtype.is_integer() and rounding_mode == "floor":
        return _floor_divide(self, other)
    return aten_div_mode(self, other, rounding_mode)


def _floor_divide(self, other):
    """``a // b``: on integers the truncating Div minus 1 where the remainder is non-zero and its sign differs from
    b's, every constant in a's type (the exporter's lowering compares an int32 b with an int64 0, which onnx.checker
    refuses); floats to the exporter's lowering."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_floor_divide
    if not self.dtype.is_integer():
        return aten_floor_divide(self, other)
    other = op.CastLike(other, self)  # a Python number in the Scalar overloads
    zero = op.CastLike(0, self)
    quotient = _truncated_quotient(self, other)
    remainder = op.Sub(self, op.Mul(quotient, other))
    offset = op.And(op.Not(op.Equal(remainder, zero)), op.Xor(op.Less(remainder, zero), op.Less(other, zero)))
    return op.Sub(quotient, op.CastLike(offset, self))


def _truncated_quotient(self, other):
    """Integer ``a / b`` truncated, as ONNX's Div computes it, except where a signed b is −1: there −a, wrapping at
    the lowest value as eager's ``//`` does. ONNX Runtime's int64 Div of the lowest value by −1 overflows and kills
    the process (SIGFPE)."""
    from onnxscript import opset18 as op
    if not self.dtype.is_signed():
        return op.Div(self, other)
    minus_one = op.Equal(other, op.CastLike(-1, self))
    return op.Where(minus_one, op.Neg(self), op.Div(self, op.Where(minus_one, op.CastLike(1, self), other)))


def _pow_tensor_scalar(self, exponent):
    """``x ** n`` of an int32/int64 tensor by a non-negative integer as products (squaring), which wrap as eager's
    do: the exporter's ``Pow(int64, int64)`` ran in float64 in ONNX Runtime (5 ** 27 off by 99, an overflow
    INT64_MIN). Other powers go to the exporter's lowering."""
    from onnxscript import ir, opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_pow_tensor_scalar
    if not (self.dtype in (ir.DataType.INT32, ir.DataType.INT64) and isinstance(exponent, int) and exponent >= 0):
        return aten_pow_tensor_scalar(self, exponent)
    result, square = None, self
    while exponent:
        if exponent & 1:
            result = square if result is None else op.Mul(result, square)
        exponent >>= 1
        if exponent:
            square = op.Mul(square, square)
    return op.Expand(op.CastLike(1, self), op.Shape(self)) if result is None else result


def _clamp(self, min=None, max=None):
    """``aten.clamp`` with one bound: on floats the other bound is ±inf. The exporter's lowering leaves it out of the
    Clip, and ONNX Runtime's Clip then clamps to the largest finite float: ``clamp(inf, min=0)`` gave 3.4e38."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_clamp
    if self.dtype.is_floating_point() and (min is None) != (max is None):
        min, max = (-math.inf if min is None else min), (math.inf if max is None else max)
    return aten_clamp(self, min, max)


def _clamp_min(self, min_):
    """``aten.clamp_min`` (a number or a 0-d tensor) as :func:`_clamp` with only a lower bound; a tensor bound of any
    rank as Max, which keeps infinities."""
    from onnxscript import opset18 as op
    if isinstance(min_, (int, float)):
        return _clamp(self, min_, None)
    return op.Max(self, op.CastLike(min_, self))


def _clamp_max(self, max_):
    """``aten.clamp_max``, as :func:`_clamp_min` with an upper bound."""
    from onnxscript import opset18 as op
    if isinstance(max_, (int, float)):
        return _clamp(self, None, max_)
    return op.Min(self, op.CastLike(max_, self))


def _sign(self):
    """``aten.sign``: 0 at NaN, as PyTorch gives it; ONNX's Sign gave NaN there."""
    from onnxscript import opset18 as op
    if not self.dtype.is_floating_point():
        return op.Sign(self)
    return op.Where(op.IsNaN(self), op.CastLike(op.Constant(value_float=0.0), self), op.Sign(self))


def _log_sigmoid(self):
    """``log σ(x) = min(x, 0) − softplus(−|x|)``: exact in float32 for every x. The exporter's Log(Sigmoid(x))
    underflows to −inf below x ≈ −88, where log σ(x) ≈ x."""
    from onnxscript import opset18 as op
    return op.Sub(op.Min(self, op.CastLike(0, self)), op.Softplus(op.Neg(op.Abs(self))))


def _logaddexp(self, other):
    """``log(eᵃ + eᵇ) = max(a, b) + softplus(−|a − b|)``: the exporter's Log(Exp(a) + Exp(b)) overflowed to ±inf
    beyond |x| ≈ 89 in float32 (710 in float64), where the result is about max(a, b). Where a = b (±inf included,
    whose difference is NaN) it is a + log 2."""
    from onnxscript import opset18 as op
    general = op.Add(op.Max(self, other), op.Softplus(op.Neg(op.Abs(op.Sub(self, other)))))
    return op.Where(op.Equal(self, other), op.Add(self, op.CastLike(math.log(2.0), self)), general)


def _logsumexp(self, dim, keepdim=False):
    """``m + log Σ exp(x − m)``, m the maximum over ``dim`` (0 where it is infinite, as PyTorch's kernel takes it):
    ORT's float16 ReduceLogSumExp overflowed to inf for values near 1000 (eager: finite)."""
    from onnxscript import opset18 as op
    axes = op.Constant(value_ints=list(dim)) if dim else None
    peak = op.ReduceMax(self, axes, keepdims=1)
    peak = op.Where(op.Less(op.Abs(peak), op.CastLike(math.inf, self)), peak, op.CastLike(0, self))  # IsInf: no half
    total = op.ReduceSum(op.Exp(op.Sub(self, peak)), axes, keepdims=1 if keepdim else 0)
    return op.Add(op.Log(total), peak if keepdim else op.ReduceMax(peak, axes, keepdims=0))


TRANSLATIONS = {dynamic_quant.DYNAMIC_LINEAR: _dynamic_linear, torch.ops.aten.mean.dim: _mean_dim,
                torch.ops.aten.div.Tensor_mode: _div_mode, torch.ops.aten.div.Scalar_mode: _div_mode,
                torch.ops.aten.floor_divide.default: _floor_divide, torch.ops.aten.clamp.default: _clamp,
                torch.ops.aten.log_sigmoid.default: _log_sigmoid, torch.ops.aten.clamp_min.default: _clamp_min,
                torch.ops.aten.clamp_min.Tensor: _clamp_min, torch.ops.aten.clamp_max.default: _clamp_max,
                torch.ops.aten.clamp_max.Tensor: _clamp_max, torch.ops.aten.logaddexp.default: _logaddexp,
                torch.ops.aten.logsumexp.default: _logsumexp, torch.ops.aten.avg_pool2d.default: _avg_pool2d,
                torch.ops.aten.pow.Tensor_Scalar: _pow_tensor_scalar, torch.ops.aten.sign.default: _sign}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter warns (and logs) about internals; an export either works or becomes a BackendError."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with silenced_warnings():
            yield
    finally:
        logger.setLevel(level)


_NODE = re.compile(r"translating node %(\w+) .*?target=([\w.:]+)")
_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='(\w+)'\)>")


def lowering_error(e: BaseException) -> BackendError:
    """A BackendError naming the op and node the exporter could not lower (from its error chain)."""
    text = "\n".join(ANSI.sub("", str(x)) for x in _chain(e))
    node = _NODE.search(text)
    missing = _NO_FUNCTION.search(text)
    if missing:
        op = f"{missing.group(1)}.{missing.group(2)}"
        where = f" at node {node.group(1)!r}" if node else ""
        return BackendError(f"the ONNX exporter cannot lower op {op}{where}: no ONNX translation is registered "
                            f"for it (torch.onnx custom_translation_table can add one)")
    if node:
        reason = first_line(_chain(e)[-1])
        return BackendError(f"the ONNX exporter failed on node {node.group(1)!r} (op {node.group(2)}): {reason}")
    return BackendError(f"the ONNX exporter failed: {first_line(_chain(e)[-1])}")


def _chain(e: BaseException) -> list[BaseException]:
    out = [e]
    while out[-1].__cause__ is not None and len(out) < 16:
        out.append(out[-1].__cause__)
    return out


def providers(target: Target) -> list[str]:
    """The target's ORT execution providers that this onnxruntime has (CPU is always there)."""
    available = set(ort.get_available_providers())
    chosen = [p for p in target.ort_providers if p in available]
    return chosen or ["CPUExecutionProvider"]


def create_session(model: bytes, target: Target, config: SessionConfig,
                   optimized_path: Path | None = None) -> ort.InferenceSession:
    """An InferenceSession for ``model``; ORT writes the model as it optimized it to ``optimized_path``."""
    so = config.session_options()
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(model, so, providers=providers(target),
                                    disabled_optimizers=list(config.disabled_optimizers))
    except Exception as e:  # e.g. no kernel for an op at this dtype (bfloat16 Gemm on CPU)
        reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(e))
        raise BackendError(f"ONNX Runtime cannot run the exported model on {', '.join(providers(target))}: "
                           f"{reason}") from None


def ort_kernels(optimized: onnx.ModelProto) -> dict[str, Any]:
    """What ORT made of the graph: kernels with a fused activation epilogue, int8 kernels by op type, and the
    float ones (every other op but quantize/dequantize and layout moves): an int8 model's float islands."""
    nodes = optimized.graph.node
    int8 = Counter(n.op_type for n in nodes if is_int8_kernel(n.op_type))
    floats = Counter(n.op_type for n in nodes
                     if not is_int8_kernel(n.op_type) and n.op_type not in (*CONVERSIONS, *LAYOUT_OPS))
    return {"ort_fused_kernels": sum(1 for n in nodes if any(a.name == "activation" for a in n.attribute)),
            "ort_int8_ops": dict(sorted(int8.items())), "ort_float_ops": dict(sorted(floats.items()))}


def is_int8_kernel(op_type: str) -> bool:
    """An ORT kernel computing in int8/uint8 (what QDQ around conv/gemm/add becomes)."""
    return op_type.startswith("QLinear") or op_type in INT8_KERNELS
