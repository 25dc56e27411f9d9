"""fxforge.autotune: accuracy-aware search over pass settings, measured on the target backend.

A setting is a pipeline: exact fusion, then optionally channel pruning (ratio), low-rank splitting (energy),
depthwise-separable decoupling (energy), and int8 quantization that keeps the k most quantization-sensitive
layers float (mixed precision). The search

1. traces the model once, fuses it, and measures each layer's sensitivity to every option on the calibration
   data (passes/analysis/sensitivity.py);
2. drops settings whose summed per-layer sensitivity already exceeds ``max_accuracy_drop``, or that change no
   layer; for int8 it keeps float the fewest most-sensitive layers that bring the predicted drop within the
   budget (and one more, as a margin);
3. compiles the float baseline (``["fuse"]``) and the plain ``"int8"`` preset, then the remaining settings in
   order of a FLOPs cost model fitted to those two measurements, each with ``fxforge.compile(..., backend=...)``,
   timing the artifact and scoring it with ``evaluate``; a setting at least as aggressive as one that already
   failed the accuracy budget is skipped unmeasured;
4. re-times the Pareto front (latency, size, score) and the two references interleaved, so that their ratios
   are not skewed by load drifting during the search, and picks the fastest setting within the budget.

``budget`` is a number of candidates (compiled, timed and evaluated pipelines, the two references included).
The result holds every candidate, the front, the best ``passes=`` list (re-applied by ``fxforge.compile``
with the same calibration data it gives the same graph), a JSON record and a Pareto plot.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import numbers
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from fxforge.api import CompiledModel, InputKey, calibration_picker, compile, passes_calibration
from fxforge.backends.base import check_writable, get_backend
from fxforge.budget import DEFAULT_MAX_DROP, default_metric
from fxforge.compiler.analysis import Flops
from fxforge.compiler.errors import BackendError, CalibrationError, FxforgeError, InputError, TuningError
from fxforge.compiler.pass_manager import Pass, PassContext, PassManager, calibration_readers
from fxforge.compiler.quality import Validation, reiterable, score
from fxforge.compiler.target import Target, get_target
from fxforge.compiler.timing import interleaved_latency, measure_latency
from fxforge.compiler.trace import trace
from fxforge.passes import QUANTIZE
from fxforge.passes.depthwise_separable import DepthwiseSeparable
from fxforge.passes.insert_qdq import InsertQdq
from fxforge.passes.low_rank import LowRank
from fxforge.passes.prune_channels import PruneChannels
from fxforge.passes.analysis.sensitivity import Sensitivity, layer_sensitivity
from fxforge.passes.lib.qdq import checked_batches

Evaluate = Callable[[CompiledModel], float]
NO_SPLIT = 2.0  # the "energy" of a layer left whole: above any energy a split may keep
RECORD_FILES = ("autotune.json", "pareto.png")  # what a search writes into its output_dir
SAME_SPEED = 1.1  # re-timed within this factor of the fastest: as fast, and the pick goes by score (``pick``)


@dataclass(frozen=True)
class SearchSpace:
    """The option values tried; an empty tuple leaves that pass out of the search."""

    prune_ratios: tuple[float, ...] = (0.1, 0.25)
    low_rank_energies: tuple[float, ...] = (0.99, 0.95)
    depthwise_energies: tuple[float, ...] = (0.99, 0.95)
    quantize: bool = True
    sensitivity_batches: int = 4  # calibration batches the sensitivity analysis runs on


@dataclass(frozen=True)
class Setting:
    """One point of the search space, and the pipeline that realizes it."""

    prune: float = 0.0
    low_rank: float | None = None
    depthwise: float | None = None
    quantize: bool = True
    skip: tuple[str, ...] = ()  # layers kept float by insert_qdq

    def structure(self) -> list[str | Pass]:
        """Exact fusion, then the structural passes this setting turns on, as configured ``Pass`` instances."""
        out: list[str | Pass] = ["fuse"]
        out += [PruneChannels(ratio=self.prune)] if self.prune else []
        out += [LowRank(energy=self.low_rank)] if self.low_rank is not None else []
        out += [DepthwiseSeparable(energy=self.depthwise)] if self.depthwise is not None else []
        return out

    def pipeline(self) -> list[str | Pass]:
        """What ``fxforge.compile(passes=...)`` runs: the structure, then int8 keeping the ``skip`` layers float."""
        if not self.quantize:
            return self.structure()
        steps = [InsertQdq(skip=self.skip) if s == "insert_qdq" and self.skip else s for s in QUANTIZE]
        return [*self.structure(), *steps]

    def passes(self) -> list[str]:
        """The pipeline as the ``passes=`` strings of the record (they round-trip through ``fxforge.compile``)."""
        return specs(self.pipeline())

    def covers(self, other: Setting) -> bool:
        """At least as aggressive as ``other`` in every option (so, presumably, at least as inaccurate)."""
        energy = lambda e: NO_SPLIT if e is None else e
        return (self.prune >= other.prune and energy(self.low_rank) <= energy(other.low_rank)
                and energy(self.depthwise) <= energy(other.depthwise) and self.quantize >= other.quantize
                and (not (self.quantize and other.quantize) or len(self.skip) <= len(other.skip)))


@dataclass
class Candidate:
    """A setting and what it measured: latency (ms) on the backend, size (the artifact's stored bytes,
    ``Artifact.stored_bytes``: an int8 graph's scales and Q/DQ nodes count too), score.
    ``retimed``: the latency comes from the final interleaved re-timing, comparable with every other re-timed
    one; otherwise it was timed once during the search, under that moment's load (stale)."""

    setting: Setting
    predicted_drop: float = 0.0
    predicted_ms: float | None = None
    latency_ms: float | None = None
    size_bytes: int | None = None
    score: float | None = None
    feasible: bool = False
    error: str | None = None
    retimed: bool = False

    @property
    def passes(self) -> list[str]:
        return self.setting.passes()

    def to_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "latency_ms": self.latency_ms, "size_bytes": self.size_bytes,
                "score": self.score, "feasible": self.feasible, "predicted_drop": self.predicted_drop,
                "predicted_ms": self.predicted_ms, "error": self.error, "retimed": self.retimed}


