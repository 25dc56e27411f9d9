"""Which layers insert_qdq keeps float, and why: the reasons its plan counts as ``skipped.<reason>`` and its
``layer_effect`` returns. Pure: nothing here changes the graph.

A layer stays float where it cannot be lowered (weights or biases that are not constants, non-float32 tensors, a
weight already behind a dequantize), where the user named it (``skip``), and where int8 measured slower or less
accurate: a stem conv with a narrow input window, and the depthwise conv reading such a float stem (the
measurements are in passes/insert_qdq.py's docstring); layers with no int8 kernel targeted (transposed convs,
recurrent layers) stay float and are counted.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from fxforge.compiler.graph import call_nodes, get_tensor
from fxforge.compiler.ops import CLAMP, CONV, MATMUL, aten, bias_of, conv_groups, data, is_op, operands, weight_of

from ..lib.qdq import is_dq, named
from .quant_plan import plan_static

# layers with weights that insert_qdq leaves float (no int8 kernel is targeted for them): counted, so that an int8
# decoder whose transposed convs stayed float does not report only the convs it quantized
NO_INT8_KERNEL = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d, aten.lstm, aten.gru,
                  aten.rnn_tanh, aten.rnn_relu)


def float_test(shapes: dict) -> Callable[[Any], bool]:
    """Whether an argument is a float32 graph tensor: what a Q/DQ pair takes and gives back (a dequantize returns
    float32, so a pair on a float16 tensor would change its readers' dtype)."""
    return lambda n: isinstance(n, fx.Node) and n.name in shapes and shapes[n.name].dtype == torch.float32


def no_int8_kernel(gm: fx.GraphModule) -> Counter:
    """``skipped.no_int8_kernel.<op>``: the layers with weights in ``gm`` that stay float for want of an int8 kernel
    (``NO_INT8_KERNEL``), said by name."""
    return Counter(f"skipped.no_int8_kernel.{node.target.__name__.split('.')[0]}"
                   for node in call_nodes(gm, *NO_INT8_KERNEL))


@dataclass(frozen=True)
class FloatRules:
    """insert_qdq's options that keep layers float (see the pass for their meaning and defaults)."""

    skip: tuple[str, ...]
    min_input_window: int
    max_stem_output: int
    float_stem_depthwise: bool

    def refusal(self, gm: fx.GraphModule, node: fx.Node, shapes: dict) -> str | None:
        """Why ``node`` (a weighted op or matmul) stays float, or None (``shapes``: the Shapes analysis of ``gm``)."""
        is_float = float_test(shapes)
        rhs = operands(node)[1] if is_op(node, *MATMUL) else weight_of(node)
        if is_dq(rhs):
            return "already_quantized"
        if any(named(node, s) for s in self.skip):
            return "by_name"
        if is_op(node, *MATMUL):
            return None if all(is_float(x) for x in operands(node)) else "not_float32"
        weight = get_tensor(gm, rhs)
        if weight is None or not weight.is_floating_point():
            return "non_constant_weight"
        if weight.numel() == 0:  # dead_channels removed every channel of this layer
            return "empty_weight"
        bias = bias_of(node)
        if bias is not None and get_tensor(gm, bias) is None:
            return "non_constant_bias"
        return self.stem_refusal(node, weight, shapes) or (None if is_float(data(node)) else "not_float32")

    def stem_refusal(self, node: fx.Node, weight: torch.Tensor, shapes: dict | None) -> str | None:
        """``narrow_input`` or ``after_float_stem`` where ``node`` (with constant ``weight``) is kept float for its
        place at the stem, else None (``shapes``: the Shapes analysis, when known)."""
        if self.narrow(node, weight, shapes):
            return "narrow_input"
        return "after_float_stem" if self.after_float_stem(node, weight, shapes) else None

    def narrow(self, node: fx.Node, weight: torch.Tensor, shapes: dict | None) -> bool:
        """A stem conv (under 4 input channels) whose input window (channels × kernel area) is under
        ``min_input_window`` and whose output at the example batch (``shapes``, the Shapes analysis, when known) holds
        at most ``max_stem_output`` values (kept float: faster there, and more accurate)."""
        channels = weight.shape[1] * conv_groups(node) if is_op(node, *CONV) else 0
        if not (0 < channels < 4 and weight[0].numel() * conv_groups(node) < self.min_input_window):
            return False
        out = shapes.get(node.name) if shapes is not None else None
        return out is None or math.prod(out.shape) <= self.max_stem_output

    def after_float_stem(self, node: fx.Node, weight: torch.Tensor, shapes: dict | None) -> bool:
        """A depthwise conv whose input is a float stem's output, through clamps (``float_stem_depthwise``; per-channel
        ones too, a relu6 that ``equalize_activations`` rescaled): ORT runs it as a float NCHWc conv fused with the
        stem's layout, which measured faster than quantizing the stem's output for an int8 depthwise conv
        (MobileNetV2's first block)."""
        if not (self.float_stem_depthwise and is_op(node, *CONV) and 1 < conv_groups(node) == weight.shape[0]):
            return False
        stem = data(node)
        while is_op(stem, *CLAMP, aten.clamp.Tensor):
            stem = data(stem)
        if not is_op(stem, *CONV):
            return False
        stem_weight = get_tensor(node.graph.owning_module, weight_of(stem))
        return stem_weight is not None and self.narrow(stem, stem_weight, shapes)

    def plan(self, gm: fx.GraphModule, shapes: dict, stats: Counter | None = None
             ) -> tuple[dict[fx.Node, int], list[fx.Node]]:
        """``quant_plan.plan_static`` of ``gm`` with these refusals: the activations to quantize (tensor → grid group)
        and the weighted ops whose weights go int8; refusals and quantized ops counted in ``stats`` when given."""
        return plan_static(gm, float_test(shapes), lambda node: self.refusal(gm, node, shapes),
                           Counter() if stats is None else stats)
