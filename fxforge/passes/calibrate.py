"""calibrate: choose every activation's scale and zero point from data. Approximate.

The graph runs in float (Q/DQ pass values through) on each calibration batch; the inputs of the Q nodes of
one group feed one histogram observer. Its clipping range [lo, hi] ∋ 0 (method ``minmax``, ``percentile``,
``entropy`` or ``mse``, see passes/lib/observers.py) gives

    asymmetric:  s = (hi − lo) / (q_max − q_min),   z = clamp(q_min − round(lo / s), q_min, q_max)
    symmetric:   s = 2·max(|lo|, |hi|) / (q_max − q_min),   z = (q_min + q_max + 1) // 2

and each bias is re-quantized with the new s_x · s_w (where that int32 would overflow, a tiny input grid ahead of a
large bias, the weight channel's scale is widened instead: stat ``weight_scales_widened``). ``method="auto"`` chooses per tensor group, among percentile,
mse and minmax, the range whose quantization changes the outputs of the ops reading the tensor least
(Σ‖op(x̂) − op(x)‖² on the first 16 calibration samples, x̂ = DQ(Q(x)) on the candidate grid, each other input
float). On the trained MobileNetV2 it does worse than percentile everywhere (docs/quantization.md): the mse ranges
it picks clip values that matter further down. The data comes from ``PassContext.calibration``
(``fxforge.compile(..., calibration=[(x1,), (x2,)])``); without it the pass refuses to guess.
"""
from __future__ import annotations

import torch.fx as fx

from fxforge.compiler.analysis import Shapes
from fxforge.compiler.dynamic_quant import DYNAMIC_LINEAR
from fxforge.compiler.errors import CalibrationError, PassError, missing_calibration
from fxforge.compiler.graph import call_nodes
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.observers import METHODS
from .lib.qdq import Choice, checked_batches, fit_activations, is_q, refuse_if_folded, role


@register_pass
class Calibrate(Pass):
    """Set activation scales/zero points from calibration data (minmax, percentile, entropy or mse)."""

    name = "calibrate"
    exact = False
    reads_calibration = True
    after = ("insert_qdq",)
    before = ("fold_qdq",)  # it observes the float graph or moves a weight's rounding: nothing once folded
    method: Choice = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "auto"):
            raise ValueError(f"method must be one of {', '.join(METHODS)} or auto, got {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        self.refuse_unread("percentile", None if self.method in ("percentile", "auto") else
                           f"with method={self.method!r}, which reads no percentile")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise missing_calibration(self.name)
        # observing a folded graph ran its integer ops on float observers: torch's "Int and Char" dtype error
        refuse_if_folded(gm, self.name)
        if not any(is_q(n) and role(n) == "activation" for n in gm.graph.nodes) and \
                any(call_nodes(gm, DYNAMIC_LINEAR)):
            # it observed nothing and changed nothing, and its row said nothing of why
            raise PassError("calibrate has no activation grid to calibrate: insert_qdq{activations='dynamic'} "
                            "quantizes each linear's input per row at run time; drop calibrate and the passes that "
                            "must come after it (fold_qdq, bias_correction, adaround: a dynamic linear is one int8 "
                            "op, with nothing to fold or correct), or quantize statically")
        batches = ctx.progress(checked_batches(ctx.calibration, ctx.example_inputs), desc="calibrate", unit="batch")
        stats = fit_activations(gm, batches, self.method, self.percentile)
        if not stats["batches"]:
            raise CalibrationError("pass 'calibrate' got an empty calibration iterable")
        # new scales and zero points, the same nodes and shapes: the report's FLOPs need no new shape propagation
        return PassResult(changed=stats["activation_groups"] > 0, preserves=frozenset({Shapes}), stats=stats)
