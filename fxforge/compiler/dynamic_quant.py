"""``fxforge::dynamic_linear``: a linear with int8 weights whose activations are quantized per row at run time.

For an input x of shape [..., K] (each row r is one token), int8 weights W_q [N, K] with per-output-channel
scales s_w [N] and an optional float bias b:

    s_r = max(max_k |x_rk|, ε) / 127,      x_q = clamp(round(x / s_r), −127, 127)  (int8, round half to even)
    y_rn = (Σ_k x_q,rk · W_q,nk) · s_r · s_w,n + b_n              (int32 accumulation)

Per-row scales follow each token's own range, so no calibration is needed and one outlier token does not
coarsen the others' grid. The op is defined here, on the ground floor, because a pass (insert_qdq with
``activations="dynamic"``) emits it and backends lower it: the onnx backend to plain ONNX
(ReduceMax/Div/Round/Cast → MatMulInteger → Cast/Mul/Add) or, with its transformer fusions, to QuantizeLinear →
ORT's MatMulIntegerToFloat → Mul; ONNX Runtime runs both on its integer GEMM.
The torch implementation below is the reference both are checked against.
"""
from __future__ import annotations

import torch

EPS = 1e-8
QMAX = 127


@torch.library.custom_op("fxforge::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x_q @ W_q^T) · s_r · s_w + b with x_q the per-row symmetric int8 quantization of x (see module doc)."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=EPS) / QMAX
    xq = torch.clamp(torch.round(x / scale), -QMAX, QMAX)
    acc = (xq.double() @ weight.double().T).float()  # exact: |acc| < 2^31 sums of int8 products
    y = acc * (scale * weight_scale)
    return y if bias is None else y + bias


@dynamic_linear.register_fake
def _(x, weight, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
