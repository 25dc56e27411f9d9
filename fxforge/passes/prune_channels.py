"""prune_channels: remove the least important coupled channel groups. Approximate, structural.

Each prunable group of ChannelGroups (e.g. channel k of a whole residual stage) gets an importance from
the weights that create it (passes/analysis/channel_importance.py): Σ‖W_row‖₁ (``l1``), √Σ‖W_row‖₂² (``l2``)
over its producer rows, or Σ|γ| of the batch norms it passes (``bn``; groups with no BN fall back to l2,
counted). Groups are ranked within their layer (the producers they share; ``scope="layer"``) or across layers
after dividing by the layer's mean importance (``scope="global"``), the lowest ``ratio`` are chosen, and each
layer keeps a multiple of ``round_to`` channels.

``flops=f`` decides per layer instead: each layer is pruned alone at the ratios of LADDER (its least important
groups, rounded) on the calibration data (passes/analysis/sensitivity.py, which asks this pass's
``layer_effect``), and ``sensitivity.plan`` takes the layers cheapest in accuracy per FLOP saved first until at
most f of the input's FLOPs remain (pruned neighbours save less than their savings summed: lib/pruning.py plans
again for the shortfall). ``latency=f`` does the same with measured time (passes/lib/goals.py). When the goal
cannot be met nothing changes and the stats say so (``skipped.flops_goal_unreachable`` with the best reachable
fraction, ``latency_…`` likewise); ``flops=1.0`` is met as the model is (``skipped.flops_goal_met``).

The chosen groups are zeroed (weight rows, biases, BN γ and β, per-channel constants) so every tensor they
occupy is exactly 0, and dead_channels removes them physically. Groups that removal would not take once zeroed
(an activation turning the zeros into another constant before zero padding) are left out of the choice
(``skipped.not_removable``): zeroed, they damaged the model and saved nothing. An optional ``finetune(gm)`` hook
runs on the smaller graph. Stats report params and FLOPs before and after.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Literal

import torch.fx as fx

from fxforge.compiler.analysis import Flops
from fxforge.compiler.errors import PassError, missing_calibration
from fxforge.compiler.pass_manager import LayerContext, LayerFn, Pass, PassContext, PassResult, register_pass
from fxforge.compiler.report import model_size

from .analysis.channel_groups import ChannelGraph, ChannelGroups
from .analysis.channel_importance import ChannelImportance, Importance
from .lib.channel_surgery import prune_groups
from .lib.goals import Goal
from .lib.pruning import goal_choice, removable_choice, zeroed

LADDER = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)  # the ratios a flops goal chooses among, per layer


@register_pass
class PruneChannels(Pass):
    """Zero the least important coupled channel groups by L1/L2/BN-γ and remove them (approximate)."""

    name = "prune_channels"
    exact = False
    before = ("insert_qdq",)  # a quantized layer's channels are no coupled float groups: nothing would be pruned

    ratio: float = 0.3
    importance: Literal["l1", "l2", "bn"] = "l1"
    scope: Literal["global", "layer"] = "global"
    round_to: int = 8
    finetune: Callable[[fx.GraphModule], None] | None = None
    flops: float | None = None  # a goal: at most this fraction of the input's FLOPs, the ratio chosen per layer
    latency: float | None = None  # a goal: at most this fraction of the input's latency on this CPU, likewise

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0 or self.round_to < 1 or self.importance not in ("l1", "l2", "bn") \
                or self.scope not in ("global", "layer") \
                or any(g is not None and not 0.0 < g <= 1.0 for g in (self.flops, self.latency)):
            raise PassError(f"prune_channels needs 0 <= ratio < 1, round_to >= 1, importance in l1/l2/bn, scope "
                            f"global/layer and flops or latency in (0, 1]; got {self.options()}")
        self.refuse_unread("ratio", f"with {self.goal.kind}, which chooses each layer's ratio" if self.goal is not None else None)

    @property
    def goal(self) -> Goal | None:
        return Goal.of(self.flops, self.latency)

    @property
    def reads_calibration(self) -> bool:  # type: ignore[override]
        return self.goal is not None  # the per-layer sensitivities are measured on calibration data

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cg: ChannelGraph = ctx.analysis(ChannelGroups, gm)
        imp: Importance = ctx.analysis(ChannelImportance, gm)
        params_before, flops_before = model_size(gm)[0], sum(ctx.analysis(Flops, gm).values())
        stats = Counter({"skipped.unprunable": len(cg.groups) - len(cg.prunable())})
        if blocked := len(imp.blocked):
            stats["skipped.layer_norm"] = blocked
        scores, fallback = imp.scores(self.importance)
        if fallback:
            stats["importance_fallback_l2"] = fallback
        chosen = removable_choice(gm, ctx, cg, imp, scores, self.choose, stats) if self.goal is None \
            else self.per_layer(gm, ctx, cg, imp, stats)
        if not chosen:
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        removed = prune_groups(gm, ctx, chosen)
        if self.finetune is not None:
            self.finetune(gm)
        ctx.invalidate("none")
        return PassResult(changed=True, stats={
            **stats, "groups_pruned": len(chosen),
            **{k: v for k, v in removed.items() if not k.startswith("skipped.unprunable")},
            "params_before": params_before, "params_after": model_size(gm)[0], "flops_before": flops_before,
            "flops_after": sum(ctx.analysis(Flops, gm).values())})

    def choose(self, scores: dict[int, float], layers: dict[tuple, list[int]], stats: Counter) -> list[int]:
        """Group indices to prune: the lowest ``ratio`` per layer or globally, each layer rounded."""
        means = {key: sum(scores[g] for g in gs) / len(gs) or 1.0 for key, gs in layers.items()}
        norm = {g: scores[g] / means[key] for key, gs in layers.items() for g in gs}
        cut = sorted(norm.values())[int(self.ratio * len(norm)) - 1] if int(self.ratio * len(norm)) else -1.0
        chosen: list[int] = []
        for groups in layers.values():
            drop = sum(norm[g] <= cut for g in groups) if self.scope == "global" else int(self.ratio * len(groups))
            chosen += self.lowest(sorted(groups, key=lambda g: norm[g]), drop, stats)
        return chosen

    def lowest(self, ranked: list[int], drop: int, stats: Counter) -> list[int]:
        """The first of a layer's ``ranked`` groups to prune when ``drop`` should go: the layer keeps a multiple of
        ``round_to`` (at least one), and a layer of at most ``round_to`` channels is left (counted)."""
        if drop and len(ranked) <= self.round_to:
            stats["skipped.small_layer"] += 1
        if not drop or len(ranked) <= self.round_to:
            return []
        keep = self.round_to * max(1, round((len(ranked) - drop) / self.round_to))
        return ranked[:max(0, len(ranked) - keep)]

    def layer_groups(self, node: str, imp: Importance) -> list[int] | str:
        """The groups this pass at ``ratio`` prunes from the layers whose first producer is ``node``, or why none."""
        scores, _ = imp.scores(self.importance)
        layers = [gs for key, gs in imp.layers(scores).items() if key[0] == node]
        if not layers:
            return "no_prunable_channels"
        return [g for gs in layers for g in self.lowest(gs, int(self.ratio * len(gs)), Counter())] or "too_few_channels"

    def layer_effect(self, node: fx.Node, layer: LayerContext) -> dict[str, LayerFn] | str:
        """Zero the groups ``layer_groups`` names at every node that ``zero_groups`` would change: the pruned
        model, channel coupling and rounding included."""
        groups = self.layer_groups(node.name, layer.analysis(ChannelImportance))
        return groups if isinstance(groups, str) else zeroed(node.graph.owning_module, layer.analysis(ChannelGroups),
                                                             groups)

    def per_layer(self, gm: fx.GraphModule, ctx: PassContext, cg: ChannelGraph, imp: Importance,
                  stats: Counter) -> list[int]:
        """Groups to prune under the goal, each layer's ratio of LADDER chosen from measured sensitivity (see
        the module docstring); [] when the goal cannot be met (counted in stats)."""
        if ctx.calibration is None:
            raise missing_calibration(self.name)
        rules = {str(rule): rule for rule in (PruneChannels(ratio=r, importance=self.importance,
                                                            round_to=self.round_to) for r in LADDER)}
        candidates = {(spec, key[0]): rule.layer_groups(key[0], imp) for spec, rule in rules.items()
                      for key in imp.layers(imp.scores(self.importance)[0])}
        candidates = {k: gs for k, gs in candidates.items() if not isinstance(gs, str)}
        # a copy a latency goal times is pruned in a context of its own (the analyses of ``gm`` stay cached)
        chosen = goal_choice(gm, ctx, cg, list(rules.values()), candidates, self.goal, stats,
                             lambda groups, copy: prune_groups(copy, PassContext(ctx.example_inputs, ctx.target), groups))
        stats.update({f"ratio.{layer}": rules[spec].ratio for spec, layer in chosen})
        return [g for gs in chosen.values() for g in gs]
