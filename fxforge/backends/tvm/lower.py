"""The TVM backend: lower the optimized graph through Relax, build it with ``tvm.compile``, run it on the VM.

Lowering (TVM 0.27):

1. ``relax_module``: re-export a copy of the GraphModule with ``torch.export`` (batch dimension dynamic
   where the Signature says so) and import it with ``relax.frontend.torch.from_exported_program``.
   ``quantized_decomposed`` Q/DQ nodes import through a ``custom_convert_map`` as ``relax.op.quantize`` /
   ``dequantize`` (int32 zero points); compute after a DQ stays float32 (Relax has no int8 conv lowering).
   An op the frontend lacks, or one it fails on, becomes a one-line BackendError naming op and node.
2. ``prepare``: ``DecomposeOpsForInference`` (inference batch norm), on CPUs ``ConvertLayout`` to NHWC/HWIO
   convolutions, the matmul layout rules of ``rewrites.py``, ``CanonicalizeBindings`` and the ``zero`` pipeline
   (legalize, fold constants, fuse). MetaSchedule records match only
   functions fused exactly this way, so tuning (``tune={"trials": N, "db": path}``) works on this module.
3. ``schedule``: CUDA PrimFuncs get dlight's default GPU schedules (unscheduled ones would silently become
   host code); CPU PrimFuncs get a small default rule (parallel outer loops, vectorized inner loop).
4. ``tvm.compile`` → a VM executable. x86 runs it on ``relax.VirtualMachine``; arm64 is linked with
   ``aarch64-linux-gnu-g++`` into an AArch64 shared library; cuda keeps the generated CUDA C beside the
   library. The artifact directory holds ``model.so`` (loaded back with ``tvm.runtime.load_module``), plus
   ``model.cu`` for cuda.
"""
from __future__ import annotations

import contextlib
import copy
import math
import operator
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.errors import BackendError, TargetError, first_line, missing_dependency
from fxforge.compiler.graph import (boolean_arithmetic_as_logic, copy_value_meta, get_tensor, shifts_as_arithmetic,
                                    views_as_reshapes)
from fxforge.compiler.ops import (CONV, DIVISION, LINEAR, MATMUL, PROMOTING_ARITHMETIC, REDUCTION, argument, aten,
                                 getitem_index, graph_outputs, is_op, set_argument, set_graph_outputs)
from fxforge.compiler.target import Target
from fxforge.compiler.trace import (EXPORT_LOCK, Signature, batch_bound, batch_dynamic, computed_indices,
                                    index_guards)

from ..base import INDEX_GUARDS, Artifact, Backend, register_backend, resolved
from .rewrites import matmul_layout, mutate_functions
from .schedules import is_gpu, schedule

if TYPE_CHECKING:
    import tvm

LIB_FILE = "model.so"
CUDA_FILE = "model.cu"
CROSS_PACKAGES = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}  # cross compiler → Debian package
HALF = (torch.float16, torch.bfloat16)
FLOATS = (*HALF, torch.float32, torch.float64)
ZERO_DIVISORS = "zero_divisors"  # info key: the integer divisions whose divisor the artifact checks, in output order
# a division's overload taking a Python number → the one taking a tensor
TENSOR_OVERLOADS = {aten.remainder.Scalar: aten.remainder.Tensor, aten.fmod.Scalar: aten.fmod.Tensor,
                    aten.div.Scalar_mode: aten.div.Tensor_mode, aten.floor_divide.Scalar: aten.floor_divide.default}
CPU_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"],  # output channels innermost: the loop the CPU rule vectorizes
              # pinned to NCHW, its only legalization: left alone it takes its input's NHWC, which stays unlowered
              "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}
