"""ONNX Runtime's fused transformer kernels for the onnx backend (option ``fusions``).

Three steps, all checked against eager by the backend's artifact check:

1. **Attention.** fxforge's graph keeps ``aten.scaled_dot_product_attention`` whole (transformers' BERT, GPT-2,
   ViT… call it), so the exporter translates it here, not by the ONNX exporter's decomposition
   (MatMul/Mul/Where/Softmax/IsNaN/Where/MatMul, which no fusion recognises): q, k, v of shape [B, N, S, H]
   become [B, S, N·H] and one ``com.microsoft.MultiHeadAttention`` node computes
   ``softmax(q·kᵀ·scale + bias)·v`` per head; the layout transposes cancel against the model's own in ORT's
   optimizer. A boolean mask m becomes the additive bias ``where(m, 0, float32.min)``, and an additive mask's −inf
   becomes float32.min (ORT's softmax of a row of −inf is NaN); a query row with every key masked then gets uniform
   weights where torch returns zeros, so the output is multiplied by ``max_k m`` (1 where any key is visible, else
   0; m: the mask, or where the additive mask is not −inf). Keys that every query of the batch masks (a padded
   batch's tail) have weight exactly 0, so key, value and bias are cut after the last visible key
   (:func:`_visible_keys`): ORT never computes their scores, which its CPU softmax runs on a slow exp path
   (docs/quantization.md). Dropout, ``is_causal``, grouped-query heads, non-float32, a mask broadcast over the keys
   ([B, 1, S_q, 1]: the kernel's bias needs a column per key) or shapes with a symbolic head count keep the
   exporter's own translation, whose rows with no visible key are zeroed the same way. Where q, k and v are
   projections of one input (self-attention, BERT's), the three GEMMs are packed into one of three times the width
   (:func:`pack_qkv`): fp32 attention without a cut becomes ORT's ``Attention`` (packed weight, projection inside the
   kernel); with a cut, the query's GEMM reads every row and one packed GEMM of key and value only the rows the cut
   keeps (the padded keys are never projected), split into k and v for MultiHeadAttention; dynamic int8 the same
   with MatMulIntegerToFloat.
2. **The rest of the block.** ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
   opt_level=0)`` (its Python fusions only; the session applies ORT's graph optimizations afterwards) turns the
   Erf-GELU into ORT's ``Gelu`` (tanh form: ``FastGelu``). For a GPU target it also fuses MatMul → Add → GELU into
   ``BiasGelu`` and residual Add → LayerNormalization into ``SkipLayerNormalization``; on CPU (the session's only
   provider) neither, and the session disables ORT's own ``SkipLayerNormFusion`` and ``BiasGeluFusion``
   (:data:`CPU_SLOWER_FUSIONS`): ORT 1.32's CPU ``SkipLayerNormalization`` is a scalar per-row loop (a division per
   element, sequential sums), measured 6× slower than ``Add`` + ``LayerNormalization`` on [1, 128, 384] (310–350
   µs against 49–61 µs, 1 thread; also at 8 × 64 and 2 threads), and ``BiasGelu`` 1.3× slower than ``Add`` +
   ``Gelu`` on [1, 128, 1536] (240 against 178–187 µs). The embeddings keep a ``LayerNormalization``: fxforge folds
   the position embedding into a constant, which ``EmbedLayerNormalization``'s pattern does not match.

3. **Dynamic int8 linears.** ``fxforge::dynamic_linear`` becomes ``QuantizeLinear`` (one per-row scale) →
   ``com.microsoft.MatMulIntegerToFloat`` → ``Mul`` by the row scale, so ORT runs its integer GEMM with the
   per-column rescale fused, instead of the plain form's elementwise quantization and rescale ops (onnx.py).
   Measured on MiniLM's int8_dynamic graph: the artifact is closer to the graph (relative error 0.015 against
   0.040); 0.99× the plain form's speed in one interleaved run, 1.20–1.38× in benchmarks/minilm.py
   (docs/quantization.md).

The result is ONNX with ``com.microsoft`` ops: it runs on ONNX Runtime only. Measured on all-MiniLM-L6-v2
(docs/quantization.md, two runs): 1.02–1.19× over the same graph without these fusions at batch 8 × 64 and
1 × 128, which is why "auto" applies them to every graph holding an attention.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections import Counter
from typing import Any, Iterator

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx.defs import OpSchema

from fxforge.compiler import dynamic_quant

FUSIONS = ("auto", "transformer", "none")
# ORT graph optimizers whose fused CPU kernel is slower than the ops it replaces (module doc, step 2): off on CPU
CPU_SLOWER_FUSIONS = ("SkipLayerNormFusion", "BiasGeluFusion")
# ORT kernels that the transformer fusions produce, counted in the ORT-optimized graph (info["ort_transformer_ops"])
TRANSFORMER_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization",
                   "LayerNormalization", "BiasGelu", "FastGelu", "Gelu", "GemmFastGelu")
SDPA = torch.ops.aten.scaled_dot_product_attention.default

_P = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional
# ORT's contrib op, declared for the exporter (onnx itself knows no com.microsoft schemas); inputs up to the bias
MHA_SCHEMA = OpSchema(
    "MultiHeadAttention", "com.microsoft", 1,
    inputs=[_P("query", "T"), _P("key", "T", param_option=_OPTIONAL), _P("value", "T", param_option=_OPTIONAL),
            _P("bias", "T", param_option=_OPTIONAL), _P("key_padding_mask", "M", param_option=_OPTIONAL),
            _P("attention_bias", "T", param_option=_OPTIONAL)],
    outputs=[_P("output", "T")],
    type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "", required=True),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False)],
)

MATMUL_INTEGER_TO_FLOAT_SCHEMA = OpSchema(
    "MatMulIntegerToFloat", "com.microsoft", 1,
    inputs=[_P("A", "T1"), _P("B", "T2"), _P("a_scale", "T3"), _P("b_scale", "T3"),
            _P("a_zero_point", "T1", param_option=_OPTIONAL), _P("b_zero_point", "T2", param_option=_OPTIONAL),
            _P("bias", "T3", param_option=_OPTIONAL)],
    outputs=[_P("Y", "T3")],
    type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(int8)"], ""), ("T3", ["tensor(float)"], "")],
)


def resolve(fusions: str, gm: fx.GraphModule) -> str:
    """The fusions to apply: "auto" means "transformer" when the graph holds an attention, else "none"."""
    if fusions != "auto":
        return fusions
    return "transformer" if any(n.op == "call_function" and n.target == SDPA for n in gm.graph.nodes) else "none"


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``aten.scaled_dot_product_attention`` as ``com.microsoft.MultiHeadAttention`` (see the module doc)."""
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

    shapes = [v.shape for v in (query, key, value)]
    if attn_mask is None and all(s is not None for s in shapes) and len({len(s) for s in shapes}) == 1 and \
            len(shapes[0]) > 4 and all(isinstance(d, int) for s in shapes for d in s[1:-3]) and \
            len({tuple(s[1:-3]) for s in shapes}) == 1 and len({str(s[0]) for s in shapes}) == 1:  # no broadcast
        # q, k, v [*batch, N, S, H] (windowed attention, twins): one batch dimension for the 4-D form and back, as
        # torch computes each leading index apart (torchlib's translation takes 4-D alone: the export failed)
        flat, last = [], op.Constant(value_ints=[len(shapes[0])])
        for t, shape in zip((query, key, value), shapes):
            inner = op.Slice(op.Shape(t), op.Constant(value_ints=[-3]), last)  # N, S, H
            flat.append(op.Reshape(t, op.Concat(op.Constant(value_ints=[-1]), inner, axis=0)))
            batch = list(shape[:-3])
            flat[-1].shape = ir.Shape([math.prod(batch) if all(isinstance(d, int) for d in batch) else None,
                                       *shape[-3:]])
            flat[-1].dtype = t.dtype
        out = _sdpa(*flat, None, dropout_p, is_causal, scale, enable_gqa)
        lead = op.Slice(op.Shape(query), op.Constant(value_ints=[0]), op.Constant(value_ints=[-2]))
        tail = op.Slice(op.Shape(out), op.Constant(value_ints=[-2]), op.Constant(value_ints=[4]))  # S, H of v
        return op.Reshape(out, op.Concat(lead, tail, axis=0))
    keys = shapes[1][2] if shapes[1] is not None and len(shapes[1]) == 4 else None
    # MultiHeadAttention takes a bias with a column per key: a mask broadcast over the keys ([B, 1, S_q, 1]) is not one
    per_key = attn_mask is None or (attn_mask.shape is not None and attn_mask.shape[-1] != 1) or keys == 1
    plain = (dropout_p == 0.0 and not is_causal and not enable_gqa and query.dtype == ir.DataType.FLOAT and per_key
             and all(s is not None and len(s) == 4 and isinstance(s[1], int) and isinstance(s[3], int)
                     for s in shapes)
             and len({(s[1], s[3]) for s in shapes}) == 1)
    boolean = attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL
    mask_shape = None if attn_mask is None else attn_mask.shape  # (the Where below has none known)
    lowest = op.Constant(value_float=float(torch.finfo(torch.float32).min))
    visible = None  # where the mask lets a key through, for the rows with none (below)
    if boolean:
        visible = attn_mask
    elif attn_mask is not None and attn_mask.dtype == ir.DataType.FLOAT:
        # an additive mask: −inf hides a key, as float32.min does without making a row of −inf NaN
        hidden = op.IsInf(attn_mask, detect_positive=0)
        attn_mask, visible = op.Where(hidden, lowest, attn_mask), op.Not(hidden)
    if plain:
        out = _multi_head_attention(query, key, value, shapes, attn_mask, mask_shape, boolean, lowest, scale)
    else:
        out = aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                enable_gqa)
    if visible is not None:  # rows with no visible key: zeros, as torch computes them
        out = op.Mul(out, op.ReduceMax(op.Cast(visible, to=query.dtype), op.Constant(value_ints=[-1]), keepdims=1))
    return out


