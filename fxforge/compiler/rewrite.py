"""Declared rewrite rules: a pattern, a check returning a reason, and a replacement, side by side.

    rule = Rule("folded", pattern=op(*BATCH_NORM, op(*WEIGHTED, name="producer"), name="bn"),
                check=why_not, replace=fold)
    stats = apply_rules(gm, [rule])          # Counter: {"folded": 3, "skipped.training_mode": 1}

A pattern is a tree of :func:`op` nodes read upward from its root along data inputs (``ops.data``; with
``either_operand`` along whichever operand of a binary op matches). Each names an op *family*, so the ATen forms
of one op match alike (``aten.hardtanh`` and ``aten.relu6``; ``aten.batch_norm`` and
``aten._native_batch_norm_legit_no_training``), which torch.fx's ``subgraph_rewriter`` (one traced form per
pattern) cannot express. ``where`` adds a structural condition; ``sole_user`` requires the node to feed only
its parent in the pattern. A node that does not fit the pattern is not this rule's business and is not
counted; a sub-pattern with ``refusal="reason"`` (or ``sole_user="reason"``) turns that miss into a counted
refusal, as does a check returning a reason. Rules are tried in order on every node; the first that matches
and passes its check rewrites it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from .ops import data, is_op, operands

Match = dict[str, fx.Node]


@dataclass(frozen=True)
class Pattern:
    """A node calling one of ``ops``, whose data input matches ``input`` (anything when None)."""

    ops: tuple[Any, ...]
    input: Pattern | None = None
    name: str | None = None
    where: Callable[[fx.Node], bool] | None = None
    sole_user: bool | str = False
    refusal: str | None = None
    either_operand: bool = False


def op(*ops: Any, input: Pattern | None = None, name: str | None = None, where: Callable[[fx.Node], bool] | None = None,
       sole_user: bool | str = False, refusal: str | None = None, either_operand: bool = False) -> Pattern:
    """A pattern node; ``op(*ACTIVATION, op(*WEIGHTED, name="producer"))`` reads activation(producer(·)): a
    Pattern after the ops is the data input's pattern."""
    if ops and isinstance(ops[-1], Pattern):
        ops, input = ops[:-1], ops[-1]
    return Pattern(tuple(ops), input, name, where, sole_user, refusal, either_operand)


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _match(p: Pattern, node: Any, parent: fx.Node | None, order: dict[fx.Node, int], out: Match) -> bool:
    if not is_op(node, *p.ops) or (p.where is not None and not p.where(node)):
        if p.refusal and parent is not None:
            raise _Refused(p.refusal)
        return False
    if p.sole_user and parent is not None and set(node.users) != {parent}:
        if isinstance(p.sole_user, str):
            raise _Refused(p.sole_user)
        return False
    if p.input is not None:
        candidates = sorted(operands(node), key=lambda n: order.get(n, -1)) if p.either_operand else [data(node)]
        for candidate in candidates:
            trial: Match = {}
            try:
                if _match(p.input, candidate, node, order, trial):
                    out.update(trial)
                    break
            except _Refused:
                if candidate is candidates[-1]:
                    raise
        else:
            return False
    if p.name:
        out[p.name] = node
    return True


def match(pattern: Pattern, node: fx.Node, order: dict[fx.Node, int] | None = None) -> Match | str | None:
    """The nodes ``pattern`` binds when rooted at ``node``; a refusal reason; or None when it does not fit."""
    out: Match = {}
    try:
        return out if _match(pattern, node, None, order or {}, out) else None
    except _Refused as r:
        return r.reason


@dataclass(frozen=True)
class Rule:
    """``name`` counts the rewrites; ``check(gm, match)`` returns why not (or None); ``replace`` rewrites."""

    name: str | Callable[[Match], str]
    pattern: Pattern
    replace: Callable[[fx.GraphModule, Match], None]
    check: Callable[[fx.GraphModule, Match], str | None] = field(default=lambda gm, m: None)

    def stat(self, m: Match) -> str:
        return self.name(m) if callable(self.name) else self.name


def apply_rules(gm: fx.GraphModule, rules: list[Rule], roots: list[fx.Node] | None = None) -> Counter:
    """Try ``rules`` in order on every node (or on ``roots``); the first fitting rule whose check passes
    rewrites. Returns rewrites per rule name and refusals as ``skipped.<reason>``."""
    stats: Counter = Counter()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(roots if roots is not None else gm.graph.nodes):
        for rule in rules:
            m = match(rule.pattern, node, order)
            if m is None:
                continue
            reason = m if isinstance(m, str) else rule.check(gm, m)
            if reason:
                stats[f"skipped.{reason}"] += 1
            else:
                rule.replace(gm, m)
                stats[rule.stat(m)] += 1
            break
    return stats
