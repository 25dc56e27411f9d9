"""ONNX Runtime's fused transformer kernels for the onnx backend (option ``fusions``).

Two steps, both checked against eager by the backend's artifact check:

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


TRANSLATIONS = {SDPA: _sdpa}


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
