"""Test helpers: run passes on a traced model, compare a graph with eager on fresh random inputs, and make a backend
that computes otherwise than its graph."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fxforge.backends.eager import EagerArtifact, EagerBackend
from fxforge.compiler.pass_manager import PassContext, PassManager
from fxforge.compiler.report import Report
from fxforge.compiler.trace import trace
from fxforge.compiler.verify import Error, compare, fresh_inputs


def apply(model: torch.nn.Module, example: tuple, passes: Any, **ctx: Any) -> tuple[fx.GraphModule, Report, tuple]:
    """Trace ``model`` and run ``passes``; returns the graph, the report and the flat example inputs."""
    gm, sig = trace(model, example)
    flat = tuple(sig.flatten(example))
    gm, report = PassManager(passes, measure_latency=False).run(gm, PassContext(flat, **ctx))
    return gm, report, flat


def error_vs_eager(gm: fx.GraphModule, model: torch.nn.Module, flat: Sequence[torch.Tensor], seed: int = 7) -> Error:
    """The graph's error against the eager model on fresh random inputs (not the examples)."""
    inputs = fresh_inputs(flat, seed)
    with torch.no_grad():
        return compare(list(gm(*inputs)), [model(*inputs)])


def count(gm: fx.GraphModule, *names: str) -> int:
    """How many call nodes have an ATen op whose name is in ``names`` (``conv2d``, ``batch_norm`` ...)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and getattr(getattr(n.target, "overloadpacket", None), "__name__", str(n.target)) in names)


def altered_backend(name: str, alter: Callable[[fx.GraphModule, tuple], tuple]) -> type[EagerBackend]:
    """A backend ``name`` like eager whose artifact returns ``alter(its graph, the graph's outputs)``: a broken
    backend, or one whose kernels round otherwise than the graph (register it with
    ``monkeypatch.setitem(fxforge.backends.base._BACKENDS, name, cls)``)."""
    class Altered(EagerArtifact):
        backend = name

        def run(self, inputs):
            return alter(self.gm, tuple(super().run(inputs)))

    class AlteredBackend(EagerBackend):
        artifact = Altered

        def lower(self, gm, example_inputs, signature, target, **options):
            eager = super().lower(gm, example_inputs, signature, target, **options)
            return Altered(eager.gm, eager.signature, eager.target, eager.info)

    AlteredBackend.name = name
    return AlteredBackend
