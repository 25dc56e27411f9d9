"""lib/goals.py: a pass's flops/latency goal, and the search that meets a latency goal as measured."""
from collections import Counter

import pytest
import torch
from torch import nn

from fxforge.compiler.errors import PassError
from fxforge.compiler.target import get_target
from fxforge.passes.lib import goals
from fxforge.passes.lib.goals import Goal, meet_measured


def test_a_pass_takes_one_goal_and_names_its_stats():
    assert Goal.of(None, None) is None and Goal.of(0.5, None) == Goal("flops", 0.5)
    assert Goal("latency", 0.7).stat("skipped.goal_unreachable") == "skipped.latency_goal_unreachable"
    assert Goal("flops", 0.7).stat("reachable") == "flops_reachable"
    with pytest.raises(PassError, match="two goals"):
        Goal.of(0.5, 0.5)
    with pytest.raises(PassError, match=r"low_rank\{latency=0.7\} times layers on this machine"):
        Goal("latency", 0.7).check_target("low_rank", get_target("arm64"))


def search(measured: dict[str, float], plans: dict[float, str], first: str, goal: float = 0.85):
    """meet_measured over made-up plans: ``plans`` maps the saving asked for (rounded) to a plan's name, and each
    plan's graph measures ``measured[name]`` of the input (10 ms, so a fraction f more is 10 f ms more)."""
    stats: Counter = Counter()
    timed = []

    def plan_for(need: float) -> str | None:
        return plans.get(round(need, 6))

    def fraction(before, after, inputs) -> float:
        return measured[timed[-1]]

    old = goals.measured_fraction
    goals.measured_fraction = fraction
    try:
        chosen = meet_measured(Goal("latency", goal), 10.0, 1.5, plan_for, lambda plan, copy: timed.append(plan),
                               nn.Identity(), (torch.ones(1),), first, stats)
    finally:
        goals.measured_fraction = old
    return chosen, timed, dict(stats)


def test_a_plan_measured_short_of_the_goal_is_followed_by_one_asked_for_the_shortfall_more():
    """Before: plan A (1.5 ms asked) measures 0.90 of the input: 0.05 short of 0.85, so 2.0 ms are asked; plan B
    measures 0.82, within the goal and within 0.05 of it. Expected: B, two plans timed."""
    chosen, timed, stats = search({"A": 0.90, "B": 0.82}, {2.0: "B"}, "A")
    assert chosen == "B" and timed == ["A", "B"]
    assert stats == {"latency.plans_timed": 2, "latency.model": 0.82}


def test_the_search_ends_where_it_comes_back_to_a_plan_it_timed():
    """Before: A measures 0.90 (short: 2.0 ms asked), B then 0.70 (0.15 past the goal: 0.5 ms asked), which plans A
    again. Expected: A not timed again; B kept, the only plan within the goal."""
    chosen, timed, stats = search({"A": 0.90, "B": 0.70}, {2.0: "B", 0.5: "A"}, "A")
    assert chosen == "B" and timed == ["A", "B"] and stats["latency.model"] == 0.70


def test_no_plan_within_the_goal_as_measured_is_no_choice_and_says_how_near_it_came():
    chosen, timed, stats = search({"A": 0.95, "B": 0.91}, {2.5: "B"}, "A")
    assert chosen is None and timed == ["A", "B"]
    assert stats == {"latency.plans_timed": 2, "skipped.latency_goal_missed_measured": 1, "latency_measured": 0.91}
