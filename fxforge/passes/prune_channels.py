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
most f of the input's FLOPs remain. A conv keeps ``F · k_out · k_in`` of its FLOPs (k: the kept fraction of its
output and input channels; a depthwise conv ``F · k_out``), so two pruned neighbours save less than the sum of
their savings: when the chosen layers together leave more than f, the plan is redone asking for the shortfall
more. When the goal cannot be met nothing changes and the stats say so (``skipped.flops_goal_unreachable``
with the best reachable fraction); ``flops=1.0`` is met as the model is (``skipped.flops_goal_met``).

The chosen groups are zeroed (weight rows, biases, BN γ and β, per-channel constants) so every tensor they
occupy is exactly 0, and dead_channels removes them physically. Groups that removal would not take once zeroed
(an activation turning the zeros into another constant before zero padding) are left out of the choice
(``skipped.not_removable``): zeroed, they damaged the model and saved nothing. An optional ``finetune(gm)`` hook
runs on the smaller graph. Stats report params and FLOPs before and after.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Callable, Literal

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Flops, Shapes
from fxforge.compiler.errors import PassError, missing_calibration
from fxforge.compiler.graph import get_tensor, set_tensor
from fxforge.compiler.ops import (BATCH_NORM, ELEMENTWISE_BINARY, WEIGHTED, aten, bias_of, bn_params, conv_groups, data,
                                 is_op, operands, weight_of)
from fxforge.compiler.pass_manager import LayerContext, LayerFn, Pass, PassContext, PassResult, register_pass
from fxforge.compiler.report import model_size