@dataclass
class AutotuneResult:
    """Everything the search measured; ``best.passes`` re-applies the chosen pipeline without searching."""

    baseline: Candidate  # float: exact fusion only
    reference: Candidate  # the plain "int8" preset
    candidates: list[Candidate]  # every measured candidate, the two references first
    pareto: list[Candidate]
    best: Candidate | None  # fastest candidate within the accuracy budget
    pruned: list[dict[str, Any]]  # settings skipped unmeasured, and why
    sensitivity: Sensitivity
    meta: dict[str, Any] = field(default_factory=dict)
    compiled: CompiledModel | None = None  # the best candidate, compiled
    record_path: Path | None = None
    plot_path: Path | None = None

    @property
    def stale(self) -> list[Candidate]:
        """Measured candidates whose latency is from the search only (released off the front before the final
        re-timing): not comparable with the front's, so neither on it nor the pick, and marked in the plot."""
        return [c for c in self.candidates if c.error is None and not c.retimed]

    @property
    def passes(self) -> list[str]:
        if self.best is None:
            raise TuningError("no candidate met the accuracy budget")
        return self.best.passes

    def to_dict(self) -> dict[str, Any]:
        index = {id(c): i for i, c in enumerate(self.candidates)}
        return {**self.meta, "passes": self.best.passes if self.best else None,
                "best": index.get(id(self.best)), "baseline": index[id(self.baseline)],
                "reference": index[id(self.reference)],
                "pareto": [index[id(c)] for c in self.pareto], "stale": [index[id(c)] for c in self.stale],
                "candidates": [c.to_dict() for c in self.candidates],
                "pruned": self.pruned, "sensitivity": self.sensitivity.to_dict()}


