"""addmm_to_linear: a matrix product with a constant weight becomes the linear every other pass knows. Exact.

    addmm(b, x, W) = b + x·W   ⇒   linear(x, Wᵀ, b)        mm(x, W) = x·W   ⇒   linear(x, Wᵀ)

with W a constant [in, out] matrix (stored transposed, Wᵀ [out, in], as ``aten.linear`` takes it) and b a constant
of its ``out`` entries; ``beta`` and ``alpha`` must be 1. GPT-2's ``Conv1D`` layers (and ``torch.addmm`` written by
hand) trace to ``addmm``: without this rewrite no pass that works on linears (insert_qdq static or dynamic,
smooth_quant, low_rank, prune_channels) saw them, and ``int8`` quantized nothing in GPT-2. The same sums in another
order: float rounding only. Left and counted: a weight other calls read too (``shared_weight``: a tied matrix would be
stored twice), a scaled product (``scaled``), a bias that is not a constant vector (``bias_shape``).
"""
from __future__ import annotations

import torch.fx as fx

from fxforge.compiler.graph import add_tensor, copy_value_meta, finalize, get_tensor, readers
from fxforge.compiler.ops import argument, aten
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass
from fxforge.compiler.rewrite import Match, Rule, apply_rules, op

PATTERN = op(aten.addmm, aten.mm, name="mm")


def _parts(node: fx.Node) -> tuple[fx.Node | None, fx.Node, fx.Node]:
    """(bias or None, x, W) of an addmm or mm."""
    if node.target == aten.mm.default:
        return None, argument(node, "self"), argument(node, "mat2")
    return argument(node, "self"), argument(node, "mat1"), argument(node, "mat2")


def check(gm: fx.GraphModule, m: Match) -> str | None:
    node = m["mm"]
    if node.target not in (aten.addmm.default, aten.mm.default):
        return "overload"
    bias, _, w = _parts(node)
    weight = get_tensor(gm, w)
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        return "non_constant_weight"
    if node.target == aten.addmm.default and (argument(node, "beta", 1) != 1 or argument(node, "alpha", 1) != 1):
        return "scaled"
    if bias is not None:
        b = get_tensor(gm, bias)
        if b is None or b.shape != (weight.shape[1],):
            return "bias_shape"
    if readers(gm, w) > 1 or readers(gm, bias) > 1:
        return "shared_weight"
    return None


def rewrite(gm: fx.GraphModule, m: Match) -> None:
    node = m["mm"]
    bias, x, w = _parts(node)
    transposed = add_tensor(gm, node, f"{node.name}_weight", get_tensor(gm, w).detach().t().contiguous())
    with gm.graph.inserting_before(node):
        linear = gm.graph.call_function(aten.linear.default, (x, transposed) if bias is None else (x, transposed, bias))
    copy_value_meta(linear, node)
    node.replace_all_uses_with(linear)
    gm.graph.erase_node(node)


RULE = Rule("rewritten", PATTERN, rewrite, check)


@register_pass
class AddmmToLinear(Pass):
    """Rewrite addmm/mm with a constant weight matrix as aten.linear (exact)."""

    name = "addmm_to_linear"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = apply_rules(gm, [RULE])
        if stats["rewritten"]:
            finalize(gm)
        return PassResult(changed=bool(stats["rewritten"]), stats=dict(stats))