from .analysis.channel_groups import ChannelGraph, ChannelGroup, ChannelGroups
from .analysis.channel_importance import ChannelImportance, Importance
from .analysis.removable_channels import RemovableChannels
from .analysis.sensitivity import give_back, layer_sensitivity, plan
from .lib.channel_surgery import remove_removable
from .lib.qdq import checked_batches

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

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0 or self.round_to < 1 or self.importance not in ("l1", "l2", "bn") \
                or self.scope not in ("global", "layer") or self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise PassError(f"prune_channels needs 0 <= ratio < 1, round_to >= 1, importance in l1/l2/bn, scope "
                            f"global/layer and flops in (0, 1]; got {self.options()}")
        self.refuse_unread("ratio", "with flops, which chooses each layer's ratio" if self.flops is not None else None)

    @property
    def reads_calibration(self) -> bool:  # type: ignore[override]
        return self.flops is not None  # the per-layer sensitivities are measured on calibration data

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
        if self.flops is None:
            # choose again without the layers some of whose chosen groups removal would not take (the groups of a
            # layer share its producers and readers, so what keeps one, an activation before zero padding, keeps all)
            stuck: set[tuple[str, ...]] = set()
            chosen, choice = [], Counter()
            for _ in range(len(scores)):
                rest = {g: v for g, v in scores.items() if imp.producers[g] not in stuck}
                choice = Counter()
                chosen = self.choose(rest, imp.layers(rest), choice)
                if not (missed := set(chosen) - removable_groups(gm, ctx, cg, chosen)):
                    break
                stuck |= {imp.producers[g] for g in missed}
            stats.update(choice)
            if left_out := sum(imp.producers[g] in stuck for g in scores):
                stats["skipped.not_removable"] = left_out
        else:
            chosen = self.per_layer(gm, ctx, cg, imp, stats)
        if not chosen:
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        zero_groups(gm, cg, [cg.groups[g] for g in chosen])
        ctx.invalidate(frozenset({ChannelGroups, Shapes}))  # same structure, new values
        removed = remove_removable(gm, ctx)
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
        if isinstance(groups, str):
            return groups
        cg: ChannelGraph = layer.analysis(ChannelGroups)
        ids = torch.tensor([i for g in groups for i in cg.groups[g].ids])
        changes = {}
        for site, hit, _ in _zero_sites(node.graph.owning_module, cg, ids):
            m = cg.map(site)
            whole = site.name in cg.shapes  # else a batch norm returning (output, mean, var): its output is zeroed
            ndim = cg.ndim(site if whole else data(site))
            keep = (~hit).reshape([m.ids.shape[m.dims.index(d)] if d in m.dims else 1 for d in range(ndim)])
            changes[site.name] = (lambda args, kwargs, op=site.target, keep=keep: op(*args, **kwargs) * keep) \
                if whole else (lambda args, kwargs, op=site.target, keep=keep: _first_times(op(*args, **kwargs), keep))
        return changes

    def per_layer(self, gm: fx.GraphModule, ctx: PassContext, cg: ChannelGraph, imp: Importance,
                  stats: Counter) -> list[int]:
        """Groups to prune under the flops goal, each layer's ratio chosen from measured sensitivity (see the module
        docstring); [] when the goal cannot be met (counted in stats)."""
        if ctx.calibration is None:
            raise missing_calibration(self.name)
        rules = [PruneChannels(ratio=r, importance=self.importance, round_to=self.round_to) for r in LADDER]
        by_spec = {str(rule): rule for rule in rules}
        flops = ctx.analysis(Flops, gm)
        total = sum(flops.values())
        goal, need = total * self.flops, total * (1 - self.flops)
        if need <= 0:  # flops=1.0: met as it is (it was "unreachable" beside flops_reachable 1.0 where nothing pruned)
            stats["skipped.flops_goal_met"] = 1
            return []
        candidates = {(str(rule), key[0]): rule.layer_groups(key[0], imp) for rule in rules
                      for key in imp.layers(imp.scores(self.importance)[0])}
        candidates = {k: gs for k, gs in candidates.items() if not isinstance(gs, str)}
        kept = removable_groups(gm, ctx, cg, sorted({g for gs in candidates.values() for g in gs}))
        if stuck := len({g for gs in candidates.values() for g in gs} - kept):
            stats["skipped.not_removable"] = stuck
        candidates = {k: kept_gs for k, gs in candidates.items() if (kept_gs := [g for g in gs if g in kept])}
        left = lambda groups: flops_left(gm, cg, flops, torch.tensor([i for g in groups for i in cg.groups[g].ids]))
        groups = lambda choice: [g for layer, spec in choice.items() for g in candidates[(spec, layer)]]
        saved = {k: total - left(gs) for k, gs in candidates.items()}
        only: dict[str, set[str]] = {}
        for spec, layer in candidates:
            only.setdefault(spec, set()).add(layer)
        sens = layer_sensitivity(gm, list(checked_batches(ctx.calibration, ctx.example_inputs)), rules, ctx.target,
                                 only=only, ctx=ctx)
        for _ in range(len(candidates)):  # each round asks for the last round's shortfall more
            chosen = plan(sens, saved, need)
            if chosen is None:
                break
            if (after := left(groups(chosen))) <= goal:
                chosen = give_back(sens, saved, chosen, lambda trial: left(groups(trial)) <= goal)
                stats.update({f"ratio.{layer}": by_spec[spec].ratio for layer, spec in chosen.items()})
                return groups(chosen)
            # more than this plan's own summed savings: asked for only its shortfall more, a plan that already saved
            # that much (on paper) came back unchanged each round, and flops=0.7 was "unreachable" where 0.55 was not
            need = sum(saved[(spec, layer)] for layer, spec in chosen.items()) + after - goal
        stats["skipped.flops_goal_unreachable"] = 1
        deepest = {layer: spec for spec in by_spec for (s, layer) in candidates if s == spec}  # ladder ascends
        stats["flops_reachable"] = round(left(groups(deepest)) / total, 4) if total else 1.0
        return []


