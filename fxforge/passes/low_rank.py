"""low_rank: split a linear or conv into thinner layers by truncated SVD or Tucker-2. Approximate; exact at full rank.

    svd:     W (m × n) = U S Vᵀ ≈ A·B,  A = U_r √S_r (m × r),  B = √S_r V_rᵀ (r × n)
             linear:   W x + b       →  A (B x) + b
             conv:     W reshaped to m × (n·k²); B is a k×k conv n → r with the layer's stride, padding and
                       dilation, A a 1×1 conv r → m carrying the bias (channel SVD)
    tucker2: W ≈ G ×₀ U_out ×₁ U_in (HOSVD: the leading left singular vectors of the two channel unfoldings,
             G = W ×₀ U_outᵀ ×₁ U_inᵀ): 1×1 conv n → r_in, k×k core conv r_in → r_out, 1×1 conv r_out → m

The rank keeps the fewest singular values holding ``energy`` of Σσ² (1.0: the numerical rank, so the split
is exact), or ``rank_ratio``·min(m, n) when given (it takes precedence). An SVD split costs r(m + n) MACs per
output position against mn, so a layer is never split when r ≥ mn/(m + n); Tucker-2 only when its FLOPs are
lower. ``budget="latency"`` additionally requires the split to time faster, measured on the layer's recorded
input, when the target runs on this host (otherwise FLOPs decide). Zero padding commutes with a leading
linear map without bias, so padding stays exact. Linears and 1×1 convs always use SVD.

``flops=f`` (a fraction of the pass's input FLOPs) decides per layer instead: every layer is tried alone at
rank ratios 1/2, 1/4, 1/8 and 1/16 on the calibration data (passes/analysis/sensitivity.py, which asks this
pass's ``layer_effect``), and ``sensitivity.plan`` takes the splits cheapest in accuracy per FLOP saved until
the model's FLOPs are at most f of what they were; ``latency=f``, per time saved as measured (passes/lib/goals.py).
A split that does not time faster (``budget="latency"`` or a latency goal) is never a candidate. When the goal
cannot be met nothing changes and the stats say so (``skipped.flops_goal_unreachable``, ``latency_…``).

Factors are computed in float64 with torch.linalg (lib/factorization.py). Stats hold the relative output error
of each split layer on its own recorded input (``error.<node>``) and of the model (``error.model``), both on
fresh random inputs.
"""
from __future__ import annotations

import math
from collections import Counter
from functools import partial
from typing import Literal

import torch
import torch.fx as fx

from fxforge.compiler.graph import call_nodes, get_tensor
from fxforge.compiler.ops import WEIGHTED, bias_of, conv_groups, data, weight_of
from fxforge.compiler.pass_manager import LayerContext, LayerFn, Pass, PassContext, PassResult, register_pass

from .lib.factorization import (Recording, Stage, check_fraction, emit_stages, energy_rank, factorized,
                                faster_on_host, layer_error, plan_splits, ratio_rank, split_layers, splittable,
                                svd_split, tucker2_split)
from .lib.goals import Goal

LADDER = (0.5, 0.25, 0.125, 0.0625)  # the rank ratios a flops goal chooses among, per layer


