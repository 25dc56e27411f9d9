"""depthwise_separable: a regular k×k conv → depthwise k×k (multiplier r) + pointwise 1×1. Approximate; exact at r = k².

Network decoupling (Guo et al., 2018): for each input channel c the kernel slice W[:, c] is an m × k² matrix,

    W[:, c] = Σ_j σ_cj u_cj v_cjᵀ      ⇒   y = Σ_c W[:, c] ∗ x_c = Σ_c Σ_j (√σ_cj u_cj) · ((√σ_cj v_cj) ∗ x_c)

so a depthwise conv with filters √σ_cj v_cj (output channel c·r + j, the layer's stride, padding and
dilation) followed by a 1×1 conv with weights P[:, c·r + j] = √σ_cj u_cj (and the bias) computes the layer.
Keeping every term (r = min(m, k²)) is exact; the multiplier r is the fewest terms per channel holding
``energy`` of Σσ² over all channels (1.0: the numerical rank), or ``multiplier`` when given. The split
costs n·r·(k² + m) MACs per output position against n·m·k², so it is applied only when
r < m·k²/(m + k²). Grouped (incl. depthwise) and 1×1 convs are left alone and counted.
``flops=f`` decides per conv instead, among multipliers 4, 2 and 1, from sensitivities measured on the
calibration data, cheapest in accuracy per FLOP saved first, until at most f of the input's FLOPs remain (the
rule of ``low_rank{flops=f}``, lib/factorization.plan_splits; nothing changes when the goal is out of reach).
``latency=f`` does the same with each split's timed saving against the graph's measured time on this machine
(passes/lib/goals.py): a split that does not time faster is no candidate.
Stats hold each split layer's relative output error on its recorded input (``error.<node>``) and the model's
(``error.model``), on fresh random inputs.
"""
from __future__ import annotations

import math
from collections import Counter
from functools import partial

import torch
import torch.fx as fx

from fxforge.compiler.graph import call_nodes, get_tensor
from fxforge.compiler.ops import aten, bias_of, conv_groups, data, is_op, weight_of
from fxforge.compiler.errors import PassError
from fxforge.compiler.pass_manager import LayerContext, LayerFn, Pass, PassContext, PassResult, register_pass

from .lib.factorization import (Recording, Stage, check_fraction, emit_stages, energy_rank, factorized, layer_error,
                                plan_splits, split_layers, splittable, svd)
from .lib.goals import Goal

LADDER = (4, 2, 1)  # the multipliers a flops goal chooses among, per conv