def removable_groups(gm: fx.GraphModule, ctx: PassContext, cg: ChannelGraph, groups: list[int]) -> set[int]:
    """Those of ``groups`` that dead_channels' removal takes once they are zeroed (asked of a zeroed copy of ``gm``).
    Zeros that an activation turns into another constant (sigmoid(0) = 0.5) and that then meet zero padding stay:
    zeroed, such a group damaged the model and saved no FLOP, and a flops goal was claimed met at 1.0× the FLOPs."""
    trial = copy.deepcopy(gm)
    zero_groups(trial, cg, [cg.groups[g] for g in groups])
    found = PassContext(example_inputs=ctx.example_inputs, target=ctx.target).analysis(RemovableChannels, trial)
    removed = set(found.ids)
    return {g for g in groups if set(cg.groups[g].ids) <= removed}


def flops_left(gm: fx.GraphModule, cg: ChannelGraph, flops: dict[str, int], ids: torch.Tensor) -> float:
    """The graph's FLOPs once the channels ``ids`` are removed: each conv/linear keeps F · k_out · k_in (k: the
    fraction of its output and input channel positions kept; a depthwise conv F · k_out), other ops their F."""
    nodes = {n.name: n for n in gm.graph.nodes}
    total = 0.0
    for name, f in flops.items():
        node = nodes[name]
        if not is_op(node, *WEIGHTED):
            total += f
            continue
        out, inp, w = cg.map(node), cg.input_map(node), get_tensor(gm, weight_of(node))
        depthwise = conv_groups(node) > 1 and w is not None and w.shape[1] == 1
        k_out = float(out.keep(ids).double().mean()) if out is not None else 1.0
        k_in = float(inp.keep(ids).double().mean()) if inp is not None and not depthwise else 1.0
        total += f * k_out * k_in
    return total


def zero_groups(gm: fx.GraphModule, cg: ChannelGraph, groups: list[ChannelGroup]) -> None:
    """Make every tensor position of ``groups`` exactly 0: zero producer rows and biases, BN γ and β,
    and per-channel constants added or multiplied in."""
    for node, hit, targets in _zero_sites(gm, cg, torch.tensor([i for g in groups for i in g.ids])):
        m = cg.map(node)
        for t_node in targets:
            t = get_tensor(gm, t_node).clone()
            d = 0 if is_op(node, *WEIGHTED, *BATCH_NORM) else m.dims[0] - (cg.ndim(node) - t.dim())
            t.index_fill_(d, hit.nonzero().flatten(), 0.0)
            set_tensor(gm, t_node, t)


def _first_times(outputs: tuple, keep: torch.Tensor) -> tuple:
    return (outputs[0] * keep, *outputs[1:])


def _zero_sites(gm: fx.GraphModule, cg: ChannelGraph, ids: torch.Tensor):
    """(node, the positions of its output map that ``ids`` hit, the constant tensors zeroing them) for every node
    whose output zero_groups makes 0 at those positions: producers, batch norms, binary ops with constants."""
    for node in gm.graph.nodes:
        m = cg.map(node)
        if m is None or node.op != "call_function" or bool(m.keep(ids).all()):
            continue
        if is_op(node, *WEIGHTED):
            targets = [weight_of(node), bias_of(node)]
        elif is_op(node, *BATCH_NORM):
            targets = [bn_params(node).gamma, bn_params(node).beta]
        elif is_op(node, aten.add, aten.sub, aten.mul) and is_op(node, *ELEMENTWISE_BINARY):
            targets = [a for a in operands(node)
                       if get_tensor(gm, a) is not None and _spans(get_tensor(gm, a), m, cg.ndim(node))]
        else:
            continue
        targets = [t for t in targets if get_tensor(gm, t) is not None]
        if targets:
            yield node, ~m.keep(ids), targets


def _spans(t: torch.Tensor, m, nd: int) -> bool:
    d = m.dims[0] - (nd - t.dim())
    return d >= 0 and t.shape[d] == m.ids.numel() > 1
