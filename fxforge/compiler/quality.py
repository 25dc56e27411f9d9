"""Quality on the user's data: how far each stage's outputs are from the traced fp32 model on validation batches.

``fxforge.compile(..., validation=[(x1,), (x2,), ...], metric=...)`` runs every stage of the report (the traced
model, each pass, the backend) on the same validation batches. The first stage measured, the traced model
(equal to the user's model within float reassociation), is the reference. Per stage:

- cosine: per sample, between the sample's float outputs and the reference's, flattened together with each output
  scaled to an energy of 1 per sample (a large output would otherwise hide a small one wholly wrong); the report
  shows the minimum and the mean over samples;
- max relative error: ``max|a - b| / max|b|`` per batch; stated as a bound for further batches of the same
  data and sizes, the largest over batches plus their spread (``verify.error_bound``; with one batch, that batch's
  error). A maximum over more values grows: on the wide digits CNN (int8) a bound from batches of 25 was exceeded
  by 2 % of unseen batches of 1, 13 % of batches of 25 and 80 % of batches of 200;
- top-1 agreement: for a 2-D float output (classifier logits), the share of samples whose argmax matches
  the reference's; omitted when the reference rows are unit vectors (embeddings, not logits);
- metric: ``"agreement"`` (top-1 agreement), ``"cosine"`` (mean cosine), ``"min_cosine"`` (the worst sample's
  cosine: the default accuracy budget's measure for outputs that are not logits), or a callable
  ``metric(outputs, inputs) -> float`` (higher is better), where ``outputs`` holds one entry per validation
  batch (the output tensor, or a tuple for several outputs) and ``inputs`` the batches as given.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import CalibrationError, InputError, first_line
from .graph import content_key
from .trace import batch_size
from .verify import COSINE_FLOOR, Error, clone_inputs, compare, error_bound, nonfinite_matched, worst

Metric = Union[None, Literal["agreement", "cosine", "min_cosine", "agreement+min_cosine"],
               Callable[[list, list], float]]
METRICS = ("agreement", "cosine", "min_cosine", "agreement+min_cosine")
# samples of 2-D float outputs from which their values tell multi-label probabilities or a regression (whose argmax
# never changes) from logits; on fewer, a classifier's few rows could look like either by chance
EVIDENCE = 16
MEMO_BYTES = 256 << 20  # the outputs a Validation keeps of the graphs it measured, to measure none twice
# the most batches compile reads from an iterable that is not a list: an endless generator, read in full, grew
# memory without bound (1 GB in 15 s) and compile never returned
READ_LIMIT = 10_000


@dataclass(frozen=True)
class Quality:
    """A stage's outputs against the reference's over the validation data."""

    samples: int
    max_rel: float
    cosine_min: float
    cosine_mean: float
    top1: float | None = None
    metric: float | None = None
    # the worst sample's cosine over the float outputs after the first (None without such outputs): what the default
    # budget bounds beside a classifier's top-1 agreement, which reads the first output alone
    others_cosine_min: float | None = None


def reiterable(data: Iterable[Any] | None, kind: str) -> Iterable[Any] | None:
    """The user's ``kind`` data as every reader can iterate it from the start (several passes, the report and the
    budget each read it): a list or tuple as it is (the user's tensors, which stay put); a one-shot iterator (a
    generator) listed, since a second reader found it empty; any other iterable (a DataLoader, a loader object)
    read anew by each reader (:class:`Copied`). Read from an iterator or such an iterable, each item's tensors are
    copied: a loader refilling one buffer in place gave every kept batch the last one's values, and the accuracy
    budget held on copies of one batch; past ``READ_LIMIT`` items, an InputError (CalibrationError for calibration
    data)."""
    if data is None or isinstance(data, (list, tuple)) or not isinstance(data, Iterable):
        return data  # a list is the user's; what is not iterable, its readers name
    return list(_copied(data, kind)) if isinstance(data, Iterator) else Copied(data, kind)


class Copied:
    """An iterable's items with their tensors copied as read, at most ``READ_LIMIT`` of them (:func:`reiterable`)."""

    def __init__(self, data: Iterable[Any], kind: str) -> None:
        self.data, self.kind = data, kind

    def __iter__(self) -> Iterator[Any]:
        return _copied(self.data, self.kind)