def autotune(model: torch.nn.Module, example_inputs: Any, target: str | Target = "x86", backend: str | None = None,
             evaluate: Evaluate | None = None, max_accuracy_drop: float = DEFAULT_MAX_DROP, budget: int = 12,
             calibration: Iterable[Any] | None = None, output_dir: str | Path = "fxforge-autotune",
             space: SearchSpace = SearchSpace(), calibration_fn: Callable[[Any], Any] | None = None,
             input_key: InputKey | None = None) -> AutotuneResult:
    """Search pass settings for the fastest pipeline whose ``evaluate`` score is within ``max_accuracy_drop``
    of the float model's; ``budget`` bounds the number of candidates compiled and measured.

    ``evaluate(compiled) -> float`` (higher is better) defaults to the default accuracy budget's metric against
    the float model on the calibration data: top-1 agreement for classifier logits, the min cosine otherwise (a
    model whose only output holds one value per sample is a TuningError asking for ``evaluate``). ``backend``
    defaults to "onnx" when installed, else "torchscript". Writes ``autotune.json`` and ``pareto.png`` into
    ``output_dir``.
    ``calibration_fn`` or ``input_key`` pick the model's inputs out of each calibration item, as in
    :func:`fxforge.compile` (e.g. ``input_key=0`` for a DataLoader's ``(input, label)`` batches).
    """
    started = time.perf_counter()
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    leaves = pytree.tree_leaves(example)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise InputError(f"example_inputs must be a tensor or a tuple of tensors (dicts or lists of them), got "
                         f"{type(example_inputs).__name__}")
    pick = calibration_picker(calibration_fn, input_key, example)
    if calibration is None:
        raise CalibrationError("autotune needs calibration data (calibration=[(x1,), (x2,), ...]): sensitivity, "
                               "int8 calibration and the default evaluate all run on it")
    _check_arguments(max_accuracy_drop, budget, Path(output_dir), space)
    budget = int(budget)  # a numpy integer too
    backend = backend or _default_backend()
    get_backend(backend)  # an unknown or missing backend fails here, before any work
    tgt = get_target(target)
    if not tgt.runs_on_host:  # every candidate is timed here: latencies of this CPU, not the target's
        raise TuningError(f"autotune times its candidates on this machine, which target {tgt.name!r} is not: run it "
                          f"on such a machine, or autotune for this one (target 'x86')")
    gm, signature = trace(model, example)
    flat = tuple(signature.flatten(example))
    calibration = reiterable(calibration, "calibration")
    batches = _calibration(passes_calibration(calibration, signature, example, pick), flat)
    search = _Search(model, example, flat, gm, tgt, backend, batches, max_accuracy_drop, budget, space, evaluate)
    result = search.run()
    if errors := search.evaluate_errors:
        warnings.warn(f"evaluate failed on {len(errors)} of {len(result.candidates)} measured candidates, each "
                      f"recorded with its error (first: {errors[0]})", stacklevel=2)
    result.meta.update({"model": type(model).__name__, "backend": backend, "target": tgt.name,
                        "max_accuracy_drop": max_accuracy_drop, "budget_candidates": budget,
                        "example_shapes": [list(t.shape) for t in example if isinstance(t, torch.Tensor)],
                        "search_s": round(time.perf_counter() - started, 1)})
    write_record(result, Path(output_dir))
    return result


# ------------------------------------------------------------------------------------------- the search

