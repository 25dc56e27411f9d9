"""Coupled channels: which channels of which tensors must be removed together.

Every channel-carrying tensor gets a ``ChannelMap``: the dims that carry channels and, over those dims, the
integer id of the channel variable at each position. Producers (conv, linear) create fresh ids; channel-wise
ops (activations, batch/layer norm, pooling, interpolation, spatial means) keep them; residual add/mul couple
their operands position by position; concat and split move ids by offsets; grouped and depthwise convs couple
input with output (depthwise) or the i-th channel of every group (grouped); view/transpose/permute (flatten →
linear's channel × spatial blocks, channel shuffle) are followed by running the op on the id tensor itself.
Coupled ids are edges of a networkx graph and each connected component is a ``ChannelGroup``.

What the analysis does not understand (model outputs, attention, unmappable reshapes, unknown ops, tensors of
unknown layout) marks the ids it touches unprunable with a reason; such groups are counted, never rewritten. So
does an op whose constant (a weight, a BN's statistics) other calls read too (``shared_weight``: a layer called
twice): cutting channels out of it for one call would cut them for the other.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx

from fxforge.compiler.analysis import Shapes, TensorInfo
from fxforge.compiler.graph import get_tensor, tensor_uses
from fxforge.compiler.ops import (BATCH_NORM, CONV, DIM_REARRANGE, DIM_REDUCTION, ELEMENTWISE_BINARY, ELEMENTWISE_UNARY,
                                 LINEAR, RESHAPE, SPATIAL_RESAMPLE, SPLIT, argument, aten, conv_groups, data, is_op,
                                 operands, reduced_dims, split_sizes, weight_of, with_data)
from fxforge.compiler.pass_manager import Analysis, PassContext


@dataclass(frozen=True)
class ChannelMap:
    """Which channel variable sits at each position of a tensor's channel-carrying dims."""

    dims: tuple[int, ...]
    ids: torch.Tensor  # int64 of shape tensor.shape[dims]

    def shifted(self, by: int) -> ChannelMap:
        return ChannelMap(tuple(d + by for d in self.dims), self.ids)

    def keep(self, removed: torch.Tensor) -> torch.Tensor:
        """Positions whose channel survives the removal of ``removed`` ids."""
        return ~torch.isin(self.ids, removed)

    def expand(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The id of every element of a tensor of ``shape``."""
        view = [shape[d] if d in self.dims else 1 for d in range(len(shape))]
        return self.ids.reshape(view).expand(shape)


@dataclass
class ChannelGroup:
    """Channel variables that are removed together; ``reason`` says why they may not be (None: prunable)."""

    ids: list[int]
    reason: str | None = None


@dataclass
class ChannelGraph:
    maps: dict[str, Any]  # node name → ChannelMap (or a list of them for split)
    groups: list[ChannelGroup]
    group_of: dict[int, int]
    shapes: dict[str, TensorInfo]
    stats: dict[str, float] = field(default_factory=dict)

    def ndim(self, node: fx.Node) -> int:
        return len(self.shapes[node.name].shape)

    def map(self, node: Any) -> ChannelMap | None:
        m = self.maps.get(node.name) if isinstance(node, fx.Node) else None
        return m if isinstance(m, ChannelMap) else None

    def input_map(self, node: fx.Node) -> ChannelMap | None:
        """The channels a conv/linear reads through its weight columns (None: layout it does not read)."""
        m = self.map(data(node))
        expected = (1,) if is_op(node, *CONV) else (self.ndim(data(node)) - 1,)
        return m if m is not None and m.dims == expected else None

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.reason is None]


class ChannelGroups(Analysis):
    """The coupled-channel graph of a model: its ChannelGroups, each prunable or not (with the reason)."""

    name = "channel_groups"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> ChannelGraph:
        b = _Builder(gm, ctx.analysis(Shapes, gm))
        for node in gm.graph.nodes:
            b.visit(node)
        groups: list[ChannelGroup] = []
        group_of: dict[int, int] = {}
        for comp in nx.connected_components(b.graph):
            ids = sorted(comp)
            reasons = sorted({b.stopped[i] for i in ids if i in b.stopped})
            for i in ids:
                group_of[i] = len(groups)
            groups.append(ChannelGroup(ids, reasons[0] if reasons else None))
        stats = {"groups": len(groups), "prunable": sum(g.reason is None for g in groups),
                 **Counter(f"unprunable.{g.reason}" for g in groups if g.reason)}
        return ChannelGraph(b.maps, groups, group_of, b.shapes, stats)


class _Builder:
    """Walks the graph once, giving every tensor its ChannelMap and recording couplings and stops."""

    def __init__(self, gm: fx.GraphModule, shapes: dict) -> None:
        self.gm, self.shapes = gm, shapes
        self.maps: dict[str, Any] = {}
        self.graph = nx.Graph()
        self.stopped: dict[int, str] = {}
        self.next_id = 0
        self.shared = {target for target, count in tensor_uses(gm).items() if count > 1}  # read by several calls

    # -- helpers
    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.next_id, self.next_id + n)
        self.next_id += n
        self.graph.add_nodes_from(ids.tolist())
        return ids

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.graph.add_edges_from(zip(a.flatten().tolist(), b.flatten().tolist()))

    def map(self, node: Any) -> ChannelMap | None:
        m = self.maps.get(node.name) if isinstance(node, fx.Node) else None
        return m if isinstance(m, ChannelMap) else None

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.shapes[node.name].shape

    def stop_ids(self, ids: torch.Tensor, reason: str) -> None:
        for i in ids.unique().tolist():
            self.stopped.setdefault(i, reason)

    def stop(self, node: fx.Node, reason: str) -> None:
        """Mark every channel the node reads unprunable."""
        for inp in node.all_input_nodes:
            m = self.maps.get(inp.name)
            for mm in m if isinstance(m, list) else [m]:
                if isinstance(mm, ChannelMap):
                    self.stop_ids(mm.ids, reason)

    def visit(self, node: fx.Node) -> None:
        if node.op == "output":
            self.stop(node, "model_output")
            return
        if node.op != "call_function":
            return
        rule = _rule(node)
        tracked = any(self.maps.get(i.name) is not None for i in node.all_input_nodes)
        if rule is None:
            if tracked:
                name = getattr(getattr(node.target, "overloadpacket", None), "__name__", str(node.target))
                self.stop(node, "attention" if "attention" in name else f"op.{name}")
            return
        out = rule(self, node) if tracked or rule in (_conv, _linear) else None
        if out is not None:
            self.maps[node.name] = out
        if any(i.op == "get_attr" and i.target in self.shared for i in node.all_input_nodes):
            self.stop(node, "shared_weight")
            for m in out if isinstance(out, list) else [out]:
                if isinstance(m, ChannelMap):
                    self.stop_ids(m.ids, "shared_weight")


# ------------------------------------------------------------------------------------------------ rules

def _conv(b: _Builder, node: fx.Node) -> ChannelMap | None:
    w = get_tensor(b.gm, weight_of(node))
    if w is None:
        b.stop(node, "dynamic_weight")
        return None
    m, groups = b.map(data(node)), conv_groups(node)
    if m is not None and m.dims != (1,):
        b.stop(node, "conv_input_layout")
        m = None
    c_out, c_in = w.shape[0], w.shape[1] * groups
    out = b.fresh(c_out)
    if groups > 1 and w.shape[1] == 1:  # depthwise: input channel j feeds outputs j·mult … (j+1)·mult − 1
        if m is None:
            b.stop_ids(out, "depthwise_fixed_input")
        else:
            b.couple(m.ids.repeat_interleave(c_out // c_in), out)
    elif groups > 1:  # grouped: the i-th channel of every group goes together, so groups stay equal
        if m is not None:
            ids = m.ids.view(groups, -1)
            b.couple(ids[:-1], ids[1:])
        o = out.view(groups, -1)
        b.couple(o[:-1], o[1:])
    return ChannelMap((1,), out)


def _linear(b: _Builder, node: fx.Node) -> ChannelMap | None:
    w = get_tensor(b.gm, weight_of(node))
    m, nd = b.map(data(node)), len(b.shape(node))
    if w is None:
        b.stop(node, "dynamic_weight")
        return None
    if m is not None and m.dims != (nd - 1,):
        b.stop(node, "linear_input_layout")
    return ChannelMap((nd - 1,), b.fresh(w.shape[0]))


def _same(b: _Builder, node: fx.Node) -> ChannelMap | None:
    """Activations and other one-tensor ops: the output has the input's channels. One that reads a second tensor
    (a clamp's bound, a pow's exponent: ``2 ** y`` has ``y`` second) is not followed, and the channels it reads
    are unprunable: mapped by its first argument alone, they looked unread, or constant whatever the bound."""
    if any(i is not data(node) for i in node.all_input_nodes):
        b.stop(node, "reads_second_tensor")
        return None
    return b.map(data(node))


def _channel_first(b: _Builder, node: fx.Node) -> ChannelMap | None:
    """Batch norm, pooling, interpolation: channel-wise ops on (N, C, ...) tensors."""
    m = b.map(data(node))
    if m is not None and m.dims != (1,):
        b.stop(node, "channel_op_layout")
        return None
    return m


def _layer_norm(b: _Builder, node: fx.Node) -> ChannelMap | None:
    m, nd = b.map(data(node)), len(b.shape(data(node)))
    normalized = range(nd - len(argument(node, "normalized_shape")), nd)
    if m is not None and any(d in normalized for d in m.dims) and (m.dims != (nd - 1,) or len(normalized) != 1):
        b.stop(node, "layer_norm_layout")
        return None
    return m


def _getitem(b: _Builder, node: fx.Node) -> ChannelMap | None:
    src, i = node.args
    value = b.maps.get(src.name)
    if isinstance(value, list):
        return value[i]
    with_extras = (*BATCH_NORM, aten.max_pool2d_with_indices, aten.adaptive_max_pool2d)  # (output, stats...)
    return value if i == 0 and is_op(src, *with_extras) else None


def _binary(b: _Builder, node: fx.Node) -> ChannelMap | None:
    nd = len(b.shape(node))
    maps = []
    for a in operands(node):
        m = b.map(a)
        if m is not None:
            maps.append(m.shifted(nd - len(b.shape(a))))
        elif isinstance(a, fx.Node) and a.op != "get_attr" and a.name in b.shapes:
            b.stop(node, "mixes_unknown_tensor")
            return None
    first = maps[0]
    for m in maps[1:]:
        if m.dims != first.dims or m.ids.shape != first.ids.shape:
            b.stop(node, "broadcast_layout")
            return None
        b.couple(first.ids, m.ids)
    for a in operands(node):
        t = get_tensor(b.gm, a)
        if t is not None and not _param_fits(t, nd, first):
            b.stop(node, "constant_layout")
            return None
    return first


def _param_fits(t: torch.Tensor, nd: int, m: ChannelMap) -> bool:
    """A constant operand is size 1 along the channel dims, or spans one channel dim fully (then it is sliced)."""
    shape = (1,) * (nd - t.dim()) + tuple(t.shape)
    return all(shape[d] == 1 for d in m.dims) or (len(m.dims) == 1 and shape[m.dims[0]] == m.ids.numel())


def _cat(b: _Builder, node: fx.Node) -> ChannelMap | None:
    tensors, nd = data(node), len(b.shape(node))
    dim = argument(node, "dim") % nd
    maps = [b.map(t) for t in tensors]
    if any(m is None for m in maps):
        b.stop(node, "concat_with_unknown_tensor")
        return None
    if all(m.dims == (dim,) for m in maps):
        return ChannelMap((dim,), torch.cat([m.ids for m in maps]))
    if all(dim not in m.dims and m.dims == maps[0].dims and m.ids.shape == maps[0].ids.shape for m in maps):
        for m in maps[1:]:
            b.couple(maps[0].ids, m.ids)
        return maps[0]
    b.stop(node, "concat_layout")
    return None


def _split(b: _Builder, node: fx.Node) -> list[ChannelMap] | None:
    m, shape = b.map(data(node)), b.shape(data(node))
    dim = argument(node, "dim") % len(shape)
    sizes = split_sizes(node, shape[dim])
    if m.dims == (dim,):
        return [ChannelMap((dim,), ids) for ids in m.ids.split(sizes)]
    if dim not in m.dims:
        return [m] * len(sizes)
    b.stop(node, "split_layout")
    return None


def _reduce(b: _Builder, node: fx.Node) -> ChannelMap | None:
    m, nd = b.map(data(node)), len(b.shape(data(node)))
    reduced = reduced_dims(node, nd)
    if reduced & set(m.dims):
        b.stop(node, "reduces_channels")
        return None
    if argument(node, "keepdim", False):
        return m
    return ChannelMap(tuple(d - sum(r < d for r in reduced) for d in m.dims), m.ids)


def _reshape(b: _Builder, node: fx.Node) -> ChannelMap | None:
    """Run the view/permute on the id tensor itself and read off where the channels went."""
    m, src, out_shape = b.map(data(node)), data(node), b.shape(node)
    full = m.expand(b.shape(src))
    if is_op(node, *RESHAPE):
        if out_shape[0] != full.shape[0] or not _same_batch(src, node):
            b.stop(node, "reshape_moves_batch")
            return None
        out = full.reshape(out_shape)
    else:
        out = node.target(*with_data(node, full), **node.kwargs)
    dims = tuple(d for d in range(out.dim()) if out.shape[d] > 1 and not (out == out.narrow(d, 0, 1)).all())
    if not dims or 0 in dims:
        b.stop(node, "reshape_unmapped")
        return None
    ids = out[tuple(slice(None) if d in dims else 0 for d in range(out.dim()))]
    if len(dims) > len(m.dims) and is_op(node, *RESHAPE):  # channels split over several dims: keep it
        rows = ids.reshape(-1, ids.shape[-1])                  # rectangular by coupling along the outer ones
        b.couple(rows[:-1], rows[1:])
    return ChannelMap(dims, ids.contiguous())


def _same_batch(src: fx.Node, node: fx.Node) -> bool:
    a, c = src.meta.get("val"), node.meta.get("val")
    return a is None or c is None or str(a.shape[0]) == str(c.shape[0])


def _sym_size(b: _Builder, node: fx.Node) -> None:
    m = b.map(data(node))
    if argument(node, "dim") % len(b.shape(data(node))) in m.dims:
        b.stop(node, "reads_channel_count")
    return None


def _rule(node: fx.Node) -> Callable[[_Builder, fx.Node], Any] | None:
    if node.target is operator.getitem:
        return _getitem
    for ops, rule in _RULES:
        if is_op(node, *ops):
            return rule
    return None


_RULES: tuple[tuple[tuple, Callable], ...] = (
    (CONV, _conv), (LINEAR, _linear), (ELEMENTWISE_UNARY, _same), (BATCH_NORM + SPATIAL_RESAMPLE, _channel_first),
    ((aten.layer_norm,), _layer_norm), (ELEMENTWISE_BINARY, _binary), ((aten.cat,), _cat), (SPLIT, _split),
    (DIM_REDUCTION, _reduce), (RESHAPE + DIM_REARRANGE, _reshape), ((aten.sym_size,), _sym_size),
)
