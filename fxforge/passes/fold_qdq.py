"""fold_qdq: turn a calibrated QDQ graph into the form int8 backends lower. Exact (the same integers).

    DQ(Q(W))                       →  DQ(W_q)         W_q = Q(W) stored as an int8 (bias: int32) constant
    Q(relu(y)), z = q_min          →  Q(y)            clamp(round(y/s) + q_min, q_min, ·) already drops y < 0
    Q(hardtanh(y, 0, h)), z = q_min, Q(h) = q_max
                                   →  Q(y)            the clamp to [0, h] is the quantizer's own clamp
    Q(clamp(y, 0, h_c)), z = q_min, Q(min_c h_c) = q_max
                                   →  Q(y)            a per-channel ceiling (equalize's rescaled relu6), all above
                                                      the grid's top
    DQ₂(Q₂(DQ₁(q))), grid 2 holds every value of grid 1
                                   →  DQ₁(q)          a redundant round trip (equal parameters, a finer or wider grid)
    Q₂(DQ₁(q)), otherwise          →  T[q − q_min]    one requantization step: a table lookup (≤ 256 entries)

A requantization chain Q₁→DQ₁→Q₂ (e.g. in a model that arrives with QDQ nodes of its own) becomes a single
integer-to-integer step. Its table T = Q₂(DQ₁(q_min..q_max)) is computed with the chain's own kernels, so
the merge is exact by construction, needs no float arithmetic, and lowers everywhere (ONNX: Cast + Gather;
ONNX Runtime still fuses the int8 ops on either side). A fixed-point multiplier (TFLite's requantize) would
round differently from the float chain at ties, so it would not give the same integers.

The weights shrink 4× (int8 instead of float32) and every backend sees int8 constants behind
dequantize_per_channel, which is what ONNX Runtime's QLinearConv/QGemm fusions require. The folded graph
still runs in PyTorch and gives exactly the integers of the unfolded one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, equal_or_new_tensor, finalize, get_tensor
from fxforge.compiler.ops import CLAMP, DQ_PER_TENSOR, Q_PER_TENSOR, QUANTIZE, aten, clamp_range, data, is_op, q_params
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass
from fxforge.compiler.rewrite import Match, Pattern, Rule, apply_rules, op

from .analysis.requantization import coarser_round_trip, is_identity, requantization_table
from .lib.channel_scaling import ceilings
from .lib.qdq import bounds, quantize_scalar, role


# --------------------------------------------------------------------------- DQ(Q(W)) → DQ(W_q)

def _constant_weight(q: fx.Node) -> bool:
    return role(q) in ("weight", "bias") and isinstance(data(q), fx.Node) and data(q).op == "get_attr"


def fold_constant(gm: fx.GraphModule, m: Match) -> None:
    """Q(W) on a constant W → the integer tensor itself, read by the DQ. A weight read at several call sites (a
    layer applied twice, a tied head) has a Q per site, quantized alike: their integers are one tensor, not one copy
    per site (a siamese encoder's int8 weights doubled)."""
    q = m["q"]
    params = [get_tensor(gm, a) if isinstance(a, fx.Node) else a for a in q_params(q).args()]
    value = q.target(get_tensor(gm, data(q)), *params)
    q.replace_all_uses_with(equal_or_new_tensor(gm, q, f"{data(q).target}_{value.dtype}".replace("torch.", ""), value))


# ------------------------------------------------------------- Q(relu(y)), Q(hardtanh(y, 0, h)) → Q(y)

def _clamp_is_the_quantizers(q: fx.Node) -> bool:
    """The clamp feeding ``q`` gives the integers q's own clamp gives: its floor is the zero point at q_min
    and its ceiling (if any) quantizes to q_max."""
    act, grid = data(q), q_params(q)
    if is_op(act, aten.clamp.Tensor):
        ends = ceilings(act)
        if ends is None:
            return False
        lo, hi = float(ends[0].abs().max()), float(ends[1].min())
    elif is_op(act, *CLAMP):
        lo, hi = clamp_range(act)
    else:
        return False
    qmin, qmax = bounds(grid.dtype)
    return grid.zero_point == qmin and lo == 0 and (hi == float("inf") or quantize_scalar(hi, q) == qmax)


def fold_clamp(gm: fx.GraphModule, m: Match) -> None:
    m["q"].replace_input_with(m["act"], data(m["act"]))


# ----------------------------------------------------------------------- Q₂(DQ₁(q₁)) requantizations

def _round_trip(q: fx.Node) -> bool:
    """A Q₂ whose requantization gives back q₁, or (read by DQ₂ alone) every value DQ₁ gave."""
    table = requantization_table(q)
    return table is not None and (is_identity(q, table) or coarser_round_trip(q, table))


def drop_round_trip(gm: fx.GraphModule, m: Match) -> None:
    """Q₂(DQ₁(q₁)) → q₁ when the table is the identity, and DQ₂(Q₂(DQ₁(q₁))) → DQ₁(q₁) when grid 2 holds
    every value of grid 1."""
    q, dq1 = m["q"], m["dq1"]
    if is_identity(q, requantization_table(q)):
        q.replace_all_uses_with(data(dq1))
        return
    for dq2 in list(q.users):
        dq2.replace_all_uses_with(dq1)


def merge_requantization(gm: fx.GraphModule, m: Match) -> None:
    """Q₂(DQ₁(q₁)) → table[q₁ − q_min₁]: the requantization as one integer lookup."""
    q, q1 = m["q"], m["q1"]
    qmin = q_params(q1).quant_min
    with gm.graph.inserting_before(q):
        lut = add_tensor(gm, q, "requantize_table", requantization_table(q))
        index = gm.graph.call_function(aten._to_copy.default, (q1,), {"dtype": torch.int64})
        if qmin:
            index = gm.graph.call_function(aten.sub.Tensor, (index, qmin))
        lookup = gm.graph.call_function(aten.index.Tensor, (lut, [index]))
    lookup.meta.update(q.meta)
    q.replace_all_uses_with(lookup)


def _requantization(where: Callable[[fx.Node], bool]) -> Pattern:
    return op(Q_PER_TENSOR, op(DQ_PER_TENSOR, op(Q_PER_TENSOR, name="q1"), name="dq1"), name="q", where=where)


RULES = [
    Rule("constants_folded", op(*QUANTIZE, name="q", where=_constant_weight), fold_constant),
    Rule("activations_folded", op(Q_PER_TENSOR, op(*CLAMP, aten.clamp.Tensor, name="act", sole_user=True), name="q",
                                  where=_clamp_is_the_quantizers), fold_clamp),
    Rule("requantizations_removed", _requantization(_round_trip), drop_round_trip),
    Rule("requantizations_merged", _requantization(lambda q: requantization_table(q) is not None),
         merge_requantization),
]


@register_pass
class FoldQdq(Pass):
    """Fold weight QDQ into int8 constants, fold relu/relu6 into output ranges, drop DQ→Q round trips and
    merge requantization chains into one table lookup (exact)."""

    name = "fold_qdq"
    after = ("insert_qdq", "calibrate")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = apply_rules(gm, RULES, roots=[n for n in gm.graph.nodes if is_op(n, *QUANTIZE)])
        stats = {rule.name: counts[rule.name] for rule in RULES}
        changed = any(stats.values())
        if changed:
            finalize(gm)
        return PassResult(changed=changed, stats=stats)
