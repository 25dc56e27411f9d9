"""Numeric equivalence of two stages of a graph on fresh random inputs.

Every stage is run on the same fresh inputs (never the example inputs the passes saw). Errors are relative
to the reference's scale: ``max|a - b| / max|b|`` over all outputs, plus the cosine similarity.

An error one batch gives is a sample: another batch of the same distribution gives more (inception_v3 with
``compress``: 0.498 on a fresh batch against 0.491 on the measured one). Where a pipeline is approximate, the
error it states is therefore a bound (:func:`error_bound`): measured on ``BOUND_BATCHES`` fresh batches, the
worst of them plus the spread between the best and the worst.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import enum
import functools
import math
import numbers
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.hooks import RemovableHandle

from .dynamic_quant import DYNAMIC_LINEAR
from .analysis.shapes import Shapes
from .errors import FxforgeError, InputError, VerificationError, first_line, listed
from .instruments import Instrument, Stage, after_passes
from .ops import QUANTIZE, graph_outputs, is_op

EXACT_TOLERANCE = 1e-4  # max relative error an exact pass may introduce (float reassociation, float32)
OUTPUT_SCALE_FLOOR = 1e-2  # compare: an output's scale is at least this share of the largest output's
COSINE_FLOOR = 1e-4  # compare's cosine: an output typically below this share of the largest output's is noise
# A quantized (Q/DQ) graph is a float simulation of integer arithmetic; integer kernels round requantization
# differently, by about one quantization error. Measured with ONNX Runtime: random-init zoo, artifact vs graph
# ≤ 0.024; trained MobileNetV2, artifact vs graph up to 0.13 while the graph itself is 0.12–0.17 from the model
# and the artifact 0.11–0.20. So the artifact of a quantized graph may be at most QUANTIZED_LOWERING_FACTOR times
# as far from the model as the graph is, plus QUANTIZED_LOWERING_TOLERANCE.
QUANTIZED_LOWERING_FACTOR = 2.0
QUANTIZED_LOWERING_TOLERANCE = 0.05
CHECK_SEED = 20240917  # the numeric check's first batch (and the passes' recordings): fresh_inputs(x)


def random_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fresh input like ``t``: normal floats (folded to the example's sign where every value of it has one: an
    image in [0, 1], a positive quantity whose log or square root the model takes, where half the values of a
    normal would make the reference NaN and the check compare nothing), random booleans, integers drawn from the
    values ``t`` holds. Not from the range between its extremes: a signed divisor that is never 0 in the example
    would be 0 somewhere in a fresh batch, and the model itself would raise (ZeroDivisionError) on inputs fxforge
    made up."""
    if t.dtype == torch.bool:
        return torch.randint(0, 2, t.shape, generator=generator).bool()
    if t.is_floating_point():
        x = torch.randn(t.shape, generator=generator, dtype=t.dtype)
        if t.numel() > 1 and not t.isnan().any():
            x = x.abs() if bool((t >= 0).all()) else -x.abs() if bool((t <= 0).all()) else x
        return x
    values = t.flatten()
    if not values.numel():
        return t.clone()
    return values[torch.randint(0, values.numel(), t.shape, generator=generator)]


# how :func:`random_like` draws, as an error says it
FRESH_INPUTS = ("normal floats, folded to the example's sign where all of its values have one; booleans at random; "
                "integers drawn from the example's values")


def raises_on_fresh_inputs(e: Exception) -> InputError:
    """The error for a model (or its traced graph) raising ``e`` on fresh inputs, which the example did not make it
    raise: a binary cross-entropy's target above 1 ran into torch's own check, a raw RuntimeError out of compile."""
    return InputError(f"the model raises on fresh inputs like the example, which every compiled model is checked on "
                      f"({FRESH_INPUTS}): {type(e).__name__}: {first_line(e)}")


def fresh_inputs(example_inputs: Sequence[torch.Tensor], seed: int = CHECK_SEED) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(random_like(t, g) for t in example_inputs)


@dataclass(frozen=True)
class Error:
    """How far one set of outputs is from a reference."""

    max_rel: float
    cosine: float
    # each tensor output's own max_rel, in order (0 for an integer one: discrete_mismatch checks those); empty where
    # a non-finite value no reference has made the whole error infinite
    each: tuple[float, ...] = field(default=(), compare=False)
    # an approximate artifact's integer and bool outputs that differ from the model's (an argmax flipped near a tie),
    # in words: what max_rel and the cosine, over the float outputs, do not say ("" when none differ)
    discrete: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, float]:
        return {"max_rel": self.max_rel, "cosine": self.cosine}


BOUND_BATCHES = 8  # fresh batches an approximate pipeline's stated error is measured on
# gm.meta key: the last stage's outputs on the numeric check's other bound batches, (gm.code, [(inputs, outputs)]),
# which check_artifact reads instead of running the graph on fresh batches of its own (see there)
BOUND_OUTPUTS = "fxforge.bound_outputs"


def error_bound(errors: Sequence[Error]) -> Error:
    """What to state for fresh batches of the same distribution, from the errors of several: the worst plus the
    spread (worst − best), for the cosine the lowest minus its spread.

    The worst of n batches alone is exceeded by the next batch with probability 1/(n+1); the spread, which
    grows with how much the error varies from batch to batch, covers that tail (for normally distributed
    errors and n = 8, about four standard deviations above the mean, against one and a half for the worst).
    """
    worst, best = max(e.max_rel for e in errors), min(e.max_rel for e in errors)
    low, high = min(e.cosine for e in errors), max(e.cosine for e in errors)
    # an infinite worst (integer outputs that differ) stays infinite: inf − inf made the bound NaN
    return Error(worst + (worst - best) if math.isfinite(worst) else worst, max(-1.0, low - (high - low)))


