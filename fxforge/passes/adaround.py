"""adaround: round each quantized weight up or down as the layer's output on calibration data needs (Nagel et al.
2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"). Approximate.

Rounding to nearest minimises each weight's own error, not the layer's: a depthwise 3×3 channel has only 9
weights, and their errors do not average out in its output. AdaRound chooses, per weight, floor or ceil:

    Ŵ = s · (clamp(⌊W/s⌋ + z + h(V), q_min, q_max) − z),     h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1

with V learned by Adam (initialised at h(V) = W/s − ⌊W/s⌋, so that Ŵ = W to begin with) on

    E‖Ŵ x̂ − W x‖²  +  λ Σ (1 − |2h(V) − 1|^β)

x̂ is the layer's input in the quantized graph (every grid applied, the layers upstream already rounded this way)
and x its input in the float graph: the paper's asymmetric reconstruction, which also makes up for error upstream.
The regulariser drives every h to 0 or 1 (β falls from 20 to 2 after the first ``warmup`` of the steps, before
which it is off); at the end h = [V ≥ 0]. The expectation runs over samples and output positions, the squared
norm over output channels. A conv or linear is linear in its weight, so per group g of a grouped conv, with the
patches (im2col columns) of x̂ and x,

    E‖Ŵ x̂ − W x‖² = Σ_g  ‖Ŵ_g F_g‖² − 2 tr(Ŵ_g B_g) + E‖W_g x_g‖²,   F_g F_gᵀ = E[x̂_g x̂_gᵀ],  B_g = E[x̂_g x_gᵀ] W_gᵀ

measured once per layer on the calibration data (F_g: the Cholesky factor, or the patches themselves when there
are fewer than the patch length); each step then costs C_out · K · min(K, n) for patch length K and n patches,
not a pass over the data. The bias is the same on both sides and drops out. The chosen weight is written back as
the float constant s·(q − z), on the grid, so the graph's own quantizer gives the chosen integers: the graph keeps
its nodes. Runs after ``calibrate`` (x̂ needs the activation grids) and before ``bias_correction`` and
``fold_qdq``. Stats: ``rounded``, ``flipped`` (weights not at their nearest value), ``error_ratio`` (the summed
output error over the summed error of nearest rounding, on the calibration data), and what was left alone:
``skipped.shared_weight``, ``skipped.not_conv2d`` (conv1d/conv3d), ``skipped.padding_mode``, ``skipped.by_name``, and
``skipped.few_samples``: a layer with fewer input patches than its patch length K (a classifier on a few calibration
images) keeps nearest rounding, since a rounding fitted to fewer equations than unknowns does not generalise
(measured on a 2304-input linear with 64 samples: 1.14× nearest rounding's output error on fresh data).
"""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Shapes
from fxforge.compiler.errors import CalibrationError, missing_calibration
from fxforge.compiler.graph import call_nodes, readers
from fxforge.compiler.ops import LINEAR, WEIGHTED, argument, aten, data, is_op, weight_of
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.qdq import batch_symbol, check_skip, checked_batches, first_samples, is_dq, named, refuse_if_folded, role
from .lib.rounding import Rounding


@register_pass
class AdaRound(Pass):
    """Learn each quantized conv/linear weight's rounding (floor or ceil) to minimise the layer's output error on
    the calibration data (approximate)."""

    name = "adaround"
    exact = False
    reads_calibration = True
    after = ("insert_qdq", "calibrate")
    before = ("fold_qdq",)  # it observes the float graph or moves a weight's rounding: nothing once folded
    iterations: int = 300  # Adam steps per layer
    lr: float = 0.01
    reg: float = 0.01  # λ, the weight of the rounding regulariser
    warmup: float = 0.2  # the share of the steps before the regulariser starts
    max_samples: int = 64  # the first calibration samples measured (held in memory at once)
    skip: tuple[str, ...] = ()  # layers left at nearest rounding: node names or weight prefixes ("stem.0")

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.max_samples < 1:
            raise ValueError("iterations and max_samples must be at least 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.reg >= 0 and math.isfinite(self.reg)):
            raise ValueError(f"lr must be > 0 and reg >= 0, both finite; got lr={self.lr}, reg={self.reg} (lr=0 "
                             "would leave every weight at nearest rounding)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise missing_calibration(self.name)
        refuse_if_folded(gm, self.name)
        check_skip(self.name, self.skip, list(call_nodes(gm, *WEIGHTED)))
        stats: Counter[str] = Counter()
        layers = []
        for op in gm.graph.nodes:
            if is_op(op, *WEIGHTED) and is_dq(weight_of(op)) and role(weight_of(op)) == "weight":
                reason = self.refusal(gm, op)
                if reason:
                    stats[f"skipped.{reason}"] += 1
                else:
                    layers.append(op)
        if not layers:
            return PassResult(changed=False, preserves="all", stats={"rounded": 0, **stats})  # never a bare {}
        chunks, samples = first_samples(list(checked_batches(ctx.calibration, ctx.example_inputs)), self.max_samples,
                                        cut=batch_symbol(gm) is not None)
        if not chunks:
            raise CalibrationError("pass 'adaround' got an empty calibration iterable")
        run = Rounding(gm, set(layers), len(chunks), iterations=self.iterations, lr=self.lr, reg=self.reg,
                       warmup=self.warmup)
        with torch.no_grad():
            run.run(*[list(parts) for parts in zip(*chunks)])
        if run.few:
            stats["skipped.few_samples"] = run.few
        stats.update({"rounded": len(layers) - run.few, "samples": samples, "flipped": run.flipped,
                      "error_ratio": run.error / max(run.nearest, 1e-30)})
        return PassResult(changed=True, preserves=frozenset({Shapes}), stats=dict(stats))

    def refusal(self, gm: fx.GraphModule, op: fx.Node) -> str | None:
        """Why the layer keeps nearest rounding, or None."""
        q = data(weight_of(op))
        if readers(gm, data(q)) > 1:
            return "shared_weight"  # another call reads this weight, and its best rounding would differ
        if any(named(op, s) for s in self.skip):
            return "by_name"
        if not (is_op(op, *LINEAR) or is_op(op, aten.conv2d)):
            return "not_conv2d"
        if is_op(op, aten.conv2d) and isinstance(argument(op, "padding"), str):
            return "padding_mode"
        return None
