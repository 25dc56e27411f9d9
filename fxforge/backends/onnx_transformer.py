"""ONNX Runtime's fused transformer kernels for the onnx backend (option ``fusions``).

Three steps, all checked against eager by the backend's artifact check:

1. **Attention.** fxforge's graph keeps ``aten.scaled_dot_product_attention`` whole (transformers' BERT, GPT-2,
   ViT… call it), so the exporter translates it here, not by the ONNX exporter's decomposition
   (MatMul/Mul/Where/Softmax/IsNaN/Where/MatMul, which no fusion recognises): q, k, v of shape [B, N, S, H]
   become [B, S, N·H] and one ``com.microsoft.MultiHeadAttention`` node computes
   ``softmax(q·kᵀ·scale + bias)·v`` per head; the layout transposes cancel against the model's own in ORT's
   optimizer. A boolean mask m becomes the additive bias ``where(m, 0, float32.min)``; a query row with every key
   masked then gets uniform weights where torch returns zeros, so the output is multiplied by ``max_k m`` (1 where
   any key is visible, else 0). Dropout, ``is_causal``, grouped-query heads, non-float32 or shapes with a symbolic
   head count keep the exporter's own translation.
2. **The rest of the block.** ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
   opt_level=0)`` (its Python fusions only; the session applies ORT's graph optimizations afterwards) turns
   MatMul → Add → Erf-GELU into ``BiasGelu``/``FastGelu`` and residual Add → LayerNormalization into
   ``SkipLayerNormalization`` where it can; ORT's own level-"extended" pass fuses the SkipLayerNormalizations
   it left. The embeddings keep a ``LayerNormalization``: fxforge folds the position embedding into a constant,
   which ``EmbedLayerNormalization``'s pattern does not match.

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
import io
import logging
import math
from collections import Counter
from typing import Any, Iterator

import onnx
import torch
import torch.fx as fx
from onnx.defs import OpSchema

from fxforge.compiler import dynamic_quant

FUSIONS = ("auto", "transformer", "none")
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
    from onnxscript.values import Op, Opset

    shapes = [v.shape for v in (query, key, value)]
    plain = (dropout_p == 0.0 and not is_causal and not enable_gqa and query.dtype == ir.DataType.FLOAT
             and all(s is not None and len(s) == 4 and isinstance(s[1], int) and isinstance(s[3], int)
                     for s in shapes)
             and len({(s[1], s[3]) for s in shapes}) == 1)
    if not plain:
        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 enable_gqa)
    heads, head = shapes[0][1], shapes[0][3]
    mha = Op(Opset("com.microsoft", 1), "MultiHeadAttention", MHA_SCHEMA)
    bsd = op.Constant(value_ints=[0, 0, heads * head])
    q, k, v = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), bsd) for t in (query, key, value))
    boolean = attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL
    bias = op.Where(attn_mask, op.Constant(value_float=0.0),
                    op.Constant(value_float=float(torch.finfo(torch.float32).min))) if boolean else attn_mask
    out = mha(q, k, v, None, None, bias, num_heads=heads, scale=1.0 / math.sqrt(head) if scale is None else scale)
    out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head])), perm=[0, 2, 1, 3])
    if boolean:  # rows with no visible key: zeros, as torch computes them
        out = op.Mul(out, op.ReduceMax(op.Cast(attn_mask, to=ir.DataType.FLOAT), op.Constant(value_ints=[-1]),
                                       keepdims=1))
    return out


def _dynamic_linear(x, weight, weight_scale, bias=None):
    """``fxforge::dynamic_linear`` (per-row int8 activations) on ORT's fused integer kernel: x_q =
    QuantizeLinear(x, s_r) per row, then ``MatMulIntegerToFloat(x_q, W_q, 1, s_w)`` (its integer GEMM rescaled per
    output column in the same kernel), · s_r, + b. The plain-ONNX form (onnx.py) spells the quantization in seven
    elementwise ops and the rescale in three."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    row_max = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)  # [..., 1]
    scale = op.Div(op.Max(row_max, op.Constant(value_float=dynamic_quant.EPS)),
                   op.Constant(value_float=float(dynamic_quant.QMAX)))
    # QuantizeLinear takes a per-axis scale on a 2-D view [rows, K]; uint8 x_q + 128 are the same integers on
    # ORT's u8s8 GEMM, its fast path
    flat = op.Reshape(scale, op.Constant(value_ints=[-1]))
    u128 = lambda shape: op.Constant(value=ir.tensor(np.full(shape, 128, dtype=np.uint8)))  # noqa: E731
    q = op.QuantizeLinear(op.Reshape(x, op.Constant(value_ints=[-1, x.shape[-1]])), flat,
                          op.Expand(u128([1]), op.Shape(flat)), axis=0)
    mm = Op(Opset("com.microsoft", 1), "MatMulIntegerToFloat", MATMUL_INTEGER_TO_FLOAT_SCHEMA)
    # x_q back in x's shape, so shapes stay known and the bias add still fuses (BiasGelu, SkipLayerNormalization)
    y = mm(op.Reshape(q, op.Shape(x)), op.Transpose(weight, perm=[1, 0]), op.Constant(value_float=1.0),
           weight_scale, u128([]))
    y = op.Mul(y, scale)  # the row scale last: the kernel's a_scale is per tensor or per column of x, not per row
    return y if bias is None else op.Add(y, bias)


TRANSLATIONS = {SDPA: _sdpa, torch.ops.fxforge.dynamic_linear.default: _dynamic_linear}


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after onnxruntime.transformers' BERT fusions (Python fusions only, ``opt_level=0``)."""
    from onnxruntime.transformers.optimizer import optimize_model
    with _quiet():
        return optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0).model


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
