"""compile(): trace → PassManager → backend → CompiledModel."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from fxforge.backends.base import Artifact, get_backend

from .errors import InputError
from .pass_manager import Pass, PassContext, PassManager, VerifyMode
from .quality import Metric, Validation
from .report import SYNTHETIC, Report, measure_latency
from .target import Target, get_target
from .trace import Signature, trace
from .verify import compare, fresh_inputs


class CompiledModel:
    """The result of :func:`compile`: call it like the model; ``report`` says what each stage did."""

    def __init__(self, graph_module: fx.GraphModule, artifact: Artifact, report: Report) -> None:
        self.graph_module = graph_module
        self.artifact = artifact
        self.report = report

    @property
    def signature(self) -> Signature:
        return self.artifact.signature

    def __call__(self, *inputs: Any) -> Any:
        return self.artifact(*inputs)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save the artifact (``fxforge.load(directory)`` gives it back) and the report beside it."""
        path = self.artifact.save(directory)
        (path / "report.json").write_text(self.report.to_json())
        return path


def compile(model: torch.nn.Module, example_inputs: Any, passes: str | Pass | Sequence[str | Pass] | None = None,
            backend: str = "eager", target: str | Target = "x86", calibration: Iterable[Any] | None = None,
            verify: VerifyMode = "numerics", measure_latency: bool = True, static_batch: bool = False,
            validation: Iterable[Any] | None = None, metric: Metric = None, **backend_options: Any) -> CompiledModel:
    """Capture ``model``, optimize it with ``passes``, and lower it with ``backend`` for ``target``.

    The user's model is never mutated. ``verify="numerics"`` checks every exact pass against the stage before
    it on fresh random inputs and records the error of approximate ones. ``validation`` (an iterable of input
    tuples, like ``calibration``) makes the report's error columns come from that data: min and mean cosine,
    max relative error, top-1 agreement for classifier outputs, and ``metric`` ("agreement", "cosine" or
    ``metric(outputs, inputs) -> float``, higher is better); see compiler/quality.py.
    """
    tgt = get_target(target)
    be = get_backend(backend)
    manager = PassManager(passes or (), verify=verify, measure_latency=measure_latency)
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _check_finite(model, example)
    gm, signature = trace(model, example, static_batch=static_batch)
    flat = tuple(signature.flatten(example))
    checked = None if validation is None and metric is None else \
        Validation.from_user(validation, signature.flatten, metric)
    ctx = PassContext(example_inputs=flat, target=tgt, calibration=calibration, validation=checked)
    gm, report = manager.run(gm, ctx)
    start = time.perf_counter()
    artifact = be.lower(gm, flat, signature, tgt, **backend_options)
    _record_backend(report, artifact, gm, flat, time.perf_counter() - start, measure_latency and tgt.runs_on_host)
    if checked is not None and tgt.runs_on_host:
        report.final.set_quality(checked.measure(lambda *x: artifact.run(x)))
    report.meta.update({"backend": backend, "target": tgt.name, "dynamic_batch": signature.dynamic_batch,
                        **({"note": signature.note} if signature.note else {}), **artifact.info})
    report.meta["errors"] = SYNTHETIC if checked is None else checked.describe()
    return CompiledModel(gm, artifact, report)


def _check_finite(model: torch.nn.Module, example: tuple) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"model tensor {name!r} holds NaN or Inf")


def _record_backend(report: Report, artifact: Artifact, gm: fx.GraphModule, flat: tuple, elapsed: float,
                    runnable: bool) -> None:
    """The backend's row: same size/FLOPs as the final graph, its own latency and error vs eager."""
    import dataclasses

    last = report.final
    row = dataclasses.replace(last, stage=f"backend:{artifact.backend}", exact=True, time_s=elapsed,
                              latency_ms=None, max_rel_err=None, cosine=None, stats={})
    if runnable:
        inputs = fresh_inputs(flat)
        with torch.no_grad():
            err = compare(list(artifact.run(inputs)), list(gm(*inputs)))
        # error against eager = error of the final graph vs eager composed with backend vs final graph
        row.max_rel_err = (last.max_rel_err or 0.0) + err.max_rel
        row.cosine = min(last.cosine if last.cosine is not None else 1.0, err.cosine)
        row.stats = {"vs_graph_max_rel": err.max_rel}
        if last.latency_ms is not None:
            row.latency_ms = measure_latency(lambda *x: artifact.run(x), flat)
    report.rows.append(row)
