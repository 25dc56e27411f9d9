"""How prune_channels chooses channel groups beyond ranking them: only groups removal takes once zeroed, under a
flops goal by the FLOPs left once they go, and the change the sensitivity analysis measures for one layer.

A conv or linear keeps ``F · k_out · k_in`` of its FLOPs once channels go (k: the kept fraction of its output and
input channel positions; a depthwise conv ``F · k_out``), so two pruned neighbours save less than the sum of their
savings. ``flops_goal_choice`` plans with each layer's own saving (``sensitivity.plan``) and, when the chosen
layers together leave more than the goal, plans again asking for the shortfall more.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Flops
from fxforge.compiler.graph import get_tensor
from fxforge.compiler.ops import WEIGHTED, conv_groups, data, is_op, weight_of
from fxforge.compiler.pass_manager import LayerFn, Pass, PassContext

from ..analysis.channel_groups import ChannelGraph
from ..analysis.channel_importance import Importance
from ..analysis.sensitivity import give_back, layer_sensitivity, plan
from .channel_surgery import removable_groups, zero_sites
from .qdq import checked_batches


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


def zeroed(gm: fx.GraphModule, cg: ChannelGraph, groups: list[int]) -> dict[str, LayerFn]:
    """Node name → its function with the positions of ``groups`` made 0, at every node that ``zero_groups`` would
    change: the pruned model, channel coupling included, without changing the graph."""
    ids = torch.tensor([i for g in groups for i in cg.groups[g].ids])
    changes = {}
    for site, hit, _ in zero_sites(gm, cg, ids):
        m = cg.map(site)
        whole = site.name in cg.shapes  # else a batch norm returning (output, mean, var): its output is zeroed
        ndim = cg.ndim(site if whole else data(site))
        keep = (~hit).reshape([m.ids.shape[m.dims.index(d)] if d in m.dims else 1 for d in range(ndim)])
        changes[site.name] = (lambda args, kwargs, op=site.target, keep=keep: op(*args, **kwargs) * keep) \
            if whole else (lambda args, kwargs, op=site.target, keep=keep: _first_times(op(*args, **kwargs), keep))
    return changes


def _first_times(outputs: tuple, keep: torch.Tensor) -> tuple:
    return (outputs[0] * keep, *outputs[1:])


def removable_choice(gm: fx.GraphModule, ctx: PassContext, cg: ChannelGraph, imp: Importance, scores: dict[int, float],
                     choose: Callable[[dict[int, float], dict[tuple, list[int]], Counter], list[int]],
                     stats: Counter) -> list[int]:
    """The groups ``choose(scores, layers, stats)`` prunes, chosen again without the layers some of whose chosen
    groups removal would not take (the groups of a layer share its producers and readers, so what keeps one, an
    activation before zero padding, keeps all); those layers' groups counted as ``skipped.not_removable``."""
    stuck: set[tuple[str, ...]] = set()
    chosen, choice = [], Counter()
    for _ in range(len(scores)):
        rest = {g: v for g, v in scores.items() if imp.producers[g] not in stuck}
        choice = Counter()
        chosen = choose(rest, imp.layers(rest), choice)
        if not (missed := set(chosen) - removable_groups(gm, ctx, cg, chosen)):
            break
        stuck |= {imp.producers[g] for g in missed}
    stats.update(choice)
    if left_out := sum(imp.producers[g] in stuck for g in scores):
        stats["skipped.not_removable"] = left_out
    return chosen


def flops_goal_choice(gm: fx.GraphModule, ctx: PassContext, cg: ChannelGraph, rules: Sequence[Pass],
                      candidates: dict[tuple[str, str], list[int]], goal_fraction: float,
                      stats: Counter) -> dict[tuple[str, str], list[int]]:
    """The (rule spec, layer) → groups of ``candidates`` (each rule's groups of each layer, rules in ascending
    depth) to prune so that at most ``goal_fraction`` of the graph's FLOPs remain, cheapest in accuracy per FLOP
    saved first (module docstring); {} when the goal is met as it is (``skipped.flops_goal_met``) or cannot be met
    (``skipped.flops_goal_unreachable`` and ``flops_reachable``). Groups removal would not take are left out
    (``skipped.not_removable``)."""
    flops = ctx.analysis(Flops, gm)
    total = sum(flops.values())
    goal, need = total * goal_fraction, total * (1 - goal_fraction)
    if need <= 0:  # flops=1.0: met as it is (it was "unreachable" beside flops_reachable 1.0 where nothing pruned)
        stats["skipped.flops_goal_met"] = 1
        return {}
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
            return {(spec, layer): candidates[(spec, layer)] for layer, spec in chosen.items()}
        # more than this plan's own summed savings: asked for only its shortfall more, a plan that already saved
        # that much (on paper) came back unchanged each round, and flops=0.7 was "unreachable" where 0.55 was not
        need = sum(saved[(spec, layer)] for layer, spec in chosen.items()) + after - goal
    stats["skipped.flops_goal_unreachable"] = 1
    deepest = {layer: spec for spec in map(str, rules) for (s, layer) in candidates if s == spec}
    stats["flops_reachable"] = round(left(groups(deepest)) / total, 4) if total else 1.0
    return {}
