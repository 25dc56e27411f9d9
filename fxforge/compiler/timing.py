"""Latency: the median wall time of repeated calls. The one place fxforge times a model, a stage or a layer."""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

K = TypeVar("K")


def measure_latency(fn: Callable[..., Any], inputs: Sequence[Any], budget_s: float = 0.5,
                    min_runs: int = 3, max_runs: int = 20) -> float:
    """Median wall time of ``fn(*inputs)`` in milliseconds after one warm-up run."""
    times: list[float] = []
    with torch.inference_mode():
        fn(*inputs)
        deadline = time.perf_counter() + budget_s
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
            start = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def paired_ratio(new: Callable[[], Any], old: Callable[[], Any], rounds: int = 3) -> float:
    """The median over ``rounds`` of ``new``'s time over ``old``'s, the two timed back to back in each round (short
    samples of :func:`measure_latency`): load that comes and goes slows both of a round alike, and one lucky round
    cannot decide (where the best of each side alone let it: a split timed 0.68× its layer in one timing cache,
    1.01–1.08× in three others)."""
    ratios = []
    for _ in range(rounds):
        before = measure_latency(old, (), budget_s=0.02)
        ratios.append(measure_latency(new, (), budget_s=0.02) / before)
    return statistics.median(ratios)


def interleaved_latency(runners: Mapping[K, Callable[[], Any]], rounds: int, sample_ms: float = 20.0,
                        pause_s: float = 0.0,
                        rebuild: Mapping[K, Callable[[], Callable[[], Any]]] | None = None,
                        settled: Callable[[dict[K, list[float]]], bool] | None = None,
                        max_rounds: int = 0) -> dict[K, list[float]]:
    """Per-call wall times (ms) of several systems timed in turn, for ratios that load drifting does not skew.

    Each of ``rounds`` rounds times every runner once, in the order :func:`rotation` gives (so no system always
    runs first or right after the same neighbour). A sample is the mean of as many calls as fill about
    ``sample_ms`` (calibrated on one call after a warm-up), which keeps sub-millisecond models above the timer's
    resolution. ``pause_s`` sleeps before each sample, letting the previous system's thread pool stop spinning.

    ``rebuild`` maps systems to a factory of a fresh runner (e.g. a new ONNX Runtime session): such a system is
    timed each round on a runner built just before its sample (then warmed by a quarter of a sample's calls, at
    least one: a fresh session's first calls still grow its memory arena and wake its thread pool) and dropped
    right after it, so that every system's sample is taken on a runner built last, whatever order the systems were built in
    (ORT sessions built later in one process ran slower than earlier ones of the identical graph).

    ``settled`` (given the samples so far) lets the timing go on past ``rounds``, one round at a time up to
    ``max_rounds``, until it returns True: a run whose rounds spread too widely to resolve a ratio (a stall in
    one round of seven decides a 90 % interval of seven) takes the rounds that narrow it instead of saying so."""
    names = list(runners)
    rebuild = rebuild or {}
    samples: dict[K, list[float]] = {n: [] for n in names}
    if not names:
        return samples
    with torch.inference_mode():
        calls = {n: _calls_per_sample(runners[n], sample_ms) for n in names}
        r = 0
        while r < rounds or (settled is not None and r < max_rounds and not settled(samples)):
            for name in rotation(names, r):
                run = runners[name]
                if name in rebuild:
                    run = rebuild[name]()
                    for _ in range(max(1, calls[name] // 4)):  # warm-up of the fresh runner
                        run()
                time.sleep(pause_s)
                start = time.perf_counter()
                for _ in range(calls[name]):
                    run()
                samples[name].append((time.perf_counter() - start) * 1e3 / calls[name])
                del run  # a rebuilt runner is released before the next system's sample
            r += 1
    return samples


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two systems' samples taken in the same rounds of :func:`interleaved_latency`.

    Why paired: load that drifts between rounds slows both samples of a round alike and cancels in their ratio,
    while it spreads each system's own samples over the rounds."""
    return [a / b for a, b in zip(numerator, denominator)]


def median_interval(values: Sequence[float], coverage: float = 0.9) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free confidence interval for it: (median, low, high).

    The interval is [x₍ₖ₎, x₍ₙ₋ₖ₊₁₎] of the sorted values, with the largest k whose coverage
    1 − 2·P(Binomial(n, ½) ≤ k − 1) is at least ``coverage`` (no normality assumed: timings are skewed by
    stalls). With too few values for that coverage it is the full range, x₍₁₎ to x₍ₙ₎ (7 values give 98 %,
    9 give 96 % at k = 2)."""
    xs = sorted(values)
    n = len(xs)
    k = 1
    def covers(k: int) -> bool:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n >= coverage
    while k < (n + 1) // 2 and covers(k + 1):
        k += 1
    return statistics.median(xs), xs[k - 1], xs[n - k]


def rotation(names: Sequence[K], r: int) -> list[K]:
    """Round ``r``'s order: ``names`` starting ``r`` places later (wrapping around)."""
    k = r % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def _calls_per_sample(run: Callable[[], Any], sample_ms: float) -> int:
    run()  # warm-up
    start = time.perf_counter()
    run()
    once = (time.perf_counter() - start) * 1e3
    return max(1, min(50, round(sample_ms / max(once, 1e-3))))


@contextlib.contextmanager
def faster_threads(probe: Callable[[], Any], threads: int = 0, rounds: int = 2) -> Iterator[int]:
    """Run the body on the faster of 1 thread and PyTorch's count for repeated calls like ``probe``; yields the count.

    ``probe`` runs ``rounds`` times on each count, alternately, before the body, and the faster count (best time)
    is kept until the body ends; then the caller's count is restored. Why: a call of many small ops (a training
    step, a model run on small inputs) on a machine whose cores are busy with other work waits, in every OpenMP
    parallel region, for its slowest thread (measured on the wide digits CNN, 2 cores under load: 40
    distillation steps took 100–120 s on 2 threads, 3.5–4.6 s on 1), while an idle many-core machine runs large
    calls faster on all. ``threads`` > 0 fixes the count instead, unprobed (float sums can round differently on
    another count: a run that must repeat bit for bit fixes it)."""
    before = torch.get_num_threads()
    chosen = threads or before
    try:  # the probe too: an error or Ctrl-C in it left the caller's process on 1 thread
        if not threads and before > 1:
            timed: dict[int, list[float]] = {1: [], before: []}
            for _ in range(rounds):
                for n, times in timed.items():
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    probe()
                    times.append(time.perf_counter() - start)
            chosen = min(timed, key=lambda n: min(timed[n]))
        torch.set_num_threads(chosen)
        yield chosen
    finally:
        torch.set_num_threads(before)
