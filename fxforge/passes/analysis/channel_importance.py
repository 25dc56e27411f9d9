"""Channel importance: how much each prunable channel group (ChannelGroups) weighs, and which layers make it.

For every prunable group g, over the conv/linear rows that create its channels and the batch norms they pass:

    l1(g) = Σ ‖W_row‖₁        l2(g) = √Σ ‖W_row‖₂²        bn(g) = Σ |γ|

A group's *layer* is the tuple of its producers in graph order (a residual stage's channels are made by every
conv adding into it); its first producer stands for the layer when a pass is asked about one node. Groups a
layer norm reads are blocked: removing a channel would change the norm's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.fx as fx

from fxforge.compiler.graph import get_tensor
from fxforge.compiler.ops import BATCH_NORM, WEIGHTED, aten, bn_params, is_op, weight_of
from fxforge.compiler.pass_manager import Analysis, PassContext

from .channel_groups import ChannelGraph, ChannelGroups

Kind = Literal["l1", "l2", "bn"]


@dataclass
class Importance:
    """Per prunable group: its norms, its producers (graph order); and the groups a layer norm blocks."""

    l1: dict[int, float]
    l2: dict[int, float]
    gamma: dict[int, float]
    producers: dict[int, tuple[str, ...]]
    blocked: set[int]

    def scores(self, kind: Kind) -> tuple[dict[int, float], int]:
        """Group → importance by ``kind`` (blocked groups left out), and how many ``bn`` scores fell back to l2
        for want of a batch norm."""
        scores, fallback = {}, 0
        for g in self.l1:
            if g in self.blocked:
                continue
            if kind == "bn" and g in self.gamma:
                scores[g] = self.gamma[g]
            elif kind == "l1":
                scores[g] = self.l1[g]
            else:
                fallback += kind == "bn"
                scores[g] = self.l2[g] ** 0.5
        return scores, fallback

    def layers(self, scores: dict[int, float]) -> dict[tuple[str, ...], list[int]]:
        """The scored groups of each layer (keyed by its producers), least important first."""
        out: dict[tuple[str, ...], list[int]] = {}
        for g in sorted(scores, key=lambda g: (scores[g], g)):
            out.setdefault(self.producers[g], []).append(g)
        return out


class ChannelImportance(Analysis):
    """The weight norms and BN scales of every prunable channel group, and the layers producing it."""

    name = "channel_importance"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Importance:
        cg: ChannelGraph = ctx.analysis(ChannelGroups, gm)
        prunable = {i: cg.group_of[i] for g in cg.prunable() for i in g.ids}
        imp = Importance({}, {}, {}, {}, set())
        producers: dict[int, dict[str, None]] = {}
        for node in gm.graph.nodes:
            m = cg.map(node)
            w = get_tensor(gm, weight_of(node)) if m is not None and is_op(node, *WEIGHTED) else None
            if w is not None:
                rows = w.detach().double().flatten(1)
                for i, a, b in zip(m.ids.tolist(), rows.abs().sum(1).tolist(), rows.pow(2).sum(1).tolist()):
                    if i in prunable:
                        g = prunable[i]
                        imp.l1[g], imp.l2[g] = imp.l1.get(g, 0.0) + a, imp.l2.get(g, 0.0) + b
                        producers.setdefault(g, {})[node.name] = None
            gamma = get_tensor(gm, bn_params(node).gamma) if m is not None and is_op(node, *BATCH_NORM) else None
            for i, a in zip(m.ids.tolist(), gamma.detach().abs().tolist()) if gamma is not None else ():
                if i in prunable:
                    imp.gamma[prunable[i]] = imp.gamma.get(prunable[i], 0.0) + a
            if m is not None and is_op(node, aten.layer_norm):
                imp.blocked |= {prunable[i] for i in m.ids.flatten().tolist() if i in prunable}
        imp.producers = {g: tuple(names) for g, names in producers.items()}
        return imp
