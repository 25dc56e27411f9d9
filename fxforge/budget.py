"""The accuracy budget of ``fxforge.compile``: a lossy pipeline ends within ``max_drop`` of the fp32 model on data.

    drop = m(traced fp32 model) − m(optimized graph)       on the budget's data, m higher-is-better

m is the ``metric`` (compiler/quality.py): ``"agreement"`` (top-1, the reference scores 1), ``"cosine"`` (mean
per-sample cosine), ``"min_cosine"`` (the worst sample's cosine) or a callable. The ``int8``, ``int8_dynamic``
and ``all`` presets carry a default budget, ``max_drop = 0.01`` with agreement for classifier logits and min cosine
otherwise (agreement ≥ 0.99, min cosine ≥ 0.99); where float outputs follow the logits (a regression head beside
the classifier), the default also holds their min cosine within ``max_drop`` (metric ``agreement+min_cosine``: m is
the smaller of the two, so the drop is the larger): agreement reads the first output alone. ``max_drop=`` sets a
budget for any pipeline, ``max_drop=math.inf`` measures without a fallback.

The data is ``validation`` when given. Otherwise a held-out split of the calibration batches: every fourth batch
(batches 3, 7, 11, ...) is held out and never calibrated on; the passes calibrate on the others. With fewer than
four calibration batches nothing is held out (calibration keeps at least three quarters of the data): the budget
is not measured, and a warning says so.

compile runs the pipeline as asked first, under its checks, and measures the graph it gives: when that holds
the budget (the usual case), that run is the compile's and nothing else runs (no per-layer sensitivity, no
second run). When the pipeline as asked misses the budget, ``strict=True`` raises ``BudgetError``; otherwise compile warns in
one line and changes the quantization. Where static int8 (``insert_qdq``) missed and the linears that dynamic int8
would quantize hold at least 90 % of the graph's FLOPs (a transformer), it first tries the ``int8_dynamic`` preset's
quantization in its place (SmoothQuant, then each linear's activations quantized per row at run time), and takes it
when that holds: every linear int8 (a trained MiniLM's static int8 kept 34 of its 36 linears float). Otherwise it
keeps layers float (mixed precision) through the quantizing pass's ``skip`` option. Each layer's cost is measured
once, by quantizing that layer alone (passes/analysis/sensitivity.py: drop, then relative error, on
the budget's first batches holding 32 samples or more: a ranking, not the verdict). Costs alone do not add up, so a
greedy phase comes first: from none float, each step measures the whole graph with each of the 6 most costly
remaining layers float as well, on those samples (the screen), keeps the best, and stops at the first set that
holds on all the data and in a verifying pipeline run (at most 8 layers; a verified miss ends it, and so does a step
whose gain on the screen, were every step left to gain as much, could not bring the screen within its bound).
Failing that, the k most costly stay float.
The search over k estimates each try cheaply where the quantizing pass can say what its skip would do to the graph it already made
(``InsertQdq.with_float``: the calibrated int8 graph with those layers' weights, biases and input pairs float
again, every other grid as calibrated), else by running the quantizing passes; an estimate whose drop on the first
32 samples already proves a miss (``_estimate``) skips the rest of the data. It estimates k = 1, 2, 3, 5, 8, ...
(×1.5) until an estimate holds, bisects between that k and the last grid point that missed, and verifies the pick
by running the quantizing passes on a copy of the graph before them; a verified miss goes on along the grid (at most
3 runs). Nothing assumes that more float layers cost less accuracy (they need not: the errors of different layers
partly cancel, and bias correction measures each layer after those upstream of it). The fewest float layers of a
verified hold are kept, else the try with the smallest verified drop, with a warning. The compiled artifact is
measured too (int8 kernels round otherwise than the simulated graph): a miss there is warned of, or raised under
``strict``. ``report.meta["budget"]`` records all of it: metric, data, every estimate and verified drop, each float
layer's measured cost.
"""
from __future__ import annotations

import copy
import functools
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.errors import BudgetError, InputError
from fxforge.compiler.analysis.flops import Flops
from fxforge.compiler.dynamic_quant import DYNAMIC_LINEAR
from fxforge.compiler.graph import call_nodes
from fxforge.compiler.ops import MATMUL, WEIGHTED, weight_of
from fxforge.compiler.pass_manager import Pass, PassContext, PassManager, resolve
from fxforge.compiler.quality import METRICS, Metric, Quality, Validation, not_logits, score
from fxforge.compiler.report import Report
from fxforge.passes import QUANTIZE_DYNAMIC
from fxforge.passes.analysis.sensitivity import Effect, layer_sensitivity
from fxforge.passes.lib.qdq import checked_batches, weights_folded

