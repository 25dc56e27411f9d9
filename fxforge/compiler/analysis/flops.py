"""Floating-point operations (2 per multiply-accumulate) of the compute-heavy ops, per node.

Counts what PyTorch's own counter (``torch.utils.flop_counter``) counts: every convolution (any groups, transposed
too), linear, matmul/bmm/addmm/einsum, recurrent layer and cell (LSTM, GRU, RNN: their gate products) and
scaled-dot-product attention. Each such node runs once on meta tensors of its inputs' shapes under
``FlopCounterMode``, which sees the products a composite op dispatches to, so an op is counted as PyTorch counts it
rather than by a formula of our own (the hand-written one knew conv, linear and matmul alone: a ConvTranspose decoder,
an einsum or an LSTM counted 0).
A linear with int8 weights (``fxforge::dynamic_linear``) is counted as the float linear it replaces: quantization
changes the kind of arithmetic, not its amount. Elementwise ops are negligible next to these and are not counted.
Shapes come from the Shapes analysis.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from ..dynamic_quant import DYNAMIC_LINEAR
from ..ops import CONV, LINEAR, MATMUL, argument, aten, is_op
from .base import Analysis
from .shapes import Shapes, TensorInfo

if TYPE_CHECKING:
    from ..pass_manager import PassContext

COUNTED = (*CONV, *LINEAR, *MATMUL, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
           aten.convolution, aten._convolution, aten.addmm, aten.baddbmm, aten.einsum,
           aten.scaled_dot_product_attention, aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu, aten.lstm_cell,
           aten.gru_cell, aten.rnn_tanh_cell, aten.rnn_relu_cell)


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


def node_flops(node: fx.Node, shapes: dict[str, TensorInfo]) -> int:
    """FLOPs of one node (0 for ops that are not counted, and for one whose inputs have no recorded shape)."""
    if is_op(node, DYNAMIC_LINEAR):
        out, weight = shapes.get(node.name), shapes.get(getattr(argument(node, "weight"), "name", ""))
        return 2 * math.prod(out.shape) * weight.shape[1] if out and weight else 0
    if not is_op(node, *COUNTED):
        return 0
    try:
        args, kwargs = pytree.tree_map_only(fx.Node, lambda n: _meta(shapes[n.name]), (node.args, node.kwargs))
    except KeyError:
        return 0
    with FlopCounterMode(display=False) as counter:
        node.target(*args, **kwargs)
    return counter.get_total_flops()


def _meta(info: TensorInfo) -> torch.Tensor:
    return torch.empty(info.shape, dtype=info.dtype, device="meta")
