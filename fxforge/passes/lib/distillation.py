"""The student and teacher of knowledge distillation (passes/distill.py, whose docstring holds the loss and the math):
a graph run as a function of trainable copies of its constants, with Q/DQ pairs as straight-through estimators.

What learns: the float weights and biases of every conv/linear (``trainable``), or the biases alone, and with
them, for LSQ, one log-ratio u per activation group, its scale s₀·e^u (``activation_scales``, ``learned_qdq``).
Where the feature loss applies: the conv/linear layers a lossy pass changed (``compressed_layers``). ``Runner``
runs a graph so; ``Student`` holds the graph being trained, its learned tensors, and writes chosen values back.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxforge.compiler.graph import call_nodes, get_tensor, set_tensor
from fxforge.compiler.ops import DEQUANTIZE, QUANTIZE, WEIGHTED, bias_of, data, is_op, q_params, weight_of

from .qdq import QDQ_KEY, is_q, refresh_bias_scales, role, set_params

Batch = tuple[torch.Tensor, ...]
Scales = dict[int, tuple[torch.Tensor, list[fx.Node]]]  # activation group → (log-ratio u, its Q nodes)


def trainable(gm: fx.GraphModule, stats: Counter, biases_only: bool = False
              ) -> tuple[dict[str, torch.Tensor], dict[str, fx.Node]]:
    """Trainable copies of the float weights and biases (``biases_only``: the biases) of every conv/linear, read
    directly or through Q/DQ, by attribute name, and the get_attr node of each. Integer weights (after fold_qdq)
    stay as they are; a tensor several get_attr nodes read (tied weights) is left and counted."""
    params: dict[str, torch.Tensor] = {}
    nodes: dict[str, fx.Node] = {}
    readers = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    for node in call_nodes(gm, *WEIGHTED):
        for arg in (bias_of(node),) if biases_only else (weight_of(node), bias_of(node)):
            arg = _behind_qdq(arg)
            t = get_tensor(gm, arg)
            if t is None or not t.is_floating_point() or arg.target in params:
                continue
            if readers[arg.target] > 1:
                stats["skipped.shared_weight"] += 1
                continue
            params[arg.target], nodes[arg.target] = t.detach().clone().requires_grad_(True), arg
    return params, nodes


def activation_scales(gm: fx.GraphModule) -> Scales:
    """Per activation group of per-tensor Q nodes: a trainable log-ratio u (0: the calibrated scale) and its Q nodes."""
    groups: Scales = {}
    for q in gm.graph.nodes:
        if is_q(q) and role(q) == "activation" and q_params(q).axis is None:
            group = groups.setdefault(q.meta[QDQ_KEY]["group"], (torch.zeros((), requires_grad=True), []))
            group[1].append(q)
    return groups


def compressed_layers(gm: fx.GraphModule, teacher: fx.GraphModule) -> list[str]:
    """Conv/linear layers whose weight differs from the teacher's layer of the same name (split by low_rank,
    quantized, ...) while their output keeps its shape: where the feature loss applies."""
    theirs = {n.name: n for n in call_nodes(teacher, *WEIGHTED)}
    out = []
    for node in call_nodes(gm, *WEIGHTED):
        t = theirs.get(node.name)
        mine = get_tensor(gm, _behind_qdq(weight_of(node)))
        ref = get_tensor(teacher, _behind_qdq(weight_of(t))) if t is not None else None
        same_shape = t is not None and node.meta.get("val") is not None and t.meta.get("val") is not None and \
            node.meta["val"].shape == t.meta["val"].shape
        if same_shape and (mine is None or ref is None or mine.shape != ref.shape or not torch.equal(mine, ref)):
            out.append(node.name)
    return out


def _behind_qdq(arg: Any) -> Any:
    """The constant a weight or bias argument reads, through its Q/DQ nodes."""
    while is_op(arg, *QUANTIZE, *DEQUANTIZE):
        arg = data(arg)
    return arg


def learned_qdq(x: torch.Tensor, q: fx.Node, u: torch.Tensor) -> torch.Tensor:
    """DQ(Q(x)) on the grid of ``q`` with its scale times e^u, differentiable in x and u (LSQ, passes/distill.py)."""
    p = q_params(q)
    s = torch.tensor(p.scale, dtype=torch.float64) * u.double().exp()  # the op's own arithmetic: x · float32(1/s)
    v = x * (1 / s).to(x.dtype)                                           # rounded, then z added (exact integers)
    q_ = (v + (torch.round(v) - v).detach() + p.zero_point).clamp(p.quant_min, p.quant_max)
    return (q_ - p.zero_point) * s.to(x.dtype)


class Runner(fx.Interpreter):
    """Runs a graph with some constants replaced by trainable tensors, Q/DQ pairs as straight-through
    estimators, and the outputs of the ``record`` layers kept: ``run(*x) -> (float outputs, {layer: output})``."""

    def __init__(self, gm: fx.GraphModule, params: dict[str, torch.Tensor], record: Sequence[str],
                 scales: Scales | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)  # a DQ reads the input of its Q
        self.params, self.record = params, list(record)
        self.scales = {q: u for u, qs in (scales or {}).values() for q in qs}  # Q node → its group's log-ratio
        self.features: dict[str, torch.Tensor] = {}
        self.normal: dict[str, torch.Tensor] = {}  # copies of constants made under torch.inference_mode

    def run(self, *args: Any, **kwargs: Any) -> tuple:  # type: ignore[override]
        self.features = {}
        out = super().run(*args, **kwargs)
        return tuple(torch.as_tensor(v) for v in pytree.tree_leaves(out)), self.features

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "get_attr" and n.target in self.params:
            return self.params[n.target]
        if n.op == "get_attr":
            out = super().run_node(n)
            # a constant made while compile ran under torch.inference_mode (batch norm's statistics, a buffer) cannot
            # be saved for the backward of an op reading it: autograd's raw error, where the same call outside worked
            if isinstance(out, torch.Tensor) and out.is_inference():
                if n.target not in self.normal:
                    self.normal[n.target] = out.clone()
                out = self.normal[n.target]
        elif is_op(n, *DEQUANTIZE) and data(n) in self.scales:
            out = learned_qdq(self.env[data(data(n))], data(n), self.scales[data(n)])
        elif is_op(n, *DEQUANTIZE) and is_op(data(n), *QUANTIZE) and self.env[data(data(n))].requires_grad:
            x = self.env[data(data(n))]
            with torch.no_grad():
                y = super().run_node(n)
            out = x + (y - x).detach()
        else:
            out = super().run_node(n)
        if n.name in self.record:
            self.features[n.name] = out
        return out


class Student(Runner):
    """The graph being distilled, run on its learned tensors: trainable copies of its conv/linear weights and biases
    (``params="biases"``: the biases; tied ones counted in ``stats``), with ``"biases+scales"`` a log-ratio per
    activation group, and the ``compressed_layers`` recorded when ``teacher`` is given (the feature loss)."""

    def __init__(self, gm: fx.GraphModule, params: str, teacher: fx.GraphModule | None, stats: Counter) -> None:
        self.weights, self.nodes = trainable(gm, stats, biases_only=params != "all")
        self.groups = activation_scales(gm) if params == "biases+scales" else {}
        super().__init__(gm, self.weights, compressed_layers(gm, teacher) if teacher is not None else [], self.groups)
        self.learned = {**self.weights, **{f"scale.{g}": u for g, (u, _) in self.groups.items()}}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every learned tensor, by name."""
        return {k: v.detach().clone() for k, v in self.learned.items()}

    def write(self, state: dict[str, torch.Tensor]) -> None:
        """Write a ``snapshot`` into the graph: the weights and biases as its constants, each learned scale (rounded
        to float32, ``set_params``) into every Q/DQ of its group, and the biases' grids s_x · s_w refreshed."""
        gm = self.module
        for name, node in self.nodes.items():
            set_tensor(gm, node, state[name])
        for g, (_, qs) in self.groups.items():
            for q in qs:
                set_params(q, q_params(q).scale * float(state[f"scale.{g}"].exp()), q_params(q).zero_point)
        if self.groups:
            refresh_bias_scales(gm)