DEFAULT_MAX_DROP = 0.01
BUDGETED_PRESETS = ("int8", "int8_dynamic", "all")
NAMED = 5  # float layers a warning names (report.meta["budget"]["float_layers"] lists every one, with its cost)
SENSITIVITY_SAMPLES = 32  # the budget's first samples each layer's cost is measured on (a ranking, not the verdict)
VERIFIED = 3  # pipeline runs the search may spend verifying its estimates
GREEDY = 8  # float layers the greedy phase may choose before the search over ranked prefixes takes over
CANDIDATES = 6  # the remaining layers of highest cost alone that each greedy step measures in the whole graph
DYNAMIC_SHARE = 0.9  # the share of the FLOPs in the linears it quantizes from which a missed static int8 tries dynamic
ARTIFACT_TRIES = 3  # more float layers, one at a time, while the lowered artifact misses what its graph holds
STATIC_ONLY = ("calibrate", "bias_correction", "adaround", "fold_qdq")  # passes for static grids alone


class Budget:
    """One compile's accuracy budget: how it is measured, the search for float layers, and its record."""

    def __init__(self, max_drop: float, metric: Metric, strict: bool, preset: str | None) -> None:
        self.max_drop, self.metric, self.strict, self.preset = max_drop, metric, strict, preset
        self.data: Validation | None = None
        self.screen: Validation | None = None  # the first batches of data, on which _estimate screens
        self.reference = 0.0  # the fp32 model's score on the data, once fit has measured it
        self.record: dict[str, Any] = {"max_drop": max_drop, "source": f"the {preset} preset's default"
                                       if preset else "max_drop="}

    @classmethod
    def of(cls, passes: Any, max_drop: float | None, metric: Metric, strict: bool) -> Budget | None:
        """The budget ``compile`` holds: ``max_drop`` when given, else the default of a budgeted preset named in
        ``passes``, else none."""
        if not isinstance(strict, bool):
            raise InputError(f"strict must be True or False, got {strict!r}")
        if max_drop is not None:
            if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not max_drop >= 0:  # numpy's too
                raise InputError(f"max_drop must be a number ≥ 0 (math.inf: measure only), got {max_drop!r}")
            return cls(float(max_drop), metric, strict, None)
        items = [passes] if isinstance(passes, (str, Pass)) else list(passes or ())
        preset = next((i.strip() for i in items if isinstance(i, str) and i.strip() in BUDGETED_PRESETS), None)
        if preset is None:  # strict still refuses an artifact that would run elsewhere than its target (api.py)
            return None
        return cls(DEFAULT_MAX_DROP, metric, strict, preset)

    def hold_out(self, calibration: Iterable[Any] | None, validation: Validation | None,
                 example: tuple[torch.Tensor, ...]) -> Iterable[Any] | None:
        """Choose the budget's data: ``validation`` (the user's, as the report measures it: a graph the report's rows
        measured is not run on it again) or every fourth of the calibration batches (flat input tuples like
        ``example``, as the passes read them); return the calibration data the passes get, without the held-out
        batches."""
        if validation is not None:
            self.data = validation
            self.record["data"] = f"validation data ({self.data.samples} samples)"
            return calibration
        if calibration is None:
            raise InputError("max_drop= needs data to measure on: pass validation=[(x1,), ...] or calibration data")
        batches = list(checked_batches(calibration, example))
        held = [i for i in range(len(batches)) if i % 4 == 3]
        if not held:
            self.record["data"] = None
            return batches
        self.data = Validation([batches[i] for i in held], [batches[i] for i in held], self.metric,
                               "held-out calibration")
        self.record["data"] = (f"held-out calibration batches {held} ({self.data.samples} samples), never calibrated "
                               f"on; the passes calibrate on the other {len(batches) - len(held)}")
        return [b for i, b in enumerate(batches) if i not in held]

    # ------------------------------------------------------------------------------------------ the search

    def fit(self, manager: PassManager, gm: fx.GraphModule, ctx: PassContext,
            result: fx.GraphModule | None = None, unlowered: str | None = None,
            lowered: Callable[[fx.GraphModule], Callable[..., Any] | None] | None = None) -> PassManager:
        """Measure ``manager``'s pipeline on the budget's data; when it misses, the pipeline with dynamic int8
        activations (:meth:`_dynamic`) or the one that keeps the fewest most costly layers float, which holds the
        budget (or raise, under ``strict``). ``result``: the pipeline's graph from ``gm`` when compile has already
        run it (checked), measured instead of running it again; when it holds (the usual case), ``manager`` itself
        is returned and nothing else runs. ``unlowered``: why the backend cannot run dynamic int8 linears (None:
        it can). ``lowered``: a graph's artifact as a function of the inputs (None where it cannot run the budget's
        data), with which the float layers the search found are checked on the artifact too
        (:meth:`_on_artifact`)."""
        if self.data is None:
            self._warn(f"the accuracy budget (max_drop {self.max_drop}) was not measured: give validation= data or "
                       "at least 4 calibration batches (every fourth is held out)")
            self.record["outcome"] = "not measured: fewer than 4 calibration batches and no validation data"
            return manager
        reference = self.data.measure(gm)
        default = default_metric(reference, self.data)
        self.kind = self.metric if isinstance(self.metric, str) else "callable" if callable(self.metric) else \
            default.kind
        self.name = getattr(self.metric, "__name__", "metric") if self.kind == "callable" else self.kind
        if self.metric is None and default.caveat:
            self.record["caveat"] = default.caveat
            cannot = " cannot measure this model" if default.unmeasured else ""
            self._warn(f"the accuracy budget's default metric{cannot}: {default.caveat}")
        if "agreement" in self.kind and 0 < self.max_drop < 1 / reference.samples:  # 0: no flip at all, any data
            self.record["resolution"] = (f"{reference.samples} samples: one of them moves top-1 agreement by "
                                         f"{1 / reference.samples:.3g}, more than max_drop, so a hold says little "
                                         "about other data")
            self._warn(f"the accuracy budget is measured on {self.record['resolution']}; give more validation data")
        self.reference = self._score(reference)
        self.record.update(metric=self.name, reference=self.reference)
        passes = manager.passes
        at = next((i for i, p in enumerate(passes) if not p.exact and "skip" in p.options()), None)
        fallback, at = at is not None, at or 0  # without a pass that keeps layers float, one try of every pass
        lossy = max((i + 1 for i, p in enumerate(passes) if not p.exact), default=len(passes))  # exact ones after
        if result is None:                                                                    # change no value
            before = self._run(passes[:at], gm, ctx)
            quantized = self._run(passes[at:lossy], before, ctx)
        tries: dict[int, float] = {0: self._drop(quantized if result is None else result)}
        self.record["tries"] = tries
        label = f"the {self.preset} preset" if self.preset else "the pipeline"
        what = f"{self.name} drop {tries[0]:.4g} > max_drop {self.max_drop} on {self.record['data']}"
        if self._holds(tries[0]):
            self.record.update(outcome="held", float_layers=[])
            return manager
        if self.strict:
            raise BudgetError(f"{label} misses its accuracy budget: {what} (strict=True; without it compile " + (
                "tries other int8 (dynamic activations where linears hold most of the FLOPs) and keeps the layers "
                "whose quantization costs most float)" if fallback else
                "warns: no pass of this pipeline can keep layers float)"))
        if not fallback:
            self.record.update(outcome="missed: no pass of this pipeline can keep layers float", float_layers=[])
            self._warn(f"{label} misses its accuracy budget: {what}; no pass of it can keep layers float")
            return manager
        if result is not None:  # the search starts from the graphs before and after the quantizing passes
            before = self._run(passes[:at], gm, ctx)
            quantized = self._run(passes[at:lossy], before, ctx)
        dynamic = self._dynamic(passes, at, before, ctx, unlowered)
        if dynamic is not None:
            record = self.record["dynamic"]
            steps = ", ".join(record["passes"])
            self.record.update(outcome=f"held with dynamic activations ({steps})", float_layers=[])
            others = len(record["float_layers"])
            others = f"; it leaves {others} layer{'s' * (others > 1)} with weights float (listed in " \
                "report.meta['budget']['dynamic'])" if others else ""
            self._warn(f"{label} missed its accuracy budget ({what}); its linears quantize their activations "
                       f"dynamically instead ({' → '.join(record['passes'])}): drop {record['drop']:.4g}{others}")
            return PassManager([*passes[:at], *dynamic], verify=manager.verify,
                               measure_latency=manager.measure_latency, instruments=manager.extra_instruments)
        setting = str(passes[at])
        first = self._first(SENSITIVITY_SAMPLES)
        sens = layer_sensitivity(before, first, [setting], ctx.target,  # each layer's drop in the budget's terms
                                 logits=None if self.kind == "callable" else "agreement" in self.kind)
        ranked = sens.changed(setting)
        verify = functools.cache(lambda k: self._try(passes[at:lossy], before, ctx, ranked[:k]))
        view = getattr(passes[at], "with_float", None)  # a cheap estimate: the quantized graph, layers float again
        if view and weights_folded(quantized):
            view = None  # a lossy pass after fold_qdq: its weights are folded to int8, which the estimate cannot undo
        estimate = (lambda k: self._estimate(k, view(quantized, before, tuple(ranked[:k]), ctx), gm, first)) \
            if view else verify
        found = self._greedy(ranked, lambda fl: self._screened(view(quantized, before, tuple(fl), ctx), gm, first),
                             lambda fl: self._drop(view(quantized, before, tuple(fl), ctx)),
                             lambda fl: self._try(passes[at:lossy], before, ctx, fl)) if view else None
        if found is None:
            k = self._search(len(ranked), estimate, verify)
            floats, drop = ranked[:k], tries[k]
        else:
            floats, drop = found
            k = len(floats)
            tries[k] = drop  # a verified hold (a greedy miss stays in record["greedy"]: its set is no prefix)
        on = ""  # where the outcome's drop was measured: the graph, or the artifact where that decided
        if lowered is not None and self._holds(drop):
            def on_artifact(fl: Sequence[str]) -> float | None:
                run = lowered(self._run([_skipping(passes[at], fl) if fl else passes[at], *passes[at + 1:]],
                                        before, ctx))
                return None if run is None else self.reference - self._score(self.data.measure(run))
            widened, measured = self._on_artifact(floats, ranked, on_artifact)
            if measured is not None and (len(widened) > len(floats) or not self._holds(measured)):
                floats, drop, on, k = widened, measured, " on the artifact", len(widened)
        weights = {n.name: str(weight_of(n).target) for n in call_nodes(before, *WEIGHTED)
                   if isinstance(weight_of(n), fx.Node)}
        self.record["float_layers"] = [{"layer": n, "weight": weights.get(n), **_cost(sens.effects[setting][n])}
                                       for n in floats]
        named = ", ".join(f"{n} ({weights.get(n)})" for n in floats[:NAMED])
        more = f" and {k - NAMED} more, listed in report.meta['budget']" if k > NAMED else ""
        kept = f"{k} of {len(ranked)} layers float ({named}{more})"
        if self._holds(drop):
            self.record["outcome"] = f"held with {kept}{on}"
            self._warn(f"{label} missed its accuracy budget ({what}); kept {kept}: drop {drop:.4g}{on}")
        else:
            self.record["outcome"] = f"missed: smallest drop {drop:.4g}{on} with {kept}"
            self._warn(f"{label} cannot meet its accuracy budget ({what}); even the best try, {kept}, drops "
                       f"{drop:.4g}{on}")
        return PassManager([*passes[:at], _skipping(passes[at], floats), *passes[at + 1:]], verify=manager.verify,
                           measure_latency=manager.measure_latency, instruments=manager.extra_instruments)

    def _on_artifact(self, floats: Sequence[str], ranked: Sequence[str],
                     drop: Callable[[Sequence[str]], float | None]) -> tuple[list[str], float | None]:
        """The float layers with which the artifact holds the budget too, and its drop (``drop(floats)``: the
        lowered pipeline's, None where it cannot be measured; then the layers as given and None). The search
        measures graphs, whose simulated int8 rounds otherwise than the backend's kernels: on the trained
        MobileNetV2 the graph with 48 layers float lost 1 of 128 samples and its ONNX Runtime artifact 2, over a
        max_drop of 0.01. While the artifact misses, the most costly remaining layer of ``ranked`` stays float too,
        at most ``ARTIFACT_TRIES`` times; the set of the smallest artifact drop is returned (the fewest layers among
        equals). ``record["artifact_tries"]``: each try."""
        tries = self.record["artifact_tries"] = []
        best: tuple[float, list[str]] | None = None
        floats = list(floats)
        for _ in range(ARTIFACT_TRIES + 1):
            measured = drop(floats)
            if measured is None:
                break
            tries.append({"float_layers": len(floats), "drop": measured})
            if best is None or measured < best[0]:
                best = (measured, floats)
            more = next((n for n in ranked if n not in floats), None)
            if self._holds(measured) or more is None:
                break
            floats = [*floats, more]
        return (best[1], best[0]) if best else (floats, None)

    def _dynamic(self, passes: Sequence[Pass], at: int, before: fx.GraphModule, ctx: PassContext,
                 unlowered: str | None) -> list[Pass] | None:
        """The dynamic alternative to a static ``insert_qdq`` (``passes[at]``) that missed: the ``int8_dynamic``
        preset's quantization (``QUANTIZE_DYNAMIC``: SmoothQuant, then linears whose activations are quantized per
        row at run time), the static pass's options kept (``skip``, ``reduce_range``, ...) but those of static grids
        (``InsertQdq.STATIC_OPTIONS``), in place of ``passes[at:]``: static int8's own passes after it
        (``STATIC_ONLY``) drop out, exact ones stay.

        Tried where the linears it quantizes hold at least ``DYNAMIC_SHARE`` of the FLOPs (a transformer or an MLP:
        it leaves every other layer float; on a CNN it would quantize the classifier alone), measured on the graph
        its ``insert_qdq`` makes, which reads no data; not tried where another lossy pass follows (``distill``
        cannot train through dynamic linears, and dropping it would change what was asked) or where the backend
        has no dynamic int8 linears (``unlowered`` says so). Returned when its drop holds the budget; else None,
        and the search for float layers runs. A trained transformer's static int8 misses (outlier activation
        channels clip on one grid per tensor: MiniLM kept 34 of its 36 linears float), where per-row grids hold
        (docs/quantization.md). ``record["dynamic"]``: the FLOPs share, the layers it leaves float, the drop."""
        quantizer = passes[at]
        if quantizer.name != "insert_qdq" or quantizer.options()["activations"] != "static":
            return None
        record = self.record["dynamic"] = {}
        rest = []
        for p in passes[at + 1:]:
            if p.name in STATIC_ONLY:
                continue
            if not p.exact or set(STATIC_ONLY).intersection(p.after):
                record["not_tried"] = f"{p} follows {quantizer}"
                return None
            rest.append(p)
        if unlowered:
            record["not_tried"] = unlowered
            return None
        kept = {k: v for k, v in quantizer.options().items() if k not in quantizer.STATIC_OPTIONS}
        dynamic = type(quantizer)(**{**kept, "activations": "dynamic"})
        probe = self._run([dynamic], before, ctx)
        flops = Flops().run(probe, ctx)
        linear = sum(flops.get(n.name, 0) for n in call_nodes(probe, DYNAMIC_LINEAR))
        record["linear_flops"] = linear / max(sum(flops.values()), 1)
        if record["linear_flops"] < DYNAMIC_SHARE:  # a CNN: the layers it would leave float are most of them
            return None
        record["float_layers"] = [n.name for n in call_nodes(probe, *WEIGHTED, *MATMUL) if flops.get(n.name)]
        done = {p.name for p in passes[:at]}  # a SmoothQuant the pipeline already ran does not run twice
        steps = [dynamic if p.name == quantizer.name else p for p in resolve(QUANTIZE_DYNAMIC)
                 if p.name == quantizer.name or p.name not in done]
        record.update(passes=[str(p) for p in steps], drop=self._drop(self._run([*steps, *rest], before, ctx)))
        return steps + rest if self._holds(record["drop"]) else None

    def _greedy(self, ranked: Sequence[str], screen: Callable[[list[str]], tuple[float, float]],
                full: Callable[[list[str]], float], verify: Callable[[list[str]], float]
                ) -> tuple[list[str], float] | None:
        """Forward selection of float layers by their measured effect on the whole graph: from none float, each
        step measures, for each of the ``CANDIDATES`` most costly remaining layers (their cost alone ranks them),
        the graph with that layer float as well (``screen(floats)``: the screen's drop, then −its mean cosine to
        break ties) and keeps the best. Costs alone do not add up (errors cancel, a float layer moves the grids
        downstream of it), so re-ranking by the whole graph after each kept layer finds small sets that the
        prefixes of the ranking miss. When a set's screen is within the screen bound, its drop on all the data
        (``full``) is measured, and a hold there is verified by running the pipeline (``verify``, once). Returns
        (the float layers, the verified drop), or None after a verified miss or ``GREEDY`` layers without a
        hold (the ranked-prefix search then runs). Every step lands in ``record["greedy"]``.

        Early stop: a step that keeps layer t float gains g_t = screen(t − 1 float) − screen(t float); with R steps
        left, the phase ends (``record["greedy_stop"]`` says why) when screen(t float) − R · g_t > the screen
        bound, i.e. when R more steps, none gaining more than this one's best, cannot bring the screen within its
        bound (assumed, as gains of a growing set usually shrink; where they do not, the prefix search still
        runs). A step that gains nothing (for agreement: no screened sample agrees again) always ends it. On the
        trained MobileNetV2, whose loss is spread over many layers, it ended after step 2: 13 screens instead
        of 48, the same float layers in the end (docs/quantization.md)."""
        chosen: list[str] = []
        steps = self.record.setdefault("greedy", [])
        last = screen([])[0]  # the all-int8 graph's screen
        total = min(GREEDY, len(ranked))
        for t in range(1, total + 1):
            pool = [n for n in ranked if n not in chosen][:CANDIDATES]
            scores = {n: screen([*chosen, n]) for n in pool}
            best = min(pool, key=lambda n: scores[n])
            chosen.append(best)
            step: dict[str, Any] = {"float": best, "screen": scores[best][0]}
            steps.append(step)
            gain, last = last - scores[best][0], scores[best][0]
            if last > self.screen_bound + self._slack():
                left = total - t
                if left and last - left * max(gain, 0.0) > self.screen_bound + self._slack():
                    self.record["greedy_stop"] = (f"step {t} gained {gain:.4g} on the screen; {left} more such "
                                                  f"steps leave it at {last - left * max(gain, 0.0):.4g} > "
                                                  f"{self.screen_bound:.4g}")
                    return None
                continue
            step["drop"] = full(chosen)
            if self._holds(step["drop"]):
                step["verified"] = verify(list(chosen))
                return (list(chosen), step["verified"]) if self._holds(step["verified"]) else None
        return None

    def _search(self, n: int, estimate: Callable[[int], float], verify: Callable[[int], float]) -> int:
        """How many of the ``n`` ranked layers stay float. Estimates (``estimate(k)``, the drop with the k most
        costly layers float) at k = 1, 2, 3, 5, 8, ... (×1.5) up to n; the first k whose estimate holds is narrowed
        down by bisection between it and the last grid point that missed (no k is assumed to hold because a
        larger one does), then verified by running the pipeline (``verify(k)``). A verified miss goes on to the
        next grid point whose estimate holds, at most ``VERIFIED`` times. Returns the fewest float layers of a
        verified hold, else the k with the smallest verified drop. Every number lands in the record."""
        tries, estimates = self.record["tries"], self.record.setdefault("estimates", {})
        missed = 0
        for k in _grid(n):
            estimates[k] = estimate(k)
            if not self._holds(estimates[k]):
                missed = k
                continue
            while k - missed > 1:
                mid = (missed + k) // 2
                estimates[mid] = estimate(mid)
                missed, k = (missed, mid) if self._holds(estimates[mid]) else (mid, k)
            tries[k] = verify(k)
            if self._holds(tries[k]) or len(tries) > VERIFIED:
                break
            missed = k
        if not estimates:  # no layer to keep float
            return 0
        if not set(tries) - {0}:  # no estimate held: verify the best one
            k = min(estimates, key=lambda j: (estimates[j], j))
            tries[k] = verify(k)
        held = [j for j, d in tries.items() if self._holds(d)]
        return min(held) if held else min(tries, key=lambda j: (tries[j], j))

    def _try(self, rest: list[Pass], before: fx.GraphModule, ctx: PassContext, floats: Sequence[str]) -> float:
        """The drop of ``rest`` run on a copy of ``before``, its first pass keeping ``floats`` float."""
        if floats:
            rest = [_skipping(rest[0], floats), *rest[1:]]
        return self._drop(self._run(rest, before, ctx))

    def _estimate(self, k: int, graph: fx.GraphModule, reference: fx.GraphModule, first: list) -> float:
        """The drop of ``graph`` (k layers float), screened on the ``first`` batches: for agreement and cosine
        (per-sample losses ≥ 0, the reference scoring 1) a full drop within max_drop bounds the drop on n of N
        samples by max_drop · N / n, and for the min cosine by max_drop; a screen above that bound is a miss,
        returned as is and recorded in ``screened`` without running the rest of the data."""
        if len(first) < len(self.data.flat) and self.kind in SCREEN_SAMPLES:
            drop = self._screened(graph, reference, first)[0]
            if drop > self.screen_bound + self._slack():
                self.record.setdefault("screened", {})[k] = drop
                return drop
        return self._drop(graph)

    def _screened(self, graph: fx.GraphModule, reference: fx.GraphModule, first: list) -> tuple[float, float]:
        """(the drop, −the mean cosine) of ``graph`` on the ``first`` batches, the screen; sets ``screen_bound``,
        above which a screen's drop proves a miss on all the data (see ``_estimate``; a callable metric has no
        bound: infinity)."""
        if self.screen is None:
            # the batches as the user gave them (a metric callable reads those), and for a callable all of them:
            # it may read data of its own beside them (labels), which a part of the batches would not match
            n = len(self.data.flat) if callable(self.metric) else len(first)
            self.screen = Validation(self.data.batches[:n], self.data.flat[:n], self.metric, self.data.kind)
            self.screen_reference = self._score(self.screen.measure(reference))
            bound = SCREEN_SAMPLES.get(self.kind)
            self.screen_bound = float("inf") if bound is None else self.max_drop if bound == "worst" else \
                self.max_drop * self.data.samples / self.screen.samples
        quality = self.screen.measure(graph)
        return self.screen_reference - self._score(quality), -quality.cosine_mean

    def _drop(self, graph: fx.GraphModule) -> float:
        return self.reference - self._score(self.data.measure(graph))

    def _first(self, samples: int) -> list[tuple[torch.Tensor, ...]]:
        """The budget's first batches holding at least ``samples`` samples (all of them when fewer), flat."""
        batches, count = [], 0
        for batch in self.data.flat:
            if count >= samples:
                break
            batches.append(batch)
            count += len(batch[0]) if batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() else 1
        return batches

    @staticmethod
    def _run(passes: Sequence[Pass], gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        """``passes`` on a copy of ``gm``, unverified (the chosen pipeline runs again under compile's checks)."""
        fresh = PassContext(example_inputs=ctx.example_inputs, target=ctx.target, calibration=ctx.calibration,
                            train=ctx.train)  # a distilling pass in the pipeline trains on every try too
        return PassManager(list(passes), verify="off", measure_latency=False).run(copy.deepcopy(gm), fresh)[0]

    # ------------------------------------------------------------------------------------------ the artifact

    def check(self, run: Callable[..., Any] | None, report: Report, backend: str, why: str = "") -> None:
        """Measure the compiled artifact (``run``; None when it cannot run the budget's data, ``why`` says why) and
        record the outcome."""
        if self.data is None:
            report.meta["budget"] = self.record
            return
        if run is None:
            self.record["artifact"] = f"not measured: {why}"
        else:
            drop = self.reference - self._score(self.data.measure(run))
            self.record["artifact"] = {"drop": drop, "held": self._holds(drop)}
            if not self._holds(drop) and self.record["outcome"].startswith("held"):
                msg = (f"the {backend} artifact misses the accuracy budget that its graph holds: {self.name} drop "
                       f"{drop:.4g} > max_drop {self.max_drop} (the backend computes otherwise than the graph, "
                       "e.g. its int8 kernels round otherwise)")
                if self.strict:
                    raise BudgetError(msg)
                self._warn(msg)
        report.meta["budget"] = self.record

    # ------------------------------------------------------------------------------------------ helpers

    def _holds(self, drop: float) -> bool:
        """``drop`` within ``max_drop``, up to float rounding (:meth:`_slack`)."""
        return drop <= self.max_drop + self._slack()

    def _slack(self) -> float:
        """What float rounding adds to a drop: 1 − 0.99 is 0.010000000000000009, which missed a ``max_drop`` of
        0.01 though the budget promises agreement ≥ 0.99 (and an exact pipeline missed ``max_drop=0`` by 1e-15);
        relative to the metric's own scale, for a callable's."""
        return 1e-9 * max(1.0, abs(self.reference))

    def _score(self, q: Quality) -> float:
        return score(q, self.kind, self.data.reference, self.data.sizes) if self.kind in METRICS else q.metric

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=5)  # _warn, fit or check, compile, its autocast guard