class _Search:
    def __init__(self, model: torch.nn.Module, example: tuple, flat: tuple[torch.Tensor, ...], traced: fx.GraphModule,
                 target: Target, backend: str, batches: list[tuple], max_drop: float, budget: int, space: SearchSpace,
                 evaluate: Evaluate | None) -> None:
        self.model, self.example, self.target, self.backend = model, example, target, backend
        self.flat = flat  # the example as the passes read it
        self.batches, self.max_drop, self.budget, self.space = batches, max_drop, budget, space
        self.compiled: dict[int, CompiledModel] = {}  # the compiled models still worth re-timing
        self.pruned: list[dict[str, Any]] = []
        self.evaluate_errors: list[str] = []  # candidates (not the references) whose evaluate raised
        self.flops: dict[tuple[str, ...], tuple[float, dict[str, int]]] = {}  # structure → (total, per node)
        self.fused = self._structural_graph(traced, Setting())
        self.evaluate = evaluate or _default_evaluate(self.fused, batches)

    def run(self) -> AutotuneResult:
        sens = layer_sensitivity(self.fused, self.batches[:self.space.sensitivity_batches], self._settings(),
                                 self.target)
        queue = self._candidates(sens)
        with tqdm(total=self.budget, desc="autotune", unit="candidate", disable=None, leave=False) as bar:
            baseline = self._measure(Candidate(Setting(quantize=False)), bar, required=True)
            reference = self._measure(Candidate(Setting()), bar, required=True) if self.space.quantize else baseline
            threshold = baseline.score - self.max_drop
            measured = list({id(c): c for c in (baseline, reference)}.values())
            for c in measured:
                c.feasible = c.score >= threshold
            self._predict(queue, baseline, reference)
            self._explore(sorted(queue, key=lambda c: c.predicted_ms), measured, threshold, bar)
        self._retime([baseline, reference, *pareto_front(measured)])
        # the front of the re-timed only: a candidate released earlier has a stale time from another load
        front = pareto_front([c for c in measured if id(c) in self.compiled])
        best = pick([c for c in front if c.feasible])
        compiled, self.compiled = self.compiled.get(id(best)), {}
        return AutotuneResult(baseline, reference, measured, front, best, self.pruned, sens,
                              meta={"baseline_score": baseline.score, "threshold": threshold}, compiled=compiled)

    def _explore(self, queue: list[Candidate], measured: list[Candidate], threshold: float, bar: tqdm) -> None:
        """Measure the queue in order until the budget is spent, skipping what a failure already rules out."""
        for cand in queue:
            failed = next((f for f in measured if f.error is None and not f.feasible
                           and cand.setting.covers(f.setting)), None)
            if failed is not None:
                self._prune(cand, f"at least as aggressive as {failed.passes}, which missed the accuracy budget")
            elif len(measured) >= self.budget:
                self._prune(cand, "budget exhausted")
            else:
                measured.append(self._measure(cand, bar))
                cand.feasible = cand.error is None and cand.score >= threshold
                self._keep_front(measured, *measured[:2])

    # ---------------------------------------------------------------------------------- candidate set

    def _settings(self) -> list[str]:
        """Every pass option the sensitivity analysis must cover."""
        s = self.space
        return (["int8"] if s.quantize else []) + specs([*(PruneChannels(ratio=r) for r in s.prune_ratios),
                                                         *(LowRank(energy=e) for e in s.low_rank_energies),
                                                         *(DepthwiseSeparable(energy=e) for e in s.depthwise_energies)])

    def _candidates(self, sens: Sensitivity) -> list[Candidate]:
        """Settings worth measuring (the two references excluded); the rest go to ``pruned`` with a reason."""
        s = self.space
        out: list[Candidate] = []
        for prune, low_rank, depthwise in itertools.product((0.0, *s.prune_ratios), (None, *s.low_rank_energies),
                                                            (None, *s.depthwise_energies)):
            structure = Setting(prune, low_rank, depthwise, quantize=False)
            options = specs(structure.structure()[1:])
            idle = [o for o in options if not sens.changed(o)]
            drop = sum(sens.predicted_drop(o) for o in options)
            if idle:
                self._prune(Candidate(structure), f"{idle[0]} changes no layer: "
                                                  f"{sorted(set(sens.effects[idle[0]].values()))}")
            elif drop > self.max_drop:
                self._prune(Candidate(structure, drop), f"predicted drop {drop:.4g} > {self.max_drop} "
                                                        "(summed layer sensitivities)")
            else:
                out += self._quantization_variants(structure, drop, sens)
        reference = {Setting(quantize=False), Setting()}
        return [c for c in out if c.setting not in reference]

    def _quantization_variants(self, structure: Setting, drop: float, sens: Sensitivity) -> list[Candidate]:
        """The float structure, and int8 keeping float the k_min and k_min + 1 most sensitive layers."""
        out = [Candidate(structure, drop)]
        options = specs(structure.structure()[1:])
        # built for the float candidate too: its FLOPs predict every candidate's latency (_predict); without int8
        # in the space (quantize=False) it was skipped and the prediction raised a raw KeyError
        graph = self._structural_graph(self.fused, structure, options) if options else None
        if not self.space.quantize:
            return out
        if graph is not None:
            sens = layer_sensitivity(graph, self.batches[:self.space.sensitivity_batches], ["int8"], self.target)
        ranked = sens.changed("int8")
        rest = lambda k: drop + sens.predicted_drop("int8", ranked[k:])
        k_min = next(k for k in range(len(ranked) + 1) if k == len(ranked) or rest(k) <= self.max_drop)
        for k in range(k_min, min(k_min + 2, len(ranked))):
            setting = Setting(structure.prune, structure.low_rank, structure.depthwise, True, tuple(ranked[:k]))
            out.append(Candidate(setting, rest(k)))
        return out

    def _structural_graph(self, gm: fx.GraphModule, setting: Setting, passes: Sequence[str | Pass] | None = None
                          ) -> fx.GraphModule:
        """``gm`` after ``passes`` (default: the setting's structural passes), and its per-layer FLOPs."""
        ctx = PassContext(example_inputs=self.flat, target=self.target, calibration=self.batches)
        gm, _ = PassManager(passes if passes is not None else setting.structure(), verify="off",
                            measure_latency=False).run(copy.deepcopy(gm), ctx)
        flops = ctx.analysis(Flops, gm)
        self.flops[tuple(specs(setting.structure()))] = (float(sum(flops.values())), flops)
        return gm

    def _predict(self, queue: list[Candidate], baseline: Candidate, reference: Candidate) -> None:
        """Latency ≈ float and int8 reference latencies weighted by the FLOPs run in each precision."""
        total0, _ = self.flops[("fuse",)]
        for c in queue:
            total, per_node = self.flops[tuple(specs(c.setting.structure()))]
            in_float = total if not c.setting.quantize else sum(per_node.get(n, 0) for n in c.setting.skip)
            c.predicted_ms = (reference.latency_ms * (total - in_float) + baseline.latency_ms * in_float) / total0

    def _prune(self, cand: Candidate, reason: str) -> None:
        self.pruned.append({"passes": cand.passes, "reason": reason})

    # ------------------------------------------------------------------------------------ measurement

    def _measure(self, cand: Candidate, bar: tqdm, required: bool = False) -> Candidate:
        """Compile on the backend, time the artifact, evaluate; a candidate's compile or evaluate error is recorded
        in it, not raised (on a ``required`` reference it is a TuningError)."""
        bar.set_description(f"autotune {' → '.join(map(str, cand.setting.pipeline()[1:])) or 'float'}"[:70])
        try:
            reads = bool(calibration_readers(cand.setting.pipeline()))
            compiled = compile(self.model, self.example, passes=cand.setting.pipeline(), backend=self.backend, target=self.target,
                               calibration=self.batches if reads else None, verify="lint", measure_latency=False)
        except FxforgeError as e:
            if required:
                raise TuningError(f"the reference pipeline {cand.passes} does not compile: {e}") from e
            cand.error = f"{type(e).__name__}: {e}"
            bar.update()
            return cand
        cand.size_bytes = compiled.report.final.bytes
        cand.latency_ms = measure_latency(lambda *x: compiled.artifact.run(x), compiled.signature.flatten(self.example))
        try:
            cand.score = _score(self.evaluate, compiled, cand.passes)
        except FxforgeError as e:
            if required:  # the references' scores set the threshold: without them nothing can be judged
                raise
            cand.error = f"{type(e).__name__}: {e}"  # one candidate's failure does not end the search
            self.evaluate_errors.append(cand.error)
            bar.update()
            return cand
        self.compiled[id(cand)] = compiled
        bar.update()
        return cand

    def _keep_front(self, measured: list[Candidate], *keep: Candidate) -> None:
        """Release the compiled models of candidates off the front (only the front is re-timed)."""
        live = {id(c) for c in (*pareto_front(measured), *keep)}
        self.compiled = {k: v for k, v in self.compiled.items() if k in live}

    def _retime(self, cands: list[Candidate], rounds: int = 7) -> None:
        """Median over interleaved rounds, so every candidate sees the same machine load."""
        cands = list({id(c): c for c in cands if id(c) in self.compiled}.values())
        flat = self.compiled[id(cands[0])].signature.flatten(self.example) if cands else []
        runners = {id(c): (lambda run=self.compiled[id(c)].artifact.run: run(flat)) for c in cands}
        samples = interleaved_latency(runners, rounds, sample_ms=50.0)
        for c in cands:
            c.latency_ms, c.retimed = statistics.median(samples[id(c)]), True