def _multi_head_attention(query, key, value, shapes, attn_mask, mask_shape, boolean, lowest, scale):
    """One ``com.microsoft.MultiHeadAttention`` for q, k, v [B, N, S, H] and a float32 or boolean mask of
    ``mask_shape`` (module doc)."""
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    heads, head = shapes[0][1], shapes[0][3]
    mha = Op(Opset("com.microsoft", 1), "MultiHeadAttention", MHA_SCHEMA)
    bsd = op.Constant(value_ints=[0, 0, heads * head])
    q, k, v = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), bsd) for t in (query, key, value))
    bias = op.Where(attn_mask, op.Constant(value_float=0.0), lowest) if boolean else attn_mask
    if boolean and mask_shape is not None and mask_shape[-1] != 1:  # a mask per key
        k, v, bias = _visible_keys(attn_mask, k, v, bias)
    queries = shapes[0][2]
    if attn_mask is not None and _without_query_rows(mask_shape) and queries != 1:
        # MultiHeadAttention takes a bias [B or 1, N or 1, S_q, S_k] only; a key-padding mask [B, 1, 1, S_k] (or a
        # 2-D or 3-D one) is broadcast over the queries first, as torch broadcasts it (a constant shape where S_q is
        # known: a computed one kept onnxruntime.transformers from fusing the graph)
        one = op.Constant(value_ints=[1])
        rows = op.Constant(value_ints=[queries]) if isinstance(queries, int) else \
            op.Slice(op.Shape(query), op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
        bias = op.Expand(bias, op.Concat(one, one, rows, one, axis=0))
    out = mha(q, k, v, None, None, bias, num_heads=heads, scale=1.0 / math.sqrt(head) if scale is None else scale)
    return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head])), perm=[0, 2, 1, 3])