# per metric the screen's bound (``_estimate``): a drop of d on all N samples is at most d · N / n on n of them for
# a mean over samples ("mean"), and at most d for the worst sample's ("worst"); for agreement+min_cosine the larger
# bound of its two parts, beyond which one of them misses
SCREEN_SAMPLES = {"agreement": "mean", "cosine": "mean", "min_cosine": "worst", "agreement+min_cosine": "mean"}


@dataclass(frozen=True)
class DefaultMetric:
    """The default accuracy budget's metric for a model, and what it cannot see of it."""

    kind: str  # "agreement", "agreement+min_cosine" or "min_cosine"
    reason: str = ""  # what it cannot see ("" when nothing)
    remedy: str = ""  # what the budget then reads, and what to pass instead
    unmeasured: bool = False  # some output holds one value per sample, whose cosine is only its sign
    blind: bool = False  # that is the only output: the metric measures nothing of this model but signs

    @property
    def caveat(self) -> str:
        """The budget's record and warning of what it cannot see ("" when nothing)."""
        return self.reason + self.remedy


def default_metric(reference: Quality, data: Validation) -> DefaultMetric:
    """The default accuracy budget's metric for the model whose outputs ``data`` holds as its reference
    (``reference``: their Quality against themselves): top-1 agreement for classifier logits (with the min cosine of
    the outputs after them, "agreement+min_cosine"), the min cosine otherwise, with what it cannot see: outputs of one
    value per sample (a cosine of one value is its sign), or 2-D outputs whose values or argmax say they are no
    logits (held to the min cosine). ``fxforge.autotune``'s default evaluate judges by it too."""
    after_logits = reference.top1 is not None and reference.others_cosine_min is not None
    signs_only = _one_value_per_sample(data, first=1 if after_logits else 0)
    kind = "min_cosine" if reference.top1 is None else \
        "agreement+min_cosine" if after_logits and not signs_only else "agreement"
    if signs_only and (kind == "min_cosine" or after_logits):
        what, reads = (("the outputs after the logits hold", "reads the logits alone") if after_logits else
                       ("the output holds", "sees sign flips, not magnitudes"))
        reason = f"{what} one value per sample (or per batch), whose cosine is only its sign"
        return DefaultMetric(kind, reason, f": this budget {reads}; pass metric= for one that sees them",
                             unmeasured=True, blind=not after_logits)
    why = not_logits(data.reference, data.sizes) if kind == "min_cosine" else ""
    if why.startswith("the first output's values lie") or why.startswith("the first output's largest column"):
        return DefaultMetric(kind, f"{why}: held to the min cosine", "; pass metric='agreement' to judge it as logits")
    return DefaultMetric(kind)


