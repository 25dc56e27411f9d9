"""How prune_channels chooses channel groups beyond ranking them: only groups removal takes once zeroed, under a
goal by the FLOPs or time left once they go, and the change the sensitivity analysis measures for one layer.

A conv or linear keeps ``F · k_out · k_in`` of its FLOPs once channels go (k: the kept fraction of its output and
input channel positions; a depthwise conv ``F · k_out``), so two pruned neighbours save less than the sum of their
savings. Under a latency goal (lib/goals.py) each conv and linear the removal thins is timed thinned against
itself whole, on inputs of its shapes (:func:`thinned_ratio`), and keeps that share of its measured time; the
other ops are counted as they were. ``goal_choice`` plans with each layer's own saving (``sensitivity.plan``)
and, when the chosen layers together leave more than the goal, plans again asking for the shortfall more.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Flops
from fxforge.compiler.cache import cached_timing
from fxforge.compiler.graph import call_nodes, get_tensor
from fxforge.compiler.ops import CONV, WEIGHTED, bias_of, conv_geometry, conv_groups, data, is_op, weight_of
from fxforge.compiler.pass_manager import LayerFn, Pass, PassContext
from fxforge.compiler.target import Target
from fxforge.compiler.timing import measure_latency, paired_ratio

from ..analysis.channel_groups import ChannelGraph
from ..analysis.channel_importance import Importance
from ..analysis.sensitivity import give_back, layer_sensitivity, plan
from .channel_surgery import removable_groups, zero_sites
from .goals import Goal, graph_ms, meet_measured
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


def goal_choice(gm: fx.GraphModule, ctx: PassContext, cg: ChannelGraph, rules: Sequence[Pass],
                candidates: dict[tuple[str, str], list[int]], aim: Goal, stats: Counter,
                trial: Callable[[list[int], fx.GraphModule], None]) -> dict[tuple[str, str], list[int]]:
    """The (rule spec, layer) → groups of ``candidates`` (each rule's groups of each layer, rules in ascending
    depth) to prune so that at most ``aim.fraction`` of the graph's FLOPs (or time) remain, cheapest in accuracy
    per unit saved first (module docstring); {} when the goal is met as it is (``skipped.flops_goal_met``) or
    cannot be met (``skipped.flops_goal_unreachable`` and ``flops_reachable``; ``latency_…`` for a latency goal).
    Groups removal would not take are left out (``skipped.not_removable``). A latency goal is met as measured:
    ``trial(groups, copy)`` prunes a copy of ``gm`` for ``goals.meet_measured`` to time."""
    aim.check_target("prune_channels", ctx.target)
    flops = ctx.analysis(Flops, gm)
    timed = _LayerTimes(gm, cg, ctx.target, ctx.example_inputs) if aim.timed else None
    total = timed.total if timed is not None else sum(flops.values())
    need = total * (1 - aim.fraction)
    if need <= 0:  # flops=1.0: met as it is (it was "unreachable" beside flops_reachable 1.0 where nothing pruned)
        stats[aim.stat("skipped.goal_met")] = 1
        return {}
    kept = removable_groups(gm, ctx, cg, sorted({g for gs in candidates.values() for g in gs}))
    if stuck := len({g for gs in candidates.values() for g in gs} - kept):
        stats["skipped.not_removable"] = stuck
    candidates = {k: kept_gs for k, gs in candidates.items() if (kept_gs := [g for g in gs if g in kept])}
    ids = lambda groups: torch.tensor([i for g in groups for i in cg.groups[g].ids])
    left = (lambda groups: timed.left(ids(groups))) if timed is not None else \
        (lambda groups: flops_left(gm, cg, flops, ids(groups)))
    groups = lambda choice: [g for layer, spec in choice.items() for g in candidates[(spec, layer)]]
    saved = {k: total - left(gs) for k, gs in candidates.items()}
    only: dict[str, set[str]] = {}
    for spec, layer in candidates:
        only.setdefault(spec, set()).add(layer)
    sens = layer_sensitivity(gm, list(checked_batches(ctx.calibration, ctx.example_inputs)), rules, ctx.target,
                             only=only, ctx=ctx)
    def plan_for(to_save: float) -> dict[str, str] | None:
        """Layer → spec leaving at most ``total − to_save`` (None: out of reach); each round asks for the last
        round's shortfall more."""
        need, most = to_save, total - to_save
        for _ in range(len(candidates)):
            chosen = plan(sens, saved, need)
            if chosen is None:
                return None
            if (after := left(groups(chosen))) <= most:
                return give_back(sens, saved, chosen, lambda trial: left(groups(trial)) <= most)
            # more than this plan's own summed savings: asked for only its shortfall more, a plan that already saved
            # that much (on paper) came back unchanged each round, and flops=0.7 was "unreachable" where 0.55 was not
            need = sum(saved[(spec, layer)] for layer, spec in chosen.items()) + after - most
        return None

    chosen = plan_for(need)
    if chosen is not None and timed is not None:
        chosen = meet_measured(aim, total, need, plan_for, lambda c, copy: trial(groups(c), copy), gm,
                               ctx.example_inputs, chosen, stats)
        if chosen is None:
            return {}
        stats["latency.planned"] = round(left(groups(chosen)) / total, 4)
    if chosen is not None:
        return {(spec, layer): candidates[(spec, layer)] for layer, spec in chosen.items()}
    stats[aim.stat("skipped.goal_unreachable")] = 1
    deepest = {layer: spec for spec in map(str, rules) for (s, layer) in candidates if s == spec}
    stats[aim.stat("reachable")] = round(left(groups(deepest)) / total, 4) if total else 1.0
    return {}


