"""fold_qdq: turn a calibrated QDQ graph into the form int8 backends lower. Exact (the same integers).

    DQ(Q(W))                       →  DQ(W_q)         W_q = Q(W) stored as an int8 (bias: int32) constant
    Q(relu(y)), z = q_min          →  Q(y)            clamp(round(y/s) + q_min, q_min, ·) already drops y < 0
    Q(hardtanh(y, 0, h)), z = q_min, Q(h) = q_max
                                   →  Q(y)            the clamp to [0, h] is the quantizer's own clamp
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

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, arg, aten, finalize, get_tensor, is_op
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .qdq import bounds, is_q, qd, quantize_scalar, role


@register_pass
class FoldQdq(Pass):
    """Fold weight QDQ into int8 constants, fold relu/relu6 into output ranges, drop DQ→Q round trips and
    merge requantization chains into one table lookup (exact)."""

    name = "fold_qdq"
    after = ("insert_qdq", "calibrate")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"weights_folded": 0, "activations_folded": 0, "requantizations_removed": 0,
                 "requantizations_merged": 0}
        for q in [n for n in gm.graph.nodes if is_q(n)]:
            if role(q) in ("weight", "bias") and get_tensor(gm, q.args[0]) is not None:
                self.fold_constant(gm, q)
                stats["weights_folded"] += 1
            elif self.fold_clamp(q):
                stats["activations_folded"] += 1
            elif (table := requantization_table(q)) is None:
                continue
            elif self.drop_round_trip(q, table):
                stats["requantizations_removed"] += 1
            else:
                self.merge_requantization(gm, q, table)
                stats["requantizations_merged"] += 1
        changed = any(stats.values())
        if changed:
            finalize(gm)
        return PassResult(changed=changed, stats=stats)

    @staticmethod
    def fold_constant(gm: fx.GraphModule, q: fx.Node) -> None:
        """Q(W) on a constant W → the integer tensor itself, read by the DQ."""
        value = q.target(get_tensor(gm, q.args[0]), *[get_tensor(gm, a) if isinstance(a, fx.Node) else a
                                                      for a in q.args[1:]])
        q.replace_all_uses_with(add_tensor(gm, q, f"{q.args[0].target}_{value.dtype}".replace("torch.", ""), value))

    @staticmethod
    def fold_clamp(q: fx.Node) -> bool:
        """Remove a relu/relu6 feeding only ``q`` when q's own clamp gives the same integers."""
        act = q.args[0]
        if not is_op(act, aten.relu, aten.hardtanh) or len(act.users) != 1:
            return False
        qmin, qmax = bounds(q.args[5])
        if q.args[2] != qmin:
            return False
        if is_op(act, aten.hardtanh):
            if arg(act, 1, "min_val", -1.0) != 0 or quantize_scalar(arg(act, 2, "max_val", 1.0), q) != qmax:
                return False
        q.replace_input_with(act, act.args[0])
        return True

    @staticmethod
    def drop_round_trip(q: fx.Node, table: torch.Tensor) -> bool:
        """Q₂(DQ₁(q₁)) → q₁ when ``table`` is the identity, and DQ₂(Q₂(DQ₁(q₁))) → DQ₁(q₁) when dequantizing
        ``table`` gives back every value DQ₁ produces (a finer or wider grid 2)."""
        dq1 = q.args[0]
        codes = _codes(dq1.args[0])
        if table.dtype == codes.dtype and torch.equal(table, codes):
            q.replace_all_uses_with(dq1.args[0])
            return True
        if not q.users or not all(is_op(u, DQ_TENSOR) and tuple(u.args[1:]) == tuple(q.args[1:]) and not u.kwargs
                                  for u in q.users):
            return False
        if not torch.equal(DQ_TENSOR(table, *q.args[1:]), DQ_TENSOR(codes, *dq1.args[1:])):
            return False
        for dq2 in list(q.users):
            dq2.replace_all_uses_with(dq1)
        return True

    @staticmethod
    def merge_requantization(gm: fx.GraphModule, q: fx.Node, table: torch.Tensor) -> None:
        """Q₂(DQ₁(q₁)) → table[q₁ − q_min₁]: the requantization as one integer lookup."""
        q1 = q.args[0].args[0]
        qmin = q1.args[3]
        with gm.graph.inserting_before(q):
            lut = add_tensor(gm, q, "requantize_table", table)
            index = gm.graph.call_function(aten._to_copy.default, (q1,), {"dtype": torch.int64})
            if qmin:
                index = gm.graph.call_function(aten.sub.Tensor, (index, qmin))
            lookup = gm.graph.call_function(aten.index.Tensor, (lut, [index]))
        lookup.meta.update(q.meta)
        q.replace_all_uses_with(lookup)


DQ_TENSOR = qd.dequantize_per_tensor.default
Q_TENSOR = qd.quantize_per_tensor.default


def requantization_table(q: fx.Node) -> torch.Tensor | None:
    """For Q₂(DQ₁(q₁)) on per-tensor 8-bit grids with constant parameters: Q₂(DQ₁(c)) for every code c of grid 1,
    computed with the two ops themselves. None for any other Q node."""
    dq1 = q.args[0]
    if not (is_op(q, Q_TENSOR) and is_op(dq1, DQ_TENSOR) and is_op(dq1.args[0], Q_TENSOR)):
        return None
    if not all(isinstance(a, (int, float, torch.dtype)) for a in (*q.args[1:], *dq1.args[1:], *dq1.args[0].args[1:])):
        return None  # scales held in tensors: not known at compile time
    if q.kwargs or dq1.kwargs or dq1.args[0].kwargs:
        return None  # e.g. a DQ with out_dtype=bfloat16: its values are not the float32 ones the table assumes
    if not all(n.args[-1] in (torch.uint8, torch.int8) for n in (q, dq1, dq1.args[0])):
        return None
    return Q_TENSOR(DQ_TENSOR(_codes(dq1.args[0]), *dq1.args[1:]), *q.args[1:])


def _codes(q: fx.Node) -> torch.Tensor:
    """Every integer a per-tensor Q node produces, quant_min to quant_max, in its dtype."""
    return torch.arange(q.args[3], q.args[4] + 1, dtype=torch.int32).to(q.args[5])
