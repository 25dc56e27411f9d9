"""The ATen op vocabulary passes speak: op families, and arguments read and written by name.

An op family is a tuple of overload packets (``aten.conv2d`` matches ``aten.conv2d.default`` and
``aten.conv2d.padding``); ``is_op(node, *CONV)`` tests membership. One op reaches the graph in several ATen
forms: ``F.relu6`` and ``nn.ReLU6`` both trace to ``aten.hardtanh(x, 0, 6)`` (``aten.relu6`` appears only when
decomposition keeps it), inference BatchNorm to ``aten._native_batch_norm_legit_no_training`` (or
``aten.batch_norm`` when not decomposed); a family lists every form.

Arguments are read by their schema name, whether the call passed them positionally or by keyword, with the
schema's default when absent: ``argument(node, "groups")``. The named accessors below (``weight_of(node)``,
``conv_groups(node)``, ``q_params(node)``, ``bn_params(node)``) are that, for the arguments passes ask about.
No positional ATen index appears outside this file.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

# ------------------------------------------------------------------------------------------- op families

CONV = (aten.conv1d, aten.conv2d, aten.conv3d)
LINEAR = (aten.linear,)
WEIGHTED = (*CONV, *LINEAR)  # a constant weight whose axis 0 is the output channel
MATMUL = (aten.matmul, aten.bmm, aten.mm)
BATCH_NORM = (aten._native_batch_norm_legit_no_training, aten.batch_norm)
RELU = (aten.relu,)
CLAMP = (aten.relu, aten.hardtanh, aten.relu6)  # relu, relu6 (hardtanh(0, 6) and relu6) and other hardtanh
ACTIVATION = (aten.relu, aten.hardtanh, aten.relu6, aten.silu, aten.gelu, aten.hardswish)
Q_PER_TENSOR = qd.quantize_per_tensor.default
DQ_PER_TENSOR = qd.dequantize_per_tensor.default
QUANTIZE = (qd.quantize_per_tensor.default, qd.quantize_per_channel.default)
DEQUANTIZE = (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default)
# ops whose output is NaN or infinite wherever a NaN or infinite input reaches it (arithmetic, layers, moves of data):
# what carries a bad input value to a quantizer. Softmax (-inf scores are masked keys), nan_to_num, where and
# masked_fill make them finite, so they are not here
NAN_PROPAGATING = (*CONV, *LINEAR, *MATMUL, *BATCH_NORM, *ACTIVATION, aten.addmm, aten.add, aten.sub, aten.mul,
                   aten.div, aten.neg, aten.abs, aten.exp, aten.layer_norm, aten.group_norm, aten.mean, aten.sum,
                   aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
                   aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.max_pool1d, aten.max_pool2d,
                   aten.max_pool3d, aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose,
                   aten.t, aten.flatten, aten.unsqueeze, aten.squeeze, aten.expand, aten.slice, aten.select,
                   aten.cat, aten.stack, aten.constant_pad_nd, aten.pad, aten.clone, aten.contiguous,
                   aten._to_copy, aten.to, operator.getitem)
DIVISION = (aten.div, aten.floor_divide, aten.remainder, aten.fmod)  # on integers by 0: eager's ZeroDivisionError
# resizes that interpolate: PyTorch's kernels compute an integer image's in fixed point, rounding otherwise than a float
# computation rounded (a quarter of a uint8 image's pixels one level apart)
INTERPOLATING_RESIZE = (aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_bicubic2d,
                        aten.upsample_trilinear3d, aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa)
# ops that sum many terms: PyTorch's kernels sum float16/bfloat16 operands in float32
REDUCTION = (aten.mean, aten.sum, aten.var, aten.std, aten.logsumexp, aten.linalg_vector_norm, aten.cumsum,
             aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.avg_pool1d,
             aten.avg_pool2d, aten.avg_pool3d, aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax,
             aten.layer_norm, aten.group_norm)
# ops applied element by element to their first tensor (activations, math, copies): the output has its shape and
# each value comes from the value at the same position (a clamp's bound or a pow's exponent may be a second tensor)
ELEMENTWISE_UNARY = (aten.relu, aten.hardtanh, aten.relu6, aten.gelu, aten.silu, aten.sigmoid, aten.tanh,
                     aten.hardswish, aten.hardsigmoid, aten.leaky_relu, aten.elu, aten.mish, aten.softplus, aten.clamp,
                     aten.clamp_min, aten.clamp_max, aten.clone, aten.dropout, aten.alias, aten.detach, aten.neg,
                     aten.abs, aten.exp, aten.sqrt, aten.rsqrt, aten.pow, aten._to_copy, aten.contiguous)
# ops applied element by element to two operands broadcast against each other
ELEMENTWISE_BINARY = (aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum)
# pooling and resizing of an (N, C, *spatial) tensor: the spatial dims change, each channel computed on its own
SPATIAL_RESAMPLE = (aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d,
                    aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
                    aten.adaptive_max_pool2d, aten.upsample_nearest1d, aten.upsample_nearest2d,
                    aten.upsample_nearest3d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_linear1d,
                    aten.upsample_trilinear3d, aten._upsample_nearest_exact2d, aten.max_pool2d_with_indices)
# ops that reduce over the dims their ``dim`` argument names (:func:`reduced_dims`), every other dim kept as it is
# (REDUCTION above is another family: ops whose kernels accumulate in float32)
DIM_REDUCTION = (aten.mean, aten.sum, aten.amax)
# ops that give the same values in the same order in another shape (dims split or merged)
RESHAPE = (aten.view, aten._unsafe_view, aten.reshape)
# ops that reorder dims, or add or drop ones of size 1, keeping every other dim whole
DIM_REARRANGE = (aten.permute, aten.transpose, aten.t, aten.unsqueeze, aten.squeeze)
# ops that cut a tensor along one dim into a list of pieces
SPLIT = (aten.split, aten.split_with_sizes)
# ops whose output holds every value of their input and no other (moved, copied or repeated, none computed)
SAME_VALUES = (aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.contiguous, aten.alias, aten.flatten,
               aten.unsqueeze, aten.squeeze, aten.permute, aten.transpose, aten.t, aten.expand)
# losses whose ``target`` holds class indices into dimension 1 of ``self`` (0 when it has one dimension)
CLASS_INDEX_LOSSES = (aten.cross_entropy_loss, aten.nll_loss, aten.nll_loss_nd, aten.nll_loss2d,
                      aten.nll_loss_forward, aten.nll_loss2d_forward)
# arithmetic whose result dtype PyTorch promotes from its operands' (an integer tensor times 0.5 is floating)
PROMOTING_ARITHMETIC = (aten.add, aten.sub, aten.mul, aten.div, aten.true_divide, aten.rsub, aten.floor_divide,
                        aten.remainder, aten.fmod)
STORAGE_READERS = (aten.as_strided.default, aten.as_strided_copy.default)  # read a tensor's storage by its strides


def is_op(node: Any, *ops: Any) -> bool:
    """True when ``node`` calls one of ``ops`` (an OpOverload, or a packet matching all its overloads)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is op or packet is op for op in ops)