class _LayerTimes:
    """The graph's measured time, and what is left of it once channels go: each conv and linear the removal thins
    keeps ``thinned_ratio`` of its own measured time (module docstring)."""

    def __init__(self, gm: fx.GraphModule, cg: ChannelGraph, target: Target, inputs: Sequence[torch.Tensor]) -> None:
        self.cg, self.target = cg, target
        self.total = graph_ms(gm, inputs)
        self.layers = [n for n in call_nodes(gm, *WEIGHTED) if get_tensor(gm, weight_of(n)) is not None]
        # timed now beside the total, never read from the cache: a time cached in another process's state (the
        # digits CNN's whole graph timed 1.9 and 2.3 ms in two processes) made the layers' shares of it wrong
        self.full = {n.name: _shapes(n, cg, None, None) for n in self.layers}
        self.own = {n.name: _layer_ms(n, *self.full[n.name][1:]) for n in self.layers}
        # each thinned shape's ratio, read from the timing cache once: a plan weighs hundreds of choices, and the
        # cache's file, read and parsed whole for each thinned layer of each, was read 18 357 times in ResNet-50's
        # pass (34 s of its 194 s on a cold cache)
        self.ratios: dict[tuple[str, int | None, int | None], float] = {}  # (layer, n_out, n_in) → ratio

    def left(self, ids: torch.Tensor) -> float:
        """The graph's time once the channels ``ids`` are removed (first order: each layer's saving summed)."""
        saved = 0.0
        for node in self.layers:
            kept = _kept(node, self.cg, ids)
            full, thin, key = self.full[node.name], _shapes(node, self.cg, *kept), (node.name, *kept)
            if thin != full:
                if key not in self.ratios:
                    self.ratios[key] = thinned_ratio(node, full, thin, self.target)
                saved += self.own[node.name] * (1 - self.ratios[key])
        return self.total - saved


def _kept(node: fx.Node, cg: ChannelGraph, ids: torch.Tensor) -> tuple[int | None, int | None]:
    """How many output and input channels of ``node`` stay once the channels ``ids`` go (None: a layout whose channel
    positions span more than one dimension, taken whole)."""
    out, inp = cg.map(node), cg.input_map(node)
    return (int(out.keep(ids).sum()) if out is not None and out.ids.dim() == 1 else None,
            int(inp.keep(ids).sum()) if inp is not None and inp.ids.dim() == 1 else None)


def thinned_ratio(node: fx.Node, full: tuple, thin: tuple, target: Target) -> float:
    """A conv or linear's time at the ``thin`` shapes (:func:`_shapes`) over its time at the ``full`` ones
    (``timing.paired_ratio``), kept per target."""
    return cached_timing(target, repr(["thinned", *full, *thin]), lambda: {"ratio": paired_ratio(
        _layer_call(node, *thin[1:]), _layer_call(node, *full[1:]))})["ratio"]


def _shapes(node: fx.Node, cg: ChannelGraph, n_out: int | None, n_in: int | None) -> tuple:
    """(op, input shape, weight shape, bias, geometry, groups) of ``node`` keeping ``n_out`` output and ``n_in``
    input channels (None: all), as removal leaves them: a depthwise conv's groups and input channels follow its
    output channels (its multiplier kept); another grouped conv keeps its group count, each group thinned alike
    (channel_groups couples the i-th channel of every group)."""
    x = list(cg.shapes[data(node).name].shape)
    w = list(get_tensor(node.graph.owning_module, weight_of(node)).shape)
    groups = conv_groups(node)
    channel = 1 if is_op(node, *CONV) else len(x) - 1
    if groups > 1 and w[1] == 1:  # depthwise, ``w[0] // groups`` outputs per input channel
        if n_out is not None:
            x[channel] = n_out // (w[0] // groups)
            w[0], groups = n_out, x[channel]
    else:
        w[0] = w[0] if n_out is None else n_out
        if n_in is not None:
            x[channel], w[1] = n_in, n_in // groups
    return str(node.target), tuple(x), tuple(w), bias_of(node) is not None, conv_geometry(node), groups


def _layer_call(node: fx.Node, x: tuple, w: tuple, bias: bool, geometry: tuple, groups: int) -> Callable[[], Any]:
    """``node``'s op on random tensors of these shapes (:func:`_shapes`), ready to time."""
    weight, inp = torch.randn(w), torch.randn(x)
    b = torch.randn(w[0]) if bias else None
    extra = (*geometry, groups) if is_op(node, *CONV) else ()
    return lambda: node.target(inp, weight, b, *extra)


def _layer_ms(node: fx.Node, *shapes: Any) -> float:
    """``node``'s time at these shapes (:func:`_shapes` less the op)."""
    return measure_latency(_layer_call(node, *shapes), (), budget_s=0.02)