def bound_inputs(example_inputs: Sequence[torch.Tensor], seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``BOUND_BATCHES`` fresh batches like ``example_inputs``, the first being ``fresh_inputs(.., seed)``."""
    return [fresh_inputs(example_inputs, seed + 1000 * k) for k in range(BOUND_BATCHES)]


def compare(outputs: Sequence[Any], reference: Sequence[Any]) -> Error:
    """Relative max error and cosine similarity of the floating outputs.

    The max error is each output's own, ``max |o − r| / s`` with ``s`` the larger of ``max |r|`` and
    ``OUTPUT_SCALE_FLOOR`` × the largest output's: measured over all outputs at once, a small output wrong entirely
    was 1e-5 relative beside one 1e5 times larger and passed every check; the floor keeps an output that is zero up to
    rounding (``y − y.mean()`` reduced) from turning float noise into a huge error. The cosine is over every floating
    output together, each scaled to a norm of 1 (one whose typical value is below COSINE_FLOOR of the largest
    output's is rounding noise and weighs less), so that each output weighs alike.

    Non-finite values are compared as values, as ``torch.testing.assert_close(equal_nan=True)`` does: a NaN or an
    infinity where the reference has the same one (a model taking the log of an input that can be negative) is
    exact, and the errors are measured over the finite rest; a non-finite value anywhere else is infinitely wrong."""
    tensors = list(zip(_tensors(outputs), _tensors(reference)))
    pairs = [(o.detach().double().flatten(), r.detach().double().flatten())
             for o, r in tensors if r.is_floating_point()]
    if not pairs:
        same = all(torch.equal(o, r) for o, r in zip(_tensors(outputs), _tensors(reference)))
        return Error(0.0 if same else float("inf"), 1.0 if same else 0.0)
    finite = []
    for a, b in pairs:
        kept = _finite_matched(a, b)
        if kept is None:
            return Error(float("inf"), 0.0)
        finite.append(kept)
    largest = max((float(b.abs().max()) for _, b in finite if b.numel()), default=0.0)
    floor = max(OUTPUT_SCALE_FLOOR * largest, 1e-12)
    each = iter([float((a - b).abs().max()) / max(float(b.abs().max()), floor) if b.numel() else 0.0
                 for a, b in finite])
    per_output = tuple(next(each) if r.is_floating_point() else 0.0 for _, r in tensors)
    # each output scaled to a norm of 1 (unscaled, a small output negated beside a large one left the cosine at
    # 0.998); one whose typical value is below COSINE_FLOOR of the largest output's is rounding noise, not scaled up
    typical = [float(b.norm()) / b.numel() ** 0.5 if b.numel() else 0.0 for _, b in finite]
    floor = COSINE_FLOOR * max(typical, default=0.0)
    scales = [1 / max(rms * b.numel() ** 0.5 if rms > floor else floor * b.numel() ** 0.5, 1e-300)
              for (_, b), rms in zip(finite, typical)]
    a = torch.cat([a * scale for (a, _), scale in zip(finite, scales)])
    b = torch.cat([b * scale for (_, b), scale in zip(finite, scales)])
    # computed directly: F.cosine_similarity clamps each norm to 1e-8, which is wrong for tiny outputs
    norms = float(a.norm() * b.norm())
    cos = float(a @ b) / norms if norms else float(torch.equal(a, b))
    return Error(max(per_output), cos, per_output)


def nesting(spec: pytree.TreeSpec) -> str:
    """A nesting of outputs in a line, ``*`` for each value: ``Out(logits=*, probs=*)``, ``tuple(*, list(*))``. A
    ``torch.Size`` is a tuple here: export records a returned ``y.shape`` as one, and the artifact returns that."""
    if spec.is_leaf():
        return "*"
    children = [nesting(child) for child in spec.children()]
    names = getattr(spec.context, "_fields", None) if isinstance(spec.context, type) else \
        spec.context if isinstance(spec.context, list) else None
    kind = spec.context.__qualname__ if isinstance(spec.context, type) else \
        "tuple" if spec.type is torch.Size else spec.type.__name__
    return f"{kind}({', '.join(children if names is None else (f'{n}={c}' for n, c in zip(names, children)))})"


def nonfinite_matched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element of ``a`` and its reference ``b`` (same shape), whether non-finite values match: both finite, or
    the same NaN or infinity in both. A NaN/±inf of the reference the output lacks, or one the output has alone, is
    False. The one rule by which :func:`compare` and quality's per-sample cosines take non-finite values."""
    return (torch.isfinite(a) & torch.isfinite(b)) | (a == b) | (a.isnan() & b.isnan())


def _finite_matched(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``a`` and its reference ``b`` (flat) at the reference's finite positions, or None where their lengths or a
    non-finite value differ (:func:`nonfinite_matched`)."""
    if a.shape != b.shape or not bool(nonfinite_matched(a, b).all()):
        return None
    finite = torch.isfinite(b)
    return a[finite], b[finite]


def discrete_mismatch(outputs: Sequence[Any], reference: Sequence[Any], values: bool = True) -> str:
    """What :func:`compare` does not measure: "" when there are as many tensor outputs as in the reference, each with
    its reference's dtype and shape and (with ``values``) every non-floating one (an argmax, a mask, token ids) with
    its exact values; else the first difference, in words. compare's errors are over the floating outputs only,
    pairing them in order, so a wrong integer output beside a float one, or one output too few, would pass unseen."""
    outputs, reference = _tensors(outputs), _tensors(reference)
    if len(outputs) != len(reference):
        return f"it gives {_count(outputs)} where eager gives {len(reference)}"
    for k, (o, r) in enumerate(zip(outputs, reference)):
        if o.dtype != r.dtype:
            return f"output {k} is {str(o.dtype).removeprefix('torch.')} where eager's is " \
                   f"{str(r.dtype).removeprefix('torch.')}"
        if o.shape != r.shape:
            return f"output {k} has shape {list(o.shape)} where eager's has {list(r.shape)}"
        if values and not r.is_floating_point() and not r.is_complex() and not torch.equal(o, r):
            return f"{r.dtype}-valued output {k} differs in {int((o != r).sum())} of {r.numel()} elements"
    return ""


def changed_outputs(outputs: Sequence[Any], reference: Sequence[Any], values: bool = True) -> str:
    """:func:`discrete_mismatch` over a graph's whole output list against another graph's, the numeric check's
    comparison of two stages: also the outputs that are no tensor (a number from the shapes, None) must stay what
    they were, so a pass that turns an output into None or a constant is named (compare sees tensors only, and the
    report said error 0.0)."""
    outputs, reference = _flat(outputs), _flat(reference)
    if len(outputs) != len(reference):
        return f"it gives {_count(outputs)} where eager gives {len(reference)}"
    for k, (o, r) in enumerate(zip(outputs, reference)):
        if isinstance(o, torch.Tensor) != isinstance(r, torch.Tensor):
            return f"output {k} is {_kind(o)} where eager's is {_kind(r)}"
        if values and not isinstance(r, torch.Tensor) and not _same_number(o, r):
            return f"output {k} is {o!r} where eager's is {r!r}"
    return discrete_mismatch(outputs, reference, values)


def _new_non_finite(outputs: Sequence[Any], reference: Sequence[Any]) -> str:
    """The first floating output that is NaN or infinite where its reference is finite, in words ("" if none): a
    lossy pass may move values, not lose them (an approximate stage's all-NaN output was accepted, its row stating
    an error of NaN)."""
    for k, (o, r) in enumerate(zip(_tensors(outputs), _tensors(reference))):
        if o.is_floating_point() and r.is_floating_point() and o.shape == r.shape:
            new = ~torch.isfinite(o) & torch.isfinite(r)
            if new.any():
                return (f"output {k} is NaN or infinite in {int(new.sum())} of {o.numel()} values where eager's "
                        "is finite")
    return ""


def _tensors(values: Any) -> list[torch.Tensor]:
    return [v for v in _flat(values) if isinstance(v, torch.Tensor)]


def _flat(values: Any) -> list[Any]:
    return [values] if isinstance(values, torch.Tensor) else list(values)


def _same_number(a: Any, b: Any) -> bool:
    """Two non-tensor outputs (None, a number from the shapes) alike: floats to rounding, NaN matching NaN as
    :func:`compare` matches it, everything else equal."""
    if isinstance(a, float) or isinstance(b, float):
        return (a != a and b != b) or (isinstance(a, numbers.Real) and isinstance(b, numbers.Real)
                                       and math.isclose(a, b, rel_tol=1e-6))
    return bool(a == b)


def _count(outputs: Sequence[Any]) -> str:
    return f"{len(outputs)} output{'s' * (len(outputs) != 1)}"


def _kind(value: Any) -> str:
    return f"a {str(value.dtype).removeprefix('torch.')} tensor" if isinstance(value, torch.Tensor) else \
        f"{value!r}" if value is None else f"a {type(value).__name__} ({value!r})"


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, every: dict[str, torch.Tensor] | None) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}
        self.every = every

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            if n.op == "call_function":
                self.values[n.name] = out
            if self.every is not None:
                self.every[n.name] = out
        return out


def run_recording(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], every: dict[str, torch.Tensor] | None = None
                  ) -> tuple[Any, dict[str, torch.Tensor]]:
    """The outputs of ``gm`` on ``inputs`` and the tensor each call_function node computed, by name; ``every``, when
    given, receives the tensor of every node that gives one (inputs and constants too)."""
    rec = _Recorder(gm, every)
    with torch.no_grad():
        out = rec.run(*inputs)
    return out, rec.values


class NumericCheck(Instrument):
    """The numeric-check instrument: runs each stage on fresh inputs, raises when an exact pass moved the
    outputs (naming the first diverging node), and sets ``stage.error`` against the traced model.

    A pass that reports no change left the very graph the previous stage was checked on: it is not run again and
    states the previous stage's error. When ``passes`` holds an approximate pass, the last of the ``passes``
    stages (the graph compile returns) states :func:`error_bound` over ``BOUND_BATCHES`` fresh batches (the
    first is the one every stage is checked on); every other stage states its error on that one batch, a sample
    (the report says so). That last stage's outputs on the other bound batches stay in
    ``gm.meta[BOUND_OUTPUTS]`` for :func:`check_artifact`.

    ``model`` (``PassContext.model_outputs``): the user's model's flat outputs on flat inputs by key, the same runs
    :func:`check_artifact` reads under the keys ``("bound", k)``; the bound batches are then compared with the model
    (which the traced graph reproduces within ``EXACT_TOLERANCE``, checked at capture) instead of a run of the traced
    graph on each, which the artifact check would follow with a run of the model on each anyway.

    With ``sample`` (``verify="numerics"``, the default) a stage is not run when its run would only state a sample
    of its own error: an approximate pass, not the last, followed by another approximate pass (so no exact pass is
    compared against its outputs) and keeping every node's shape (so the report's FLOPs need no run either), e.g.
    ``calibrate`` before ``bias_correction``: its row states no error and its name is in ``skipped``. The later
    stages' errors are still measured against the traced graph, and every exact pass against the stage before it.
    With validation data nothing is left out (its row runs the stage on that data anyway). Without ``sample``
    (``verify="full"``) every changed stage runs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], passes: Sequence[Any],
                 sample: bool = False, model: Any = None) -> None:
        self.inputs = fresh_inputs(example_inputs)
        self.tolerances = exact_tolerances(gm)
        # the traced model draws random numbers itself (randn, dropout in training): a pass is not blamed for that
        self.samples = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                           and torch.Tag.nondeterministic_seeded in n.target.tags for n in gm.graph.nodes)
        self.every: dict[str, torch.Tensor] = {}  # the last run's every node output: its shapes (Shapes.from_values)
        try:
            self.reference, self.prev_values = run_recording(gm, self.inputs, self.every)
        except Exception as e:  # the traced graph reproduces the model, which the example did not make raise
            raise raises_on_fresh_inputs(e) from None
        self.prev_out = self.reference
        self.more: list[tuple[tuple[torch.Tensor, ...], Any]] = []  # the other batches and the traced outputs
        if not all(p.exact for p in passes):
            # the references: the model's outputs when given (``model(key, x)``), else the graph's
            with torch.no_grad():
                self.more = [(x, list(model(("bound", k), x)) if model is not None else list(gm(*x)))
                             for k, x in enumerate(bound_inputs(example_inputs, CHECK_SEED)[1:])]
        self.bounding = False  # an approximate pass has run: the last stage states a bound
        self.passes, self.seen = list(passes), 0
        self.sample = sample
        self.skipped: list[str] = []  # stages not run (``sample``), by row name
        self.last: Error | None = Error(0.0, 1.0)  # None after a skipped stage: the next stage must run

    def after(self, p: Any, gm: fx.GraphModule, ctx: Any, stage: Stage) -> None:
        if p is None:
            stage.error = self.last
            self._hand_shapes(gm, ctx)
            return
        self.seen += 1
        unchecked = self.skipped[-1] if self.last is None else None  # the stage before, sampled out: not run
        try:
            if stage.result is None or stage.result.changed or self.last is None:  # else the same graph and error
                if self._sampled_out(p, stage, ctx):
                    self.skipped.append(stage.name)
                    self.last, self.bounding = None, True
                else:
                    self.last = self.check(p, gm, stage.done)
                    self._hand_shapes(gm, ctx)
            stage.error = self.last
            if self.bounding and self.more and self.seen == len(self.passes):
                with torch.no_grad():
                    outputs = [list(gm(*x)) for x, _ in self.more]
                stage.error = error_bound([self.last, *(compare(o, ref) for o, (_, ref) in zip(outputs, self.more))])
                gm.meta[BOUND_OUTPUTS] = (gm.code, [(x, o) for (x, _), o in zip(self.more, outputs)])
        except FxforgeError:
            raise
        except Exception as e:  # a graph that no longer runs is the pass's fault, named as such
            node = re.search(r"While executing %(\w+)", str(e))
            where = f" at node {node.group(1)!r}" if node else ""
            also = f" (or {unchecked!r} before it, not run on its own: verify='full' tells which)" if unchecked else ""
            raise VerificationError(f"pass {p.name!r}{also} left a graph that fails to run{where}: "
                                    f"{type(e).__name__}: {first_line(e)}{after_passes(stage.done)}") from e

    def _sampled_out(self, p: Any, stage: Stage, ctx: Any) -> bool:
        """Whether ``sample`` leaves this stage unrun (see the class docstring). Never with validation data: the
        report row runs the stage on it anyway, and a graph that fails to run is then this check's to name."""
        if not self.sample or p.exact or self.seen >= len(self.passes) or ctx.validation is not None:
            return False
        preserves = stage.result.preserves if stage.result is not None else "none"
        return not self.passes[self.seen].exact and (preserves == "all" or
                                                     (not isinstance(preserves, str) and Shapes in preserves))

    def _hand_shapes(self, gm: fx.GraphModule, ctx: Any) -> None:
        """The checked run was on inputs shaped like the example: every node's shape, which the Shapes analysis
        would run the graph once more to learn (the report's FLOPs ask for it after every changed stage)."""
        ctx.provide(Shapes, gm, Shapes.from_values(self.every))
        self.every = {}

    def check(self, p: Any, gm: fx.GraphModule, done: Sequence[str]) -> Error:
        """The error of the new stage against eager on the checked batch; raise if an exact pass moved the
        numbers."""
        self.every = {}
        inputs = clone_inputs(self.inputs)
        out, values = run_recording(gm, inputs, self.every)
        if written := [k for k, (a, b) in enumerate(zip(inputs, self.inputs)) if not torch.equal(a, b)]:
            # the next stage would read the changed inputs, and compile would write into the caller's example
            raise VerificationError(f"pass {p.name!r} made the graph write into its input {written[0]}; passes before "
                                    f"it: {', '.join(done) or 'none'}")
        if mismatch := changed_outputs(out, self.prev_out, values=p.exact) or _new_non_finite(out, self.prev_out):
            self._refuse_if_random(gm, out)
            raise VerificationError(f"{'exact' if p.exact else 'approximate'} pass {p.name!r} changed the outputs: "
                                    f"{mismatch}; passes before it: {', '.join(done) or 'none'}")
        step = compare(out, self.prev_out)
        if p.exact and (over := beyond(step, self.tolerances)) and \
                not within_rounding_noise(gm, self.inputs, out, self.prev_out):
            error, tolerance = over
            self._refuse_if_random(gm, out)
            where = first_divergence(values, self.prev_values, tolerance) or \
                diverging_output(gm, out, self.prev_out, tolerance)
            raise VerificationError(
                f"exact pass {p.name!r} changed the outputs by {error:.3g} relative "
                f"(tolerance {tolerance:g}){where}; passes before it: {', '.join(done) or 'none'}")
        self.prev_out, self.prev_values = out, values
        self.bounding = self.bounding or not p.exact
        return compare(out, self.reference)

    def _refuse_if_random(self, gm: fx.GraphModule, out: Any) -> None:
        """Before a pass is blamed for moved outputs: where the traced model samples itself (``randn`` noise, dropout
        with ``training=True``) and the graph's second run on the same inputs differs from its first, every stage
        differs from the one before, the pass or not (:data:`RANDOM_MODEL`). A pass that makes a deterministic
        graph random is the pass's fault, and is named so."""
        if not self.samples:
            return
        again, _ = run_recording(gm, clone_inputs(self.inputs))
        if compare(again, out).max_rel > EXACT_TOLERANCE:
            raise VerificationError(RANDOM_MODEL)