def op_name(node: fx.Node) -> str:
    """The ATen op's name without overload (``conv2d``), the form stats and fusion patterns use."""
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else str(node.target)


# ---------------------------------------------------------------------------------------------- arguments


def _schema(node: fx.Node) -> list[Any]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        raise TypeError(f"node {node.name!r} calls {node.target!r}, which has no ATen schema")
    return list(schema.arguments)


_MISSING = object()


def _index(node: fx.Node, name: str) -> tuple[int, Any]:
    for i, a in enumerate(_schema(node)):
        if a.name == name:
            return i, a
    raise KeyError(f"{op_name(node)} has no argument {name!r}")


def argument(node: fx.Node, name: str, absent: Any = _MISSING) -> Any:
    """The argument ``name`` of an ATen call, given positionally or by keyword, else the schema default.

    ``absent`` is returned when this overload has no such argument (``aten.mean.default`` has no ``dim``);
    without it, that is a KeyError."""
    if absent is not _MISSING and name not in [a.name for a in _schema(node)]:
        return absent
    i, a = _index(node, name)
    if len(node.args) > i:
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    return a.default_value if a.has_default_value() else None


def set_argument(node: fx.Node, name: str, value: Any) -> None:
    """Set the argument ``name``, padding earlier positional arguments with the schema's defaults; a keyword-only
    argument (``cumsum``'s ``dtype``) is set by keyword."""
    i, schema_argument = _index(node, name)
    if name in node.kwargs or schema_argument.kwarg_only:
        node.update_kwarg(name, value)
        return
    args = list(node.args)
    args.extend(a.default_value for a in _schema(node)[len(args):i + 1])
    args[i] = value
    node.args = tuple(args)


def data(node: fx.Node) -> Any:
    """The tensor an op works on: its first argument (``input`` / ``self`` / ``tensors``)."""
    return node.args[0]


def operands(node: fx.Node) -> tuple[Any, Any]:
    """The two operands of a binary op (``aten.add(self, other)``…)."""
    return node.args[0], node.args[1]


def weight_of(node: fx.Node) -> Any:
    """The weight of a conv/linear (a get_attr node for a constant)."""
    return node.args[1]


def bias_of(node: fx.Node) -> Any:
    """The bias of a conv/linear, or None."""
    return argument(node, "bias")


def conv_groups(node: fx.Node) -> int:
    """``groups`` of a convolution; 1 for a linear."""
    return argument(node, "groups") if is_op(node, *CONV) else 1


def conv_geometry(node: fx.Node) -> tuple:
    """A conv's (stride, padding, dilation), defaults filled in; () for a linear."""
    return () if is_op(node, *LINEAR) else tuple(argument(node, n) for n in ("stride", "padding", "dilation"))


def new_shape(node: fx.Node) -> list:
    """The target shape of a view / reshape / _unsafe_view."""
    return list(argument(node, "shape" if is_op(node, aten.reshape) else "size"))