def _copied(data: Iterable[Any], kind: str) -> Iterator[Any]:
    for i, item in enumerate(data):
        if i == READ_LIMIT:
            error = CalibrationError if kind == "calibration" else InputError
            raise error(f"{kind} data gave more than {READ_LIMIT} batches (an endless iterable?): give a finite one, "
                        f"e.g. itertools.islice(data, 64)")
        yield clone_inputs(item)


def flat_batches(data: Iterable[Any], flatten: Callable[[Sequence[Any]], list[torch.Tensor]], kind: str,
                 pick: Callable[[Any], Any] | None = None
                 ) -> tuple[list[Any], list[tuple[torch.Tensor, ...]]]:
    """The user's ``kind`` data (validation, train: an iterable of input tuples; a bare tensor is a 1-tuple) as
    given and flattened with ``flatten`` (the signature's, which checks count, shape and dtype). ``pick`` (compile's
    ``input_key``) takes the model's inputs out of each item, e.g. the input of an ``(input, label)`` batch; the items
    are then kept as given, labels and all, for a metric callable to read. A batch holding NaN or Inf is refused:
    measuring on it or training on it gives NaN, not a model. Errors name the batch."""
    try:
        items = list(data)
    except TypeError:
        raise InputError(f"{kind} must be an iterable of input tuples, got {type(data).__name__}") from None
    batches = items if pick else [_inputs(b) for b in items]
    flat = []
    for i, item in enumerate(items):
        try:
            inputs = _inputs(pick(item)) if pick else batches[i]
        except CalibrationError as e:  # the picking's own message: "input_key 'x' is not in it (...)"
            raise InputError(f"{kind} batch {i}: {e}") from None
        except Exception as e:
            raise InputError(f"input_key failed on {kind} batch {i}: {type(e).__name__}: {first_line(e)}") from None
        try:
            flat.append(tuple(flatten(inputs)))
        except InputError as e:
            hint = (f"; {kind} batches hold the model's inputs alone (give input_key= to pick them out of (inputs, "
                    "labels) batches)") if str(e).startswith("expected") and not pick else ""
            raise InputError(f"{kind} batch {i}: {e}{hint}") from None
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in flat[-1]):
            raise InputError(f"{kind} batch {i} holds NaN or Inf")
    return batches, flat


def _inputs(item: Any) -> tuple[Any, ...] | list[Any]:
    """A data item as an input tuple: a bare tensor (or dict) is the model's one input."""
    return item if isinstance(item, (tuple, list)) else (item,)


