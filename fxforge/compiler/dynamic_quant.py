"""``fxforge::dynamic_linear``: a linear with int8 weights whose activations are quantized per row at run time.

For an input x of shape [..., K] (each row r is one token), int8 weights W_q [N, K] with per-output-channel
scales s_w [N] and an optional float bias b:

    s_r = max(max_k |x_rk|, ε) / 127,      x_q = clamp(round(x / s_r), −127, 127)  (int8, round half to even)
    y_rn = (Σ_k x_q,rk · W_q,nk) · s_r · s_w,n + b_n              (int32 accumulation)

Per-row scales follow each token's own range, so no calibration is needed and one outlier token does not
coarsen the others' grid.

An input with a known lower bound m (``lower_bound``: GELU's output is ≥ −0.17, its tanh form's ≥ −0.1701, ReLU's ≥
0) is quantized shifted, on an unsigned per-row grid that spends all 256 levels on [m, max] instead of half of them
on [−max, −|m|]:

    x' = x − m ≥ 0,   s_r = max(max_k x'_rk, ε) / 255,   x_q = clamp(round(x' / s_r), 0, 255)   (uint8)
    y_rn = (Σ_k x_q,rk · W_q,nk) · s_r · s_w,n + m · (Σ_k W_q,nk) · s_w,n + b_n        (x = x' + m)

The second term is a constant per output channel, so a backend adds it to the bias; the step s_r is about half the
symmetric one. Measured on all-MiniLM-L6-v2's six FFN down-projections (they read GELU's output): min cosine of
the held-out embeddings 0.9990 against 0.9983 symmetric, the same as with those six linears in float (0.9991;
docs/quantization.md). The op is defined here, on the ground floor, because a pass (insert_qdq with
``activations="dynamic"``) emits it and backends lower it: the onnx backend to plain ONNX
(ReduceMax/Div/Round/Cast → MatMulInteger → Cast/Mul/Add) or, with its transformer fusions, to QuantizeLinear →
ORT's MatMulIntegerToFloat → Mul; ONNX Runtime runs both on its integer GEMM.
The torch implementation below is the reference both are checked against.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .ops import CLAMP, argument, aten, clamp_range, is_op

EPS = 1e-8
QMAX = 127
UQMAX = 255  # the unsigned grid of an input with a lower bound
# A bound at or below GELU's minimum: erf GELU min_x x·Φ(x) = −0.169971, its tanh form's −0.170041 (x ≈ −0.75)
GELU_LOWER_BOUND = {"none": -0.17, "tanh": -0.1701}


@torch.library.custom_op("fxforge::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, lower_bound: float | None = None) -> torch.Tensor:
    """y = (x_q @ W_q^T) · s_r · s_w + b with x_q the per-row symmetric int8 quantization of x, or with
    ``lower_bound`` m the unsigned 8-bit quantization of x − m plus m · Σ_k W_q · s_w (see module doc)."""
    if lower_bound is None:
        scale = x.abs().amax(-1, keepdim=True).clamp(min=EPS) / QMAX
        xq = torch.clamp(torch.round(x / scale), -QMAX, QMAX)
    else:
        x = x - lower_bound
        scale = x.amax(-1, keepdim=True).clamp(min=EPS) / UQMAX
        xq = torch.clamp(torch.round(x / scale), 0, UQMAX)
    acc = (xq.double() @ weight.double().T).float()  # exact: |acc| < 2^31 sums of 8-bit products
    y = acc * (scale * weight_scale)
    if lower_bound is not None:
        y = y + shift_term(weight, weight_scale, lower_bound)
    return y if bias is None else y + bias


def shift_term(weight: torch.Tensor, weight_scale: torch.Tensor, lower_bound: float) -> torch.Tensor:
    """m · Σ_k W_q,nk · s_w,n: what the shifted input x − m leaves out of x · Wᵀ (constant per output channel)."""
    return lower_bound * weight.float().sum(1) * weight_scale


@dynamic_linear.register_fake
def _(x, weight, weight_scale, bias, lower_bound=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


DYNAMIC_LINEAR = torch.ops.fxforge.dynamic_linear.default  # the op as graph nodes call it


def input_lower_bound(x: object) -> float | None:
    """The least value ``x`` can take where its producer bounds it (GELU: ``GELU_LOWER_BOUND`` of its form; relu,
    relu6 and clamps from 0: 0), the ``lower_bound`` a ``dynamic_linear`` reading it may shift by; else None."""
    if not isinstance(x, fx.Node):
        return None
    if is_op(x, aten.gelu):
        return GELU_LOWER_BOUND[argument(x, "approximate")]
    if is_op(x, *CLAMP) and clamp_range(x)[0] == 0.0:
        return 0.0
    return None
