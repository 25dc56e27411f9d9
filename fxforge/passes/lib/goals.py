"""The global goal of the passes that choose per layer (low_rank, depthwise_separable, prune_channels).

``flops=f``: at most f of the pass's input FLOPs (counted, so a plan meets it exactly). ``latency=f``: at most f
of the input graph's latency, measured on this machine, which must therefore be the target's CPU. Each
candidate's saving is its layers' time before and after, timed on their recorded inputs in PyTorch (the ratios
cached per target, compiler/cache.py) and summed first order, against the whole graph's measured time. Layer
savings do not add up to the graph's (the ops between the layers shrink too; the graph's time drifts with the
machine's state), so :func:`meet_measured` applies each plan to a copy and times it against the input,
interleaved, and plans again for the measured shortfall or excess: the goal holds as measured
(``latency.model``), not only as predicted (``latency.planned``). The layers are timed in PyTorch whatever the
backend: a proxy for its kernels, as ``low_rank{budget='latency'}`` is.
"""
from __future__ import annotations

import copy
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, TypeVar

import torch
import torch.fx as fx

from fxforge.compiler.errors import PassError
from fxforge.compiler.target import Target
from fxforge.compiler.timing import interleaved_latency, measure_latency, paired_ratios

ROUNDS = 7  # interleaved rounds timing the whole graph before and after a latency goal's plan
TRIES = 4  # plans a latency goal applies and times at most
CLOSE = 0.05  # a measured fraction this far below the goal, or nearer, ends the search
C = TypeVar("C")


@dataclass(frozen=True)
class Goal:
    """At most ``fraction`` of the input graph's FLOPs or latency (``kind``)."""

    kind: Literal["flops", "latency"]
    fraction: float

    @staticmethod
    def of(flops: float | None, latency: float | None) -> Goal | None:
        """The goal a pass's ``flops`` and ``latency`` options set (one at most), or None."""
        if flops is not None and latency is not None:
            raise PassError(f"flops={flops!r} and latency={latency!r} are two goals: give one")
        return Goal("flops", flops) if flops is not None else Goal("latency", latency) if latency is not None \
            else None

    @property
    def timed(self) -> bool:
        return self.kind == "latency"

    def stat(self, what: str) -> str:
        """A stats key of this goal: ``flops_reachable``, ``skipped.latency_goal_unreachable``, ..."""
        prefix, _, rest = what.rpartition(".")
        return f"{prefix + '.' if prefix else ''}{self.kind}_{rest}"

    def check_target(self, owner: str, target: Target) -> None:
        """A latency goal is measured here: refuse a target whose CPU is elsewhere (FLOPs need no machine)."""
        if self.timed and not target.runs_on_host:
            raise PassError(f"{owner}{{latency={self.fraction}}} times layers on this machine, and target "
                            f"{target.name!r} runs on another CPU: give flops= instead")


def graph_ms(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> float:
    """The graph's median latency on ``inputs`` in ms, in PyTorch on this machine: what layer savings are of."""
    return measure_latency(gm, inputs)


def meet_measured(aim: Goal, total: float, need: float, plan_for: Callable[[float], C | None],
                  trial: Callable[[C, fx.GraphModule], None], gm: fx.GraphModule, inputs: Sequence[torch.Tensor],
                  chosen: C, stats: Counter) -> C | None:
    """The choice, among plans for ``need`` and needs corrected by measurement, whose graph measures at most
    ``aim.fraction`` of ``gm``'s time and nearest it (the least change that meets the goal), or None (counted:
    ``skipped.latency_goal_missed_measured`` and the best ``latency_measured``).

    ``chosen`` is the plan for ``need`` (``total`` × (1 − fraction) in the plan's own units, its layers' summed
    savings); ``trial(choice, copy)`` applies a choice to a copy of ``gm``, which is timed against ``gm``
    (:func:`measured_fraction`). While the measured fraction misses the goal, or passes it by more than ``CLOSE``,
    ``plan_for`` is asked for the difference more or less (``TRIES`` plans at most; the search ends where it
    comes back to a plan it timed)."""
    measured: list[float] = []
    timed: list[C] = []
    met: tuple[float, C] | None = None
    for _ in range(TRIES):
        after = copy.deepcopy(gm)
        trial(chosen, after)
        fraction = measured_fraction(gm, after, inputs)
        measured.append(fraction)
        timed.append(chosen)
        if fraction <= aim.fraction and (met is None or fraction > met[0]):
            met = (fraction, chosen)
        if aim.fraction - CLOSE <= fraction <= aim.fraction:
            break
        need += (fraction - aim.fraction) * total
        nxt = plan_for(need) if need > 0 else None
        if nxt is None or nxt in timed:  # a plan timed already (the search went back and forth) says nothing new
            break
        chosen = nxt
    stats["latency.plans_timed"] = len(measured)
    if met is None:
        stats["skipped.latency_goal_missed_measured"] = 1
        stats["latency_measured"] = min(measured)
        return None
    stats["latency.model"] = met[0]
    return met[1]


def measured_fraction(before: fx.GraphModule, after: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> float:
    """``after``'s latency as a fraction of ``before``'s: the median of their per-round ratios, the two timed in
    interleaved rounds (compiler/timing.py), so load that drifts slows both alike."""
    samples = interleaved_latency({"before": lambda: before(*inputs), "after": lambda: after(*inputs)}, ROUNDS)
    return round(statistics.median(paired_ratios(samples["after"], samples["before"])), 4)