class ValidationCheck(Instrument):
    """An exact pass checked on the user's validation data too, which the report's row runs each stage on anyway
    (after :class:`~fxforge.compiler.report.StageRecorder`): the numeric check's fresh inputs are normal draws, and a
    pass wrong only on data like the user's (values above 1, say) was accepted while its own row stated an error of 2
    on that data."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.tolerances = exact_tolerances(gm)

    def after(self, p: Any, gm: fx.GraphModule, ctx: Any, stage: Stage) -> None:
        if p is None or not p.exact or ctx.validation is None or stage.result is None or not stage.result.changed:
            return
        step = ctx.validation.step
        if step is not None and (over := beyond(step, self.tolerances)):
            raise VerificationError(f"exact pass {p.name!r} changed the outputs on your validation data by "
                                    f"{over[0]:.3g} relative (tolerance {over[1]:g}); passes before it: "
                                    f"{', '.join(stage.done) or 'none'}")


def first_divergence(values: dict[str, torch.Tensor], before: dict[str, torch.Tensor], tolerance: float) -> str:
    """Where two recordings first disagree, by node name (nodes both graphs share)."""
    for name, v in values.items():
        ref = before.get(name)
        if ref is None or ref.shape != v.shape or not v.is_floating_point():
            continue
        if compare([v], [ref]).max_rel > tolerance:
            return f"; first diverging node: {name!r}"
    return ""


def diverging_output(gm: fx.GraphModule, out: Sequence[Any], before: Sequence[Any], tolerance: float) -> str:
    """The node producing the first output that moved (when no node both graphs share diverged)."""
    producers = graph_outputs(gm.graph)
    for node, a, b in zip(producers, _tensors(out), _tensors(before)):
        if compare([a], [b]).max_rel > tolerance:
            return f"; first diverging node: {getattr(node, 'name', node)!r} (an output)"
    return ""


def clone_inputs(args: Any) -> Any:
    """A copy of every tensor in ``args`` (a pytree): what a model that writes into its input may overwrite."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, args)


