"""Floating-point operations (2 per multiply-accumulate) of the compute-heavy ops, per node.

Counts conv (any groups), linear, matmul/bmm/addmm and scaled-dot-product attention; elementwise ops are
negligible next to them and are not counted. Shapes come from the Shapes analysis.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.fx as fx

from ..ops import CONV, LINEAR, argument, aten, data, is_op, weight_of
from .base import Analysis
from .shapes import Shapes, TensorInfo

if TYPE_CHECKING:
    from ..pass_manager import PassContext


class Flops(Analysis):
    """node name → FLOPs on the example inputs; ``sum(values())`` is the model's."""

    name = "flops"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        shapes: dict[str, TensorInfo] = ctx.analysis(Shapes, gm)
        out: dict[str, int] = {}
        for node in gm.graph.nodes:
            f = node_flops(node, shapes)
            if f:
                out[node.name] = f
        return out


def _shape(node, shapes: dict[str, TensorInfo]) -> tuple[int, ...] | None:
    info = shapes.get(node.name) if isinstance(node, fx.Node) else None
    return info.shape if info else None


def node_flops(node: fx.Node, shapes: dict[str, TensorInfo]) -> int:
    """FLOPs of one node (0 for ops that are not counted)."""
    out = _shape(node, shapes)
    if out is None or node.op != "call_function":
        return 0
    if is_op(node, *CONV, aten.convolution, aten._convolution):
        w = _shape(weight_of(node), shapes)
        # weight is (C_out, C_in/groups, *k): each output element takes C_in/groups·prod(k) MACs
        return 2 * math.prod(out) * math.prod(w[1:]) if w else 0
    if is_op(node, *LINEAR):
        w = _shape(weight_of(node), shapes)
        return 2 * math.prod(out) * w[1] if w else 0
    if is_op(node, aten.addmm, aten.mm, aten.bmm, aten.matmul, aten.baddbmm):
        a = _shape(argument(node, "mat1") if is_op(node, aten.addmm) else
                   argument(node, "batch1") if is_op(node, aten.baddbmm) else data(node), shapes)
        return 2 * math.prod(out) * a[-1] if a else 0
    if is_op(node, aten.scaled_dot_product_attention):
        q, v = _shape(argument(node, "query"), shapes), _shape(argument(node, "value"), shapes)
        if not q or not v:
            return 0
        kv_len = v[-2]
        return 2 * math.prod(q[:-1]) * kv_len * (q[-1] + v[-1])
    return 0
