"""Before/Expected graph tests: compare two fx graphs by structure, names aside.

Two graphs are the same when their call nodes, in order, call the same ops with the same wiring: a node argument
is the position of the node producing it (placeholders and constants counted alike), a constant tensor is its
shape and dtype, anything else its value. ``meta_key`` also compares one meta entry (e.g. fusion tags, with
group names replaced by their order of appearance).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxforge.compiler.graph import get_tensor
from fxforge.compiler.trace import trace


def traced(model: torch.nn.Module, *example: torch.Tensor) -> fx.GraphModule:
    return trace(model.eval(), example)[0]


def structure(gm: fx.GraphModule, meta_key: str | None = None) -> list[tuple]:
    index: dict[fx.Node, Any] = {}
    groups: dict[Any, int] = {}
    rows = []

    def value(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return index[a]
        if isinstance(a, (list, tuple)):
            return type(a)(value(x) for x in a)
        return a

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            index[n] = f"input{len([k for k in index.values() if str(k).startswith('input')])}"
        elif n.op == "get_attr":
            t = get_tensor(gm, n)
            index[n] = ("const", tuple(t.shape), t.dtype)
        elif n.op == "call_function":
            index[n] = f"%{len(rows)}"
            tag = None
            if meta_key and meta_key in n.meta:
                tag = dict(n.meta[meta_key])
                tag["group"] = groups.setdefault(tag["group"], len(groups))
            rows.append((str(n.target), value(n.args), value(dict(n.kwargs)), tag))
        elif n.op == "output":
            rows.append(("output", value(n.args)))
    return rows


def assert_same_graph(actual: fx.GraphModule, expected: fx.GraphModule, meta_key: str | None = None) -> None:
    a, e = structure(actual, meta_key), structure(expected, meta_key)
    assert a == e, "graphs differ:\nactual:\n  " + "\n  ".join(map(str, a)) + "\nexpected:\n  " + \
        "\n  ".join(map(str, e))