def exact_tolerances(gm: fx.GraphModule) -> tuple[float, ...]:
    """Per tensor output of ``gm``, in order: EXACT_TOLERANCE, widened where the ops that output is computed by run
    in half precision: another kernel's summation order moves a float16 result by a few units of its last place
    (eps 1e-3; bfloat16 8e-3), not float32's 1e-7. What those ops compute decides, not the inputs' dtypes (a bfloat16
    side input cast to float32 at once leaves every op in float32), nor another output's: one small bfloat16 output
    widened every output's tolerance to 6.25 %, and an exact pass 4 % wrong on a float32 output went through."""
    coarsest: dict[fx.Node, float] = {}  # per node, the largest eps of the ops it is computed by (one pass, in order)
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        own = torch.finfo(value.dtype).eps if node.op == "call_function" and isinstance(value, torch.Tensor) and \
            value.is_floating_point() else 0.0
        coarsest[node] = max([own, *(coarsest[source] for source in node.all_input_nodes)])
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    # None, a number or a value of the batch size among the outputs is not compared as a tensor
    return tuple(max(EXACT_TOLERANCE, 8 * coarsest[leaf]) for leaf in pytree.tree_leaves(output.args)
                 if isinstance(leaf, fx.Node) and isinstance(leaf.meta.get("val", torch.empty(0)), torch.Tensor))


NOISE_MARGIN = 2.0  # two evaluations of one computation differ by up to twice either's rounding noise
NOISE_CAP = 1e-3  # a float32 output further than this from its float64 run is not rounding (random ops, another dtype)
HALF_NOISE_CAP = 0.1  # the same for an output computed in float16 or bfloat16, which round 8000× and 65000× coarser


def rounding_noise(module: torch.nn.Module, inputs: tuple, outputs: Sequence[Any]) -> tuple[float, ...] | None:
    """Each of ``outputs``' distance (``compare``'s per-output error) from ``module`` computed in float64 on
    ``inputs`` (its arguments, pytrees allowed): how far that dtype's rounding took them. None where ``module``
    cannot run in float64 (Q/DQ ops) or casts to a narrower dtype somewhere (no float64 reference)."""
    def wide(t: Any) -> Any:
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    try:
        with torch.no_grad():
            truth = pytree.tree_leaves(copy.deepcopy(module).double()(*pytree.tree_map(wide, inputs)))
    except Exception:  # an op that takes float32 or half precision alone
        return None
    if any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 for t in truth):
        return None
    return compare(outputs, truth).each or None


def within_rounding_noise(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], outputs: Sequence[Any],
                          other: Sequence[Any], other_noise: Sequence[float] | None = None) -> bool:
    """Whether ``other`` differs from ``outputs`` (``gm``'s on ``inputs``) by no more than rounding explains: each
    output by at most NOISE_MARGIN times the larger of the two's distances from their float64 runs
    (:func:`rounding_noise`; ``other_noise`` where the other's computation is known, else ``outputs``' own), plus
    its exact tolerance. Two evaluations of a deep network differ by its own rounding noise, which can exceed the
    exact tolerance: fusing inception_v3's 94 batch norms moved its float32 outputs by 1.15e-4, each evaluation 9e-5
    from float64; fusing a float16 regnet_x_400mf's moved them by 4.8 %, the float16 model itself 5.6 % from
    float32; the exact check refused both valid models. A rewrite that computes something else moves its outputs by
    more than their rounding noise (a 0.1 % scale: 1e-3 against 1e-7 in float32). False without a float64 run, or
    where an output is further from its float64 run than its cap, NOISE_CAP or in half precision HALF_NOISE_CAP (a
    graph that samples draws other numbers in every run)."""
    tolerances, noise = exact_tolerances(gm), rounding_noise(gm, tuple(inputs), outputs)
    other_noise = noise if other_noise is None else tuple(other_noise)
    apart = compare(other, outputs).each
    if noise is None or not len(noise) == len(other_noise) == len(apart) == len(tolerances):
        return False
    return all(max(n, m) <= (NOISE_CAP if t == EXACT_TOLERANCE else HALF_NOISE_CAP)
               and d <= NOISE_MARGIN * max(n, m) + t for n, m, d, t in zip(noise, other_noise, apart, tolerances))


