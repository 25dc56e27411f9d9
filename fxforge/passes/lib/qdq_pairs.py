"""The quantize→dequantize pairs static int8 writes into a graph: an activation's pair (shared by all its readers),
a weight's and a bias's pair (the math is in passes/insert_qdq.py's docstring and lib/qdq.py)."""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, get_tensor
from fxforge.compiler.ops import WEIGHTED, bias_of, is_op, qd, set_argument, weight_of
from fxforge.compiler.target import Target

from .qdq import INT32, QDQ_KEY, bias_scales, bounds, weight_scales


def weight_qmax(reduce_range: bool | None, target: Target) -> int:
    """The weights' q_max: 63 (7 bits) with ``reduce_range``, by default (None) where the target's u8s8 products
    saturate (x86 without VNNI or AMX), else 127."""
    reduced = reduce_range if reduce_range is not None else target.saturates_u8s8()
    return 63 if reduced else 127


def quantize_activation(gm: fx.GraphModule, tensor: fx.Node, group: int, dtype: torch.dtype,
                        symmetric: bool) -> None:
    """Route every reader of ``tensor`` through one new per-tensor Q → DQ pair of grid ``group`` (scale 1 and zero
    point 0 until ranges are fitted)."""
    qmin, qmax = bounds(dtype)
    meta = {"role": "activation", "group": group, "symmetric": symmetric}
    with gm.graph.inserting_after(tensor):
        q = gm.graph.call_function(qd.quantize_per_tensor.default, (tensor, 1.0, 0, qmin, qmax, dtype))
    with gm.graph.inserting_after(q):
        dq = gm.graph.call_function(qd.dequantize_per_tensor.default, (q, 1.0, 0, qmin, qmax, dtype))
    q.meta[QDQ_KEY], dq.meta[QDQ_KEY] = meta, dict(meta)
    # a constant read as an activation (``h @ enc.weight``, a tied head) keeps its own quantizer where a layer
    # reads it as its weight or bias: per channel, as quantize_weight gives every weight
    tensor.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q and not (
        is_op(user, *WEIGHTED) and tensor in (weight_of(user), bias_of(user))))


def quantize_weight(gm: fx.GraphModule, op: fx.Node, qmax: int, per_channel: bool) -> None:
    """Route ``op``'s weight through a symmetric int8 pair in [−qmax − 1, qmax] (per output channel or per tensor),
    and its bias, if any, through an int32 pair of scale s_x · s_c."""
    weight = get_tensor(gm, weight_of(op))
    scales = weight_scales(weight, qmax, per_channel)
    if per_channel:
        params = (add_tensor(gm, op, f"{op.name}_weight_scale", scales),
                  add_tensor(gm, op, f"{op.name}_weight_zero_point", torch.zeros(len(scales), dtype=torch.int64)))
        _pair(gm, op, "weight", (*params, 0, -qmax - 1, qmax, torch.int8), qd.quantize_per_channel.default,
              qd.dequantize_per_channel.default)
    else:
        _pair(gm, op, "weight", (float(scales), 0, -qmax - 1, qmax, torch.int8),
              qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)
    bias = bias_of(op)
    if bias is not None:
        channels = get_tensor(gm, bias).shape[0]
        scale = add_tensor(gm, op, f"{op.name}_bias_scale", bias_scales(gm, op, channels))
        zero = add_tensor(gm, op, f"{op.name}_bias_zero_point", torch.zeros(channels, dtype=torch.int64))
        _pair(gm, op, "bias", (scale, zero, 0, *INT32, torch.int32), qd.quantize_per_channel.default,
              qd.dequantize_per_channel.default)


def _pair(gm: fx.GraphModule, op: fx.Node, kind: str, params: tuple, q_op, dq_op) -> None:
    """Route ``op``'s argument ``kind`` ("weight" or "bias") through a new Q → DQ pair."""
    with gm.graph.inserting_before(op):
        q = gm.graph.call_function(q_op, (weight_of(op) if kind == "weight" else bias_of(op), *params))
        dq = gm.graph.call_function(dq_op, (q, *params))
    q.meta[QDQ_KEY], dq.meta[QDQ_KEY] = {"role": kind}, {"role": kind}
    set_argument(op, kind, dq)
