"""Dynamic int8 (insert_qdq with ``activations="dynamic"``): each constant-weight linear becomes one
``fxforge::dynamic_linear`` (compiler/dynamic_quant.py) with int8 per-output-channel weights, its input quantized
per row at run time, shifted by a known lower bound where one is known (the math and measurements are in
passes/insert_qdq.py's docstring); here the graph rewrite and its one-layer eager form (``layer_effect``)."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.fx as fx

from fxforge.compiler.dynamic_quant import DYNAMIC_LINEAR, input_lower_bound
from fxforge.compiler.graph import call_nodes, copy_value_meta, equal_or_new_tensor, finalize, get_tensor
from fxforge.compiler.ops import LINEAR, MATMUL, WEIGHTED, bias_of, data, is_op, value_of, weight_of
from fxforge.compiler.pass_manager import LayerFn

from .qdq import int8_weight, weight_bits


def lower_bound(node: fx.Node, shifted: bool) -> float | None:
    """The lower bound ``dynamic_linear`` may shift ``node``'s input by (``dynamic_quant.input_lower_bound``), or
    None without ``shifted`` (insert_qdq's ``shifted_inputs``)."""
    return input_lower_bound(data(node)) if shifted else None


def to_dynamic(gm: fx.GraphModule, refusal: Callable[[fx.Node], str | None], qmax: int, shifted: bool,
               stats: Counter) -> int:
    """Replace each linear that ``refusal`` (node → reason it stays float, or None) accepts by
    ``fxforge::dynamic_linear`` with int8 weights in [−qmax − 1, qmax]; convs and matmuls stay float
    (``skipped.dynamic_float``). Counts in ``stats``: refusals, ``dynamic_shifted``, ``dynamic_linears`` and, with
    any linear, ``weight_bits``. Returns how many linears were replaced."""
    linears = []
    for node in call_nodes(gm, *WEIGHTED, *MATMUL):  # decided before any rewrite, on the shapes as they were
        reason = refusal(node) or (None if is_op(node, *LINEAR) else "dynamic_float")
        if reason:
            stats[f"skipped.{reason}"] += 1
        else:
            linears.append(node)
    for node in linears:
        weight = weight_of(node)
        wq, scales = int8_weight(get_tensor(gm, weight), qmax)
        # a layer called at several sites (a shared encoder) keeps one int8 weight, as in the static path
        args = (data(node), equal_or_new_tensor(gm, node, f"{weight.target}_int8", wq),
                equal_or_new_tensor(gm, node, f"{weight.target}_scale", scales), bias_of(node),
                lower_bound(node, shifted))
        if args[-1] is not None:
            stats["dynamic_shifted"] += 1
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(DYNAMIC_LINEAR, args)
        copy_value_meta(new, node)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if linears:  # the float weights go too: the module held them beside their int8 copies (3x the bytes)
        finalize(gm)  # (only then: on a graph without linears it dropped unrelated dead nodes, "changed=False")
    stats.update({"dynamic_linears": len(linears), **({"weight_bits": weight_bits(qmax)} if linears else {})})
    return len(linears)


def dynamic_effect(node: fx.Node, weight: torch.Tensor, qmax: int, shifted: bool) -> LayerFn:
    """The linear ``node`` (constant ``weight``) as the ``dynamic_linear`` that ``to_dynamic`` writes for it, in
    eager: per-row activations, no calibration range."""
    wq, scales = int8_weight(weight, qmax)
    bound = lower_bound(node, shifted)
    return lambda args, kwargs: torch.ops.fxforge.dynamic_linear(
        value_of(node, args, kwargs, "input"), wq, scales, value_of(node, args, kwargs, "bias"), bound)