def exact_tolerance(gm: fx.GraphModule) -> float:
    """The widest of :func:`exact_tolerances`: what the report says exact passes are held to."""
    return max((EXACT_TOLERANCE, *exact_tolerances(gm)))


def beyond(error: Error, tolerances: Sequence[float]) -> tuple[float, float] | None:
    """(its error, its tolerance) of the output furthest beyond its own exact tolerance (by their ratio), or None
    where each output is within its own. Without an error per output (a non-finite value made it infinite) or with
    another count of them, the largest error against the widest tolerance."""
    if not error.each or len(error.each) != len(tolerances):
        widest = max(tolerances, default=EXACT_TOLERANCE)
        return None if error.max_rel <= widest else (error.max_rel, widest)
    ratio, worst_error, tolerance = max((e / t, e, t) for e, t in zip(error.each, tolerances))
    return None if ratio <= 1 else (worst_error, tolerance)


BACKEND_SEED = CHECK_SEED + 1  # the backend is checked on inputs no pass was checked on


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the user's model (fxforge runs and exports copies, never the model itself), or an InputError
    saying why there is none: deepcopy refuses a tensor attribute computed with gradients, which the hook of
    ``torch.nn.utils.prune`` or of the legacy ``weight_norm`` leaves on its module after a forward with gradients
    (the raw RuntimeError surfaced from compile)."""
    try:
        memo: dict[int, Any] = {}
        copied = copy.deepcopy(model, memo)
        _rebind_closures(copied, memo)
        return copied
    except RuntimeError as e:
        cause = ("a module holds a tensor computed with gradients, which deepcopy refuses (a torch.nn.utils.prune or "
                 "weight_norm hook leaves one after a forward with gradients): run the model's last forward under "
                 "torch.no_grad(), or make the pruning permanent with torch.nn.utils.prune.remove"
                 if "deepcopy protocol" in str(e) else first_line(e))
        raise InputError(f"fxforge cannot copy the model: {cause}") from None


@contextlib.contextmanager
def untouched(model: Any) -> Iterator[None]:
    """Run the block (a compile) and hold ``model`` to the state it had: fxforge runs copies, but code the model
    holds can reach the model itself where the copy shares a reference deepcopy keeps (a weakref, a dict a closure
    holds, a module-level global that forward calls, a ``__deepcopy__`` returning ``self``), and compile then ran
    and changed the user's model (batch-norm statistics in training mode, a counter, its mode, its hooks).
    Modes and hook dicts are put back; any other change (a tensor written, an attribute rebound) is an InputError
    naming it, raised in place of the block's own error, which such a run makes misleading (torch.export's
    "Constant lifted_tensor_2 is mutated")."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules() if isinstance(getattr(m, "training", None), bool)]
    hooks = [(d, dict(d)) for m in model.modules() for k, d in vars(m).items()
             if k.endswith("_hooks") and isinstance(d, dict)]
    before, tensors = _guarded(_state, model), _guarded(_tensor_sums, model)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for d, items in hooks:
            if dict(d) != items:
                d.clear()
                d.update(items)
        after, sums = _guarded(_state, model), _guarded(_tensor_sums, model)
        changed = [name for name, sum_ in (sums or {}).items() if not _same_sum((tensors or {}).get(name), sum_)] \
            if tensors is not None and sums is not None else []
        if not changed and before is not None and after is not None and not _alike(before, after):
            changed = _changed_names(before, after) or ["its attributes"]
        if changed:
            raise InputError(f"compiling changed your model ({listed(changed)}): code the model holds reaches the "
                             "model itself, not fxforge's copy of it (a weakref, a global its forward calls, a closure "
                             "over a container, a __deepcopy__ returning self); make forward reach the model through "
                             "self") from None


def _tensor_sums(model: torch.nn.Module) -> dict[str, float]:
    """Each parameter's and buffer's sum in float64, by name: a write shows even where no version counts it (batch
    norm's running statistics, updated inside its kernel) and where the model's state cannot be fingerprinted (a
    weakref attribute)."""
    sums = {}
    with torch.no_grad():
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
            try:  # a lazy, quantized (qint8), nested or complex tensor has no such sum: not compared
                sums[name] = float(torch.sum(t, dtype=torch.float64)) if not t.is_meta and t.numel() else 0.0
            except Exception:  # noqa: BLE001 - whatever torch raises for such a tensor
                continue
    return sums


def _same_sum(a: float | None, b: float) -> bool:
    return a is not None and (a == b or math.isnan(a) and math.isnan(b))


def _guarded(read: Any, model: torch.nn.Module) -> Any:
    """``read(model)``, or None where the model cannot be read so (a TorchScript module): the guard of
    :func:`untouched` must not fail a compile of its own."""
    try:
        return read(model)
    except Exception:  # noqa: BLE001 - whatever the model's attributes raise
        return None