def specs(passes: Sequence[str | Pass]) -> list[str]:
    """Pass and preset names and ``Pass`` instances as the strings ``passes=`` and the record take; a ``Pass``
    with every option written out, so a record keeps its meaning if a default changes."""
    return [p if isinstance(p, str) else p.spec(full=True) for p in passes]


def pick(feasible: Sequence[Candidate]) -> Candidate | None:
    """The candidate autotune chooses: of those timed within ``SAME_SPEED`` of the fastest (as fast, within the
    noise of re-timing), the highest score, then the smallest, then the fastest. The fastest alone was a coin flip
    between near-equal candidates: identical runs chose int8 with or without one float layer (scores 0.999970 and
    0.999983) as their timings crossed."""
    if not feasible:
        return None
    fastest = min(c.latency_ms for c in feasible)
    tied = [c for c in feasible if c.latency_ms <= SAME_SPEED * fastest]
    return min(tied, key=lambda c: (-c.score, c.size_bytes, c.latency_ms))


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on latency, size and score at once (lower, lower, higher)."""
    ok = [c for c in cands if c.error is None]
    key = lambda c: (c.latency_ms, c.size_bytes, -c.score)
    dominated = lambda a, b: all(x <= y for x, y in zip(key(b), key(a))) and key(b) != key(a)
    return sorted((a for a in ok if not any(dominated(a, b) for b in ok)), key=key)


def latency_score_front(cands: Sequence[Candidate]) -> list[Candidate]:
    """The front of the 2-D view (latency, score), fastest first: each candidate that scores higher than every
    faster one. The 3-D front (``pareto_front``) drawn in these two axes would zig-zag: size is not shown."""
    front: list[Candidate] = []
    for c in sorted((c for c in cands if c.error is None), key=lambda c: (c.latency_ms, -c.score)):
        if not front or c.score > front[-1].score:
            front.append(c)
    return front


# --------------------------------------------------------------------------------------------- helpers

def _default_backend() -> str:
    try:
        get_backend("onnx")
        return "onnx"
    except BackendError:
        return "torchscript"


def _calibration(calibration: Iterable[Any], flat_example: Sequence[torch.Tensor]) -> list[tuple]:
    """The calibration batches as flat input tuples (``passes_calibration``'s), checked against the example's."""
    batches = list(checked_batches(calibration, flat_example))
    if not batches:
        raise CalibrationError("autotune got an empty calibration iterable")
    return batches


def _check_arguments(max_accuracy_drop: float, budget: int, output_dir: Path, space: SearchSpace) -> None:
    """Everything the search would otherwise find wrong only at its end (the record's directory) or deep inside."""
    if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, numbers.Real) or \
            not 0 <= max_accuracy_drop < math.inf:
        raise InputError(f"max_accuracy_drop must be a finite number >= 0, got {max_accuracy_drop!r}")
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool):
        raise InputError(f"budget must be an integer (a number of candidates), got {type(budget).__name__}")
    if budget < 2:
        raise InputError(f"budget is a number of candidates >= 2 (the float and int8 references), got {budget!r}")
    if not isinstance(space, SearchSpace):
        raise InputError(f"space must be a fxforge.autotune.SearchSpace, got {type(space).__name__}")
    for name in ("prune_ratios", "low_rank_energies", "depthwise_energies"):
        values = getattr(space, name)
        if not isinstance(values, (tuple, list)) or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            raise InputError(f"SearchSpace.{name} must be a tuple of numbers (empty: not searched), got {values!r}")
    if not isinstance(space.quantize, bool):
        raise InputError(f"SearchSpace.quantize must be True or False, got {space.quantize!r}")
    sensitivity = space.sensitivity_batches
    if not isinstance(sensitivity, int) or isinstance(sensitivity, bool) or sensitivity < 1:
        raise InputError(f"SearchSpace.sensitivity_batches must be an integer >= 1, got {sensitivity!r}")
    check_writable(output_dir, "output_dir")
    for name in RECORD_FILES:  # written at the end: a directory of that name would lose the search's result
        if (output_dir / name).is_dir():
            raise InputError(f"output_dir {output_dir}: {name} is a directory, where the search writes its file")