def set_new_shape(node: fx.Node, shape: list) -> None:
    set_argument(node, "shape" if is_op(node, aten.reshape) else "size", shape)


def split_sizes(node: fx.Node, extent: int) -> list[int]:
    """The chunk sizes of ``aten.split`` (one size, the last chunk shorter) or ``aten.split_with_sizes`` along a
    dimension of ``extent`` elements."""
    if is_op(node, aten.split_with_sizes):
        return list(argument(node, "split_sizes"))
    size = argument(node, "split_size")
    return [min(size, extent - s) for s in range(0, extent, size)]


def reduced_dims(node: fx.Node, ndim: int) -> set[int]:
    """The dimensions a mean / sum / amax reduces (all of them when it names none)."""
    dims = argument(node, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return set(range(ndim))
    return {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}


def value_of(node: fx.Node, args: Sequence[Any], kwargs: dict[str, Any], name: str) -> Any:
    """Argument ``name`` among the *evaluated* ``args``/``kwargs`` of a call to ``node``'s op."""
    i, a = _index(node, name)
    if i < len(args):
        return args[i]
    return kwargs.get(name, a.default_value if a.has_default_value() else None)


def call_with(node: fx.Node, args: Sequence[Any], kwargs: dict[str, Any], **replaced: Any) -> Any:
    """Call ``node``'s op on evaluated ``args``/``kwargs`` with the named arguments replaced."""
    args, kwargs = list(args), dict(kwargs)
    for name, value in replaced.items():
        i, _ = _index(node, name)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    return node.target(*args, **kwargs)


def getitem_index(node: fx.Node) -> Any:
    """The index of an ``operator.getitem`` node (which output of a multi-output op it takes)."""
    assert node.target is operator.getitem
    return node.args[1]


def graph_outputs(graph: fx.Graph) -> list[Any]:
    """The values a captured graph returns, in order: the output node's one argument (export writes a tuple)."""
    return list(graph.output_node().args[0])


def set_graph_outputs(graph: fx.Graph, values: Sequence[Any]) -> None:
    """Make ``graph`` return ``values`` (in the container type it returned before)."""
    output = graph.output_node()
    output.args = (type(output.args[0])(values),)


def with_data(node: fx.Node, x: Any) -> tuple:
    """``node``'s positional arguments with the data argument replaced by ``x``."""
    return (x, *node.args[1:])


def clamp_range(node: fx.Node) -> tuple[float, float]:
    """The (min, max) a relu / relu6 / hardtanh clamps to (inf where unbounded)."""
    if is_op(node, aten.relu):
        return 0.0, float("inf")
    if is_op(node, aten.relu6):
        return 0.0, 6.0
    return argument(node, "min_val"), argument(node, "max_val")


@dataclass(frozen=True)
class BatchNormParams:
    """The constant inputs of an inference batch norm (get_attr nodes, or None when absent) and its eps."""

    gamma: Any
    beta: Any
    mean: Any
    var: Any
    eps: float
    training: bool

    def tensors(self) -> tuple[Any, Any, Any, Any]:
        return self.gamma, self.beta, self.mean, self.var


def bn_params(node: fx.Node) -> BatchNormParams:
    """Parameters of ``aten._native_batch_norm_legit_no_training`` or ``aten.batch_norm`` alike."""
    legit = is_op(node, aten._native_batch_norm_legit_no_training)
    return BatchNormParams(argument(node, "weight"), argument(node, "bias"), argument(node, "running_mean"),
                           argument(node, "running_var"), argument(node, "eps"),
                           False if legit else bool(argument(node, "training")))


@dataclass(frozen=True)
class QParams:
    """The grid of a quantize/dequantize node: scale and zero point (per-channel: nodes, with ``axis``),
    the integer range and dtype."""

    scale: Any
    zero_point: Any
    quant_min: int
    quant_max: int
    dtype: torch.dtype
    axis: int | None = None

    def args(self) -> tuple:
        """The arguments after the data, in the op's order (to call the op or build a node)."""
        axis = () if self.axis is None else (self.axis,)
        return (self.scale, self.zero_point, *axis, self.quant_min, self.quant_max, self.dtype)


def q_params(node: fx.Node) -> QParams:
    """The grid of a quantized_decomposed quantize/dequantize node (per tensor or per channel)."""
    per_channel = "axis" in [a.name for a in _schema(node)]
    scale_name = "scales" if per_channel else "scale"
    zp_name = "zero_points" if per_channel else "zero_point"
    return QParams(argument(node, scale_name), argument(node, zp_name), argument(node, "quant_min"),
                   argument(node, "quant_max"), argument(node, "dtype"),
                   argument(node, "axis") if per_channel else None)


def set_q_scale(node: fx.Node, scale: float, zero_point: int) -> None:
    """Set a per-tensor Q/DQ node's scale and zero point."""
    set_argument(node, "scale", scale)
    set_argument(node, "zero_point", zero_point)
