"""Latency: the median wall time of repeated calls. The one place fxforge times a model, a stage or a layer."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch


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
