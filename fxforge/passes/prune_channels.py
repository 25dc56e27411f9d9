"""prune_channels: remove the least important coupled channel groups. Approximate, structural.

Each prunable group of ChannelGroups (e.g. channel k of a whole residual stage) gets an importance from
the weights that create it: Σ‖W_row‖₁ (``l1``), √Σ‖W_row‖₂² (``l2``) over its producer rows, or Σ|γ| of the
batch norms it passes (``bn``; groups with no BN fall back to l2, counted). Groups are ranked within their
layer (the set of producers they belong to; ``scope="layer"``) or across layers after dividing by the
layer's mean importance (``scope="global"``), the lowest ``ratio`` are chosen, and each layer keeps a
multiple of ``round_to`` channels. The chosen groups are zeroed (weight rows, biases, BN γ and β, per-channel
constants) so every tensor they occupy is exactly 0, and dead_channels removes them physically. An optional
``finetune(gm)`` hook runs on the smaller graph. Stats report params and FLOPs before and after.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Literal

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Flops, Shapes
from fxforge.compiler.errors import PassError
from fxforge.compiler.graph import get_tensor, set_tensor
from fxforge.compiler.ops import (BATCH_NORM, WEIGHTED, aten, bias_of, bn_params, call_with, is_op, operands, value_of,
                                 weight_of)
from fxforge.compiler.pass_manager import LayerContext, LayerFn, Pass, PassContext, PassResult, register_pass
from fxforge.compiler.report import model_size

from .analysis.channel_groups import BINARY, ChannelGraph, ChannelGroup, ChannelGroups
from .dead_channels import DeadChannels


@register_pass
class PruneChannels(Pass):
    """Zero the least important coupled channel groups by L1/L2/BN-γ and remove them (approximate)."""

    name = "prune_channels"
    exact = False

    ratio: float = 0.3
    importance: Literal["l1", "l2", "bn"] = "l1"
    scope: Literal["global", "layer"] = "global"
    round_to: int = 8
    finetune: Callable[[fx.GraphModule], None] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0 or self.round_to < 1 or self.importance not in ("l1", "l2", "bn") \
                or self.scope not in ("global", "layer"):
            raise PassError(f"prune_channels needs 0 <= ratio < 1, round_to >= 1, importance in l1/l2/bn and scope "
                            f"global/layer; got {self.options()}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cg: ChannelGraph = ctx.analysis(ChannelGroups, gm)
        params_before, flops_before = model_size(gm)[0], sum(ctx.analysis(Flops, gm).values())
        stats = Counter({"skipped.unprunable": len(cg.groups) - len(cg.prunable())})
        scores, layers = _importance(gm, cg, self.importance, stats)
        chosen = self.choose(scores, layers, stats)
        if not chosen:
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        zero_groups(gm, cg, [cg.groups[g] for g in chosen])
        ctx.invalidate(frozenset({ChannelGroups, Shapes}))  # same structure, new values
        result = DeadChannels().run(gm, ctx)
        if self.finetune is not None:
            self.finetune(gm)
        ctx.invalidate("none")
        return PassResult(changed=True, stats={
            **stats, "groups_pruned": len(chosen),
            **{k: v for k, v in result.stats.items() if not k.startswith("skipped.unprunable")},
            "params_before": params_before, "params_after": model_size(gm)[0], "flops_before": flops_before,
            "flops_after": sum(ctx.analysis(Flops, gm).values())})

    def layer_effect(self, node: fx.Node, layer: LayerContext) -> LayerFn | str:
        """Zero the ``ratio`` of output channels with the smallest L1 weight norm (channel coupling and
        rounding to ``round_to`` ignored: one layer alone)."""
        w = layer.weight
        drop = int(self.ratio * w.shape[0])
        if not drop:
            return "too_few_channels"
        rows = w.flatten(1).abs().sum(1).argsort()[:drop]
        wz = w.clone().index_fill_(0, rows, 0.0)

        def layer_fn(args: list, kwargs: dict) -> torch.Tensor:
            bias = value_of(node, args, kwargs, "bias")
            zeroed = {} if bias is None else {"bias": bias.clone().index_fill_(0, rows, 0.0)}
            return call_with(node, args, kwargs, weight=wz, **zeroed)
        return layer_fn

    def choose(self, scores: dict[int, float], layers: dict[tuple, list[int]], stats: dict) -> list[int]:
        """Group indices to prune: the lowest ``ratio`` per layer or globally, each layer rounded."""
        means = {key: sum(scores[g] for g in gs) / len(gs) or 1.0 for key, gs in layers.items()}
        norm = {g: scores[g] / means[key] for key, gs in layers.items() for g in gs}
        cut = sorted(norm.values())[int(self.ratio * len(norm)) - 1] if int(self.ratio * len(norm)) else -1.0
        chosen: list[int] = []
        for groups in layers.values():
            ranked = sorted(groups, key=lambda g: norm[g])
            drop = sum(norm[g] <= cut for g in groups) if self.scope == "global" else int(self.ratio * len(groups))
            if drop and len(groups) <= self.round_to:
                stats["skipped.small_layer"] += 1
            elif drop:
                keep = self.round_to * max(1, round((len(groups) - drop) / self.round_to))
                chosen += ranked[:max(0, len(groups) - keep)]
        return chosen


def _importance(gm: fx.GraphModule, cg: ChannelGraph, kind: str, stats: dict) -> tuple[dict, dict]:
    """Importance per prunable group, and the groups of each layer (keyed by the producers they share)."""
    prunable = {i: cg.group_of[i] for g in cg.prunable() for i in g.ids}
    l1: dict[int, float] = {}
    l2: dict[int, float] = {}
    gammas: dict[int, float] = {}
    producers: dict[int, set[str]] = {}
    blocked: set[int] = set()
    for node in gm.graph.nodes:
        m = cg.map(node)
        w = get_tensor(gm, weight_of(node)) if m is not None and is_op(node, *WEIGHTED) else None
        if w is not None:
            rows = w.detach().double().flatten(1)
            for i, a, b in zip(m.ids.tolist(), rows.abs().sum(1).tolist(), rows.pow(2).sum(1).tolist()):
                if i in prunable:
                    g = prunable[i]
                    l1[g], l2[g] = l1.get(g, 0.0) + a, l2.get(g, 0.0) + b
                    producers.setdefault(g, set()).add(node.name)
        gamma = get_tensor(gm, bn_params(node).gamma) if m is not None and is_op(node, *BATCH_NORM) else None
        for i, a in zip(m.ids.tolist(), gamma.detach().abs().tolist()) if gamma is not None else ():
            if i in prunable:
                gammas[prunable[i]] = gammas.get(prunable[i], 0.0) + a
        if m is not None and is_op(node, aten.layer_norm):
            blocked |= {prunable[i] for i in m.ids.flatten().tolist() if i in prunable}
    if blocked:
        stats["skipped.layer_norm"] = len(blocked)
    scores: dict[int, float] = {}
    for g in l1:
        if g in blocked:
            continue
        if kind == "bn" and g in gammas:
            scores[g] = gammas[g]
        elif kind == "l1":
            scores[g] = l1[g]
        else:
            if kind == "bn":
                stats["importance_fallback_l2"] += 1
            scores[g] = l2[g] ** 0.5
    layers: dict[tuple, list[int]] = {}
    for g in scores:
        layers.setdefault(tuple(sorted(producers[g])), []).append(g)
    return scores, layers


def zero_groups(gm: fx.GraphModule, cg: ChannelGraph, groups: list[ChannelGroup]) -> None:
    """Make every tensor position of ``groups`` exactly 0: zero producer rows and biases, BN γ and β,
    and per-channel constants added or multiplied in."""
    ids = torch.tensor([i for g in groups for i in g.ids])
    for node in gm.graph.nodes:
        m = cg.map(node)
        if m is None or node.op != "call_function" or bool(m.keep(ids).all()):
            continue
        hit = ~m.keep(ids)
        if is_op(node, *WEIGHTED):
            targets = [weight_of(node), bias_of(node)]
        elif is_op(node, *BATCH_NORM):
            targets = [bn_params(node).gamma, bn_params(node).beta]
        elif is_op(node, aten.add, aten.sub, aten.mul) and is_op(node, *BINARY):
            targets = [a for a in operands(node)
                       if get_tensor(gm, a) is not None and _spans(get_tensor(gm, a), m, cg.ndim(node))]
        else:
            continue
        for t_node in targets:
            t = get_tensor(gm, t_node)
            if t is None:
                continue
            t = t.clone()
            d = 0 if is_op(node, *WEIGHTED, *BATCH_NORM) else m.dims[0] - (cg.ndim(node) - t.dim())
            t.index_fill_(d, hit.nonzero().flatten(), 0.0)
            set_tensor(gm, t_node, t)


def _spans(t: torch.Tensor, m, nd: int) -> bool:
    d = m.dims[0] - (nd - t.dim())
    return d >= 0 and t.shape[d] == m.ids.numel() > 1