def _alike(a: Any, b: Any) -> bool:
    """Two fingerprints (:func:`_fingerprint`) of an unchanged state: as ``==``, but a tensor without a version (an
    inference tensor) is unchanged while it is the same object (``_Ref`` calls it changed, for :class:`ModelRuns`,
    which must not reuse what it cannot tell), and NaN equals NaN."""
    if isinstance(a, _Ref) and isinstance(b, _Ref):
        return a.obj is b.obj and a.version == b.version
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_alike(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _changed_names(before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> list[str]:
    """The names whose fingerprints differ between two :func:`_state` records, compared by name and as
    :func:`_alike` compares (NaN equal to NaN): matched by position, an attribute a forward adds shifted every later
    one, and a warning named training, _backward_pre_hooks and 22 more, not the new one."""
    was, now, absent = dict(before), dict(after), object()
    return [name.lstrip(".") for name in dict.fromkeys([*was, *now])
            if not _alike(was.get(name, absent), now.get(name, absent))]


def _rebind_closures(copied: torch.nn.Module, memo: dict[int, Any]) -> None:
    """The functions a module holds itself (``m.forward = lambda x: post(orig(x))``, a hook) made to reach the
    model's copy where they reach the model: deepcopy shares a function as it is, so the copy's forward called
    ``orig``, the user's own bound forward (a closure's or a global's), and compile ran and changed the user's model
    (batch-norm statistics, a counter); a one-shot hook removed itself from the user's model through its global
    handle. ``memo``: the deepcopy's, original id → copy."""
    for module in copied.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, types.FunctionType):
                setattr(module, key, _into_copy(value, memo))
            elif key.endswith("_hooks") and isinstance(value, dict):
                for hook, fn in list(value.items()):
                    value[hook] = _into_copy(fn, memo)


def _into_copy(value: Any, memo: dict[int, Any]) -> Any:
    """``value``'s counterpart in the copy where it refers into the model (a submodule, parameter or buffer; a
    method bound to one; a hook handle on one's hooks; a function whose closure or globals hold such), else
    ``value`` itself: other objects a function reaches stay shared, as the user wrote them."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, types.MethodType) and id(value.__self__) in memo:
        return types.MethodType(value.__func__, memo[id(value.__self__)])
    if isinstance(value, RemovableHandle):
        hooks = value.hooks_dict_ref()
        return copy.deepcopy(value, memo) if hooks is not None and id(hooks) in memo else value
    if not isinstance(value, types.FunctionType):
        return value
    memo[id(value)] = value  # while its own references are looked at (a recursive function keeps itself)
    cells = tuple(_cell_into_copy(c, memo) for c in value.__closure__ or ())
    names = {n: _into_copy(value.__globals__[n], memo) for n in value.__code__.co_names if n in value.__globals__}
    moved = {n: v for n, v in names.items() if v is not value.__globals__[n]}
    if not moved and all(a is b for a, b in zip(cells, value.__closure__ or ())):
        del memo[id(value)]
        return value
    new = types.FunctionType(value.__code__, {**value.__globals__, **moved} if moved else value.__globals__,
                             value.__name__, value.__defaults__, cells or None)
    new.__kwdefaults__, new.__dict__ = value.__kwdefaults__, dict(value.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = value.__qualname__, value.__doc__, value.__module__
    memo[id(value)] = new
    return new


def _cell_into_copy(cell: Any, memo: dict[int, Any]) -> Any:
    """The cell itself where its contents stay, else one new cell for every function that shares it (a pre-hook and
    a hook sharing state through ``nonlocal`` still share it in the copy)."""
    if id(cell) not in memo:
        contents = _contents(cell)
        moved = contents if contents is _EMPTY_CELL else _into_copy(contents, memo)
        memo[id(cell)] = cell if moved is contents else types.CellType(moved)
    return memo[id(cell)]


_EMPTY_CELL = object()


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return _EMPTY_CELL


class ModelRuns:
    """The user's model's outputs, each input set run once: capture checks the graph against them and the artifact
    check the artifact, so the model (often the slowest thing to run) is not run again for inputs it has seen.
    Each run starts from a copy of the model in its original state and from a copy of the inputs, so a model that
    changes its own state or writes into its input is compared from the same start; ``model`` itself is never run.

    A copy that a run left as it found it serves the next run: copying a large model costs more than running it
    (efficientnet_v2_s: 0.15 s of CPU against 0.13 s, and a compile runs it 9 times). "As it found it": the same
    parameter and buffer tensors at the same versions (an in-place write bumps a tensor's version) and every other
    attribute of every submodule bound to the same object with the same contents (``self.calls += 1`` rebinds one,
    ``self.seen.append(x)`` changes one's contents); otherwise, or where an attribute's state cannot be read, the
    next run copies anew."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cached: dict[Any, list[Any]] = {}
        self.count = 0  # runs of the model so far (tests guard that none is repeated)
        self.copies = 0  # copies of the model made so far
        # a copy in the original state, once a run has shown one, with that state (:func:`_state`): nothing touches
        # the copy between two runs, so the state recorded after one run is the state before the next
        self._unchanged: tuple[torch.nn.Module, Any] | None = None
        # what a run changed of the model's own state (``calls``: ``self.calls += 1``), from the first run that did
        self.state_changes: list[str] = []

    def run(self, inputs: tuple) -> Any:
        """The model's output on ``inputs``, computed anew."""
        self.count += 1
        # outside an ambient inference_mode: its tensors keep no version, so every run looked like a state change
        # (a warning on every compile under inference_mode, and a fresh copy of the model for every run)
        with torch.inference_mode(False):
            if self._unchanged is not None:
                (model, before), self._unchanged = self._unchanged, None
            else:
                model, self.copies = copy_model(self.model), self.copies + 1
                before = _state(model)
            with torch.no_grad():
                out = model(*clone_inputs(inputs))
        after = _state(model)
        if _same(before, after):
            self._unchanged = model, after
        elif not self.state_changes and before is not None and after is not None:
            self.state_changes = _changed_names(before, after)
        return out

    def structure(self, key: Any) -> pytree.TreeSpec:
        """How the model's outputs named ``key`` (computed by :meth:`outputs` before) are nested."""
        return pytree.tree_structure(self.cached[key])

    def outputs(self, key: Any, inputs: tuple) -> list[Any]:
        """The model's flat outputs on ``inputs``, named ``key`` ("example", or the seed of fresh inputs)."""
        if key not in self.cached:
            try:
                self.cached[key] = self.run(inputs)
            except Exception as e:
                if key == "example":
                    raise
                raise raises_on_fresh_inputs(e) from None
        return pytree.tree_leaves(self.cached[key])


class _Ref:
    """An object compared by identity, and a tensor also by version: equal only to a ``_Ref`` of the same object at
    the same known version (an inference tensor keeps none, so it is never equal)."""

    __slots__ = ("obj", "version")

    def __init__(self, obj: Any, version: int | None = 0) -> None:
        self.obj, self.version = obj, version

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Ref) and self.obj is other.obj and self.version is not None
                and self.version == other.version)

    __hash__ = None  # type: ignore[assignment]


class _Opaque(Exception):
    """An attribute whose state cannot be read (an extension object) or is too large to record."""


_VALUES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
           torch.memory_format, enum.Enum)  # immutable: compared by value
_CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType,
         functools.partial)  # compared by identity: a run rebinds, it does not rewrite code
STATE_LIMIT = 100_000  # values recorded per model state; a larger state is not recorded (the next run copies)