def _without_query_rows(shape) -> bool:
    """Whether a bias of ``shape`` is known to lack a row per query: fewer than 4 dimensions, or dimension 2 of
    size 1. An unknown shape is left as it is (expanding it anyway broke onnxruntime.transformers' fusions)."""
    return shape is not None and (len(shape) < 4 or shape[2] == 1)


def _visible_keys(mask, k, v, bias):
    """k, v [B, S_k, N·H] and the additive bias [..., S_k] cut after the last key that some query of the batch sees:
    every later key has weight exactly 0 in every row (exp of float32.min), so the result is the same, and the
    masked scores, MLAS's slow exp path, are never computed (padded batches: docs/quantization.md)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    seen = op.ReduceMax(op.Cast(mask, to=ir.DataType.FLOAT), op.Constant(value_ints=list(range(len(mask.shape) - 1))),
                        keepdims=0)  # [S_k]: 1 where some query sees the key
    position = op.CumSum(op.Expand(op.Constant(value_float=1.0), op.Shape(seen)), op.Constant(value_int=0))  # 1..S_k
    end = op.Cast(op.Max(op.ReduceMax(op.Mul(seen, position), keepdims=1), op.Constant(value_floats=[1.0])),
                  to=ir.DataType.INT64)  # [1], at least one key
    start = op.Constant(value_ints=[0])
    cut = lambda t, axis: op.Slice(t, start, end, op.Constant(value_ints=[axis]))  # noqa: E731
    return cut(k, 1), cut(v, 1), cut(bias, -1)


def _dynamic_linear(x, weight, weight_scale, bias=None, lower_bound=None):
    """``fxforge::dynamic_linear`` (per-row int8 activations) on ORT's fused integer kernel: x_q =
    QuantizeLinear(x, s_r) per row, then ``MatMulIntegerToFloat(x_q, W_q, 1, s_w)`` (its integer GEMM rescaled per
    output column in the same kernel), · s_r, + b. With a ``lower_bound`` m, x − m on the unsigned grid (zero point
    0) and m · Σ_k W_q · s_w added to the bias (a subgraph of initializers only). The plain-ONNX form (onnx.py) spells the
    quantization in seven elementwise ops and the rescale in three."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    last, shape = op.Constant(value_ints=[-1]), op.Shape(x)
    rows = op.Constant(value_ints=[-1, x.shape[-1]])
    u8 = lambda dims, v: op.Constant(value=ir.tensor(np.full(dims, v, dtype=np.uint8)))  # noqa: E731
    if lower_bound is None:
        # max_k |x| as max(max_k x, −min_k x): two reductions reading x, no |x| tensor written (measured 1.09× /
        # 1.15× the Abs → ReduceMax form for MiniLM's int8 graph at 8 × 64 / 1 × 128, docs/quantization.md)
        row_max, qmax, zero = (op.Max(op.ReduceMax(x, last, keepdims=1), op.Neg(op.ReduceMin(x, last, keepdims=1))),
                               dynamic_quant.QMAX, 128)
    else:
        x = op.Sub(x, op.Constant(value_float=float(lower_bound)))
        row_max, qmax, zero = op.ReduceMax(x, last, keepdims=1), dynamic_quant.UQMAX, 0
    scale = op.Div(op.Max(row_max, op.Constant(value_float=dynamic_quant.EPS)), op.Constant(value_float=float(qmax)))
    # QuantizeLinear takes a per-axis scale on a 2-D view [rows, K]; symmetric: uint8 x_q + 128 are the same integers
    # on ORT's u8s8 GEMM, its fast path
    flat = op.Reshape(scale, op.Constant(value_ints=[-1]))
    q = op.QuantizeLinear(op.Reshape(x, rows), flat,
                          op.Expand(u8([1], zero), op.Shape(flat)), axis=0)
    mm = Op(Opset("com.microsoft", 1), "MatMulIntegerToFloat", MATMUL_INTEGER_TO_FLOAT_SCHEMA)
    # x_q back in x's shape, so shapes stay known and the bias add can still fuse (BiasGelu, SkipLayerNormalization)
    y = mm(op.Reshape(q, shape), op.Transpose(weight, perm=[1, 0]), op.Constant(value_float=1.0),
           weight_scale, u8([], zero))
    y = op.Mul(y, scale)  # the row scale last: the kernel's a_scale is per tensor or per column of x, not per row
    if lower_bound is not None:
        bias = shifted_bias(weight, weight_scale, bias, lower_bound)
    return y if bias is None else op.Add(y, bias)