@register_pass
class LowRank(Pass):
    """Split linear and conv layers by truncated SVD (or convs by Tucker-2) where it saves FLOPs (approximate)."""

    name = "low_rank"
    exact = False
    before = ("insert_qdq",)  # a quantized layer's weight is no float constant: nothing would be split
    energy: float = 0.95
    rank_ratio: float | None = None
    budget: Literal["flops", "latency"] = "flops"
    method: Literal["svd", "tucker2"] = "svd"
    flops: float | None = None  # a goal: at most this fraction of the input's FLOPs, chosen per layer
    latency: float | None = None  # a goal: at most this fraction of the input's latency on this CPU, chosen per layer
    max_error: float | None = None  # a cap on the summed per-layer damage of the splits, chosen per layer

    def __post_init__(self) -> None:
        check_fraction("energy", self.energy)
        check_fraction("rank_ratio", self.rank_ratio)
        check_fraction("flops", self.flops)
        check_fraction("latency", self.latency)
        check_fraction("max_error", self.max_error)
        Goal.of(self.flops, self.latency)  # one goal at most
        if self.per_layer and (self.method != "svd" or self.rank_ratio is not None):
            raise ValueError("flops, latency and max_error choose each layer's SVD rank: they take neither "
                             "method='tucker2' nor rank_ratio")
        self.refuse_unread("energy", "with flops, latency or max_error, which choose each layer's rank" if self.per_layer else
                           "with rank_ratio, which sets each rank" if self.rank_ratio is not None else None)

    @property
    def per_layer(self) -> bool:
        """Whether each layer's rank is chosen from measured sensitivity (a goal or an error cap)."""
        return Goal.of(self.flops, self.latency) is not None or self.max_error is not None

    @property
    def reads_calibration(self) -> bool:  # type: ignore[override]
        return self.per_layer  # the per-layer sensitivities are measured on calibration data

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rec = Recording(gm, ctx.example_inputs)
        stats: Counter = Counter()
        if self.budget == "latency" and not ctx.target.runs_on_host:
            stats["untimed"] = 1  # splits decided by FLOPs: the target's CPU is not here to time them
        layers = splittable(gm, list(call_nodes(gm, *WEIGHTED)), stats)
        rules = self.choose(gm, ctx, rec, layers, stats) if self.per_layer else None
        if rules is None and self.per_layer:
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        split_layers(gm, [n.name for n in layers], rules, self, partial(self.split, rec, ctx), stats)
        if not stats.get("split"):
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        stats["error.model"] = rec.model_error(gm)
        return PassResult(changed=True, stats=dict(stats))


    def choose(self, gm: fx.GraphModule, ctx: PassContext, rec: Recording, layers: list[fx.Node],
               stats: Counter) -> dict[str, LowRank] | None:
        """Layer → the LowRank (rank ratio of LADDER) that splits it under the goal and error cap; None
        when the goal cannot be met or nothing fits the cap (counted in stats)."""
        rules = [LowRank(rank_ratio=ratio, budget=self.budget) for ratio in LADDER]
        chosen = plan_splits(gm, ctx, rec, self.name, rules, lambda rule, node, w: rule.stages(node, w),
                             layers, Goal.of(self.flops, self.latency),
                             self.budget == "latency" and ctx.target.runs_on_host, stats, self.max_error,
                             lambda chosen, copy: split_layers(copy, [n.name for n in layers], chosen, self,
                                                               partial(self.split, rec, ctx), Counter()))
        stats.update({f"rank_ratio.{layer}": rule.rank_ratio for layer, rule in (chosen or {}).items()})
        return chosen

    def split(self, rec: Recording, ctx: PassContext, gm: fx.GraphModule, node: fx.Node, rule: LowRank,
              stats: Counter) -> str | None:
        """Split one layer of ``gm`` by ``rule``'s rank (this pass's own, or the one a goal chose); return why not,
        or None when split."""
        weight, bias_node = get_tensor(gm, weight_of(node)), bias_of(node)
        bias = get_tensor(gm, bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            return "non_constant_weight"
        if weight.numel() == 0:  # dead_channels removed every channel of this layer
            return "empty"
        if conv_groups(node) != 1:
            return "grouped"
        x, y = rec.value(data(node)), rec.value(node)
        if x is None or y is None:
            return "not_executed"
        tucker = self.method == "tucker2" and weight.dim() > 2 and math.prod(weight.shape[2:]) > 1
        stages = tucker2_split(weight, x, y, rule.rank) if tucker else svd_split(weight, rule.rank)
        if isinstance(stages, str):
            return stages
        if rule is self and self.budget == "latency" and ctx.target.runs_on_host and \
                not faster_on_host(node, x, weight, bias, stages, ctx.target):
            return "slower_measured"
        stats[f"error.{node.name}"] = layer_error(node, x, y, stages, bias)
        emit_stages(gm, node, stages)
        return None

    def layer_effect(self, node: fx.Node, layer: LayerContext) -> LayerFn | str:
        return factorized(node, self.stages(node, layer.weight))

    def stages(self, node: fx.Node, w: torch.Tensor) -> list[Stage] | str:
        """The SVD split of one layer alone, or why not."""
        return "grouped" if conv_groups(node) != 1 else svd_split(w, self.rank)

    def rank(self, s: torch.Tensor, shape: tuple[int, ...]) -> int:
        """How many of the singular values ``s`` (descending) of a matrix of ``shape`` a split keeps."""
        return ratio_rank(self.rank_ratio, len(s)) if self.rank_ratio is not None else \
            energy_rank(s, self.energy, shape)