KERNEL = re.compile(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(")  # a CUDA kernel's name


def _tvm():
    """Import TVM (slow: ~5 s) on first use only."""
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ModuleNotFoundError as e:
        raise missing_dependency(e.name or "apache-tvm", "tvm", "the tvm backend") from None
    return tvm


def tvm_target(target: Target) -> tvm.target.Target:
    """The ``tvm.target.Target`` for an fxforge Target (a device target carries its LLVM host)."""
    tvm = _tvm()
    host = target.tvm_host_dict()
    try:
        return tvm.target.Target(target.tvm_dict(), host=host) if host else tvm.target.Target(target.tvm_dict())
    except Exception as e:
        raise TargetError(f"TVM refuses the target dict of {target.name!r} ({target.tvm_dict()}): "
                          f"{first_line(e)}") from None


# ---------------------------------------------------------------------------------------------- import


def relax_module(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                 batched: Sequence[bool] = ()) -> tvm.IRModule:
    """Import ``gm`` (flat tensors in, a tuple out) into a Relax IRModule whose ``main`` returns a tuple.

    Shapes are those of ``example_inputs``, except dimension 0 of the inputs ``batched`` marks (the signature's
    :meth:`Signature.batched`, as the ONNX backend takes it): a symbolic variable there (MetaSchedule tunes static
    shapes only, so tuning imports without it).
    """
    _tvm()
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    args, shapes = batch_dynamic(example_inputs, batched)
    _check_supported(gm.graph)
    try:
        with torch.no_grad(), EXPORT_LOCK:
            ep = torch.export.export(_for_import(gm).eval(), args, dynamic_shapes=shapes, strict=False)
            ep = ep.run_decompositions(_decompositions())
    except Exception as e:
        raise BackendError(f"re-exporting the graph for TVM failed: {first_line(e)}") from None

    class Importer(ExportedProgramImporter):
        """The stock importer whose converters report the node they failed on."""

        def create_convert_map(self):
            return {k: _located(f) for k, f in super().create_convert_map().items()}

    importer = Importer()
    custom = {k: _located(f) for k, f in {**QDQ_CONVERTERS, **REDUCTION_CONVERTERS, **IMAGE_CONVERTERS}.items()}
    known = set(importer.convert_map) | set(custom)
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target.__name__ not in known:
            raise BackendError(f"the TVM Relax frontend cannot import op {_op_name(node)} at node {node.name!r}: "
                               f"it has no converter for it")
    try:
        mod = importer.from_exported_program(ep, False, False, False, custom)
    except _NodeFailure as f:
        raise BackendError(f"the TVM Relax frontend failed on node {f.node.name!r} (op {_op_name(f.node)}): "
                           f"{first_line(f.cause)}") from None
    except Exception as e:
        raise BackendError(f"the TVM Relax frontend failed: {first_line(e)}") from None
    # export's batch bound (2**16) would make static memory planning reserve buffers for that batch
    mod["main"] = mod["main"].without_attr("tir_var_upper_bound")
    return mod


def _check_supported(graph: fx.Graph) -> None:
    """A BackendError naming an op TVM computes otherwise than PyTorch: an antialiased resize (the importer drops
    ``antialias``); a bilinear or bicubic one by a ``scale_factor`` without ``align_corners`` where TVM maps
    coordinates otherwise (:func:`_scaled_otherwise`); the indices of a max
    pooling (TVM gives them as float32); a matmul, linear or convolution of integers whose result is read as integers
    (the importer computes it in float32, exact only below 2**24). The artifact
    check refused each, telling only how far off it was, or that a dtype differed (nearest resizes are decomposed
    instead: ``_decompositions``; float16, bfloat16 and float64 products are cast back: ``_products_cast_back``)."""
    for node in graph.nodes:
        result = node.meta.get("val")
        if is_op(node, *CONV, *LINEAR, *MATMUL) and isinstance(result, torch.Tensor) and \
                not result.is_floating_point() and not all(_dtype(user) in FLOATS for user in node.users):
            raise BackendError(f"TVM's importer computes this {str(result.dtype).removeprefix('torch.')} "
                               f"{_op_name(node)} in float32 (node {node.name!r}), exact only below 2**24; compile "
                               "such a model for another backend")
        if is_op(node, aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default) and any(
                getitem_index(user) == 1 and user.users for user in node.users if user.target is operator.getitem):
            raise BackendError(f"TVM gives a max pooling's indices as float32, not int64 as PyTorch (node "
                               f"{node.name!r}); compile for another backend")
        if is_op(node, aten._upsample_bilinear2d_aa.vec, aten._upsample_bilinear2d_aa.default):
            raise BackendError(f"TVM cannot resize with antialias=True as PyTorch does (node {node.name!r}); "
                               "compile for another backend")
        if is_op(node, aten.upsample_bilinear2d.vec, aten.upsample_bicubic2d.vec) and \
                not argument(node, "align_corners") and _scaled_otherwise(node):
            raise BackendError(f"TVM resizes by this scale_factor otherwise than PyTorch (node "
                               f"{node.name!r}); give F.interpolate size= or recompute_scale_factor=True, or "
                               "compile for another backend")


def _scaled_otherwise(node: fx.Node) -> bool:
    """Whether a resize by ``scale_factors`` maps coordinates otherwise in TVM than in PyTorch: PyTorch by 1 / scale,
    TVM by input size / output size, which differ where the input size times the scale is no whole number (the output
    size being its floor); a dimension of unknown size counts as differing."""
    scales = argument(node, "scale_factors")
    source, result = argument(node, "input").meta.get("val"), node.meta.get("val")
    if not scales:
        return False
    if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
        return True
    sizes = zip(source.shape[-len(scales):], result.shape[-len(scales):], scales)
    return any(not isinstance(n, int) or not isinstance(m, int) or abs(n / m - 1 / s) > 1e-9 * n / m
               for n, m, s in sizes)


def _var_mean(x: torch.Tensor, dim: Sequence[int] | None = None, *, correction: float | None = None,
              keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``var_mean`` as the two reductions TVM's importer converts (torch's decomposition of it goes to ``prims``)."""
    dims = list(range(x.dim())) if dim is None else list(dim)
    return aten.var.correction(x, dims, correction=correction, keepdim=keepdim), aten.mean.dim(x, dims, keepdim)


def _elu(x: torch.Tensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> torch.Tensor:
    """``elu`` with its ``scale`` and ``input_scale``, which TVM's converter drops: ``selu`` (scale 1.0507) came out
    5 % off and ``celu`` (input scale 1/alpha) otherwise wrong."""
    return torch.where(x > 0, x * scale, torch.expm1(x * input_scale) * (alpha * scale))


def _im2col(x: torch.Tensor, kernel_size: Sequence[int], dilation: Sequence[int], padding: Sequence[int],
            stride: Sequence[int]) -> torch.Tensor:
    """``unfold`` (im2col) as a grouped convolution with one-hot kernels: output channel c·kh·kw + i of input channel
    c picks the window's i-th place, exactly (a product by 1, sums with 0). torch's decomposition indexes with
    broadcast index tensors, which TVM's importer failed on ("cannot broadcast index shapes")."""
    channels, places = x.shape[1], math.prod(kernel_size)
    picks = torch.eye(places, dtype=x.dtype, device=x.device).reshape(places, 1, *kernel_size)
    columns = torch.nn.functional.conv2d(x, picks.repeat(channels, 1, 1, 1), stride=stride, padding=padding,
                                         dilation=dilation, groups=channels)
    return columns.reshape(x.shape[0], channels * places, -1)


def _decompositions() -> Mapping[Any, Callable]:
    """Export's default decompositions (what ``from_exported_program`` runs), changed where TVM's importer fails on
    a valid graph: ``instance_norm`` is kept whole (its decomposition, a batch norm over a [1, B·C, …] view, fails
    at a symbolic batch; its own converter works), ``group_norm`` goes down to reductions (``native_group_norm``'s
    converter fails without weights: "null pointer node"), ``adaptive_max_pool2d``, which has no converter, is
    decomposed (into max pooling where the sizes divide; elsewhere it stays, a BackendError naming it), and so is a
    nearest resize (into indexing: the converter's resize rounds source coordinates otherwise than PyTorch's floor,
    1.6 relative off where the output size is no whole multiple of the input's; as fast at a scale of 2).
    ``var_mean`` becomes the two reductions the importer converts, ``elu`` keeps the scales its converter drops, and
    ``im2col`` is a grouped convolution (:func:`_im2col`)."""
    from torch._decomp import decomposition_table
    table = torch.export.default_decompositions()
    del table[aten.instance_norm.default]
    for op in (aten.native_group_norm.default, aten.adaptive_max_pool2d.default, aten.upsample_nearest2d.vec,
               aten.upsample_nearest2d.default):
        table[op] = decomposition_table[op]
    table[aten.var_mean.correction] = _var_mean
    table[aten.elu.default] = _elu
    table[aten.im2col.default] = _im2col
    return table


def _for_import(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` for TVM's importer: the same values, with each rewrite below applied (each works around a
    way the importer or TVM's kernels read an op otherwise than PyTorch)."""
    copied = copy.deepcopy(gm)
    index_guards(copied)  # first: the rewrites below read indices otherwise (a negative one wrapped)
    for rewrite in (views_as_reshapes, shifts_as_arithmetic, boolean_arithmetic_as_logic, _squeezes_named,
                    _reduced_dims_non_negative, _empty_cat_inputs_dropped, _negative_indices_wrapped,
                    _promoted_operands, _alpha_applied, _clamp_bounds_typed, _finite_arg_extremes,
                    _typed_integer_divisors, _divisors_guarded, _cumulative_sums_typed, _half_reductions_in_float32,
                    _products_cast_back):
        rewrite(copied.graph)
    copied.recompile()
    return copied


def _squeezes_named(graph: fx.Graph) -> None:
    """Each ``squeeze`` as ``squeeze.dims`` of the non-negative dimensions it removes (those of static size 1, from
    the graph's shapes): the importer failed on ``y.squeeze()`` ("undefined bijective layout") and on
    ``y.squeeze(-1)`` (``std::bad_alloc``), a pooled head's common ending. A squeeze that removes nothing goes."""
    for node in [n for n in graph.nodes if is_op(n, aten.squeeze)]:
        shape = argument(node, "self").meta["val"].shape
        asked = argument(node, "dim") if node.target in (aten.squeeze.dim, aten.squeeze.dims) else range(len(shape))
        asked = [asked] if isinstance(asked, int) else list(asked)
        dims = sorted({d % len(shape) for d in asked if isinstance(shape[d], int) and shape[d] == 1}) if shape else []
        if not dims:
            node.replace_all_uses_with(argument(node, "self"))
            graph.erase_node(node)
            continue
        node.target, node.args, node.kwargs = aten.squeeze.dims, (argument(node, "self"), dims), {}


def _reduced_dims_non_negative(graph: fx.Graph) -> None:
    """The ``dim`` of a reduction along dimensions (``max``/``min`` along a dim, ``logsumexp``) counted from the
    front: a negative one made TVM's pipeline fail with ``std::bad_alloc`` (``x.max(-1)``; ``logsumexp(x, -1)``,
    whose decomposition squeezes it), as it did for ``squeeze``."""
    for node in [n for n in graph.nodes if is_op(n, aten.max.dim, aten.min.dim, aten.logsumexp.default)]:
        rank, dim = argument(node, "self").meta["val"].dim(), argument(node, "dim")
        if rank:
            set_argument(node, "dim", dim % rank if isinstance(dim, int) else [d % rank for d in dim])


def _empty_cat_inputs_dropped(graph: fx.Graph) -> None:
    """Leave out of each ``cat`` the 1-D tensors of size 0, which PyTorch's cat skips whatever the others' rank (a
    transformers cache starts as one): TVM's importer refused the concatenation ("Concat expects all input tensors to
    have same ndim")."""
    for node in [n for n in graph.nodes if is_op(n, aten.cat)]:
        tensors = argument(node, "tensors")
        kept = [t for t in tensors if not (isinstance(v := _value(t), torch.Tensor) and v.shape == (0,))]
        if len(kept) == len(tensors) or not kept:
            continue
        if len(kept) == 1:
            node.replace_all_uses_with(kept[0])
            graph.erase_node(node)
        else:
            set_argument(node, "tensors", kept)


def _negative_indices_wrapped(graph: fx.Graph) -> None:
    """Count each negative index from the end, as PyTorch counts it: a constant ``select`` index
    (``x[:, -1]``) becomes ``n − 1``, and each integer index tensor of an ``aten.index`` (``x[:, i]``) ``i mod n``
    (floor mod; exact on the [−n, n) eager accepts), n the indexed dimension's size. The importer lowers these
    ops to ``take`` or ``index_tensor``, which read a negative index as memory outside the tensor (a silently wrong
    value for ``x[:, i]`` with ``i = −1``; ``take``, which reads the flattened tensor so, becomes such an index
    first). Indices built from an ``arange`` (an attention mask's) cannot be negative and are left as they are."""
    for node in [n for n in graph.nodes if is_op(n, aten.select)
                 and isinstance(argument(n, "index"), int) and argument(n, "index") < 0]:
        size = argument(node, "self").meta["val"].shape[argument(node, "dim")]  # x[:, -1]: the same reading
        if isinstance(size, int):
            set_argument(node, "index", argument(node, "index") + size)
    for node in [n for n in graph.nodes if is_op(n, aten.take)]:  # x.take(i): x.reshape(-1)[i], wrapped below
        source = argument(node, "self")
        with graph.inserting_before(node):
            flat = graph.call_function(aten.reshape.default, (source, [-1]))
        flat.meta["val"] = source.meta["val"].reshape(-1)
        node.target, node.args, node.kwargs = aten.index.Tensor, (flat, [argument(node, "index")]), {}
    for node in [n for n in graph.nodes if is_op(n, aten.index)]:
        source, indices = argument(node, "self"), list(argument(node, "indices"))
        for dim, index in enumerate(indices):
            value = index.meta.get("val") if isinstance(index, fx.Node) else None
            if (not isinstance(value, torch.Tensor) or value.dtype in (torch.bool, torch.uint8)
                    or _from_arange(index)):
                continue  # a mask, no index (the whole dimension), or an index known to be ≥ 0
            with graph.inserting_before(node):
                indices[dim] = graph.call_function(aten.remainder.Tensor, (index, _size_tensor(graph, source, dim)))
        set_argument(node, "indices", indices)


def _alpha_applied(graph: fx.Graph) -> None:
    """Write each ``add``/``sub``/``rsub`` with an ``alpha`` other than 1 as the op on the scaled operand (``x + a·y``:
    ``other`` scaled; ``rsub``, ``other − a·x``: ``self``). The importer dropped ``alpha``: torchvision's grayscale
    (``add_(g, alpha=0.587)``) came out a plain sum, and a model given an all-black example compiled unwarned. After
    :func:`_promoted_operands`, which casts an integer operand of a floating result before it is scaled."""
    for node in [n for n in graph.nodes if is_op(n, aten.add, aten.sub, aten.rsub)]:
        alpha = argument(node, "alpha", 1)
        if alpha == 1:
            continue
        name = "self" if is_op(node, aten.rsub) else "other"
        operand = argument(node, name)
        if isinstance(operand, fx.Node):
            with graph.inserting_before(node):
                operand = graph.call_function(aten.mul.Tensor, (operand, alpha))
        else:
            operand = operand * alpha
        set_argument(node, name, operand)
        set_argument(node, "alpha", 1)


def _promoted_operands(graph: fx.Graph) -> None:
    """Cast each integer tensor operand of an arithmetic op whose result is floating (``ids * 0.5``, an integer
    true division) to the result's dtype first, as PyTorch's type promotion does. The importer
    computes such an op in the integer dtype: ``ids * 0.5`` gave 0 for every id below 2, and ``ids * 1.0`` an int64
    tensor."""
    for node in [n for n in graph.nodes if is_op(n, *PROMOTING_ARITHMETIC)]:
        result = node.meta.get("val")
        if not isinstance(result, torch.Tensor) or not result.is_floating_point():
            continue
        for operand in [a for a in node.args if isinstance(a, fx.Node)]:
            value = operand.meta.get("val")
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                _cast_input(graph, node, operand, result.dtype)


def _clamp_bounds_typed(graph: fx.Graph) -> None:
    """Cast each tensor bound of a ``clamp`` to the result's dtype, as PyTorch's promotion leaves a float16 tensor
    clamped by a 0-d float32 bound float16 (T5's overflow guard, ``cosine_similarity``'s eps): the importer refused
    the mix ("Binary operators must have the same datatype")."""
    for node in [n for n in graph.nodes if is_op(n, aten.clamp.Tensor, aten.clamp_min.Tensor, aten.clamp_max.Tensor)]:
        result = node.meta.get("val")
        if not isinstance(result, torch.Tensor):
            continue
        for bound in [a for a in node.all_input_nodes[1:] if _dtype(a) not in (None, result.dtype)]:
            _cast_input(graph, node, bound, result.dtype)


def _finite_arg_extremes(graph: fx.Graph) -> None:
    """Clamp the input of each floating ``argmax``/``argmin`` strictly inside the finite range.
    TVM's reduction starts from index −1 at the dtype's lowest (highest) finite value and moves only on a strictly
    better one, so a row that is all −inf gave argmax −1 (eager: 0), an index outside the row. Clamping to one step
    inside keeps every index eager picks unless a row holds both an infinity and a value within one step of the
    dtype's largest finite magnitude."""
    for node in [n for n in graph.nodes if is_op(n, aten.argmax, aten.argmin)]:
        source = argument(node, "self")
        value = source.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        if not value.is_floating_point():  # −1 only where every value is the start: eager's first index, 0
            _applied_after(graph, node, lambda index: graph.call_function(aten.relu.default, (index,)))
            continue
        top = torch.nextafter(torch.tensor(torch.finfo(value.dtype).max, dtype=value.dtype),
                              torch.zeros((), dtype=value.dtype)).item()
        with graph.inserting_before(node):
            clamped = graph.call_function(aten.clamp.default, (source, -top, top))
        node.replace_input_with(source, clamped)


def _cumulative_sums_typed(graph: fx.Graph) -> None:
    """Give each ``cumsum`` without a ``dtype`` the dtype of its result: PyTorch sums bool and integer tensors in
    int64, and TVM's converter kept the input's dtype (a uint8 sum wrapped at 256 silently, a bool mask's position
    ids failed to build, an int32 sum came out int32)."""
    for node in [n for n in graph.nodes if is_op(n, aten.cumsum.default) and argument(n, "dtype", None) is None]:
        result = node.meta.get("val")
        if isinstance(result, torch.Tensor) and result.dtype != _dtype(argument(node, "self")):
            set_argument(node, "dtype", result.dtype)


def _half_reductions_in_float32(graph: fx.Graph) -> None:
    """Run each reduction (:data:`~fxforge.compiler.ops.REDUCTION`) whose output is float16 or bfloat16 in float32:
    its half-precision tensor operands and a half ``dtype`` argument made float32, its output cast back, which is how
    PyTorch's kernels sum. TVM summed in the tensor's own dtype: the float16 mean of values near 60000 was inf (eager:
    60096), and a long sum lost digits."""
    for node in [n for n in graph.nodes if is_op(n, *REDUCTION)]:
        result = node.meta.get("val")
        if not isinstance(result, torch.Tensor) or result.dtype not in HALF:
            continue
        if argument(node, "dtype", None) in HALF:
            set_argument(node, "dtype", torch.float32)
        for operand in [a for a in node.all_input_nodes if _dtype(a) in HALF]:
            _cast_input(graph, node, operand, torch.float32)
        _applied_after(graph, node, lambda x, d=result.dtype: _cast(graph, x, d))  # back to the dtype it recorded


def _products_cast_back(graph: fx.Graph) -> None:
    """Cast each float16, bfloat16 or float64 matmul, linear and convolution back to its dtype, its bias added after
    the cast. The importer gives these ops a float32 output whatever their operands (they accumulate in float32, as
    PyTorch's half kernels do; a float64 product keeps float32's precision, within the exact tolerance), so the bias
    it then adds failed ("Binary operators must have the same datatype"), and so did any later op mixing the product
    with a tensor of the model's dtype; without a bias a float64 model returned float32. The weights keep theirs. A
    layer a pass rebuilt without a recorded value (``prune_channels``) computes in its operands' dtype."""
    for node in [n for n in graph.nodes if is_op(n, *CONV, *LINEAR, *MATMUL)]:
        result = node.meta.get("val")
        dtype = result.dtype if isinstance(result, torch.Tensor) else \
            next((d for d in map(_dtype, node.all_input_nodes) if d is not None), None)
        if dtype not in (*HALF, torch.float64):
            continue
        bias = argument(node, "bias", None)
        if bias is not None:
            set_argument(node, "bias", None)
        narrow = _applied_after(graph, node, lambda x, d=dtype: _cast(graph, x, d))
        if bias is not None:
            weight = argument(node, "weight")  # of a conv's rank, which is its output's
            rank = result.dim() if isinstance(result, torch.Tensor) else _value(weight).dim()
            shape = [-1] + [1] * (rank - 2) if is_op(node, *CONV) else [-1]
            with graph.inserting_after(narrow):
                column = graph.call_function(aten.reshape.default, (bias, shape))
            with graph.inserting_after(column):
                biased = graph.call_function(aten.add.Tensor, (narrow, column))
            narrow.replace_all_uses_with(biased, delete_user_cb=lambda user: user is not biased)


def _cast_input(graph: fx.Graph, node: fx.Node, operand: fx.Node, dtype: torch.dtype) -> None:
    """``node`` reads ``operand`` cast to ``dtype``."""
    with graph.inserting_before(node):
        cast = _cast(graph, operand, dtype)
    node.replace_input_with(operand, cast)


def _cast(graph: fx.Graph, x: fx.Node, dtype: torch.dtype) -> fx.Node:
    """A node giving ``x`` cast to ``dtype``, at the graph's insertion point."""
    return graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})


def _dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype of the tensor ``node`` gives (:func:`_value`), or None."""
    value = _value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _value(node: fx.Node) -> Any:
    """What ``node`` gives, as recorded (a fake tensor), or a constant's own tensor (a pass's new constants, and
    those ``fold_constants`` made, carry no recorded value)."""
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else get_tensor(node.graph.owning_module, node)


def _typed_integer_divisors(graph: fx.Graph) -> None:
    """Make a Python-number divisor of a division (``ids // 3``, ``x // 2``, ``ids // 2.5``) a 0-d tensor of the
    result's dtype. The importer made it an int32 constant, and an int64 or float dividend then failed to import
    ("Binary operators must have the same datatype"). After :func:`_promoted_operands`: an integer dividend of a
    float result is cast already. A signed integer divided by −1 is divided by 1, its quotient negated, as
    :func:`_divisors_guarded` does for divisors computed at run time (the lowest value divided by −1 traps)."""
    for node in [n for n in graph.nodes if is_op(n, *DIVISION)]:
        divisor, result = argument(node, "other"), node.meta.get("val")
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and isinstance(result, torch.Tensor) \
                and not result.is_complex():
            if divisor == -1 and result.dtype.is_signed and not result.is_floating_point():
                divisor = 1
                if is_op(node, aten.floor_divide, aten.div):
                    _applied_after(graph, node, lambda q: graph.call_function(aten.neg.default, (q,)))
            with graph.inserting_before(node):
                typed = graph.call_function(aten.scalar_tensor.default, (divisor,), {"dtype": result.dtype})
            node.target = TENSOR_OVERLOADS.get(node.target, node.target)
            set_argument(node, "other", typed)


def integer_divisions(graph: fx.Graph) -> list[fx.Node]:
    """The integer divisions (``//``, ``%``, ``fmod``, ``div`` with a rounding mode) by a tensor computed at run time,
    in graph order: the nodes whose divisor can be 0 on some call."""
    found = []
    for node in [n for n in graph.nodes if is_op(n, *DIVISION)]:
        divisor, result = argument(node, "other"), node.meta.get("val")
        value = divisor.meta.get("val") if isinstance(divisor, fx.Node) else None
        if isinstance(value, torch.Tensor) and isinstance(result, torch.Tensor) and \
                not (result.is_floating_point() or result.is_complex()):
            found.append(node)
    return found


def _divisors_guarded(graph: fx.Graph) -> None:
    """Make each of :func:`integer_divisions` safe for TVM's kernels, whose traps kill the process (SIGFPE):

    - divide by ``b + (b == 0)`` instead of ``b`` and return the count of zeros in ``b`` as an extra output after the
      model's own: where eager raises ZeroDivisionError the artifact raises instead (:meth:`TvmArtifact.run`), and
      the quotients it computed meanwhile are never returned;
    - divide by 1 where ``b`` is −1 and negate a quotient there: ``a // −1`` is ``−a``, which wraps at the dtype's
      lowest value as eager's division does (the lowest value divided by −1 overflows, and traps); a remainder by ±1
      is 0 either way."""
    flags = []
    for node in integer_divisions(graph):
        divisor = argument(node, "other")
        dtype = divisor.meta["val"].dtype
        with graph.inserting_before(node):
            zero = graph.call_function(aten._to_copy.default, (graph.call_function(aten.eq.Scalar, (divisor, 0)),),
                                       {"dtype": dtype})
            safe = graph.call_function(aten.add.Tensor, (divisor, zero))
            flags.append(graph.call_function(aten.sum.default, (zero,)))  # the importer has no aten.any
            if dtype.is_signed:  # −1 is 255 to a uint8 divisor
                minus_one = graph.call_function(aten.eq.Scalar, (divisor, -1))
                two = graph.call_function(aten.mul.Tensor, (graph.call_function(
                    aten._to_copy.default, (minus_one,), {"dtype": dtype}), 2))
                safe = graph.call_function(aten.add.Tensor, (safe, two))
        node.replace_input_with(divisor, safe)
        if dtype.is_signed and is_op(node, aten.floor_divide, aten.div):  # a quotient: −a where b is −1
            _applied_after(graph, node, lambda q, m=minus_one: graph.call_function(aten.where.self, (
                m, graph.call_function(aten.neg.default, (q,)), q)))
    if flags:
        set_graph_outputs(graph, [*graph_outputs(graph), *flags])


def _applied_after(graph: fx.Graph, node: fx.Node, make: Callable[[fx.Node], fx.Node]) -> fx.Node:
    """Put ``make(node)`` (a node reading ``node``, made right after it) between ``node`` and every reader of it, and
    return it. What it gives has the shape and dtype ``node`` recorded (a relu of an index, a negated quotient, a cast
    back to the recorded dtype), so it takes ``node``'s value meta: the rewrites after this one read a divisor's dtype
    (:func:`integer_divisions`) and the dtypes of a product's operands from it."""
    readers = list(node.users)  # not the nodes ``make`` adds: they read ``node`` itself
    with graph.inserting_before(node.next):  # in the order made: ``make`` may add nodes of its own first
        after = make(node)
    copy_value_meta(after, node)
    for reader in readers:
        reader.replace_input_with(node, after)
    return after


def _size_tensor(graph: fx.Graph, source: fx.Node, dim: int) -> fx.Node:
    """A 0-d int64 tensor holding ``source``'s size along ``dim``. A symbolic size (the batch) is built as the sum
    of that many ones: the importer takes a symbolic size as a shape, not as a value."""
    size = source.meta["val"].shape[dim]
    if isinstance(size, int):
        return graph.call_function(aten.scalar_tensor.default, (size,), {"dtype": torch.int64})
    symbolic = graph.call_function(aten.sym_size.int, (source, dim))
    ones = graph.call_function(aten.ones.default, ([symbolic],), {"dtype": torch.int64})
    return graph.call_function(aten.sum.default, (ones,))


def _from_arange(node: fx.Node) -> bool:
    """Whether ``node`` is an ``arange`` from 0 or more, moved by shape ops and non-negative constant shifts."""
    while True:
        if is_op(node, aten.arange):
            start = argument(node, "start", 0)
            return isinstance(start, (int, float)) and start >= 0
        if is_op(node, aten.unsqueeze, aten.view, aten.reshape, aten.expand, aten.clone, aten._to_copy):
            node = argument(node, "self")
        elif is_op(node, aten.add) and isinstance(argument(node, "other"), int) and argument(node, "other") >= 0:
            node = argument(node, "self")
        else:
            return False


class _NodeFailure(Exception):
    def __init__(self, node: fx.Node, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.node, self.cause = node, cause


def _located(convert: Callable) -> Callable:
    def run(node: fx.Node, *rest: Any):
        try:
            return convert(node, *rest)
        except _NodeFailure:
            raise
        except Exception as e:
            raise _NodeFailure(node, e) from None
    return run


def _op_name(node: fx.Node) -> str:
    name = getattr(node.target, "_name", None) or getattr(node.target, "__name__", str(node.target))
    overload = getattr(node.target, "_overloadname", None)
    return f"{name.replace('::', '.')}.{overload}" if overload and not name.endswith(overload) else \
        name.replace("::", ".")


def _qdq(quantize: bool, per_channel: bool) -> Callable:
    """A converter for quantized_decomposed.{quantize,dequantize}_per_{tensor,channel}.default.

    Arguments: (x, scale, zero_point[, axis], quant_min, quant_max, dtype). The Relax ops clamp to the dtype's
    range; a narrower [quant_min, quant_max] (7-bit weights) gets an explicit clip after quantize.
    """

    def convert(node: fx.Node, importer: Any):
        from tvm import relax

        args = importer.retrieve_args(node)
        x, scale, zero = args[0], args[1], args[2]
        axis = args[3] if per_channel else -1
        qmin, qmax, dtype = args[-3], args[-2], args[-1]
        scale = scale if isinstance(scale, relax.Expr) else relax.const(float(scale), "float32")
        zero = relax.op.astype(zero, "int32") if isinstance(zero, relax.Expr) else relax.const(int(zero), "int32")
        bb = importer.block_builder
        if not quantize:
            return bb.emit(relax.op.dequantize(x, scale, zero, axis, "float32"))
        tvm_dtype = str(dtype).removeprefix("torch.")
        q = bb.emit(relax.op.quantize(x, scale, zero, axis, tvm_dtype))
        info = torch.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):
            q = bb.emit(relax.op.clip(q, qmin, qmax))
        return q

    return convert


QDQ_CONVERTERS = {"quantize_per_tensor.default": _qdq(True, False),
                  "dequantize_per_tensor.default": _qdq(False, False),
                  "quantize_per_channel.default": _qdq(True, True),
                  "dequantize_per_channel.default": _qdq(False, True)}


def _extremum(largest: bool) -> Callable:
    """A converter for ``aten.amax`` / ``aten.amin`` (``dim`` empty: every dimension; ``logsumexp`` and
    ``aminmax`` decompose to them). Booleans reduce as int8, since Relax's max and min take no bool."""

    def convert(node: fx.Node, importer: Any):
        from tvm import relax

        x = importer.env[argument(node, "self")]
        dims = argument(node, "dim")
        axis = ([dims] if isinstance(dims, int) else list(dims)) or None
        reduce = relax.op.max if largest else relax.op.min
        keepdims = bool(argument(node, "keepdim"))
        if x.ty.dtype != "bool":
            return importer.block_builder.emit(reduce(x, axis, keepdims))
        return importer.block_builder.emit(relax.op.astype(reduce(relax.op.astype(x, "int8"), axis, keepdims), "bool"))

    return convert


def _any_element(node: fx.Node, importer: Any):
    """A converter for ``aten.any.default``: whether any element is nonzero (the importer converts ``any.dim``)."""
    from tvm import relax

    x = importer.env[argument(node, "self")]
    nonzero = x if x.ty.dtype == "bool" else relax.op.not_equal(x, relax.const(0, x.ty.dtype))
    return importer.block_builder.emit(relax.op.astype(relax.op.max(relax.op.astype(nonzero, "int8")), "bool"))


def _min_dim(node: fx.Node, importer: Any):
    """A converter for ``aten.min.dim`` (values and indices), as the importer converts ``max.dim``: top-1 from
    below."""
    from tvm import relax

    x, dim = importer.env[argument(node, "self")], argument(node, "dim")
    bb = importer.block_builder
    both = bb.emit(relax.op.topk(x, k=1, axis=dim, largest=False, ret_type="both", dtype="int64"))
    values, indices = both[0], both[1]
    if not argument(node, "keepdim"):
        values, indices = bb.emit(relax.op.squeeze(values, [dim])), bb.emit(relax.op.squeeze(indices, [dim]))
    return bb.emit(relax.Tuple([values, indices]))


# ops the stock importer has no converter for
REDUCTION_CONVERTERS = {"amax.default": _extremum(True), "amin.default": _extremum(False),
                        "any.default": _any_element, "min.dim": _min_dim}


def _grid_sample(node: fx.Node, importer: Any):
    """A converter for ``aten.grid_sampler_2d``: the importer's, with the grid given as TVM's kernel reads it,
    [N, 2, H, W] (coordinates x, y along dimension 1). The importer passed PyTorch's [N, H, W, 2] as it is, and the
    output came out [N, C, W, 2] instead of [N, C, H, W]."""
    from tvm import relax
    grid = relax.op.permute_dims(importer.env[argument(node, "grid")], [0, 3, 1, 2])
    return importer.block_builder.emit(relax.op.image.grid_sample(
        importer.env[argument(node, "input")], grid,
        method={0: "bilinear", 1: "nearest", 2: "bicubic"}[argument(node, "interpolation_mode")], layout="NCHW",
        padding_mode={0: "zeros", 1: "border", 2: "reflection"}[argument(node, "padding_mode")],
        align_corners=argument(node, "align_corners")))


IMAGE_CONVERTERS = {"grid_sampler_2d.default": _grid_sample}


# ------------------------------------------------------------------------------------------- prep/build


SYMBOLIC_OPERAND_OPS = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.floor_divide",
                        "relax.mod", "relax.floor_mod", "relax.power", "relax.maximum", "relax.minimum", "relax.equal",
                        "relax.not_equal", "relax.less", "relax.less_equal", "relax.greater", "relax.greater_equal"}


def _batch_as_value(mod: tvm.IRModule) -> str:
    """The first elementwise op of ``main`` with a symbolic size as an operand (``x * x.shape[0]``, the index
    arithmetic of ``roll`` along the batch), in words; "" when there is none. TVM's pipeline crashed the process
    (SIGSEGV in ``prepare``) on such an operand, so the backend builds those graphs for the example's batch."""
    tvm = _tvm()
    from tvm.tirx.analysis import undefined_vars
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            name = getattr(getattr(binding.value, "op", None), "name", "")
            symbolic = [a for a in getattr(binding.value, "args", ()) if name in SYMBOLIC_OPERAND_OPS
                        and isinstance(getattr(a, "ty", None), tvm.ir.PrimType) and undefined_vars(a)]
            if symbolic:
                return f"{name.removeprefix('relax.')} by {symbolic[0]}"
    return ""


def prepare(mod: tvm.IRModule, tvm_target: tvm.target.Target, *, fast_math: bool = True) -> tvm.IRModule:
    """Inference decomposition, NHWC/HWIO convs on CPUs, :func:`~.rewrites.matmul_layout` (unbroadcast matmul
    weights, reshapes below elementwise ops), :func:`fast_math` (unless ``fast_math=False``), canonical bindings
    and the ``zero`` pipeline (legalize, fold constants, fuse).

    This is the module MetaSchedule tunes and applies its database to: records match only functions fused
    exactly this way (with the same ``fast_math``), and a miss is silent.
    """
    tvm = _tvm()
    from tvm import relax
    layout = [] if is_gpu(tvm_target) else [relax.transform.ConvertLayout(CPU_LAYOUT)]
    fast = [_fast_math_pass()] if fast_math else []
    try:
        with tvm_target:
            return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), *layout, matmul_layout(),
                                             *fast,
                                             relax.transform.CanonicalizeBindings(),
                                             relax.get_pipeline("zero")])(mod)
    except Exception as e:  # an op TVM imported but cannot legalize (seen: clamp_min of an int64 tensor)
        raise BackendError(f"TVM's Relax pipeline (decompose, legalize, fold, fuse) failed on the imported model: "
                           f"{type(e).__name__}: {first_line(e)}") from None


def _fast_math_pass() -> tvm.transform.Pass:
    """float32 ``exp``, ``erf``, ``tanh``, ``softmax``, ``gelu`` and ``gelu_tanh`` as TVM's fast approximations
    (``topi.fast_exp``: range reduction and a polynomial; ``fast_erf``, ``fast_tanh``: rational polynomials;
    ``fast_softmax``: softmax over ``fast_exp``): arithmetic only, so a loop over them is vectorized. The stock
    lowering calls libm's scalar ``expf``/``erff`` once per element (LLVM has no vector math library here):
    measured on a 1×128×1536 GELU, 2.2 ms against eager's 0.12 ms (1 thread), and softmax 12× slower than eager.

    TVM's own ``relax.transform.FastMathTransform`` leaves ``gelu`` (most of a transformer's erf) alone, hence
    this rewrite; its error against eager is ~1e-6, like oneDNN's own approximations."""
    import tvm
    from tvm import relax, te, tirx, topi

    def gelu(x: te.Tensor) -> te.Tensor:
        half = tirx.const(0.5, x.dtype)
        return x * (half + topi.fast_erf(x * tirx.const(0.5 ** 0.5, x.dtype)) * half)

    def gelu_tanh(x: te.Tensor) -> te.Tensor:
        inner = tirx.const((2.0 / 3.141592653589793) ** 0.5, x.dtype) * x * (1 + tirx.const(0.044715, x.dtype) * x * x)
        return tirx.const(0.5, x.dtype) * x * (tirx.const(1.0, x.dtype) + topi.fast_tanh(inner))

    unary = {"relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh,
             "relax.nn.gelu": gelu, "relax.nn.gelu_tanh": gelu_tanh}

    @relax.expr_functor.mutator
    class FastMath(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            name = getattr(call.op, "name", None)
            if name not in (*unary, "relax.nn.softmax") or getattr(call.ty, "dtype", None) != "float32":
                return super().visit_call_(call)
            x = self.visit_expr(call.args[0])
            if name == "relax.nn.softmax":
                return self.builder_.call_te(topi.nn.fast_softmax, x, int(call.attrs.axis),
                                             primfunc_name_hint="fast_softmax")
            return self.builder_.call_te(unary[name], x, primfunc_name_hint=name.split(".")[-1])

    @tvm.transform.module_pass(opt_level=0, name="FxforgeFastMath")
    def rewrite(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        return mutate_functions(FastMath(mod), mod)

    return rewrite


def build(mod: tvm.IRModule, tvm_target: tvm.target.Target) -> Any:
    """Compile a prepared, scheduled module into a Relax VM executable."""
    tvm = _tvm()
    try:
        return tvm.compile(mod, target=tvm_target)
    except Exception as e:
        raise BackendError(f"tvm.compile failed for {tvm_target.kind.name}: {first_line(e)}") from None


def cuda_source(executable: Any) -> str:
    """The CUDA C of the device module(s) imported under a VM executable ("" when there are none)."""
    sources = [m.inspect_source() for m in _imports(executable.mod) if m.kind == "cuda"]
    return "\n".join(dict.fromkeys(sources))  # a module imported on two paths is listed twice


def _imports(module: Any) -> list[Any]:
    out = []
    for m in module.imports:
        out += [m, *_imports(m)]
    return out


# C++ LOG(WARNING) lines TVM writes on file descriptor 2 that say nothing to fxforge's user: an empty ``Scope
# Saving:`` (``Scope Loaded:``) line per memory scope when it saves (loads) an executable, and "fast mode segfaults
# when there are out-of-bounds indices", which legalization writes for every gather it builds, whatever the indices
# (the importer's own for roll and reflection padding; fxforge bounds the inputs an op reads as indices at every call,
# and indices a model computes are PyTorch's, which raises where they leave the tensor)
TVM_NOISE = ("Scope Saving:", "Scope Loaded:", "Fast mode segfaults when there are out-of-bounds indices")
FD2_LOCK = threading.Lock()  # one capture of file descriptor 2 at a time: overlapping ones left it on a deleted file


@contextlib.contextmanager
def _without_noise_lines() -> Iterator[None]:
    """Capture file descriptor 2 (TVM's C++ log, out of Python's reach) meanwhile and pass every line through but
    ``TVM_NOISE``'s; one thread at a time (``FD2_LOCK``), since the descriptor is the process's."""
    with FD2_LOCK, tempfile.TemporaryFile(mode="w+b") as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [ln for ln in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(noise in ln for noise in TVM_NOISE)]
            sys.stderr.write("".join(kept))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` where its data starts on a 64-byte boundary, which TVM's zero-copy ``from_dlpack`` requires, else a
    copy (PyTorch allocates aligned): a slice, or an array numpy loaded from a file, starts anywhere."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def export_library(executable: Any, path: Path, target: Target) -> None:
    """Link the executable into a shared library for ``target`` (cross-compiled where it needs it)."""
    if target.cross_compiler is None:
        try:
            with _without_noise_lines():
                executable.export_library(str(path))
        except Exception as e:  # e.g. an AArch64 target without a cross compiler: this machine's linker refuses
            raise BackendError(f"linking the {target.name} library with this machine's compiler failed (a target "
                               f"for another architecture needs Target(cross_compiler=...)): {first_line(e)}") from None
        return
    from tvm.support import cc
    if shutil.which(target.cross_compiler) is None:
        package = CROSS_PACKAGES.get(target.cross_compiler, f"a package providing {target.cross_compiler}")
        raise BackendError(f"the {target.name} target needs the cross compiler {target.cross_compiler}, which is "
                           f"not installed: apt-get install {package}")
    try:
        with _without_noise_lines():
            executable.export_library(str(path), fcompile=cc.cross_compiler(target.cross_compiler))
    except Exception as e:
        raise BackendError(f"linking the {target.name} library with {target.cross_compiler} failed: "
                           f"{first_line(e)}") from None


# ------------------------------------------------------------------------------------------------ run


class TvmArtifact(Artifact):
    """A Relax VM executable: ``model.so`` (and ``model.cu`` for cuda). Runs where the target runs."""

    backend = "tvm"
    files, optional_files = (LIB_FILE,), (CUDA_FILE,)

    def __init__(self, signature: Signature, target: Target, info: dict[str, Any], *,
                 executable: Any = None, library: bytes | None = None, source: str = "") -> None:
        super().__init__(signature, target, info)
        self.executable, self.library, self.source = executable, library, source
        self._vm: Any = None
        self._device: Any = None
        self._lock = threading.Lock()  # one call at a time: the Relax VM's registers and storage are shared state

    def vm(self) -> Any:
        """The Relax VirtualMachine on the target's device (created on first call)."""
        if self._vm is None:
            tvm = _tvm()
            from tvm import relax
            if self.unrunnable() and self.target.tvm.get("kind") == "llvm":
                built = self.target.tvm.get("mtriple") or f"{self.target.tvm.get('mcpu')}, with " \
                    f"{', '.join(self.target.lacks())}, which this CPU lacks"
                raise TargetError(f"this tvm artifact was built for {self.target.name} ({built}) and cannot run on "
                                  f"this machine; copy {LIB_FILE} to such a machine and load it with "
                                  f"tvm.runtime.load_module")
            kind = "cpu" if self.target.tvm.get("kind") == "llvm" else str(self.target.tvm.get("kind"))
            device = tvm.device(kind, 0)
            if not device.exist:
                raise TargetError(f"this tvm artifact needs a {kind} device and there is none here "
                                  f"(tvm.device({kind!r}, 0) does not exist)")
            if self.executable is None:
                with tempfile.TemporaryDirectory(prefix="fxforge-tvm-") as tmp:
                    path = Path(tmp) / LIB_FILE
                    path.write_bytes(self.library or b"")
                    with _without_noise_lines():
                        self.executable = tvm.runtime.load_module(str(path))
            self._vm, self._device = relax.VirtualMachine(self.executable, device), device
        return self._vm

    def run(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Run on the VM, one thread at a time (calls from two threads at once crashed it: SIGSEGV in its tensor
        allocator, or "Check failed: reg < frame->register_file.size()"); the outputs are views of the VM's
        memory, which ``Artifact.__call__`` copies. A lazily negated or conjugated input (``torch._neg_view``, the
        ``.imag`` of a conjugated tensor) is made plain first: DLPack hands over the memory without the bit, and the
        model ran on −x."""
        tvm = _tvm()
        with self._lock:
            vm, device = self.vm(), self._device
            if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():  # zero-copy both ways
                args = [tvm.runtime.from_dlpack(_aligned(resolved(t).contiguous())) for t in inputs]
            else:
                args = [tvm.runtime.tensor(resolved(t).cpu().contiguous().numpy(), device) for t in inputs]
            outputs = tuple(torch.from_dlpack(o).cpu() for o in vm["main"](*args))
        guarded = self.info.get(ZERO_DIVISORS, [])
        if guarded:
            outputs, flags = outputs[:-len(guarded)], outputs[-len(guarded):]
            for name, flag in zip(guarded, flags):
                if bool(flag):  # raised here, not by __call__: `fxforge run` and the checks call run itself
                    raise BackendError(f"the tvm artifact failed on inputs that match its signature: integer division "
                                       f"by zero at node {name!r} (eager raises ZeroDivisionError)")
        return self.checked_indices(inputs, outputs)

    def format(self) -> int:
        """Format 2 where the library returns zero-divisor counts after the outputs, which a format-1 reader would
        return as outputs."""
        return max(2, super().format()) if self.info.get(ZERO_DIVISORS) else super().format()

    def stored_bytes(self) -> int:
        """The library's bytes, linked once and kept: ``write`` then writes them as they are."""
        if self.library is None:
            with tempfile.TemporaryDirectory(prefix="fxforge-tvm-") as tmp:
                export_library(self.executable, Path(tmp) / LIB_FILE, self.target)
                self.library = (Path(tmp) / LIB_FILE).read_bytes()
        return len(self.library) + len(self.source.encode())

    def write(self, directory: Path) -> None:
        if self.library is not None:
            (directory / LIB_FILE).write_bytes(self.library)
        else:
            export_library(self.executable, directory / LIB_FILE, self.target)
        if self.source:
            (directory / CUDA_FILE).write_text(self.source)

    @classmethod
    def read(cls, directory: Path, signature: Signature, target: Target, info: dict[str, Any]) -> TvmArtifact:
        source = (directory / CUDA_FILE).read_text() if (directory / CUDA_FILE).exists() else ""
        return cls(signature, target, info, library=(directory / LIB_FILE).read_bytes(), source=source)


@register_backend
class TvmBackend(Backend):
    """torch.export → Relax → prepare (+ MetaSchedule database) → dlight → tvm.compile → Relax VM."""

    name = "tvm"
    artifact = TvmArtifact
    dynamic_int8 = False  # Relax imports no fxforge::dynamic_linear (nor has an int8 kernel for it)
    folded_biases = True  # Relax's importer has no int32 quantize

    def check_options(self, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - {"tune", "fast_math"})
        if unknown:
            raise BackendError(f"unknown tvm backend option(s) {', '.join(unknown)}; valid: fast_math, tune")
        if not isinstance(options.get("fast_math", True), bool):
            raise BackendError(f"fast_math must be True or False, got {options['fast_math']!r}")
        tune = options.get("tune")
        if tune is not None and not isinstance(tune, dict):
            raise BackendError(f"tune must be a dict like {{'trials': 64, 'db': 'path'}} or None, got {tune!r}")
        if tune is not None:
            from .rpc import free_servers, rpc_devices
            from .tuning import tune_options
            opts = tune_options(tune)
            if "rpc" in opts and opts["trials"]:  # an unreachable tracker or unknown key before any work
                free_servers(rpc_devices(opts["rpc"], need_tracker=True))

    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], signature: Signature,
              target: Target, **options: Any) -> TvmArtifact:
        self.check_options(options)
        tune, fast_math = options.pop("tune", None), options.pop("fast_math", True)
        tgt = tvm_target(target)
        info: dict[str, Any] = {"tvm_target": str(tgt), "lib_file": LIB_FILE, "fast_math": fast_math}
        divisions, guards = [n.name for n in integer_divisions(gm.graph)], [r.guard() for r in computed_indices(gm)]
        if divisions:
            info[ZERO_DIVISORS] = divisions
        if guards:
            info[INDEX_GUARDS] = guards
        mod = executable = None
        batch = signature.call_batch(example_inputs)  # before a fallback makes the signature static
        if signature.dynamic_batch and tune is None:  # MetaSchedule tunes static shapes
            try:
                mod, executable = _dynamic_build(gm, example_inputs, signature.batched(), tgt, fast_math)
            except BackendError as e:
                signature = signature.with_static_batch(example_inputs, f"tvm: TVM cannot compile this graph for a "
                                                                        f"symbolic batch ({e})")
        if executable is None:
            with _without_noise_lines():
                mod = prepare(relax_module(gm, example_inputs), tgt, fast_math=fast_math)
            if tune is not None:
                from .tuning import apply_tuning
                mod, info["tuning"] = apply_tuning(mod, tgt, tune, cross_compiler=target.cross_compiler)
                if signature.dynamic_batch:
                    signature = signature.with_static_batch(example_inputs,
                                                            "tvm: tuned for the example batch (static shapes)")
            executable = build(schedule(mod, tgt), tgt)
        if guards and batch is not None and not signature.dynamic_batch:  # built for the example's batch alone
            info[INDEX_GUARDS] = [batch_bound(g, batch) for g in guards]
        source, library = "", None
        if is_gpu(tgt):
            source = cuda_source(executable)
            _check_kernels(mod, source)
            info.update(cuda_file=CUDA_FILE, cuda_kernels=len(set(KERNEL.findall(source))))
        if target.cross_compiler is not None:  # link now: the library is the product, and it cannot run here
            with tempfile.TemporaryDirectory(prefix="fxforge-tvm-") as tmp:
                export_library(executable, Path(tmp) / LIB_FILE, target)
                library = (Path(tmp) / LIB_FILE).read_bytes()
            info["runs_on"] = f"{target.name} machines only (cross-compiled with {target.cross_compiler})"
        elif is_gpu(tgt):
            info["runs_on"] = f"a {tgt.kind.name} GPU with a {tgt.kind.name}-enabled TVM runtime"
        return TvmArtifact(signature, target, info, executable=executable, library=library, source=source)


def _dynamic_build(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], batched: Sequence[bool],
                   tgt: tvm.target.Target, fast_math: bool) -> tuple[tvm.IRModule, Any]:
    """The prepared module and executable of ``gm`` for any batch size, or a BackendError saying why TVM cannot build
    it so (the caller builds it for the example's batch then). Where the batch size is a value
    (:func:`_batch_as_value`) it is an error before ``prepare``, which crashed the process on such a graph; the
    importer and the build refuse others (a slice at the batch's end, ``std`` over the batch, a view of it). An
    error that is no batch's (an op without a converter) comes again from the static build, after a second import."""
    mod = relax_module(gm, example_inputs, batched=batched)
    used = _batch_as_value(mod)
    if used:
        raise BackendError(f"the batch size is a value: {used}")
    with _without_noise_lines():
        mod = prepare(mod, tgt, fast_math=fast_math)
    return mod, build(schedule(mod, tgt), tgt)


def _check_kernels(mod: tvm.IRModule, source: str) -> None:
    """Every PrimFunc must have become a ``__global__`` kernel; an unscheduled one silently runs on the host."""
    from tvm import tirx
    kernels = set(KERNEL.findall(source))
    missing = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, tirx.PrimFunc) and f"{gv.name_hint}_kernel" not in kernels]
    if missing:
        raise BackendError(f"{len(missing)} function(s) got no GPU kernel (no default schedule fits): "
                           f"{', '.join(missing[:5])}")

