"""Which channel ids dead_channels may remove: the coupled groups (ChannelGroups) whose value is the same for every
input (ConstantChannels) or that nothing reads, and why each other group stays.

A group can go when every consumer that mixes it into other channels (a conv or linear; ``is_consumer``) reads it as
a constant or ignores it (zero weight columns); under zero padding a constant v ≠ 0 is not constant at the borders
(``padding_border``), layer norm over channels would see other statistics (``layer_norm``), and a varying channel
that is read (``live``) stays. Where every output channel of a conv would go, its first group stays
(``last_conv_channel``: PyTorch refuses a conv without outputs). Pure: nothing here changes the graph.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxforge.compiler.graph import get_tensor
from fxforge.compiler.ops import CONV, LINEAR, WEIGHTED, argument, aten, conv_groups, data, is_op, weight_of
from fxforge.compiler.pass_manager import Analysis, PassContext

from .channel_groups import ChannelGraph, ChannelGroups
from .constant_channels import ConstantChannels, Constants, padding_free


@dataclass
class Removable:
    ids: list[int]                                      # channel ids to remove (whole groups)
    groups: int                                         # how many groups they make
    skipped: dict[str, int] = field(default_factory=dict)  # "skipped.<reason>" → groups that stay


class RemovableChannels(Analysis):
    """The channel ids whose groups are constant or unread everywhere they are mixed, and why the others stay."""

    name = "removable_channels"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Removable:
        cg: ChannelGraph = ctx.analysis(ChannelGroups, gm)
        blocked = _blocked(gm, cg, ctx.analysis(ConstantChannels, gm))
        stats: Counter = Counter()
        removed: list[int] = []
        for group in cg.groups:
            reasons = {blocked[i] for i in group.ids if i in blocked}
            reason = f"unprunable.{group.reason}" if group.reason else min(reasons, default=None)
            if reason is None:
                removed.extend(group.ids)
            elif "live" not in reasons:
                stats[f"skipped.{reason}"] += 1
        removed = _spare_one_conv_channel(gm, cg, removed, stats)
        return Removable(removed, len({cg.group_of[i] for i in removed}), dict(stats))


def _spare_one_conv_channel(gm: fx.GraphModule, cg: ChannelGraph, removed: list[int],
                            stats: Counter) -> list[int]:
    """PyTorch refuses a conv with no output channels: where all of a conv's would go, keep its first group."""
    gone = set(removed)
    for node in gm.graph.nodes:
        m = cg.map(node) if is_op(node, *CONV) else None
        ids = m.ids.flatten().tolist() if m is not None else []
        if ids and gone.issuperset(ids):
            gone.difference_update(cg.groups[cg.group_of[ids[0]]].ids)
            stats["skipped.last_conv_channel"] += 1
    return [i for i in removed if i in gone]


def is_consumer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv or linear that mixes its input channels into new ones (a depthwise conv only passes them on)."""
    w = get_tensor(gm, weight_of(node)) if is_op(node, *WEIGHTED) else None
    return w is not None and (is_op(node, *LINEAR) or not (conv_groups(node) > 1 and w.shape[1] == 1))


def _blocked(gm: fx.GraphModule, cg: ChannelGraph, const: Constants) -> dict[int, str]:
    """Channel id → why its group must stay: read while varying ("live"), padding, layer norm."""
    blocked: dict[int, str] = {}
    for node in gm.graph.nodes:
        m = cg.map(data(node)) if node.op == "call_function" and node.args else None
        normalized = cg.ndim(node) - len(argument(node, "normalized_shape")) if is_op(node, aten.layer_norm) else None
        if m is not None and normalized is not None and any(d >= normalized for d in m.dims):
            blocked.update({i: "layer_norm" for i in m.ids.flatten().tolist()})
        m = cg.input_map(node) if m is not None and is_consumer(gm, node) else None
        if m is None:
            continue
        is_const, value = const.mask(data(node), m), const.values[data(node).name]
        padded = is_op(node, *CONV) and not padding_free(node)
        ok = _unread(gm, node) | (is_const & ((value == 0) | (not padded)))
        for i, c in zip(m.ids[~ok].tolist(), is_const[~ok].tolist()):
            if blocked.get(i) != "live":
                blocked[i] = "padding_border" if c else "live"
    return blocked


def _unread(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """Per input channel of a conv/linear: are all weights reading it zero?"""
    w = get_tensor(gm, weight_of(node))
    if is_op(node, *LINEAR):
        return (w == 0).all(0)
    groups = conv_groups(node)
    return (w.reshape(groups, w.shape[0] // groups, w.shape[1], -1) == 0).all(3).all(1).flatten()
