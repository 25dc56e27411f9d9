"""Which channel variables hold the same value at every position for every input, and that value.

Constancy is proven from the graph, never guessed from data: a conv/linear output channel is constant when
each input channel it reads (nonzero weights) is constant (and, under zero padding, equals 0), so a zero
weight row gives the bias; a BN with γ = 0 gives β; channel-wise ops (activations, BN, pooling, spatial
means, interpolation, views) keep constants; a residual add/mul of constants is constant; layer norm over
channels and any op the channel analysis does not follow give nothing. The value itself is read from one
run on the example inputs (it is what the graph computes), which also confirms the proof.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxforge.compiler.graph import get_tensor
from fxforge.compiler.ops import (BATCH_NORM, CONV, ELEMENTWISE_BINARY, WEIGHTED, argument, aten, bn_params,
                                 conv_groups, data, is_op, operands, weight_of)
from fxforge.compiler.pass_manager import Analysis, PassContext
from fxforge.compiler.verify import run_recording

from .channel_groups import ChannelGraph, ChannelGroups, ChannelMap


@dataclass
class Constants:
    ids: dict[str, set[int]]            # node name → constant channel ids in its output
    values: dict[str, torch.Tensor]     # node name → value at each position of its ChannelMap (first element)

    def mask(self, node: fx.Node, m: ChannelMap) -> torch.Tensor:
        """Per position of ``m``: is the channel constant in ``node``'s output?"""
        return torch.isin(m.ids, torch.tensor(sorted(self.ids.get(node.name, ())), dtype=torch.long))


class ConstantChannels(Analysis):
    """node name → the channel ids that are provably constant there, and their values."""

    name = "constant_channels"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Constants:
        cg: ChannelGraph = ctx.analysis(ChannelGroups, gm)
        _, recorded = run_recording(gm, ctx.example_inputs)
        out = Constants({}, {})
        for node in gm.graph.nodes:
            m = cg.map(node)
            if m is None:
                continue
            proven = _proven(gm, cg, out, node, m, cg.ndim(node) if node.name in cg.shapes else 0)
            if node.name in recorded:  # tuple-valued nodes (batch norm) have their values on the getitem
                first, observed = _first_values(recorded[node.name], m)
                out.values[node.name] = first
                proven -= set(m.ids[~observed].tolist())
            out.ids[node.name] = proven
        return out


def _first_values(t: torch.Tensor, m: ChannelMap) -> tuple[torch.Tensor, torch.Tensor]:
    """The value at the first element of every channel position, and whether the channel is flat there."""
    index = tuple(slice(None) if d in m.dims else 0 for d in range(t.dim()))
    first = t[index]
    view = [t.shape[d] if d in m.dims else 1 for d in range(t.dim())]
    flat = (t == first.reshape(view)).permute(*m.dims, *[d for d in range(t.dim()) if d not in m.dims])
    return first.double(), flat.reshape(*first.shape, -1).all(-1)


def _proven(gm: fx.GraphModule, cg: ChannelGraph, c: Constants, node: fx.Node, m: ChannelMap, nd: int) -> set[int]:
    if is_op(node, *WEIGHTED):
        return _producer(gm, cg, c, node, m)
    if is_op(node, *BATCH_NORM):
        gamma = get_tensor(gm, bn_params(node).gamma)
        zero = set(m.ids[gamma == 0].tolist()) if gamma is not None else set()
        return c.ids.get(data(node).name, set()) | zero
    if is_op(node, *ELEMENTWISE_BINARY):
        return _binary(gm, cg, c, node, m, nd)
    padded_average = is_op(node, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d) \
        and any(argument(node, "padding")) and argument(node, "count_include_pad")
    if is_op(node, aten.layer_norm) or padded_average:
        return set()  # layer norm mixes channels; padded averages shrink constants at the borders
    if is_op(node, aten.cat):
        sources = data(node)
    elif node.target is operator.getitem and isinstance(cg.maps.get(data(node).name), list):
        sources = [data(data(node))]  # a chunk of a split
    else:
        sources = [data(node)]
    return set().union(*(c.ids.get(s.name, set()) for s in sources)) & set(m.ids.unique().tolist())


def _producer(gm: fx.GraphModule, cg: ChannelGraph, c: Constants, node: fx.Node, m: ChannelMap) -> set[int]:
    """Output channels whose every nonzero-weight input is constant (and zero, under padding)."""
    w = get_tensor(gm, weight_of(node))
    x, m_in = data(node), cg.input_map(node)
    is_conv = is_op(node, *CONV)
    n_in = w.shape[1] * conv_groups(node)
    if m_in is None:
        ok = torch.zeros(n_in, dtype=torch.bool)
    else:
        const = c.mask(x, m_in)
        ok = const & (c.values[x.name] == 0) if is_conv and not padding_free(node) else const
    reads = w.flatten(2).abs().amax(2) != 0 if is_conv else w != 0          # (C_out, C_in per group)
    groups = n_in // w.shape[1]
    ok = ok.reshape(groups, -1).repeat_interleave(w.shape[0] // groups, 0)   # the inputs each row sees
    return set(m.ids[(~reads | ok).all(1)].tolist())


def padding_free(conv: fx.Node) -> bool:
    """No zero padding: every output element sees only real input elements."""
    pad = argument(conv, "padding")
    return pad == "valid" or (not isinstance(pad, str) and not any([pad] if isinstance(pad, int) else pad))


def _binary(gm: fx.GraphModule, cg: ChannelGraph, c: Constants, node: fx.Node, m: ChannelMap,
            nd: int) -> set[int]:
    """Constant where every operand is constant at that position (constant tensors must be flat spatially)."""
    ok = torch.ones(m.ids.shape, dtype=torch.bool)
    for a in operands(node):
        t = get_tensor(gm, a)
        if t is not None:
            shape = (1,) * (nd - t.dim()) + tuple(t.shape)
            if any(s != 1 for d, s in enumerate(shape) if d not in m.dims):
                return set()
        elif isinstance(a, fx.Node) and cg.map(a) is not None:
            ok &= c.mask(a, cg.map(a))
        elif isinstance(a, fx.Node):
            return set()  # a number that varies by call (the batch size, ``y * x.shape[0]``)
    return set(m.ids[ok].tolist()) - set(m.ids[~ok].tolist())
