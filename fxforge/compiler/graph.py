"""Graph surgery shared by every pass: constant tensors behind get_attr nodes, a node's value meta, finalizing,
fusion groups.

The op vocabulary (``aten``, ``is_op``, op families, named arguments) lives in ``compiler/ops.py``."""
from __future__ import annotations

import hashlib
import itertools
import types
from collections import Counter
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .ops import STORAGE_READERS, argument, aten, is_op


def call_nodes(gm: fx.GraphModule, *ops: Any) -> Iterator[fx.Node]:
    """The call_function nodes of ``gm`` calling any of ``ops`` (all of them when none are given)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and (not ops or is_op(node, *ops)):
            yield node


def get_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The constant tensor behind a get_attr node (None for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = _resolve(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def copy_value_meta(dst: fx.Node, src: fx.Node) -> None:
    """Give ``dst`` the meta that describes the value ``src`` gives: the recorded value (a fake tensor: shape and
    dtype, which later rewrites read), its ``tensor_meta`` (which the Shapes analysis reads) and the source line, for
    a node that takes ``src``'s place or gives a value of its shape and dtype. The other keys (module stack, fusion
    tags) describe ``src``'s own op and stay behind."""
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("val", "tensor_meta", "stack_trace")})


class GraphState:
    """What a pass can change of a graph module, recorded cheaply: the graph's text (nodes, targets, arguments) and
    every constant a ``get_attr`` reads, by identity and version (an in-place write bumps a tensor's version). Equal
    states: the same graph computing with the same constants. The versions of the buffers the graph writes itself
    (a forward's ``self.calls.add_(1)``: running the graph bumps them) and of inference tensors (which keep none)
    are not compared, only their identity; nor are writes through ``.data``, which bump no version. The pass
    manager compares the states around a pass that says it changed nothing."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.text = str(gm.graph)
        written = {a.target for n in gm.graph.nodes if n.op == "call_function"
                   and getattr(getattr(n.target, "_schema", None), "is_mutable", False)
                   for a in n.all_input_nodes if a.op == "get_attr"}
        self.constants = [(n.target, t, None if t is None or t.is_inference() or n.target in written else t._version)
                          for n in gm.graph.nodes if n.op == "get_attr" for t in [get_tensor(gm, n)]]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GraphState) and self.text == other.text and len(self.constants) ==
                len(other.constants) and all(a == c and b is d and v == w for (a, b, v), (c, d, w)
                                             in zip(self.constants, other.constants)))

    __hash__ = None  # type: ignore[assignment]


PURE_NAMESPACES = ("aten", "prims", "quantized_decomposed", "fxforge")  # operators their arguments alone decide


def content_key(gm: fx.GraphModule) -> bytes | None:
    """A digest of the graph's text and the values and layout of every constant it reads: equal keys, the same
    computation, for two copies of one graph too (which :class:`GraphState`, comparing constants by identity, tells
    apart). None where the graph's outputs may depend on more than that: it calls submodules, writes its own buffers,
    calls Python functions or a user's custom operator (a closure's or a module's values are not in the text), holds
    tensors in its arguments, or reads a constant's storage beyond its values (``as_strided``)."""
    h = hashlib.blake2b(str(gm.graph).encode(), digest_size=32)
    for n in gm.graph.nodes:
        if n.op == "call_module" or n.op == "call_function" and not _pure(n.target):
            return None
        if n.target in STORAGE_READERS or any(isinstance(a, torch.Tensor)
                                              for a in pytree.tree_leaves((n.args, n.kwargs))):
            return None
        if n.op != "get_attr":
            continue
        t = get_tensor(gm, n)
        if t is None or t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            return None  # a constant whose value is not plain bytes
        h.update(f"{n.target}:{t.dtype}:{tuple(t.shape)}:{t.stride()}:{t.storage_offset()}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def _pure(target: Any) -> bool:
    """A call whose outputs its arguments alone decide: a builtin (``operator.getitem``), or an operator of
    PyTorch's or fxforge's own namespaces that writes none of its arguments (as GraphState reads writes) and draws
    no random numbers (``randn``, ``bernoulli``: a graph of them computes otherwise each run). A user's
    ``torch.library.custom_op`` is an operator too, but its Python body may read state of its own."""
    if isinstance(target, types.BuiltinFunctionType):
        return True
    return isinstance(target, torch._ops.OpOverload) and target.namespace in PURE_NAMESPACES \
        and not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def pure_calls(gm: fx.GraphModule) -> bool:
    """Whether every call of ``gm`` is pure (``_pure``): no submodule, method, Python function or user's custom
    operator, nothing written, nothing random (an attention without dropout is not, though PyTorch tags it random),
    so a node computed again from the same inputs gives the same values and a value computed once may stand in for
    computing it again."""
    return all(n.op in ("placeholder", "get_attr", "output") or n.op == "call_function" and _pure(n.target)
               or is_op(n, aten.scaled_dot_product_attention) and argument(n, "dropout_p") == 0  # seeded by tag
               for n in gm.graph.nodes)


def tensor_uses(gm: fx.GraphModule) -> Counter:
    """Constant target → how many uses it has across the graph (every get_attr of it counted): more than one where
    a module's parameter is read by several calls (a layer called twice, tied weights), which a pass rewriting the
    tensor for one of them must not change for the others."""
    uses: Counter = Counter()
    for n in gm.graph.find_nodes(op="get_attr"):
        uses[n.target] += len(n.users)
    return uses


def readers(gm: fx.GraphModule, node: Any) -> int:
    """How many uses the tensor behind get_attr ``node`` has (as ``tensor_uses`` counts them, for its target only);
    0 for anything else."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return 0
    return sum(len(n.users) for n in _get_attrs(gm, node.target))


def set_tensor(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> None:
    """Replace the tensor behind a get_attr node (a fresh attribute if other nodes share it)."""
    shared = [n for n in _get_attrs(gm, node.target) if n is not node]
    if shared:
        node.target = _fresh_name(gm, node.target)
    _assign(gm, node.target, value)
    node.meta.pop("val", None)
    node.meta.pop("tensor_meta", None)


def add_tensor(gm: fx.GraphModule, before: fx.Node, stem: str, value: torch.Tensor) -> fx.Node:
    """Store ``value`` as a new constant and return a get_attr node for it, inserted before ``before``."""
    name = _fresh_name(gm, stem)
    _assign(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def equal_or_new_tensor(gm: fx.GraphModule, before: fx.Node, stem: str, value: torch.Tensor) -> fx.Node:
    """A get_attr node, inserted before ``before``, for a constant :func:`add_tensor` stored from ``stem`` that equals
    ``value``, else for ``value`` stored anew: what a rewrite derives alike at several call sites of one weight stays
    one tensor. It probes the names that stem gets, not the graph: a scan of every node per call (once per layer)
    grew quadratically (0.07 s at 250 layers, 2.2–3.5 s at 2,000; now 0.09 s there)."""
    for name in _stem_names(stem):  # the names _fresh_name gives the stem, in its order, up to the first free one
        try:
            stored = _resolve(gm, name)
        except AttributeError:
            break
        if isinstance(stored, torch.Tensor) and stored.shape == value.shape and stored.dtype == value.dtype \
                and torch.equal(stored, value):
            with gm.graph.inserting_before(before):
                return gm.graph.get_attr(name)
    return add_tensor(gm, before, stem, value)


def _assign(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    owner_path, _, attr = qualname.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    for store in (owner._parameters, owner._buffers):
        store.pop(attr, None)
    if attr in owner.__dict__:
        delattr(owner, attr)
    if value.is_floating_point():
        owner.register_parameter(attr, torch.nn.Parameter(value.detach(), requires_grad=False))
    else:
        owner.register_buffer(attr, value.detach())


def _resolve(gm: fx.GraphModule, qualname: str) -> Any:
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _get_attrs(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """The get_attr nodes reading ``target`` (the graph indexes its nodes by op, not a get_attr's target)."""
    return [n for n in gm.graph.find_nodes(op="get_attr") if n.target == target]


def _stem_names(stem: str) -> Iterator[str]:
    """The attribute names a constant stored from ``stem`` may get, in order: stem, stem_1, stem_2, ... (dots as
    underscores)."""
    stem = stem.replace(".", "_")
    yield stem
    for i in itertools.count(1):
        yield f"{stem}_{i}"


def _fresh_name(gm: fx.GraphModule, stem: str) -> str:
    for name in _stem_names(stem):
        try:
            _resolve(gm, name)
        except AttributeError:
            return name
    raise AssertionError("unreachable")


def remove_unused_tensors(gm: fx.GraphModule) -> int:
    """Delete parameters and buffers no get_attr node reads; returns how many were removed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = 0
    # every name of a tied tensor: named_parameters() gives one of them, and a dead alias stayed in the module
    for name, _ in list(itertools.chain(gm.named_parameters(remove_duplicate=False),
                                        gm.named_buffers(remove_duplicate=False))):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)
            removed += 1
    return removed


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every constant tensor the graph reads, by attribute name: a tied tensor read under two names is here twice
    (:func:`report.model_size` counts it once)."""
    out: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        t = get_tensor(gm, node)
        if t is not None:
            out[node.target] = t
    return out


def finalize(gm: fx.GraphModule) -> None:
    """Drop dead nodes and unused tensors, check the graph, regenerate code."""
    gm.graph.eliminate_dead_code()
    remove_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()


FUSION_KEY = "fxforge.fusion"  # node.meta key: {"group": id, "pattern": "conv2d+relu"}


def views_as_reshapes(graph: fx.Graph) -> None:
    """Make every ``aten.view`` an ``aten.reshape`` (the same values: reshape is a view wherever one exists), for a
    captured graph, which runs on inputs of other strides than the example's (export turns ``x.reshape(B, -1)`` of a
    contiguous example into a view, which a channels_last input of the same shape cannot take), and for a graph that
    is exported again (eager's save, TVM's import). The re-export decomposes
    ``scaled_dot_product_attention`` into ops whose output strides differ from the fused kernel's, and a later view
    of it (GPT-2's ``Conv1D`` after the attention's transpose, T5's output projection) then has no valid strides:
    "Cannot view a tensor with shape [B, T, C] and strides (C, C·B, 1)", which a reshape copes with by copying."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default


SHIFTS = {aten.__rshift__.Scalar: aten.floor_divide.default, aten.bitwise_right_shift.Tensor_Scalar:
          aten.floor_divide.default, aten.__lshift__.Scalar: aten.mul.Tensor,
          aten.bitwise_left_shift.Tensor_Scalar: aten.mul.Tensor}


def shifts_as_arithmetic(graph: fx.Graph) -> None:
    """Write each shift of an integer tensor by a constant k (``w >> 4`` unpacking 4-bit weights) as the arithmetic it
    is, for backends lacking the op: ``x >> k`` is ``x // 2**k`` (floor division: an arithmetic shift of a negative
    value rounds down as it does), ``x << k`` is ``x * 2**k`` (both wrap modulo 2**bits). TVM's importer has no
    converter for them, and the ONNX exporter's translation of a uint8 shift fails onnx.checker. Only where 2**k
    is a number of the tensor's dtype: 0 ≤ k < bits − 1 when signed, 0 ≤ k < bits when unsigned (uint8's
    ``w >> 7``, a packed bit's unpacking, failed as before otherwise); others stay as they are."""
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in SHIFTS]:
        value, k = argument(node, "self").meta.get("val"), argument(node, "other")
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() or \
                value.dtype == torch.bool or not isinstance(k, int):
            continue
        info = torch.iinfo(value.dtype)
        if not 0 <= k < info.bits - (info.min < 0):  # 2**k a value of the dtype: 128 is a uint8, not an int8
            continue
        node.target, node.args, node.kwargs = SHIFTS[node.target], (argument(node, "self"), 2 ** k), {}