class Validation:
    """The user's validation batches (flat, checked against the signature) and the reference outputs."""

    def __init__(self, batches: list[tuple[Any, ...]], flat: list[tuple[torch.Tensor, ...]], metric: Metric,
                 kind: str = "validation") -> None:
        self.batches, self.flat, self.metric, self.kind = batches, flat, metric, kind  # kind: how errors name it
        self.reference: list[list[torch.Tensor]] | None = None
        self.previous: list[list[torch.Tensor]] | None = None  # the outputs of the run before the last
        self.step: Error | None = None  # the last run's error against the run before it (the worst batch's)
        self.measured: dict[bytes, list[list[torch.Tensor]]] = {}  # graph content_key → its outputs, up to MEMO_BYTES

    @classmethod
    def from_user(cls, data: Iterable[Any] | None, flatten: Callable[[Sequence[Any]], list[torch.Tensor]],
                  metric: Metric, pick: Callable[[Any], Any] | None = None) -> Validation:
        """Check ``data`` (an iterable of input tuples, or of items ``pick`` takes them out of) with ``flatten`` (the
        signature's) and ``metric``."""
        if metric is not None and metric not in METRICS and not callable(metric):
            raise InputError(f"metric must be None, {' or '.join(map(repr, METRICS))} or a callable "
                             f"(outputs, inputs) -> float, got {metric!r}")
        if data is None:
            raise InputError("metric= needs validation data: pass validation=[(x1,), (x2,), ...]")
        batches, flat = flat_batches(data, flatten, "validation", pick)
        if not batches:
            raise InputError("validation is empty: pass validation=[(x1,), (x2,), ...]")
        return cls(batches, flat, metric)

    @property
    def sizes(self) -> list[int]:
        """Each batch's samples (:func:`trace.batch_size`: a leading 0-d input, a temperature, holds none; one
        cosine per batch of 16 samples was read as per sample), 0 where no input has a dimension."""
        return [batch_size(b) or 0 for b in self.flat]

    @property
    def samples(self) -> int:
        return sum(n or 1 for n in self.sizes)

    def describe(self) -> str:
        """The report's line saying where its error columns come from."""
        name = self.metric if isinstance(self.metric, str) or self.metric is None else \
            getattr(self.metric, "__name__", "callable")
        # the largest relative difference in a batch grows with its size: the bound is for batches like these
        sizes = sorted({n or 1 for n in self.sizes})
        of = f"a bound for batches of {sizes[0]} samples" if len(sizes) == 1 else \
            f"measured on batches of {sizes[0]}-{sizes[-1]} samples: a larger batch exceeds it more often"
        bound = "one batch: max err is a sample" if len(self.flat) == 1 else \
            f"max err: the worst batch plus the spread over batches, {of}"
        return (f"measured on validation data ({self.samples} samples in {len(self.flat)} batches) against the "
                f"traced fp32 model ({bound})" + (f"; metric: {name}" if name else ""))

    def measure(self, run: Callable[..., Any]) -> Quality:
        """Run ``run(*flat_batch)`` on every batch; the first call's outputs become the reference, and ``step`` is
        how far these outputs are from the previous call's (an exact stage's from the stage before it). A graph
        measured before (the same text and constant values: the budget's final pipeline repeats the stages before
        its quantizer) is not run again, while the outputs kept stay under ``MEMO_BYTES``."""
        key = content_key(run) if isinstance(run, fx.GraphModule) else None
        outs = self.measured.get(key) if key is not None else None
        if outs is None:
            with torch.inference_mode():
                # copies: an output may be a view of a constant (a table returned as is), which a later pass may
                # edit in place, and the reference would change with it
                outs = [[torch.as_tensor(v).clone() for v in pytree.tree_leaves(run(*b))] for b in self.flat]
            kept = sum(t.numel() * t.element_size() for o in (outs, *self.measured.values()) for b in o for t in b)
            if key is not None and kept <= MEMO_BYTES:
                self.measured[key] = outs
        if self.reference is None:
            self._check_measurable(outs)
            self.reference = outs
        self.step = None if self.previous is None else worst([compare(o, r) for o, r in zip(outs, self.previous)])
        self.previous = outs
        cosines = torch.cat([_sample_cosines(o, r, n) for o, r, n in zip(outs, self.reference, self.sizes)])
        max_rel = error_bound([compare(o, r) for o, r in zip(outs, self.reference)]).max_rel
        top1 = _top1(outs, self.reference, self.sizes)
        others = None
        if any(r.is_floating_point() for r in self.reference[0][1:]):
            others = float(torch.cat([_sample_cosines(o[1:], r[1:], n)
                                      for o, r, n in zip(outs, self.reference, self.sizes)]).min())
        quality = Quality(self.samples, max_rel, float(cosines.min()), float(cosines.mean()), top1,
                          others_cosine_min=others)
        return Quality(**{**quality.__dict__, "metric": self._metric(quality, outs)})

    def _check_measurable(self, reference: list[list[torch.Tensor]]) -> None:
        """Refuse a validation batch on which the fp32 model's float outputs hold no finite value (finite inputs
        overflowing inside it): NaN against NaN counts as equal, so every stage, a negated model's too, measured an
        error of 0 and a cosine of 1 there, and the budget held on nothing."""
        for i, outputs in enumerate(reference):
            floats = [t for t in outputs if t.is_floating_point() and t.numel()]
            if floats and not any(torch.isfinite(t).any() for t in floats):
                error = CalibrationError if "calibration" in self.kind else InputError
                raise error(f"{self.kind} batch {i}: the model's outputs on it are all NaN or Inf, so nothing can be "
                            "measured on it (finite inputs overflowing inside the model?); give batches on which the "
                            "model computes finite values")

    def _metric(self, quality: Quality, outs: list[list[torch.Tensor]]) -> float | None:
        if self.metric is None:
            return None
        if isinstance(self.metric, str):
            return score(quality, self.metric, self.reference, self.sizes)
        # copies: a metric normalizing in place wrote into the user's batches, which every later stage runs on (an
        # exact pass was then blamed for the change), and into the outputs kept as the reference
        values, batches = clone_inputs(([o[0] if len(o) == 1 else tuple(o) for o in outs], self.batches))
        try:
            value = float(self.metric(values, batches))
        except Exception as e:
            raise InputError(f"the metric callable failed: {type(e).__name__}: {first_line(e)}") from e
        if not math.isfinite(value):  # a budget cannot compare NaN, nor a drop between infinities
            raise InputError(f"the metric callable {getattr(self.metric, '__name__', '')!r} returned {value}")
        return value


