"""The functional ATen graph of an export, by local rewrites instead of a retrace, where that is possible.

fxforge's IR is the exported graph after ``ExportedProgram.run_decompositions({})``: functional, with inference
batch norm as ``_native_batch_norm_legit_no_training``. That call retraces every op with symbolic shapes, twice
(metadata, then the graph): 13–27 s of efficientnet_v2_s's compile on a 2-core machine. For a graph of ops the
decomposition leaves alone plus the few below, the same graph comes from node surgery in well under a second:

- ``op_(x, …)`` → ``op(x, …)``; later readers of ``x`` (and of the in-place result) read the new node. ``x`` must be
  an intermediate nobody else sees: not an input, parameter or buffer, nor anything a view was taken of;
- ``batch_norm(x, w, b, mean, var, training=False, momentum, eps, _)``
  → ``_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]``;
- ``dropout(x, p, train=False)`` and ``dropout_`` → ``x``;
- ``flatten(x, s, e)`` of a contiguous ``x`` → ``view(x, shape)``, a symbolic size read by ``sym_size`` from the
  input it belongs to.

Anything else (views, other composite ops, writes into inputs or state, symbolic arithmetic, higher-order ops)
gives None, and the caller decomposes the usual way. ``trace`` checks the result against the user's model either
way and decomposes anew when it does not reproduce it.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._export.utils import _is_cia_op

from fxforge.compiler.ops import argument, data

aten = torch.ops.aten
# Composite ops the decomposition keeps (torch.export preserves them for backends): measured, and pinned by the
# Before/Expected tests of tests/compiler/test_functionalize.py
PRESERVED = {aten.conv2d.default, aten.linear.default, aten.adaptive_avg_pool2d.default, aten.max_pool2d.default}
PASSED_THROUGH = {aten._assert_tensor_metadata.default}


class _Unsupported(Exception):
    """The graph holds something only the full decomposition handles."""


def functional_graph(gm: fx.GraphModule) -> fx.GraphModule | None:
    """``gm`` (an unlifted ``ep.module()``) as run_decompositions({}) would give it, or None."""
    try:
        return _Rewriter(gm).run()
    except _Unsupported:
        return None


def _kept(op: Any) -> bool:
    """An op the decomposition leaves as it is: functional ATen, not composite (or composite but preserved)."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return False
    schema = op._schema
    if schema.is_mutable or any(a.alias_info is not None for a in (*schema.arguments, *schema.returns)):
        return False
    return op in PRESERVED or not _is_cia_op(op)