BOOLEAN_ARITHMETIC = {aten.add.Tensor: aten.logical_or.default, aten.mul.Tensor: aten.logical_and.default}
BOOLEAN_EXTREMES = {aten.amax.default: aten.any.dims, aten.amin.default: aten.all.dims}


def boolean_arithmetic_as_logic(graph: fx.Graph) -> None:
    """Write ``m + n`` and ``m * n`` of two bool tensors (masks combined) as the logical or and and they compute in
    PyTorch, and a bool ``amax``/``amin`` along dimensions as ``any``/``all``, for backends whose Add, Mul and
    ReduceMax take no bool (onnx.checker refused the model; TVM's build failed)."""
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in BOOLEAN_ARITHMETIC]:
        a, b = argument(node, "self"), argument(node, "other")
        if all(_is_bool(x) for x in (a, b)) and argument(node, "alpha", 1) == 1:
            node.target, node.args, node.kwargs = BOOLEAN_ARITHMETIC[node.target], (a, b), {}
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in BOOLEAN_EXTREMES]:
        if _is_bool(argument(node, "self")) and argument(node, "dim"):  # no dims: every one, which any.dims is not
            node.target, node.args, node.kwargs = BOOLEAN_EXTREMES[node.target], (
                argument(node, "self"), list(argument(node, "dim")), argument(node, "keepdim")), {}


def _is_bool(x: Any) -> bool:
    return isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor) and x.meta["val"].dtype == torch.bool


def fusion_groups(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Fusion groups tagged by fuse_activation, each in graph order (producer first, activation last)."""
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        tag = node.meta.get(FUSION_KEY)
        if tag:
            groups.setdefault(tag["group"], []).append(node)
    return groups


def inplace_variant(node: fx.Node) -> Any:
    """The in-place overload of an ATen call (``relu`` → ``relu_``), or None if it has none."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet is None:
        return None
    inplace = getattr(aten, packet.__name__ + "_", None)
    return getattr(inplace, node.target._overloadname, None) if inplace is not None else None
