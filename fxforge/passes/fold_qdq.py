"""fold_qdq: turn a calibrated QDQ graph into the form int8 backends lower. Exact (the same integers).

    DQ(Q(W))                       →  DQ(W_q)         W_q = Q(W) stored as an int8 (bias: int32) constant
    Q(relu(y)), z = q_min          →  Q(y)            clamp(round(y/s) + q_min, q_min, ·) already drops y < 0
    Q(hardtanh(y, 0, h)), z = q_min, Q(h) = q_max
                                   →  Q(y)            the clamp to [0, h] is the quantizer's own clamp
    Q₂(DQ₁(q)), same parameters    →  q               (q − z)·s·(1/s) rounds back to q

The weights shrink 4× (int8 instead of float32) and every backend sees int8 constants behind
dequantize_per_channel, which is what ONNX Runtime's QLinearConv/QGemm fusions require. The folded graph
still runs in PyTorch and gives exactly the integers of the unfolded one.
"""
from __future__ import annotations

import torch.fx as fx

from fxforge.compiler.graph import add_tensor, arg, aten, finalize, get_tensor, is_op
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .qdq import bounds, is_dq, is_q, quantize_scalar, role


@register_pass
class FoldQdq(Pass):
    """Fold weight QDQ into int8 constants, fold relu/relu6 into output ranges, drop DQ→Q round trips (exact)."""

    name = "fold_qdq"
    after = ("insert_qdq", "calibrate")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"weights_folded": 0, "activations_folded": 0, "requantizations_removed": 0}
        for q in [n for n in gm.graph.nodes if is_q(n)]:
            if role(q) in ("weight", "bias") and get_tensor(gm, q.args[0]) is not None:
                self.fold_constant(gm, q)
                stats["weights_folded"] += 1
            elif self.fold_clamp(q):
                stats["activations_folded"] += 1
            elif self.drop_round_trip(q):
                stats["requantizations_removed"] += 1
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
    def drop_round_trip(q: fx.Node) -> bool:
        """Q₂(DQ₁(q₁)) with equal parameters and dtype → q₁."""
        dq = q.args[0]
        if not (is_dq(dq) and is_q(dq.args[0]) and q.target.overloadpacket is dq.args[0].target.overloadpacket):
            return False
        if tuple(q.args[1:]) != tuple(dq.args[1:]):
            return False
        q.replace_all_uses_with(dq.args[0])
        return True