def _one_value_per_sample(data: Validation, first: int = 0) -> bool:
    """Whether the float outputs of ``data``'s reference from the ``first`` on hold one value per sample together (a
    regression score), or one per batch (a loss or an accuracy computed in forward: its "min cosine" was 1.0 while
    int8 moved an accuracy by 0.031, and the budget held unwarned)."""
    n = data.sizes[0]
    floats = [r for r in data.reference[0][first:] if r.is_floating_point()]
    return bool(floats) and (sum(r.numel() for r in floats) == 1 or bool(n) and all(
        r.dim() and r.shape[0] == n for r in floats) and sum(r[0].numel() for r in floats) == 1)


def _grid(n: int) -> list[int]:
    """1, 2, 3, 5, 8, 11, 17, ... (each about 1.5× the last) up to and including n."""
    ks = [1]
    while ks[-1] < n:
        ks.append(max(ks[-1] + 1, round(ks[-1] * 1.5)))
    return [min(k, n) for k in ks] if n else []


def _skipping(p: Pass, layers: Sequence[str]) -> Pass:
    """``p`` (a pass with a ``skip`` option) keeping ``layers`` float as well."""
    return type(p)(**{**p.options(), "skip": (*p.options()["skip"], *layers)})


def _cost(effect: Effect | str) -> dict[str, Any]:
    """A float layer's measured cost: what quantizing it alone does to the output on the budget's data."""
    if isinstance(effect, str):
        return {"reason": effect}
    return {"drop": effect.drop, "rel_error": effect.rel_error}
