"""compiler/timing.py: the interleaved schedule (order rotated per round, calls batched per sample), and the thread
count chosen for repeated work."""
import time

import pytest
import torch

from fxforge.compiler.timing import (faster_threads, interleaved_latency, measure_latency, median_interval,
                                    paired_ratios, rotation)


def test_interleaved_rounds_rotate_the_order_and_batch_calls_per_sample():
    log: list[str] = []
    runners = {name: (lambda name=name: log.append(name)) for name in "abc"}
    samples = interleaved_latency(runners, rounds=3, sample_ms=0)  # 0 ms: one call per sample
    assert {n: len(t) for n, t in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for times in samples.values() for t in times)
    # two warm-up/calibration calls each, then rounds starting one system later each time
    assert log == ["a", "a", "b", "b", "c", "c"] + list("abc") + list("bca") + list("cab")


def test_rebuilt_systems_are_timed_on_a_runner_built_just_before_their_sample_and_released_after():
    log: list[str] = []

    class Session:
        """A runner that logs its calls and its release, numbered by build."""
        built = 0

        def __init__(self, name):
            Session.built += 1
            self.tag = f"{name}{Session.built}"
            log.append(f"build {self.tag}")

        def __call__(self):
            log.append(self.tag)

        def __del__(self):
            log.append(f"free {self.tag}")

    runners = {"a": lambda: log.append("a0"), "b": lambda: log.append("b0")}
    samples = interleaved_latency(runners, rounds=2, sample_ms=0, rebuild={"b": lambda: Session("b")})
    assert {n: len(t) for n, t in samples.items()} == {"a": 2, "b": 2}
    assert log == ["a0", "a0", "b0", "b0",                      # calibration on the runners as built
                   "a0", "build b1", "b1", "b1", "free b1",     # round 0: warm-up and sample on a fresh b
                   "build b2", "b2", "b2", "free b2", "a0"]     # round 1 starts at b, again fresh


def test_rounds_go_on_past_the_minimum_until_settled_or_the_cap():
    runners = {"a": lambda: None, "b": lambda: None}
    seen: list[int] = []

    def settled_at(n):
        def settled(samples):
            seen.append(len(samples["a"]))
            assert len(samples["a"]) == len(samples["b"])  # asked between whole rounds only
            return len(samples["a"]) >= n
        return settled
    assert len(interleaved_latency(runners, rounds=3, sample_ms=0, settled=settled_at(5), max_rounds=9)["a"]) == 5
    assert seen == [3, 4, 5]  # not asked before the minimum
    assert len(interleaved_latency(runners, rounds=3, sample_ms=0, settled=settled_at(99), max_rounds=6)["b"]) == 6
    assert len(interleaved_latency(runners, rounds=3, sample_ms=0, settled=settled_at(0), max_rounds=9)["a"]) == 3
    assert len(interleaved_latency(runners, rounds=3, sample_ms=0)["a"]) == 3  # no predicate: exactly ``rounds``


def test_rotation_starts_one_later_each_round():
    assert [rotation("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert rotation([], 3) == []


def test_calls_per_sample_fill_the_sample_time():
    calls: list[int] = []
    samples = interleaved_latency({"x": lambda: calls.append(1)}, rounds=2, sample_ms=5.0)
    assert len(samples["x"]) == 2 and len(calls) == 2 + 2 * 50  # a call far below 5 ms: the cap of 50 per sample


def test_interleaved_with_no_runner_times_nothing():
    assert interleaved_latency({}, rounds=5) == {}


def test_measure_latency_is_a_median_of_at_least_min_runs():
    calls: list[int] = []
    assert measure_latency(lambda: calls.append(1), (), budget_s=0.0, min_runs=3) >= 0
    assert len(calls) == 1 + 3


@pytest.mark.parametrize("slow_on", [1, 2])
def test_faster_threads_probes_both_counts_keeps_the_faster_and_restores(slow_on):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []

    def probe():  # 20 ms on the slow count, nothing on the other
        seen.append(torch.get_num_threads())
        time.sleep(0.02 if seen[-1] == slow_on else 0.0)

    try:
        with faster_threads(probe) as threads:
            assert threads == torch.get_num_threads() == 3 - slow_on
        assert seen == [1, 2, 1, 2] and torch.get_num_threads() == 2
        with faster_threads(probe, threads=1) as threads:  # a fixed count is not probed
            assert threads == torch.get_num_threads() == 1
        assert len(seen) == 4 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_faster_threads_restores_the_count_when_the_probe_is_interrupted():
    """An error or Ctrl-C while probing (the sensitivity analysis, distill) left the caller's process on 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def probe():
        if torch.get_num_threads() == 1:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            with faster_threads(probe):
                pass
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n, low, high", [(3, 1, 3), (7, 1, 7), (9, 2, 8), (11, 3, 9), (21, 7, 15)])
def test_the_median_interval_is_the_widest_order_statistics_pair_needed_for_90_percent(n, low, high):
    # [x(k), x(n-k+1)] covers the median with probability 1 - 2 P(Bin(n, 1/2) <= k-1): n=9, k=2: 96 %; k=3: 82 %
    values = [float(v) for v in range(n, 0, -1)]  # order does not matter
    assert median_interval(values) == ((n + 1) / 2, low, high)


def test_paired_ratios_cancel_load_that_drifts_between_rounds():
    load = [1.0, 1.6, 0.9, 2.5, 1.1, 1.3, 1.0]  # a machine slowing and recovering between rounds
    a = [10.0 * f for f in load]
    b = [12.0 * f for f in load]  # b is 1.2x slower in every round
    ratio, low, high = median_interval(paired_ratios(b, a))
    assert ratio == pytest.approx(1.2) and high - low == pytest.approx(0)
    assert max(a) / min(a) > 2.5  # each system's own samples spread over 2.7x