def shifted_bias(weight, weight_scale, bias, lower_bound: float):
    """The bias of a ``dynamic_linear`` on the shifted grid: ``bias + m · Σ_k W_q[n, k] · s_w[n]`` (the
    ``x = x' + m`` term, :func:`fxforge.compiler.dynamic_quant.shift_term`), a subgraph of initializers only
    (whether ORT folds it is not checked); shared by both ONNX lowerings of the op."""
    from onnxscript import ir
    from onnxscript import opset18 as op
    shift = op.Mul(op.Mul(op.ReduceSum(op.Cast(weight, to=ir.DataType.FLOAT), op.Constant(value_ints=[1]), keepdims=0),
                          weight_scale), op.Constant(value_float=float(lower_bound)))
    return shift if bias is None else op.Add(bias, shift)


TRANSLATIONS = {SDPA: _sdpa, dynamic_quant.DYNAMIC_LINEAR: _dynamic_linear}


def optimize(model: onnx.ModelProto, cpu: bool = True) -> onnx.ModelProto:
    """``model`` with each attention's query, key and value projections packed into one GEMM (:func:`pack_qkv`,
    first: it reads ranks from ONNX shape inference, which knows no com.microsoft op), then after
    onnxruntime.transformers' BERT fusions (Python fusions only, ``opt_level=0``); for ``cpu`` without the two
    whose CPU kernels are slower (``SkipLayerNormalization``, ``BiasGelu``: module doc, step 2), and a ValueError
    where they made ``QOrdered*`` ops, which have CUDA kernels only (a session on CPU refused the model)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    options = FusionOptions("bert")
    if cpu:
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = options.enable_bias_gelu = False
        options.enable_qordered_matmul = False
    inputs = [copy.deepcopy(i) for i in model.graph.input]
    with _quiet():
        optimized = optimize_model(pack_qkv(model), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=options).model
    cuda_only = sorted({n.op_type for n in optimized.graph.node if n.op_type.startswith("QOrdered")})
    if cpu and cuda_only:  # its LayerNorm, GELU and attention fusions make them of signed int8 around those ops
        raise ValueError(f"they made {', '.join(cuda_only)}, which ONNX Runtime runs on CUDA only (signed int8 "
                         "activations around LayerNorm, GELU or attention)")
    # its pruning drops an input nothing reads (a mask a causal model ignores); the model still takes it
    kept = {i.name: i for i in optimized.graph.input}
    if len(kept) < len(inputs):
        del optimized.graph.input[:]
        optimized.graph.input.extend(kept.get(i.name, i) for i in inputs)
    return optimized


def pack_qkv(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each ``MultiHeadAttention`` whose query, key and value are projections x·W_i + b_i of one rank-3 input x
    (through the reshapes :func:`_sdpa` adds) computed from one packed weight [W_q | W_k | W_v]:

    * fp32 (MatMul → Add): ``com.microsoft.Attention(x, W_qkv, b_qkv, attention_bias=…)``, ORT's kernel for
      BERT's self-attention, which runs the three projections as one GEMM of three times the width;
    * fp32 with key and value cut by :func:`_visible_keys` (``Attention`` takes no shorter key): a MatMul of x on
      W_q, the same Slice of x's rows (key and value are rows of x's projections), a MatMul of those rows on
      [W_k | W_v] and a Split into k and v (:func:`_project`), and the packed bias given to MultiHeadAttention (its
      ``bias`` input);
    * dynamic int8 (:func:`_dynamic_linear`: MatMulIntegerToFloat → Mul by the row scale → Add): as the fp32 forms,
      each GEMM a MatMulIntegerToFloat on the concatenated int8 weights and column scales and a Mul by the row
      scale (cut with x_q's rows), also without a cut (packed GEMM and Split into q, k, v).

    Exact: concatenating the output columns of a GEMM changes no sum, and each row of a projection depends on its
    own row of x only (one per-row scale for the int8 form). Attentions of any other form (GPT-2's projection is
    already packed and split in the model) stay as they are."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    weights = {init.name: init for init in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value or d.dim_param or None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.value_info, *inferred.input) if v.type.tensor_type.HasField("shape")}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for mha in [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]:
        cuts = [_cut(name, producer) for name in mha.input[:3]]  # (source, Slice of :func:`_visible_keys` or None)
        projections = [_projection(source, producer, weights) for source, _ in cuts]
        if (any(p is None for p in projections) or any(mha.input[3:5]) or len({p[:2] for p in projections}) != 1
                or len({tuple(weights[p[2][0]].dims) for p in projections}) != 1  # one input, equal widths
                or cuts[0][1] is not None or len({tuple(c.input[1:]) if c else () for _, c in cuts[1:]}) != 1):
            continue
        sliced = cuts[1][1]
        kind, inputs = projections[0][:2]
        x = shapes.get(inputs[0] if kind == "MatMul" else inputs[0][0])
        if x is None or len(x) != 3:  # Attention takes x as [B, S, hidden]
            continue
        name = mha.name or mha.output[0]
        packed = lambda i, axis: np.concatenate(  # noqa: E731
            [numpy_helper.to_array(weights[p[2][i]]) for p in projections], axis)
        w, b = packed(0, -1), numpy_helper.from_array(packed(-1, 0), f"{name}_bias")
        graph.initializer.append(b)
        bias = mha.input[5] if len(mha.input) > 5 else ""
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        if kind == "MatMul" and sliced is None:
            weight = numpy_helper.from_array(w, f"{name}_weight")
            graph.initializer.append(weight)
            replaced[id(mha)] = [helper.make_node("Attention", [inputs[0], weight.name, b.name, "", "", bias],
                                                  list(mha.output), name=f"{name}_packed", domain="com.microsoft",
                                                  **attrs)]
            continue
        rows = [inputs[0]] if kind == "MatMul" else [inputs[0][0], inputs[1]]  # x; int8: x_q and its row scale
        scale = packed(1, 0) if kind != "MatMul" else None

        def gemm(columns: slice, source: list[str], out: str, w=w, scale=scale, quantized=inputs[0]) -> list:
            """``out`` = the projection of ``source`` (x; int8: x_q and its row scale) onto the packed weight's
            ``columns``."""
            weight = numpy_helper.from_array(w[:, columns], f"{out}_weight")
            graph.initializer.append(weight)
            if scale is None:
                return [helper.make_node("MatMul", [source[0], weight.name], [out])]
            s = numpy_helper.from_array(scale[columns], f"{out}_weight_scale")
            graph.initializer.append(s)
            _, _, a_scale, _, zero = quantized
            return [helper.make_node("MatMulIntegerToFloat", [source[0], weight.name, a_scale, s.name, zero],
                                     [f"{out}_acc"], domain="com.microsoft"),
                    helper.make_node("Mul", [f"{out}_acc", source[1]], [out])]
        # the key's rows are x's rows (the same leading dimensions as x, or int8: as the row scale computed from x
        # with x_q, whose own shape inference cannot follow): the cut can move before the projection
        lead = shapes.get(rows[-1], [])[:2]
        early = (sliced is not None and len(lead) == 2 and None not in lead
                 and shapes.get(cuts[1][0], [])[:2] == lead)
        qkv = [f"{name}_{t}" for t in ("q", "k", "v")]
        new = [*_project(gemm, rows, qkv, sliced, early, w.shape[-1] // 3),
               helper.make_node("MultiHeadAttention", [*qkv, b.name, "", bias], list(mha.output),
                                name=f"{name}_packed", domain="com.microsoft", **attrs)]
        replaced[id(mha)] = new
    if not replaced:
        return model
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(_live(nodes, [o.name for o in graph.output]))
    used = {i for node in graph.node for i in node.input}
    produced = {o for node in graph.node for o in node.output}
    for field, live in ((graph.initializer, used), (graph.value_info, used | produced)):
        kept = [v for v in field if v.name in live]
        del field[:]
        field.extend(kept)
    return model


def _project(gemm, rows: list[str], qkv: list[str], sliced: onnx.NodeProto | None, early: bool,
             width: int) -> list[onnx.NodeProto]:
    """Nodes computing q, k, v (named ``qkv``) with ``gemm(columns, rows, out)``, the projection of ``rows`` onto
    columns of the packed weight [W_q | W_k | W_v] (each ``width`` wide). Without a cut of the keys one GEMM and a
    Split. With one (``sliced``, the Slice of :func:`_visible_keys`): where ``early``, q from all rows and k, v from
    the rows that Slice keeps, so the cut-off keys are never projected (at MiniLM's 8 × 64, 19 of 64 rows: half the
    q/k/v GEMM saved); else the packed GEMM, a Split, and the Slice of k and v."""
    from onnx import helper

    q, k, v = qkv
    cut = lambda t, out: helper.make_node("Slice", [t, *sliced.input[1:]], [out])  # noqa: E731
    if not early:
        nodes = [*gemm(slice(None), rows, f"{q}kv"),
                 helper.make_node("Split", [f"{q}kv"], [q, f"{k}_all", f"{v}_all"] if sliced else qkv, axis=-1,
                                  num_outputs=3)]
        return nodes + ([cut(f"{k}_all", k), cut(f"{v}_all", v)] if sliced else [])
    kept = [f"{q}_rows{i}" for i in range(len(rows))]
    return [*gemm(slice(None, width), rows, q), *(cut(r, c) for r, c in zip(rows, kept)),
            *gemm(slice(width, None), kept, f"{k}v"),
            helper.make_node("Split", [f"{k}v"], [k, v], axis=-1, num_outputs=2)]


def _cut(name: str, producer: dict) -> tuple[str, onnx.NodeProto | None]:
    """(what ``name`` slices, the Slice) where ``name`` is a key/value cut by :func:`_visible_keys`, else (name,
    None)."""
    node = producer.get(name)
    return (node.input[0], node) if node is not None and node.op_type == "Slice" else (name, None)


def _projection(name: str, producer: dict, weights: dict) -> tuple | None:
    """(kind, shared inputs, per-projection initializers) of the projection ``name`` reads through reshapes:
    ("MatMul", (x, ), (W, b)) for x·W + b; ("MatMulIntegerToFloat", ((x_q, ·, a_scale, ·, zero), row_scale),
    (W_q, s_w, b)) for MatMulIntegerToFloat(x_q, W_q, a_scale, s_w, zero)·row_scale + b; None otherwise."""
    node = producer.get(name)
    while node is not None and node.op_type == "Reshape":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Add" or len(weights.get(node.input[1], _EMPTY).dims) != 1:
        return None  # a bias [N]
    gemm = producer.get(node.input[0])
    if gemm is not None and gemm.op_type == "MatMul" and len(weights.get(gemm.input[1], _EMPTY).dims) == 2:
        return "MatMul", (gemm.input[0],), (gemm.input[1], node.input[1])
    if gemm is None or gemm.op_type != "Mul":
        return None
    integer = producer.get(gemm.input[0])
    if (integer is None or integer.op_type != "MatMulIntegerToFloat" or len(integer.input) != 5
            or len(weights.get(integer.input[1], _EMPTY).dims) != 2
            or len(weights.get(integer.input[3], _EMPTY).dims) != 1):  # per-column weight scales [N]
        return None
    shared = (integer.input[0], "", integer.input[2], "", integer.input[4])
    return "MatMulIntegerToFloat", (shared, gemm.input[1]), (integer.input[1], integer.input[3], node.input[1])


_EMPTY = onnx.TensorProto()


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """``nodes`` (in topological order) without those whose outputs nothing reads."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def transformer_ops(optimized: onnx.ModelProto) -> dict[str, int]:
    """The fused transformer kernels in ORT's optimized graph, by op type."""
    ops = Counter(n.op_type for n in optimized.graph.node if n.op_type in TRANSFORMER_OPS)
    return dict(sorted(ops.items()))


@contextlib.contextmanager
def _quiet() -> Iterator[Any]:
    """The optimizer prints and logs warnings (failed symbolic shape inference on a dynamic batch) a user cannot
    act on."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
