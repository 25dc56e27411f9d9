"""fold_constants: evaluate subgraphs that read only constants, once, at compile time. Exact.

A call node is constant when every input node is a get_attr or another constant node and the op is pure
and deterministic. Each constant node that feeds a non-constant one is replaced by a get_attr holding its
value. Folds that would grow the model (e.g. expanding a small constant into a big one, or transposing a weight that
other ops still read as it is) are skipped, and quantize and dequantize nodes are never folded (a quantized weight
stays int8).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, finalize
from fxforge.compiler.ops import DEQUANTIZE, QUANTIZE, is_op
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

GROWTH_LIMIT = 4096  # elements a fold may add beyond the constants it consumes


def _foldable_op(node: fx.Node) -> bool:
    # a weight's quantize and dequantize are the quantized model itself: folded, they left its int8 weights float32
    # (after `int8`, any preset's fold_constants made the model 3.4x larger while every report row still read int8)
    if node.op != "call_function" or node.is_impure() or is_op(node, *QUANTIZE, *DEQUANTIZE):
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


@register_pass
class FoldConstants(Pass):
    """Precompute subgraphs that depend only on parameters and constants (exact)."""

    name = "fold_constants"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        constant: set[fx.Node] = {n for n in gm.graph.nodes if n.op == "get_attr"}
        for node in gm.graph.nodes:
            if _foldable_op(node) and node.all_input_nodes and all(i in constant for i in node.all_input_nodes):
                constant.add(node)
        frontier = [n for n in gm.graph.nodes if n in constant and n.op != "get_attr"
                    and any(u not in constant for u in n.users)]
        if not frontier:
            return PassResult(changed=False, preserves="all")
        values = _evaluate(gm, constant)
        stats = {"folded": 0, "skipped.would_grow_model": 0}
        # a tensor also read outside the constant subgraphs (a tied embedding's weight, read by the lookup and by the
        # head's W.t()) stays in the model after a fold: it is not consumed by it
        kept = {id(values[n.name]) for n in constant if n.op == "get_attr"
                and any(u not in constant for u in n.users)}
        for node in frontier:
            value = values.get(node.name)
            if not isinstance(value, torch.Tensor):
                continue
            consumed = sum(values[i.name].numel() for i in _constant_inputs(node, constant, values)
                           if id(values[i.name]) not in kept)
            if value.numel() > consumed + GROWTH_LIMIT:
                stats["skipped.would_grow_model"] += 1
                continue
            replacement = add_tensor(gm, node, f"{node.name}_folded", value.clone().contiguous())
            node.replace_all_uses_with(replacement)
            stats["folded"] += 1
        if stats["folded"]:
            finalize(gm)
        return PassResult(changed=bool(stats["folded"]), stats=stats)


def _evaluate(gm: fx.GraphModule, constant: set[fx.Node]) -> dict[str, Any]:
    """Values of the constant nodes, computed without any graph input."""
    env: dict[fx.Node, Any] = {}
    interp = fx.Interpreter(gm)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node in constant:
                interp.env = env
                env[node] = interp.run_node(node)
    return {n.name: v for n, v in env.items()}


def _constant_inputs(node: fx.Node, constant: set[fx.Node], values: dict[str, Any]) -> list[fx.Node]:
    """The get_attr leaves a constant node was computed from."""
    seen, stack, leaves = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr" and isinstance(values.get(n.name), torch.Tensor):
            leaves.append(n)
        stack.extend(i for i in n.all_input_nodes if i in constant)
    return leaves
