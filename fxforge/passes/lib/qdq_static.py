"""Static int8 (insert_qdq with ``activations="static"``, the default): the rewrite in its order (SiLUs split, the
plan of passes/analysis/quant_plan.py, its pairs, clips restored where no grid sits, a first guess of the ranges),
one layer's eager form (``layer_effect``, which the sensitivity analysis asks), and the quantized graph with more
layers float (``with_float``). The math and measurements are in passes/insert_qdq.py's docstring."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.graph import FUSION_KEY, call_nodes, fusion_groups, get_tensor, set_tensor
from fxforge.compiler.ops import MATMUL, WEIGHTED, bias_of, call_with, data, is_op, set_argument, value_of, weight_of
from fxforge.compiler.pass_manager import LayerFn

from ..analysis.qdq_float_rules import FloatRules, no_int8_kernel
from .channel_scaling import restore_clips
from .qdq import activation_qparams, bounds, fit_activations, is_dq, is_q, role, weight_bits, weight_scales
from .qdq_pairs import quantize_activation, quantize_weight
from .qdq_silu import split_silus


def to_static(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], rules: FloatRules, shapes: dict,
              qmax: int, per_channel: bool, dtype: torch.dtype, symmetric: bool, stats: Counter) -> bool:
    """Quantize ``gm`` as its plan under ``rules`` says (``shapes``: a copy of its Shapes analysis, which the SiLU
    split extends): activations on per-tensor ``dtype`` grids, weights symmetric int8 in [−qmax − 1, qmax] (per
    output channel with ``per_channel``), scales first fitted to ``example_inputs``. Counts in ``stats``; returns
    whether the graph changed."""
    if split := split_silus(gm, rules.plan(gm, shapes)[0], shapes):
        stats["silu_split"] = split
    plan, weighted = rules.plan(gm, shapes, stats)
    for tensor, group in plan.items():
        quantize_activation(gm, tensor, group, dtype, symmetric)
    for op in weighted:
        quantize_weight(gm, op, qmax, per_channel)
    if restored := restore_clips(gm):  # where the plan put no grid
        stats["clips_restored"] = restored
    if plan:  # a first guess from the example inputs; calibrate replaces it
        stats.update({k: v for k, v in fit_activations(gm, [example_inputs], "minmax").items()
                      if k == "weight_scales_widened"})
    stats.update({"activations": len(plan), "weights": len(weighted)})
    stats.update(no_int8_kernel(gm))
    if weighted:
        stats["weight_bits"] = weight_bits(qmax)
    if cut := untag_split_groups(gm):
        stats["fusion_groups_split"] = cut
    return bool(plan) or bool(restored)


def static_effect(node: fx.Node, weight: torch.Tensor, input_range: tuple[float, float], qmax: int,
                  per_channel: bool, dtype: torch.dtype, symmetric: bool) -> dict[str, LayerFn]:
    """Node name → new function: ``node`` with ``weight`` fake-quantized symmetric in [−qmax − 1, qmax] (per output
    channel or per tensor) and its input on the ``dtype`` grid of ``input_range``, and every other reader of that
    input reading it rounded too (they share its pair)."""
    s = weight_scales(weight, qmax, per_channel)
    wq = (torch.fake_quantize_per_channel_affine(weight, s, torch.zeros_like(s, dtype=torch.int32), 0,
                                                 -qmax - 1, qmax) if per_channel else
          torch.fake_quantize_per_tensor_affine(weight, float(s), 0, -qmax - 1, qmax))
    qmin, qmax_a = bounds(dtype)
    scale, zero = activation_qparams(*input_range, dtype, symmetric)

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax_a)

    def layer_fn(args: list, kwargs: dict) -> torch.Tensor:
        return call_with(node, args, kwargs, weight=wq, input=rounded(value_of(node, args, kwargs, "input")))
    # the pair on the layer's input is one for all readers of that tensor (quantize_activation): a reader kept
    # float reads it rounded too, which quantizing this layer alone does to it (a head beside this one: 0.012 of
    # its top-1 agreement, where this layer alone was measured at 1e-6)
    x = data(node)
    others = [r for r in x.users if r is not node and r.op == "call_function" and
              not (is_op(r, *WEIGHTED) and x in (weight_of(r), bias_of(r)))]
    return {node.name: layer_fn, **{r.name: _reading_rounded(r, x, rounded) for r in others}}


def _reading_rounded(reader: fx.Node, x: fx.Node, rounded: Callable[[torch.Tensor], torch.Tensor]) -> LayerFn:
    """``reader`` computed with its argument ``x`` (a node) passed through ``rounded``."""
    places = [i for i, a in enumerate(reader.args) if a is x]
    names = [k for k, a in reader.kwargs.items() if a is x]

    def fn(args: list, kwargs: dict) -> Any:
        for i in places:
            args[i] = rounded(args[i])
        for k in names:
            kwargs[k] = rounded(kwargs[k])
        return reader.target(*args, **kwargs)
    return fn


def untag_split_groups(gm: fx.GraphModule) -> int:
    """Drop fuse_activation's tags from groups a Q/DQ pair now cuts (conv → Q → DQ → add + relu): their
    members are no longer one float kernel; an int8 backend fuses the QDQ form itself."""
    split = 0
    for nodes in fusion_groups(gm).values():
        if any(a not in b.all_input_nodes for a, b in zip(nodes, nodes[1:])):
            for n in nodes:
                del n.meta[FUSION_KEY]
            split += 1
    return split


def float_again(quantized: fx.GraphModule, before: fx.GraphModule, rules: FloatRules, shapes: dict
                ) -> fx.GraphModule:
    """A copy of ``quantized`` (insert_qdq's graph of ``before``, calibrated) as insert_qdq with ``rules`` would have
    made it, where ``rules`` keep more layers float by name (``shapes``: the Shapes analysis of ``before``): the
    activation pairs the smaller plan would not insert passed through, and the layers ``rules`` skip reading
    ``before``'s float weights and biases again (``adaround`` and ``bias_correction`` may have moved the constants
    behind their quantizers); per-channel clips with no grid left between them get their one ceiling back
    (``restore_clips``). Every other grid keeps its calibrated scale, which a skip does not change (calibration
    observes the float graph)."""
    shapes = dict(shapes)
    before = copy.deepcopy(before)
    split_silus(before, rules.plan(before, shapes)[0], shapes)  # the same names as in ``quantized``
    keep = {t.name for t in rules.plan(before, shapes)[0]}
    by_name = {n.name for n in call_nodes(before, *WEIGHTED, *MATMUL)
               if rules.refusal(before, n, shapes) == "by_name"}
    gm = copy.deepcopy(quantized)
    for node in list(gm.graph.nodes):
        if is_q(node) and role(node) == "activation" and data(node).name not in keep:
            for dq in [u for u in node.users if is_dq(u)]:
                dq.replace_all_uses_with(data(node))
        elif is_op(node, *WEIGHTED) and node.name in by_name and is_dq(weight_of(node)):
            original = next(n for n in before.graph.nodes if n.name == node.name)
            for kind, of in (("weight", weight_of), ("bias", bias_of)):  # rounding and correction undone
                if is_dq(of(node)):
                    constant = data(data(of(node)))
                    set_tensor(gm, constant, get_tensor(before, of(original)).detach().clone())
                    set_argument(node, kind, constant)
    gm.graph.eliminate_dead_code()
    restore_clips(gm)
    gm.recompile()
    return gm