def _fingerprint(value: Any, seen: set[int], budget: list[int]) -> Any:
    """What a run could change in ``value``, recursively: immutable values themselves, tensors by identity and
    version, containers and plain objects by identity and contents (a list appended to differs), code by identity;
    :class:`_Opaque` for anything else."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Opaque
    if isinstance(value, _VALUES):
        return value
    if isinstance(value, torch.Tensor):
        if torch.nn.parameter.is_lazy(value):  # no data, no version: any method of it raises
            return _Ref(value)
        return _Ref(value, None if value.is_inference() else value._version)
    if isinstance(value, _CODE) or id(value) in seen:
        return _Ref(value)
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.size > budget[0]:
            raise _Opaque
        budget[0] -= value.size
        return _Ref(value), value.dtype, value.shape, value.tobytes()
    if isinstance(value, dict):
        return _Ref(value), tuple((_fingerprint(k, seen, budget), _fingerprint(v, seen, budget))
                                  for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return _Ref(value), tuple(_fingerprint(v, seen, budget) for v in value)
    if hasattr(value, "__dict__") and not hasattr(value, "__slots__"):
        return _Ref(value), _fingerprint(vars(value), seen, budget)
    raise _Opaque


def _state(model: torch.nn.Module) -> Any:
    """What a run of ``model`` could change that its next run would see: every parameter and buffer with its version,
    and the fingerprint of every other attribute of every submodule (:func:`_fingerprint`: ``self.calls += 1``
    rebinds one, ``self.history.append(y)`` changes one's contents); None where some attribute cannot be recorded,
    which :func:`_same` never takes for unchanged. The fingerprint holds the objects it names, so the identities it
    compares are of objects still alive."""
    seen: set[int] = set()
    budget = [STATE_LIMIT]
    try:
        return [(name, _fingerprint(t, seen, budget)) for name, t in
                (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))] + [
            (f"{name}.{key}", _fingerprint(value, seen, budget))
            for name, module in model.named_modules(remove_duplicate=False) if not _compile_wrapper(module)
            for key, value in vars(module).items() if key not in ("_parameters", "_buffers", "_modules")]
    except _Opaque:
        return None


def _compile_wrapper(module: torch.nn.Module) -> bool:
    """Whether ``module`` is torch.compile's wrapper (``OptimizedModule``): its own attributes are dynamo's (a
    context that a call changes), not the model's state, which the module it wraps holds (a submodule, recorded).
    A stateless compiled model was warned of as changing its state."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # no wrapper exists before torch.compile imported it
    return dynamo is not None and isinstance(module, dynamo.OptimizedModule)


def _same(before: Any, after: Any) -> bool:
    """Both states recorded and equal: the same names bound to the same objects with the same contents, each tensor
    at the same known version."""
    return before is not None and after is not None and before == after


RANDOM_MODEL = ("your model gives other outputs on a second run on the same inputs (random ops in its forward: "
                "sampling, dropout with training=True), so no compile of it can be checked against it: make its "
                "forward deterministic, or pass verify='off' to compile it unchecked")


def check_artifact(artifact: Any, model: ModelRuns, gm: fx.GraphModule, example: tuple, exact: bool) -> Error:
    """:func:`_checked_artifact`, whose failure on a model that is random itself says so: a forward that samples
    (``randn_like`` noise, dropout with ``training=True``) gave an error blaming the backend, and offered
    ``verify='off'`` as if the artifact were at fault."""
    try:
        return _checked_artifact(artifact, model, gm, example, exact)
    except VerificationError:
        again = pytree.tree_leaves(model.run(example))
        if compare(again, model.outputs("example", example)).max_rel > EXACT_TOLERANCE:
            raise VerificationError(RANDOM_MODEL) from None
        raise


def _checked_artifact(artifact: Any, model: ModelRuns, gm: fx.GraphModule, example: tuple, exact: bool) -> Error:
    """Check the compiled artifact on the example inputs as given and on fresh inputs of the same shapes, and
    return its error against the user's own model (``model``: its outputs, computed once per input set): for an
    exact pipeline the worst of the two, for an approximate one the worse of the example's error and
    :func:`error_bound` over ``BOUND_BATCHES`` fresh batches.

    The backend must implement the graph it was given (``gm``): a float graph to the exact tolerance; a quantized
    one (Q/DQ or dynamic int8 linears), which integer kernels cannot reproduce bit for bit, no further from the
    model than QUANTIZED_LOWERING_FACTOR × the graph's own distance + QUANTIZED_LOWERING_TOLERANCE. An ``exact``
    pipeline must also match the model itself to the exact tolerance, which catches a capture that took another
    branch than the model takes at these shapes. The bounds check the worst measured error, not the stated bound.

    An approximate pipeline's fresh batches are the one no pass was checked on (``BACKEND_SEED``) and the
    ``BOUND_BATCHES - 1`` others on which the numeric check measured the last stage's bound, whose graph outputs it
    left in ``gm.meta[BOUND_OUTPUTS]``: the same outputs a new run of the graph gives (a quantized graph runs slowly in
    PyTorch: efficientnet_v2_s's int8 graph 7 runs, ~3 s of CPU), read only while ``gm.code`` is the code they were
    computed by and then dropped. Without them (``verify`` below "numerics" in the passes, a pipeline whose last
    stage changed nothing) the graph runs on ``bound_inputs(.., BACKEND_SEED)`` as before.
    """

    flat, spec = pytree.tree_flatten(example)
    known = [] if exact else _bound_outputs(gm)
    if known:  # the batch no pass was checked on, then those the graph's bound was measured on
        fresh = [(BACKEND_SEED, fresh_inputs(flat, BACKEND_SEED), None), *((("bound", k), x, out)
                                                                          for k, (x, out) in enumerate(known))]
    else:
        fresh = [(BACKEND_SEED + 1000 * k, x, None) for k, x in
                 enumerate([fresh_inputs(flat, BACKEND_SEED)] if exact else bound_inputs(flat, BACKEND_SEED))]
    fresh += _other_batch(getattr(artifact, "signature", None), flat, model, spec)
    errors: list[Error] = []
    vs_graph, graph_vs_model = [], []
    runs = []  # (flat inputs, inputs, artifact's outputs, graph's, model's): what a float64 run can judge a miss by
    quantized = is_quantized(gm)
    for key, x, graph in (("example", tuple(flat), None), *fresh):
        inputs = example if key == "example" else pytree.tree_unflatten(list(x), spec)
        want = model.outputs(key, inputs)
        with torch.no_grad():
            returned = artifact(*inputs)
            graph = graph if graph is not None else list(gm(*pytree.tree_leaves(clone_inputs(inputs))))
        got, structure = pytree.tree_flatten(returned)
        if key == "example" and nesting(structure) != nesting(model.structure(key)):  # other fields, a list
            raise VerificationError(f"the {artifact.backend} artifact returns {nesting(structure)} where your model "
                                    f"returns {nesting(model.structure(key))}")
        where = f"at batch {key[1]}" if isinstance(key, tuple) and key[0] == "batch" else \
            "on the example" if key == "example" else "on fresh inputs"
        # integer kernels may round an int8 graph's argmax otherwise; the dtypes and shapes still hold
        if mismatch := discrete_mismatch(got, graph, values=not quantized):
            hint = STATIC_BATCH_HINT if where.startswith("at batch") else "; pass verify='off' to accept it anyway"
            raise VerificationError(f"the {artifact.backend} artifact differs from the graph it compiled {where}: "
                                    f"{mismatch}{hint}")
        if mismatch := discrete_mismatch(got, want, values=False):  # the graph too: a pass wrong at that batch
            raise VerificationError(f"the compiled model differs from your model {where}: {mismatch}"
                                    f"{STATIC_BATCH_HINT if where.startswith('at batch') else ''}")
        errors.append(compare(got, want))
        vs_graph.append(compare(got, graph))
        graph_vs_model.append(compare(graph, want))
        runs.append((pytree.tree_leaves(inputs), inputs, got, graph, want))
    largest = worst(errors)  # what the bounds below check
    discrete = "" if exact else _discrete_changes([(got, want) for *_, got, _, want in runs])
    stated = largest if exact else dataclasses.replace(worst([errors[0], error_bound(errors[1:])]), discrete=discrete)
    tolerances, vs_graph, graph_vs_model = exact_tolerances(gm), worst(vs_graph), worst(graph_vs_model)
    if quantized:
        bound = QUANTIZED_LOWERING_FACTOR * graph_vs_model.max_rel + QUANTIZED_LOWERING_TOLERANCE
        if not largest.max_rel <= bound:
            raise VerificationError(f"the {artifact.backend} artifact of a quantized graph is {largest.max_rel:.3g} "
                                    f"relative from the model, the graph itself {graph_vs_model.max_rel:.3g} (bound "
                                    f"{bound:.3g}: the int8 kernels compute something else); pass verify='off' to "
                                    "accept it anyway")
    elif (over := beyond(vs_graph, tolerances)) and not all(within_rounding_noise(gm, x, graph, got)
                                                           for x, _, got, graph, _ in runs):
        raise VerificationError(f"the {artifact.backend} artifact differs from the graph it compiled by "
                                f"{over[0]:.3g} relative (bound {over[1]:g}); pass verify='off' to accept it anyway")
    if exact and (over := beyond(largest, tolerances)) and not all(
            within_rounding_noise(gm, x, graph, got) and within_rounding_noise(
                gm, x, graph, want, rounding_noise(model.model, inputs, want))
            for x, inputs, got, graph, want in runs):
        # a graph as far off as its artifact: no backend's fault, and verify='off' would accept a wrong graph
        cause = (f", and so does the graph it compiled ({graph_vs_model.max_rel:.3g}): a pass or the capture "
                 "computes otherwise on inputs the passes were not checked on (fresh values, another batch size)"
                 if beyond(graph_vs_model, tolerances) else "; pass verify='off' to accept it anyway")
        raise VerificationError(f"the {artifact.backend} artifact of an exact pipeline differs from the model by "
                                f"{over[0]:.3g} relative (cosine {largest.cosine:.4f}; bound {over[1]:g}){cause}")
    return stated


def _discrete_changes(pairs: Sequence[tuple[list[Any], list[Any]]]) -> str:
    """The integer and bool outputs of (artifact, model) output pairs that differ, with the share of their elements
    that do: "output 1 (int64): 12 of 2560 elements (0.47 %) over 10 input sets", "" when none do."""
    changed: dict[int, list[int]] = {}
    for got, want in pairs:
        for k, (o, r) in enumerate(zip(_tensors(got), _tensors(want))):
            if not (r.is_floating_point() or r.is_complex()) and o.shape == r.shape:
                counts = changed.setdefault(k, [0, 0, r.dtype])
                counts[0] += int((o != r).sum())
                counts[1] += r.numel()
    return "; ".join(f"output {k} ({str(dtype).removeprefix('torch.')}): {n} of {total} elements "
                     f"({100 * n / total:.2g} %) over {len(pairs)} input sets"
                     for k, (n, total, dtype) in changed.items() if n)


# a graph right at its example's batch and wrong at another (a squeeze of the batch, a pass wrong there)
STATIC_BATCH_HINT = " (static_batch=True compiles for the example's batch size alone)"


def _other_batch(signature: Any, flat: Sequence[torch.Tensor], model: ModelRuns, spec: Any) -> list[tuple]:
    """For a dynamic batch, one fresh input set at the example's batch size + 1, and one at the smallest batch the
    signature accepts where that is below the example's: every other check runs at the example's shapes, and a
    backend can be right there and wrong at another batch (TVM lowered ``x[:1].expand(B, 4)`` and ``x.squeeze(0)``
    compiled from a batch of 1 for that batch alone; a graph exported at batch 2 fixes a ``squeeze()``'s axes, so
    ONNX returned [1, 5] at batch 1 where eager squeezes the batch away too and returns [5]). None at a size where
    the model itself fails (its own limit, not the artifact's)."""
    if signature is None or not signature.dynamic_batch:
        return []
    batched = signature.batched()
    if not any(batched):  # no input has the batch dimension (every one 0-d)
        return []
    size = next(t.shape[0] for t, b in zip(flat, batched) if b)
    grown = [torch.cat([t, t[:1]]) if b else t for t, b in zip(flat, batched)]  # values like the example's
    others = [(size + 1, grown, BACKEND_SEED + 1)]
    if signature.min_batch < size:
        others.append((signature.min_batch, [t[:signature.min_batch] if b else t for t, b in zip(flat, batched)],
                       BACKEND_SEED + 2))
    checked = []
    for batch, like, seed in others:
        inputs = fresh_inputs(like, seed)
        try:
            model.outputs(("batch", batch), pytree.tree_unflatten(list(inputs), spec))
        except Exception:
            continue
        checked.append((("batch", batch), inputs, None))
    return checked


def is_quantized(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` simulates integer arithmetic (Q/DQ or dynamic int8 linears), which int8 kernels round
    otherwise: its artifact is held to the quantized lowering bound, not the exact one."""
    return any(is_op(n, *QUANTIZE, DYNAMIC_LINEAR) for n in gm.graph.nodes)


def checks_made(verify: str, exact: bool, quantized: bool, backend: str, unrun: str, tolerance: float,
                skipped: Sequence[str] = (), dynamic_batch: bool = False, validation: bool = False,
                other_target: str | None = None) -> str:
    """What a compile under ``verify`` checked, in words, for ``report.meta["checked"]``: which stages were compared
    on what, and the bounds that would have raised ``VerificationError``; ``skipped``: the stages the sampled numeric
    check did not run (``NumericCheck.skipped``); ``validation``: the user gave validation data
    (:class:`ValidationCheck` compares the exact passes on it too); ``unrun``: why this machine cannot run the
    artifact ("": it ran); ``other_target``: the target, where the artifact was run here for another machine's (a
    portable one)."""
    if verify == "off":
        return "nothing (verify='off'): no graph linted, no output compared"
    if verify == "lint":
        return "each pass's graph linted; no output compared (verify='numerics' compares them)"
    stages = (f"each pass that changed the graph, run on one fresh batch against the stage before it (exact passes "
              f"within {tolerance:g} relative{', on your validation data too' if validation else ''})")
    if skipped:
        stages += (f", except the approximate {', '.join(skipped)}, whose output only the next approximate stage "
                   "reads: not run on its own, its row states no error (verify='full' runs it)")
    if not exact:
        stages += f"; the last pass's stated error a bound over {BOUND_BATCHES} fresh batches"
    if unrun:
        return f"{stages}; the {backend} artifact not run ({unrun})"
    batches = 1 if exact else BOUND_BATCHES
    bound = (f"within {QUANTIZED_LOWERING_FACTOR:g}x the graph's own error + {QUANTIZED_LOWERING_TOLERANCE:g}"
             if quantized else f"within {tolerance:g} of the graph")
    other = (", and one fresh batch each of the example's batch size + 1 and of the smallest batch size the artifact "
             "takes, where that is smaller") if dynamic_batch else ""
    elsewhere = (f"; run on this machine, not on target {other_target}'s, whose runtime may round otherwise"
                 if other_target else "")
    return (f"{stages}; the {backend} artifact against the graph and your model on the example inputs and {batches} "
            f"fresh batch{'es' if batches > 1 else ''}{other} ({bound}{f', and of your model' if exact else ''})"
            f"{elsewhere}")


def _bound_outputs(gm: fx.GraphModule) -> list[tuple[tuple[torch.Tensor, ...], list[Any]]]:
    """The numeric check's ``BOUND_BATCHES - 1`` (inputs, outputs) of ``gm`` (removed from its meta), if ``gm`` is
    still the graph that computed them; else none."""
    code, known = gm.meta.pop(BOUND_OUTPUTS, (None, []))
    return known if code == gm.code and len(known) == BOUND_BATCHES - 1 else []


def worst(errors: Sequence[Error]) -> Error:
    """The largest error and the smallest cosine of ``errors``, each output's largest error too (where every one
    has them, for the same outputs)."""
    each = tuple(max(per) for per in zip(*(e.each for e in errors))) if len({len(e.each) for e in errors}) == 1 else ()
    return Error(max(e.max_rel for e in errors), min(e.cosine for e in errors), each)


def first_float(out: Any) -> torch.Tensor:
    """What agreement-based scores compare of a model's result (a tensor, or any nesting of tuples, lists and dicts
    of them, in the order the traced graph flattens it): its first floating-point output with a batch dimension,
    else its first output with one (class ids, compared element by element), else its first output as a 1-element
    tensor. A 0-d score beside the logits, or an integer output alone, was a raw error where batches are
    concatenated; a dict or nested output was one too."""
    values = [torch.as_tensor(v) for v in pytree.tree_leaves(out) if isinstance(v, (torch.Tensor, numbers.Number))]
    batched = [v for v in values if v.dim()]
    return next((v for v in batched if v.is_floating_point()), batched[0] if batched else values[0].reshape(1))