def _default_evaluate(reference_graph: fx.GraphModule, batches: list[tuple]) -> Evaluate:
    """The default evaluate: the default accuracy budget's metric (``budget.default_metric``: top-1 agreement for
    classifier logits, else the min cosine) against the float graph on the calibration data (flat input tuples;
    the compiled model is called with them where the model's arguments hold them, a dict's entries). A model that
    metric is blind to (one value per sample, whose cosine is its sign) is refused, and what it cannot see is
    warned of: judged by the argmax of a regression's columns or the cosine of one value, candidates off by more
    than the outputs' spread scored 1.0 and a pruned pipeline was picked."""
    data = Validation(batches, batches, None, "calibration")
    default = default_metric(data.measure(reference_graph), data)
    if default.blind:
        raise TuningError(f"the default evaluate cannot judge this model: {default.reason}; pass evaluate=(compiled "
                          "model → score, higher is better) measuring what matters for it")
    if default.reason:
        warnings.warn(f"the default evaluate judges this model by {default.kind}: {default.reason}; pass evaluate= "
                      "for a score that sees what matters for it", UserWarning, stacklevel=4)

    def evaluate(compiled: CompiledModel) -> float:
        return score(data.measure(lambda *b: compiled(*compiled.signature.arguments(b))), default.kind,
                     data.reference, data.sizes)
    return evaluate