@register_pass
class DepthwiseSeparable(Pass):
    """Replace regular k×k conv2d by depthwise + pointwise convs via per-channel SVD where FLOPs drop (approximate)."""

    name = "depthwise_separable"
    exact = False
    before = ("insert_qdq",)  # a quantized conv's weight is no float constant: nothing would be split
    energy: float = 0.95
    multiplier: int | None = None
    flops: float | None = None  # a goal: at most this fraction of the input's FLOPs, chosen per conv
    latency: float | None = None  # a goal: at most this fraction of the input's latency on this CPU, chosen per conv

    def __post_init__(self) -> None:
        check_fraction("energy", self.energy)
        check_fraction("flops", self.flops)
        check_fraction("latency", self.latency)
        if self.multiplier is not None and self.multiplier < 1:
            raise PassError(f"multiplier must be a positive integer, got {self.multiplier!r}")
        if self.goal is not None and self.multiplier is not None:
            raise PassError(f"{self.goal.kind} chooses each conv's multiplier: it does not take multiplier")
        self.refuse_unread("energy", f"with {self.goal.kind}, which chooses each conv's multiplier" if self.goal is not None else
                           "with multiplier, which sets each conv's rank" if self.multiplier is not None else None)

    @property
    def reads_calibration(self) -> bool:  # type: ignore[override]
        return self.goal is not None  # the per-layer sensitivities are measured on calibration data

    @property
    def goal(self) -> Goal | None:
        return Goal.of(self.flops, self.latency)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rec = Recording(gm, ctx.example_inputs)
        stats: Counter = Counter()
        rules = None
        layers = splittable(gm, list(call_nodes(gm, aten.conv2d)), stats)
        names = [n.name for n in layers]
        if self.goal is not None:
            rules = plan_splits(gm, ctx, rec, self.name, [DepthwiseSeparable(multiplier=r) for r in LADDER],
                                lambda rule, node, w: rule.stages(node, w), layers, self.goal, False, stats,
                                trial=lambda chosen, copy: split_layers(copy, names, chosen, self,
                                                                        partial(self.split, rec), Counter()))
            if rules is None:
                return PassResult(changed=False, preserves="all", stats=dict(stats))
            stats.update({f"multiplier.{layer}": rule.multiplier for layer, rule in rules.items()})
        split_layers(gm, names, rules, self, partial(self.split, rec), stats)
        if not stats.get("split"):
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        stats["error.model"] = rec.model_error(gm)
        return PassResult(changed=True, stats=dict(stats))

    def split(self, rec: Recording, gm: fx.GraphModule, node: fx.Node, rule: DepthwiseSeparable,
              stats: Counter) -> str | None:
        """Decouple one conv of ``gm`` by ``rule`` (this pass, or the multiplier a goal chose); return why not, or
        None when split."""
        weight, bias_node = get_tensor(gm, weight_of(node)), bias_of(node)
        bias = get_tensor(gm, bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            return "non_constant_weight"
        if conv_groups(node) != 1:
            return "grouped"
        x, y = rec.value(data(node)), rec.value(node)
        if math.prod(weight.shape[2:]) > 1 and (x is None or y is None):
            return "not_executed"
        stages = rule.stages(node, weight)
        if isinstance(stages, str):
            return stages
        stats[f"error.{node.name}"] = layer_error(node, x, y, stages, bias)
        emit_stages(gm, node, stages)
        return None

    def layer_effect(self, node: fx.Node, layer: LayerContext) -> LayerFn | str:
        return factorized(node, self.stages(node, layer.weight))

    def stages(self, node: fx.Node, w: torch.Tensor) -> list[Stage] | str:
        """The decoupled conv (depthwise, pointwise) of one layer alone, or why not."""
        if not is_op(node, aten.conv2d) or conv_groups(node) != 1:
            return "not_a_regular_conv2d" if not is_op(node, aten.conv2d) else "grouped"
        m, n, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
        if k == 1:
            return "pointwise"
        stages = self.decouple(w)
        return "not_cheaper" if stages[1].weight.shape[1] // n * (k + m) >= m * k else stages

    def decouple(self, w: torch.Tensor) -> list[Stage]:
        """Depthwise (n·r, 1, kh, kw) with groups n, then pointwise (m, n·r, 1, 1)."""
        m, n = w.shape[:2]
        slices = w.double().transpose(0, 1).reshape(n, m, -1)  # n × m × k²
        u, s, vh = svd(slices)  # u: n×m×q, s: n×q, vh: n×q×k²
        r = min(self.multiplier or self.rank(s, (m, slices.shape[2])), s.shape[1])
        root = s[:, :r].sqrt()
        depthwise = (root[..., None] * vh[:, :r]).reshape(n * r, 1, *w.shape[2:])
        pointwise = (u[:, :, :r] * root[:, None, :]).permute(1, 0, 2).reshape(m, n * r, 1, 1)
        return [Stage(depthwise.to(w.dtype), spatial=True, groups=n), Stage(pointwise.to(w.dtype))]

    def rank(self, s: torch.Tensor, shape: tuple[int, int]) -> int:
        """The fewest terms per channel holding ``energy`` of Σσ² over all channels."""
        if self.energy >= 1.0:
            return max(energy_rank(row, 1.0, shape) for row in s)
        return energy_rank((s.double() ** 2).sum(0).sqrt(), self.energy, shape)
