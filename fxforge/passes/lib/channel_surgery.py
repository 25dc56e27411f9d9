"""Cutting channels out of a graph: every tensor and parameter that carries the removed channel ids loses them, and a
constant channel a conv or linear mixed into its outputs moves into that layer's bias,

    y[o] = b[o] + Σ_c W[o, c] ∗ x_c,   x_c ≡ v_c   ⇒   b'[o] = b[o] + Σ_{removed c} v_c · ΣW[o, c]

Exact for the ids RemovableChannels returns (constant or unread channels); dead_channels and prune_channels (after
zeroing its chosen groups with ``zero_groups``, which makes them such channels) both remove with it.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Shapes
from fxforge.compiler.graph import add_tensor, finalize, get_tensor, set_tensor
from fxforge.compiler.ops import (BATCH_NORM, ELEMENTWISE_BINARY, RESHAPE, SPLIT, WEIGHTED, argument, aten, bias_of,
                                 bn_params, conv_groups, data, is_op, new_shape, operands, set_argument, set_new_shape,
                                 weight_of)

from fxforge.compiler.pass_manager import PassContext

from ..analysis.channel_groups import ChannelGraph, ChannelGroup, ChannelGroups, ChannelMap
from ..analysis.constant_channels import ConstantChannels, Constants
from ..analysis.removable_channels import RemovableChannels, is_consumer


def prune_groups(gm: fx.GraphModule, ctx: PassContext, chosen: list[int]) -> dict[str, int]:
    """Zero the groups ``chosen`` (indices of ``ctx``'s ChannelGroups of ``gm``) and remove what removal takes
    (:func:`remove_removable`'s counts): prune_channels' rewrite, of its graph or of a copy a latency goal times."""
    cg = ctx.analysis(ChannelGroups, gm)
    zero_groups(gm, cg, [cg.groups[g] for g in chosen])
    ctx.invalidate(frozenset({ChannelGroups, Shapes}))  # same structure, new values
    return remove_removable(gm, ctx)


def remove_removable(gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
    """Remove every channel RemovableChannels finds; the stats ``groups_removed``, ``channels_removed`` (output rows)
    and ``skipped.<reason>`` for the groups that stay."""
    found = ctx.analysis(RemovableChannels, gm)
    stats = dict(found.skipped)
    if found.ids:
        cg, const = ctx.analysis(ChannelGroups, gm), ctx.analysis(ConstantChannels, gm)
        stats["groups_removed"] = found.groups
        stats["channels_removed"] = remove_channels(gm, cg, const, torch.tensor(found.ids))
        finalize(gm)
    return stats


def zero_groups(gm: fx.GraphModule, cg: ChannelGraph, groups: list[ChannelGroup]) -> None:
    """Make every tensor position of ``groups`` exactly 0: zero producer rows and biases, BN γ and β,
    and per-channel constants added or multiplied in."""
    for node, hit, targets in zero_sites(gm, cg, torch.tensor([i for g in groups for i in g.ids])):
        m = cg.map(node)
        for t_node in targets:
            t = get_tensor(gm, t_node).clone()
            d = 0 if is_op(node, *WEIGHTED, *BATCH_NORM) else _channel_dim(t, m, cg.ndim(node))
            t.index_fill_(d, hit.nonzero().flatten(), 0.0)
            set_tensor(gm, t_node, t)


def zero_sites(gm: fx.GraphModule, cg: ChannelGraph,
               ids: torch.Tensor) -> Iterator[tuple[fx.Node, torch.Tensor, list[fx.Node]]]:
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
                       if get_tensor(gm, a) is not None and _spans_channels(get_tensor(gm, a), m, cg.ndim(node))]
        else:
            continue
        targets = [t for t in targets if get_tensor(gm, t) is not None]
        if targets:
            yield node, ~m.keep(ids), targets


def removable_groups(gm: fx.GraphModule, ctx: PassContext, cg: ChannelGraph, groups: list[int]) -> set[int]:
    """Those of ``groups`` that remove_removable takes once they are zeroed (asked of a zeroed copy of ``gm``).
    Zeros that an activation turns into another constant (sigmoid(0) = 0.5) and that then meet zero padding stay:
    zeroed, such a group damaged the model and saved no FLOP, and a flops goal was claimed met at 1.0× the FLOPs."""
    trial = copy.deepcopy(gm)
    zero_groups(trial, cg, [cg.groups[g] for g in groups])
    found = PassContext(example_inputs=ctx.example_inputs, target=ctx.target).analysis(RemovableChannels, trial)
    removed = set(found.ids)
    return {g for g in groups if set(cg.groups[g].ids) <= removed}


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
        elif is_op(node, *ELEMENTWISE_BINARY) and m is not None:
            _cut_constants(gm, node, m, removed, cg.ndim(node))
        elif is_op(node, *RESHAPE) and m is not None:
            _resize_view(node, m, removed)
        elif is_op(node, *SPLIT) and isinstance(cg.maps.get(node.name), list):
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
        if t is not None and _spans_channels(t, m, nd):
            set_tensor(gm, a, t.index_select(_channel_dim(t, m, nd), m.keep(removed).nonzero().flatten()).contiguous())


def _spans_channels(t: torch.Tensor, m: ChannelMap, nd: int) -> bool:
    """Whether the constant ``t`` (a per-channel scale or bias) holds one value per channel of map ``m``."""
    d = _channel_dim(t, m, nd)
    return d >= 0 and t.shape[d] == m.ids.numel() > 1


def _channel_dim(t: torch.Tensor, m: ChannelMap, nd: int) -> int:
    """The dim of ``t``, broadcast against an ``nd``-dim tensor of map ``m``, along its channels (< 0: none)."""
    return m.dims[0] - (nd - t.dim())


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