def score(quality: Quality, metric: str, reference: list[list[torch.Tensor]], sizes: Sequence[int] = ()) -> float:
    """``quality`` in the named ``metric`` (one of METRICS; ``reference``: the batches' reference outputs, of
    ``sizes`` samples each, which an error names): agreement+min_cosine is the smaller of the top-1 agreement and
    the min cosine of the outputs after the logits (the agreement alone where there are none)."""
    if metric == "cosine":
        return quality.cosine_mean
    if metric == "min_cosine":
        return quality.cosine_min
    if quality.top1 is None:
        raise InputError(f"metric={metric!r} needs classifier logits: {not_logits(reference, sizes)}")
    others = quality.others_cosine_min
    return quality.top1 if metric == "agreement" or others is None else min(quality.top1, others)


def _sample_cosines(outs: list[torch.Tensor], ref: list[torch.Tensor], n: int) -> torch.Tensor:
    """Cosine per sample (``n``: the batch size) where a float output has the batch as its first dimension (an output
    without it joins every sample's row), else one per batch, over the
    float outputs flattened together, each output scaled to an energy of 1 per sample (by its reference's root mean
    square over the batch). Unscaled, a dense map 10⁴ times larger than the scores beside it hid scores of the wrong
    sign (cosine 1.0000) and the default budget held; scaled, each output weighs alike, and a near-zero value, of a
    score or of an all-zero row, still weighs little (a cosine per output would be a score's sign alone). An output
    whose values are below COSINE_FLOOR of the largest output's (zero up to rounding) is not scaled up beyond it:
    its rounding noise would weigh as much as the logits. An output all zero in the reference and not in the graph
    is then far off, as it is: its error is measured against that floor."""
    pairs = [(o.double(), r.double()) for o, r in zip(outs, ref) if r.is_floating_point()]
    if not pairs:  # integer outputs only: 1 where they match exactly
        return torch.tensor([float(all(torch.equal(o, r) for o, r in zip(outs, ref)))], dtype=torch.double)
    batched = [n > 0 and r.dim() > 0 and r.shape[0] == n and o.shape == r.shape for o, r in pairs]
    rows = n if any(batched) else 1
    # each output as rows (one per sample, or a single row for an output without the batch, which joins every
    # sample's: one cosine per batch hid a sample at 0.974 behind the batch's 0.995)
    flat = [(o.reshape(rows if each else 1, -1), r.reshape(rows if each else 1, -1))
            for (o, r), each in zip(pairs, batched)]
    # each output's root mean square per value (non-finite values left out), and the values of a sample's row
    typical = [float(torch.nan_to_num(b, posinf=0.0, neginf=0.0).pow(2).mean()) ** 0.5 if b.numel() else 0.0
               for _, b in flat]
    floor = COSINE_FLOOR * max(typical)
    parts = []
    for (a, b), rms in zip(flat, typical):
        per_sample_rms = max(rms, floor) * b.shape[1] ** 0.5
        scale = 1 / per_sample_rms if per_sample_rms > 0 else 1.0
        parts.append(_row_sums(a * scale, b * scale))
    # summed over the outputs, a single row's sums broadcast to every sample's (not copied: a [12, 197, 197] output
    # beside a batch of 128 took 3.5 GB)
    dot, norm_a, norm_b = (sum(part[k] for part in parts) for k in range(3))
    same, ok = (functools.reduce(torch.logical_and, [part[k] for part in parts]) for k in (3, 4))
    norms = (norm_a * norm_b).sqrt()
    cosines = torch.where(norms > 0, dot / norms.clamp(min=1e-300), same.double())
    return torch.where(ok, cosines, 0.0)