def _score(evaluate: Evaluate, compiled: CompiledModel, passes: list[str]) -> float:
    try:
        score = evaluate(compiled)
    except FxforgeError:
        raise
    except Exception as e:
        raise TuningError(f"evaluate failed on the pipeline {passes}: {type(e).__name__}: {e}") from e
    if isinstance(score, torch.Tensor) and score.numel() == 1 or getattr(score, "shape", None) == ():
        score = score.item()  # a 0-d tensor or array, a numpy scalar
    if not isinstance(score, numbers.Real) or isinstance(score, bool) or not math.isfinite(score):
        raise TuningError(f"evaluate must return a finite number (higher is better), got {score!r} "
                          f"for the pipeline {passes}")
    return float(score)


# ------------------------------------------------------------------------------------- record and plot

def write_record(result: AutotuneResult, directory: Path) -> None:
    """``autotune.json`` (every candidate, the front, the chosen passes) and ``pareto.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    result.record_path, result.plot_path = (directory / name for name in RECORD_FILES)
    result.record_path.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    plot_pareto(result, result.plot_path)


def load_passes(record: str | Path) -> list[str]:
    """The chosen ``passes=`` list of a saved record, for ``fxforge.compile`` (no search)."""
    try:
        passes = json.loads(Path(record).read_text())["passes"]
    except (OSError, ValueError, KeyError) as e:
        raise TuningError(f"{record} is not an autotune record: {e}") from None
    if passes is None:
        raise TuningError(f"{record}: no candidate met the accuracy budget")
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise TuningError(f"{record} is not an autotune record: 'passes' must be a list of pass strings, got "
                          f"{passes!r:.80}")
    return passes


def plot_pareto(result: AutotuneResult, path: Path) -> None:
    """Score against latency for every candidate (colour: size). The front drawn is the one of this 2-D view
    (``latency_score_front``; the search's front also weighs size, which would zig-zag in 2-D) over the re-timed
    candidates: a step through every one that no faster one outscores. Stale candidates (timed during the search
    only, under another load) are hollow grey and labelled so: they may sit left of the front. The pick is
    starred; names go in the legend, not on points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in result.candidates if c.error is None and c.retimed]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    points = ax.scatter([c.latency_ms for c in ok], [c.score for c in ok], c=[c.size_bytes / 1024 for c in ok],
                        cmap="viridis", edgecolors="k", zorder=3)
    fig.colorbar(points, ax=ax, label="size (KiB stored: the artifact's file)")
    if stale := result.stale:
        ax.scatter([c.latency_ms for c in stale], [c.score for c in stale], facecolors="none", edgecolors="gray",
                   zorder=3, label="stale: timed only during the search (another load)")
    front = latency_score_front(ok)
    ax.step([c.latency_ms for c in front], [c.score for c in front], where="post", color="gray", ls="--",
            label="front of the re-timed (latency, score)")
    ax.axhline(result.meta["threshold"], color="red", lw=0.8, label="accuracy budget")
    for c, name, marker in ((result.baseline, "float", "s"), (result.reference, "int8 preset", "D")):
        ax.scatter([c.latency_ms], [c.score], marker=marker, s=90, facecolors="none", edgecolors="k", zorder=4,
                   label=name)
    if result.best is not None:
        ax.scatter([result.best.latency_ms], [result.best.score], marker="*", s=300, c="red", zorder=5,
                   label="pick: " + " → ".join([*map(str, result.best.setting.structure()),
                                                *(["int8"] if result.best.setting.quantize else [])]))
    ax.set(xlabel=f"latency (ms, {result.meta.get('backend')})", ylabel="score (evaluate)",
           title=f"autotune: {result.meta.get('model', '')}")
    handles, labels = ax.get_legend_handles_labels()  # under the plot: beside it, it overprinted the colour bar
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    rows = -(-len(labels) // 2)
    fig.set_figheight(fig.get_figheight() + 0.2 * rows)
    fig.tight_layout(rect=(0, (0.2 * rows + 0.1) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
