"""dead_channels: remove channel groups whose value is the same for every input, or that nothing reads. Exact.

A channel is constant when its producer's weight row is zero (conv/linear: the bias; a BN with γ = 0: β) and
stays constant through channel-wise ops; a ReLU turns a constant ≤ 0 into 0 (ConstantChannels proves it).
A coupled group (ChannelGroups) is removed from its producers and every coupled op when each consumer that
mixes it into other channels (a conv or linear) reads it as a constant v or ignores it (zero weight
columns). The constant moves into the consumer's bias:

    y[o] = b[o] + Σ_c W[o, c] ∗ x_c,   x_c ≡ v_c   ⇒   b'[o] = b[o] + Σ_{removed c} v_c · ΣW[o, c]

Under zero padding a constant v ≠ 0 is not constant at the borders, so a padded conv reading it blocks the
group (``skipped.padding_border``); layer norm over channels would see other statistics
(``skipped.layer_norm``). Unprunable groups (model outputs, attention, ...) are counted, never touched.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, finalize, get_tensor, set_tensor
from fxforge.compiler.ops import (BATCH_NORM, CONV, LINEAR, WEIGHTED, argument, aten, bias_of, bn_params, conv_groups,
                                 data, is_op, new_shape, operands, set_argument, set_new_shape, weight_of)
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .analysis.channel_groups import (BINARY, RESHAPES, SPLITS, ChannelGraph, ChannelGroups,
                                      ChannelMap)
from .analysis.constant_channels import ConstantChannels, Constants, padding_free


@register_pass
class DeadChannels(Pass):
    """Remove constant or unread channel groups, folding constants into consumer biases (exact)."""

    name = "dead_channels"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cg: ChannelGraph = ctx.analysis(ChannelGroups, gm)
        const: Constants = ctx.analysis(ConstantChannels, gm)
        blocked = _blocked(gm, cg, const)
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
        if not removed:
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        stats["groups_removed"] = len({cg.group_of[i] for i in removed})
        stats["channels_removed"] = remove_channels(gm, cg, const, torch.tensor(removed))
        finalize(gm)
        return PassResult(changed=True, stats=dict(stats))


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


def remove_channels(gm: fx.GraphModule, cg: ChannelGraph, const: Constants, removed: torch.Tensor) -> int:
    """Cut the ``removed`` channel ids out of every tensor and parameter; returns output rows removed."""
    rows = 0
    for node in list(gm.graph.nodes):
        m = cg.map(node)
        if node.op != "call_function":
            continue
        if is_op(node, *WEIGHTED) and m is not None:
            rows += _cut_producer(gm, cg, const, node, removed)
        elif is_op(node, *BATCH_NORM) and m is not None:
            keep = m.keep(removed)
            for param in bn_params(node).tensors():
                t = get_tensor(gm, param)
                if t is not None:
                    set_tensor(gm, param, t[keep].clone())
        elif is_op(node, *BINARY) and m is not None:
            _cut_constants(gm, node, m, removed, cg.ndim(node))
        elif is_op(node, *RESHAPES) and m is not None:
            _resize_view(node, m, removed)
        elif is_op(node, *SPLITS) and isinstance(cg.maps.get(node.name), list):
            _resize_split(node, cg, removed)
        if m is not None and not bool(m.keep(removed).all()):
            node.meta.pop("val", None)
            node.meta.pop("tensor_meta", None)
    return rows


def _cut_producer(gm: fx.GraphModule, cg: ChannelGraph, const: Constants, node: fx.Node,
                  removed: torch.Tensor) -> int:
    """Drop removed output rows and input columns of a conv/linear, folding constant inputs into the bias."""
    w, x = get_tensor(gm, weight_of(node)), data(node)
    keep_out = cg.map(node).keep(removed)
    m = cg.input_map(node)
    keep_in = m.keep(removed) if m is not None else torch.ones(w.shape[1] * conv_groups(node), dtype=torch.bool)
    bias_node = bias_of(node)
    bias = get_tensor(gm, bias_node) if bias_node is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    if is_consumer(gm, node):
        groups = conv_groups(node)
        folded = (torch.where(~keep_in & const.mask(x, m), const.values[x.name], 0.0) if m is not None
                  else torch.zeros(len(keep_in), dtype=torch.float64))
        per_row = folded.reshape(groups, -1).repeat_interleave(w.shape[0] // groups, 0)  # inputs each row sees
        delta = (w.double().reshape(w.shape[0], w.shape[1], -1).sum(2) * per_row).sum(1)
        w = w[:, keep_in.reshape(groups, -1)[0]]
    else:  # depthwise: its input channels go with its output channels
        delta = torch.zeros(w.shape[0], dtype=torch.float64)
        set_argument(node, "groups", int(keep_in.sum()))
    if bool(keep_out.all()) and bool(keep_in.all()):
        return 0
    set_tensor(gm, weight_of(node), w[keep_out].clone())
    new_bias = (bias.double() + delta)[keep_out].to(w.dtype)
    if bias_node is not None:
        set_tensor(gm, bias_node, new_bias)
    elif bool(delta.any()):
        set_argument(node, "bias", add_tensor(gm, node, f"{node.name}_bias", new_bias))
    return int((~keep_out).sum())


def _cut_constants(gm: fx.GraphModule, node: fx.Node, m: ChannelMap, removed: torch.Tensor, nd: int) -> None:
    """Slice a constant operand spanning the channel dim (a per-channel scale or bias; one dim, see analysis)."""
    for a in operands(node):
        t = get_tensor(gm, a)
        d = m.dims[0] - (nd - t.dim()) if t is not None else -1
        if d >= 0 and t.shape[d] == m.ids.numel() > 1:
            set_tensor(gm, a, t.index_select(d, m.keep(removed).nonzero().flatten()).contiguous())


def _resize_view(node: fx.Node, m: ChannelMap, removed: torch.Tensor) -> None:
    """New explicit sizes for the channel dims of a view (rectangular: groups are coupled so)."""
    keep = m.keep(removed)
    shape = new_shape(node)
    for k, d in enumerate(m.dims):
        size = int(keep.movedim(k, 0).reshape(keep.shape[k], -1).any(1).sum())
        if isinstance(shape[d], int) and shape[d] != -1:
            shape[d] = size
    set_new_shape(node, shape)


def _resize_split(node: fx.Node, cg: ChannelGraph, removed: torch.Tensor) -> None:
    """Split sizes counted again after removal (as split_with_sizes: chunks may now differ)."""
    chunks = cg.maps[node.name]
    if chunks[0] is cg.map(data(node)):  # split along another dim: sizes unchanged
        return
    sizes = [int(c.keep(removed).sum()) for c in chunks]
    dim = argument(node, "dim")
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (data(node),), {}
    set_argument(node, "split_sizes", sizes)
    set_argument(node, "dim", dim)
