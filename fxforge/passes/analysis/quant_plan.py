"""Where static int8 goes: which tensors get a quantize→dequantize pair, which of them share one grid, and which
weighted ops get int8 weights. insert_qdq decides with this and then rewrites; nothing here changes the graph.

- Activations: one pair per tensor, shared by all its readers, on the inputs of conv, linear, matmul/bmm, cat and
  average pooling, and on their outputs (after a following relu/relu6, the tensor an int8 kernel would emit).
- An add whose two inputs are already planned (a CNN's residual) is planned too; one that would quantize a float
  stream (a pre-norm transformer's residual, measured: ViT cosine 0.983 instead of 0.9986) is not.
- A sigmoid of a planned tensor, and a mul of two planned tensors (a SiLU split into x · sigmoid(x), a
  squeeze-excitation gate), are planned too: each becomes an int8 kernel between its pairs (ONNX Runtime's
  QLinearSigmoid, QLinearMul) instead of a float island with a dequantize before and a quantize after.
- cat's inputs and output, and maxpool/view/flatten/relu outputs, join their input's group (one scale), so no
  requantization happens there.
- A tensor that already is a dequantize output (a model that brings its own QDQ nodes) is read on its own grid,
  not planned again (``reused_grids`` counts such reads); nor is one that already feeds a quantize.
- A weighted op or matmul the caller refuses (``refusal(node)`` returns a reason) stays float and is counted as
  ``skipped.<reason>``; the planned ones as ``quantized.<op>``.
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, Callable

import torch.fx as fx

from fxforge.compiler.ops import CLAMP, MATMUL, WEIGHTED, aten, data, is_op, op_name, operands

from ..lib.qdq import is_dq, is_q

# ops that average their input (2-D average pooling, a mean): with a planned input, their output is planned too
AVERAGE_POOLS = (aten.adaptive_avg_pool2d, aten.avg_pool2d, aten.mean)
# ops whose output values are some of their input's (or 0, after relu): their output shares their input's grid
SAME_GRID = (aten.max_pool2d, aten.view, aten.reshape, aten.flatten, aten._unsafe_view, aten.relu)


def plan_static(gm: fx.GraphModule, is_float: Callable[[Any], bool], refusal: Callable[[fx.Node], str | None],
                stats: Counter) -> tuple[dict[fx.Node, int], list[fx.Node]]:
    """The activation tensors to quantize (tensor → grid group) and the weighted ops whose weights go int8."""
    groups = itertools.count()
    plan: dict[fx.Node, int] = {}
    weighted: list[fx.Node] = []

    def want(t: fx.Node, group: int | None = None) -> None:
        if is_dq(t):
            stats["reused_grids"] += 1
        elif is_float(t) and t not in plan and not any(is_q(u) for u in t.users):
            plan[t] = group if group is not None else next(groups)

    for node in list(gm.graph.nodes):
        if is_op(node, *WEIGHTED, *MATMUL):
            reason = refusal(node)
            if reason:
                stats[f"skipped.{reason}"] += 1
                continue
            for x in operands(node) if is_op(node, *MATMUL) else (data(node),):
                want(x)
            if is_op(node, *WEIGHTED):
                weighted.append(node)
            stats[f"quantized.{op_name(node)}"] += 1
            want(chain_end(node))
        elif is_op(node, aten.add) and len(node.all_input_nodes) == 2 and all(i in plan for i in operands(node)):
            for x in node.all_input_nodes:
                want(x)
            want(chain_end(node))
        elif (is_op(node, aten.sigmoid) and data(node) in plan) or \
                (is_op(node, aten.mul) and len(node.all_input_nodes) == 2 and all(i in plan for i in operands(node))):
            want(node)
        elif is_op(node, aten.cat) and any(i in plan for i in data(node)):
            group = next(groups)
            for x in [*data(node), node]:
                merged = plan.get(x)
                plan.update({t: group for t, g in plan.items() if g == merged})
                want(x, group)
        elif is_op(node, *AVERAGE_POOLS) and data(node) in plan:
            want(chain_end(node))
        elif is_op(node, *SAME_GRID) and data(node) in plan:
            want(node, plan[data(node)])
    return plan, weighted


def chain_end(node: fx.Node) -> fx.Node:
    """``node``, or the relu/relu6/clamp that is its only reader (the tensor an int8 kernel would emit; a clamp
    with per-channel bounds is what equalize makes of a relu6)."""
    while len(node.users) == 1 and is_op(next(iter(node.users)), *CLAMP, aten.clamp.Tensor):
        node = next(iter(node.users))
    return node