def _row_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of ``a`` and its reference ``b``: a·b, |a|², |b|², whether the rows are equal, and whether the row can
    be compared (else ``_sample_cosines`` gives it cosine 0). Non-finite values by verify's nonfinite_matched: where
    the reference has the same NaN or infinity, matched and left out; anywhere else the row is wholly wrong. A NaN of
    the reference made every row's cosine NaN → 0, the fp32 model's own score 0, and so any drop 0."""
    finite = torch.isfinite(b)
    ok = nonfinite_matched(a, b).all(1)
    a, b = torch.where(finite, a, 0.0), torch.where(finite, b, 0.0)
    return (a * b).sum(1), a.pow(2).sum(1), b.pow(2).sum(1), (a == b).all(dim=1), ok


def _top1(outs: list[list[torch.Tensor]], ref: list[list[torch.Tensor]], sizes: Sequence[int] = ()) -> float | None:
    """Top-1 agreement of the first output when it is 2-D float logits (rows of unit length are embeddings), or the
    share of equal class ids when it is a 1-D integer output (a model that returns its argmax)."""
    if not_logits(ref, sizes):
        return None
    if not ref[0][0].is_floating_point():
        hits = sum(int((o[0] == r[0]).sum()) if o[0].shape == r[0].shape else 0 for o, r in zip(outs, ref))
    else:
        hits = sum(int((o[0].argmax(1) == r[0].argmax(1)).sum()) for o, r in zip(outs, ref))
    return hits / sum(r[0].shape[0] for r in ref)


def not_logits(ref: list[list[torch.Tensor]], sizes: Sequence[int] = ()) -> str:
    """Why the first output of reference batches ``ref`` (of ``sizes`` samples each, where known) has no top-1
    agreement, in words; "" when it has one."""
    first = [r[0] for r in ref]
    if all(not r[0].is_floating_point() and not r[0].is_complex() and r[0].dim() == 1
           and not any(t.is_floating_point() for t in r) for r in ref):
        return ""  # class ids, and nothing else the budget could measure (counts beside features are no classes)
    if not all(r.is_floating_point() and r.dim() == 2 for r in first):
        return (f"the first output is {str(first[0].dtype).removeprefix('torch.')} of shape {list(first[0].shape)}, "
                "not 2-D float logits (batch × classes) or 1-D class ids")
    if any(n and r.shape[0] != n for r, n in zip(first, sizes)):  # [classes, batch]: the argmax ran over samples
        return "the first output's rows are not the batch's samples (its first dimension is not the batch size)"
    if any(r.shape[1] < 2 for r in first):
        return "the first output has one column: logits need two classes or more"
    if all(torch.allclose(r.double().norm(dim=1), torch.ones(r.shape[0], dtype=torch.double), atol=1e-3)
           for r in first):
        return "the first output's rows are unit vectors: embeddings, not logits"
    if sum(r.shape[0] for r in first) < EVIDENCE:
        return ""
    if all(bool(((r >= 0) & (r <= 1)).all()) for r in first) and not all(
            torch.allclose(r.double().sum(1), torch.ones(r.shape[0], dtype=torch.double), atol=1e-3) for r in first):
        # several labels near 1 tie for the top: a flip of one of them moved the argmax, one of another went unseen
        return ("the first output's values lie in [0, 1] and its rows do not sum to 1: independent probabilities "
                "(multi-label), not one class's logits")
    if len(set(torch.cat([r.argmax(1) for r in first]).tolist())) == 1:
        # a regression output whose first value is always the largest: agreement 1.0 whatever the error
        return ("the first output's largest column is the same on every validation sample: top-1 agreement would "
                "measure nothing (a regression output, or data of one class)")
    return ""
