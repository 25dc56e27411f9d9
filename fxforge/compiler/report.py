"""The report: one row per stage (input, each pass, the backend) with the model's numbers.

Every number that describes the model comes from here or from the analyses it calls: parameters and bytes
of the constants the graph reads, FLOPs, latency (median of repeated runs), and the error against eager:
on the user's validation data when given (compiler/quality.py: min and mean cosine, max relative error,
top-1 agreement, the user's metric), otherwise on synthetic N(0,1) inputs, which the report says.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

from .analysis import Flops
from .graph import graph_tensors
from .instruments import Instrument, Stage
from .quality import Quality
from .timing import measure_latency
from .verify import BOUND_BATCHES, Error

SYNTHETIC = ("measured on synthetic inputs (N(0,1) floats, integers drawn from the example's values), not on your "
             "data (compile(..., validation=[(x1,), ...]) measures them on it); after an approximate pass, the last "
             f"pass's and the backend's max err and cosine are estimated bounds for fresh batches (the worst of "
             f"{BOUND_BATCHES} plus their spread: most further batches stay within them, not every one), the other "
             "stages' are measured on one batch (a sample)")


LATENCY_NOTE = ("latency: each stage's graph run by PyTorch eager (Q/DQ stages simulate int8 in float, so they read "
                "slower than float); the backend row times the compiled artifact")


@dataclass
class StageRow:
    """One stage of a compile (the traced input, each pass, the backend): its graph's size, FLOPs and latency, its
    error against the stage before (or, with validation data, the traced model) and the pass's own stats."""

    stage: str
    exact: bool
    time_s: float
    nodes: int
    params: int
    bytes: int  # the graph's constant tensors; the backend row: its files (``Artifact.stored_bytes``) where known
    flops: int
    latency_ms: float | None = None
    max_rel_err: float | None = None
    cosine: float | None = None  # the minimum per-sample cosine on validation data
    stats: dict[str, float] = field(default_factory=dict)
    cosine_mean: float | None = None  # on validation data only
    top1: float | None = None  # top-1 agreement with the traced model, classifier outputs on validation data
    metric: float | None = None  # the user's metric on validation data

    def set_quality(self, q: Quality) -> None:
        """Error columns from validation data."""
        self.max_rel_err, self.cosine, self.cosine_mean, self.top1, self.metric = \
            q.max_rel, q.cosine_min, q.cosine_mean, q.top1, q.metric


@dataclass
class Report:
    """What a compile did, stage by stage (``CompiledModel.report``): one :class:`StageRow` per stage, in order, and
    ``meta`` for what belongs to no single stage (the backend's notes, the accuracy budget's decision)."""

    rows: list[StageRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, stage: str) -> StageRow:
        """The row of ``stage``, by its full spec or by its pass name alone (``"low_rank"``)."""
        return next(r for r in self.rows if r.stage == stage or r.stage.split("{")[0] == stage)

    @property
    def final(self) -> StageRow:
        return self.rows[-1]

    def speedup(self) -> float | None:
        """Eager latency of the traced model over the final stage's latency."""
        first, last = self.rows[0].latency_ms, self.final.latency_ms
        return first / last if first and last else None

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "meta": self.meta}

    def to_json(self) -> str:
        """Strict JSON: an infinite or NaN number (``max_drop=math.inf``, an infinite error) is written as the
        string "inf", "-inf" or "nan", which JSON has no number for (Python wrote ``Infinity``, which strict
        parsers refuse)."""
        def strict(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {k: strict(v) for k, v in value.items()}
            return [strict(v) for v in value] if isinstance(value, (list, tuple)) else value
        return json.dumps(strict(self.to_dict()), indent=2, default=str, allow_nan=False)

    def __str__(self) -> str:
        validated = any(r.cosine_mean is not None for r in self.rows)
        head = ["stage", "time", "nodes", "params", "size", "FLOPs", "latency", "max err",
                "min cos" if validated else "cosine"]
        optional = [(name, key) for name, key in (("mean cos", "cosine_mean"), ("top-1", "top1"),
                                                  ("metric", "metric"))
                    if any(getattr(r, key) is not None for r in self.rows)]
        head += [name for name, _ in optional] + ["stats"]
        body = [[_clip(r.stage, STAGE_WIDTH), f"{r.time_s:.2f}s", str(r.nodes), _si(r.params), _bytes(r.bytes), _si(r.flops),
                 f"{r.latency_ms:.2f}ms" if r.latency_ms is not None else "-",
                 f"{r.max_rel_err:.1e}" if r.max_rel_err is not None else "-",
                 f"{r.cosine:.6f}" if r.cosine is not None else "-",
                 *[f"{getattr(r, key):.4f}" if getattr(r, key) is not None else "-" for _, key in optional],
                 _stats(r.stats)] for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if any(r.latency_ms is not None for r in self.rows):
            lines.append(LATENCY_NOTE)
        extra = [f"{k}: {v}" for k, v in self.meta.items()]
        return "\n".join(lines + extra)


STAGE_WIDTH = 60  # a stage's full spec (e.g. insert_qdq with 47 layers to skip) is in to_json()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    """``n`` bytes in binary units (KiB = 1024 bytes), said so: "MB" read as 10⁶ would be 5 % off."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n}B"


def _stats(stats: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in stats.items())


def model_size(gm: fx.GraphModule) -> tuple[int, int]:
    """(elements, bytes) of the constant tensors the graph reads, each tensor once: a tied weight read under two
    names (export keeps both) was counted twice, and the first pass that dropped the unused name seemed to halve it."""
    tensors = {id(t): t for t in graph_tensors(gm).values()}.values()
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


class StageRecorder(Instrument):
    """The pass manager's reporting instrument: appends a row after every stage."""

    def __init__(self, report: Report, measure: bool) -> None:
        self.report, self.measure = report, measure

    def after(self, p: Any, gm: fx.GraphModule, ctx: Any, stage: Stage) -> None:
        params, nbytes = model_size(gm)
        flops = sum(ctx.analysis(Flops, gm).values())
        error: Error | None = stage.error
        stats = stage.result.stats if stage.result is not None else {}
        row = StageRow(stage.name, stage.exact, stage.elapsed, sum(1 for n in gm.graph.nodes if n.op == "call_function"),
                       params, nbytes, flops, measure_latency(gm, ctx.example_inputs) if self.measure else None,
                       error.max_rel if error else None, error.cosine if error else None, dict(stats))
        if ctx.validation is not None:  # a graph it measured before (a stage that changed nothing) does not run again
            row.set_quality(ctx.validation.measure(gm))
        self.report.rows.append(row)