def _functional_twin(op: Any) -> Any:
    """``aten.relu_.default`` → ``aten.relu.default`` when that is a kept op, else None."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return None
    name = op._schema.name.split("::")[1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    twin = getattr(getattr(aten, name[:-1], None), op._overloadname, None)
    return twin if _kept(twin) else None


class _Rewriter:
    """Copies the graph node by node. ``env`` maps each old node to the new node holding its current value; nodes
    that share storage (an intermediate and the in-place results on it) form one alias class, so an in-place op
    updates every member's current value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.graph = gm, fx.Graph()
        self.graph._codegen = gm.graph._codegen
        self.env: dict[fx.Node, fx.Node] = {}
        self.alias: dict[fx.Node, list[fx.Node]] = {}  # node → its class (a shared list)
        self.frozen: set[int] = set()  # ids of classes that may not be written: inputs, state, viewed tensors
        self.sym_sizes: dict[str, fx.Node] = {}

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self._copy(node)
                self.frozen.add(id(self.alias[node]))
            elif node.op == "output" or (node.op == "call_module" and node.target == "_guards_fn"):
                self._copy(node)
            elif node.op == "call_function":
                self._call(node)
            else:
                raise _Unsupported(node.op)
        out = fx.GraphModule(self.gm, self.graph, class_name=type(self.gm).__name__)
        out.meta.update(self.gm.meta)
        return out

    def _copy(self, node: fx.Node) -> fx.Node:
        new = self.graph.node_copy(node, lambda n: self.env[n])
        self._fresh(node, new)
        return new

    def _fresh(self, node: fx.Node, new: fx.Node) -> None:
        self.env[node] = new
        self.alias[node] = [node]

    def _join(self, node: fx.Node, source: fx.Node, new: fx.Node) -> None:
        """``node`` shares ``source``'s storage; every member of the class now reads ``new``."""
        members = self.alias[source]
        members.append(node)
        self.alias[node] = members
        for m in members:
            self.env[m] = new

    def _emit(self, op: Any, args: tuple, meta_from: fx.Node, kwargs: dict | None = None) -> fx.Node:
        """A new node calling ``op`` on the current values of ``args``, with ``meta_from``'s metadata."""
        new = self.graph.call_function(op, *fx.map_arg((args, kwargs or {}), lambda n: self.env[n]))
        new.meta.update(meta_from.meta)
        return new

    def _call(self, node: fx.Node) -> None:
        op = node.target
        x = data(node) if node.args else None
        if op is operator.getitem and isinstance(x, fx.Node) and _kept(x.target):
            self._copy(node)
        elif _kept(op) or op in PASSED_THROUGH:
            self._copy(node)
        elif (twin := _functional_twin(op)) is not None:
            if not isinstance(x, fx.Node) or id(self.alias[x]) in self.frozen:
                raise _Unsupported(f"{op} writes into an input, a parameter or a view")
            self._join(node, x, self._emit(twin, node.args, node, node.kwargs))
        elif op is aten.batch_norm.default:
            self._batch_norm(node)
        elif op in (aten.dropout.default, aten.dropout_.default):
            if argument(node, "train") is not False:
                raise _Unsupported("dropout in training mode")
            self._join(node, x, self.env[x])
        elif op is aten.flatten.using_ints:
            self._flatten(node)
        else:
            raise _Unsupported(str(op))

    def _batch_norm(self, node: fx.Node) -> None:
        x, w, b, mean, var, training, momentum, eps = (argument(node, name) for name in (
            "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"))
        if training is not False or mean is None or var is None:
            raise _Unsupported("batch_norm in training mode")
        val = node.meta["val"]
        bn = self._emit(aten._native_batch_norm_legit_no_training.default, (x, w, b, mean, var, momentum, eps), node)
        bn.meta["val"] = (val, val.new_empty((0,)), val.new_empty((0,)))
        bn.meta.pop("tensor_meta", None)
        out = self.graph.call_function(operator.getitem, (bn, 0))
        out.meta.update(node.meta)
        self._fresh(node, out)

    def _flatten(self, node: fx.Node) -> None:
        x = data(node)
        val = x.meta.get("val")
        start, end = argument(node, "start_dim"), argument(node, "end_dim")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            raise _Unsupported("flatten of a scalar")
        start, end = start % val.dim(), end % val.dim()
        merged = val.shape[start:end + 1]
        if start >= end or not all(isinstance(d, int) for d in merged) or not _contiguous(val):
            raise _Unsupported("flatten that is not a plain view")
        size = 1
        for d in merged:
            size *= d
        shape = [self._size(d) for d in val.shape[:start]] + [size] + [self._size(d) for d in val.shape[end + 1:]]
        new = self.graph.call_function(aten.view.default, (self.env[x], shape))
        new.meta.update(node.meta)
        self._fresh(node, new)
        self.frozen.update({id(self.alias[x]), id(self.alias[node])})  # a write into either would show in the other

    def _size(self, d: Any) -> Any:
        """An int as it is; a symbolic size as a ``sym_size`` node on the input it comes from."""
        if isinstance(d, int):
            return d
        key = str(d.node.expr)
        if key not in self.sym_sizes:
            for p in self.gm.graph.nodes:
                pv = p.meta.get("val") if p.op == "placeholder" else None
                hits = [i for i, s in enumerate(pv.shape) if isinstance(s, torch.SymInt) and str(s.node.expr) == key] \
                    if isinstance(pv, torch.Tensor) else []
                if hits:
                    last_input = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
                    with self.graph.inserting_after(last_input):
                        s = self.graph.call_function(aten.sym_size.int, (self.env[p], hits[0]))
                    s.meta["val"] = pv.shape[hits[0]]
                    self.sym_sizes[key] = s
                    break
            else:
                raise _Unsupported(f"symbolic size {key} of no input")
        return self.sym_sizes[key]


def _contiguous(val: torch.Tensor) -> bool:
    try:
        return bool(val.is_contiguous())
    except Exception:  # a symbolic answer export would guard on: leave it to the decomposition
        return False
