"""What the factorization passes (low_rank, depthwise_separable) share: rank choice, stages, error, timing; and
low_rank's two splits of a weight into stages (SVD, Tucker-2).

A factorized layer is a chain of *stages* replacing one conv or linear node. Each stage is a weight and
whether it keeps the layer's geometry (the k×k conv with the original stride, padding and dilation) or is a
plain 1×1 conv / linear; the last stage carries the bias. The same stage list is emitted into the graph and
evaluated on recorded inputs, so the error a pass reports is the error of exactly what it inserted.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Flops
from fxforge.compiler.cache import cached_timing
from fxforge.compiler.errors import PassError, missing_calibration
from fxforge.compiler.graph import add_tensor, finalize, get_tensor, readers
from fxforge.compiler.ops import LINEAR, aten, bias_of, conv_geometry, conv_groups, data, is_op, value_of, weight_of
from fxforge.compiler.pass_manager import Pass, PassContext
from fxforge.compiler.target import Target
from fxforge.compiler.timing import measure_latency, paired_ratio
from fxforge.compiler.verify import compare, fresh_inputs, run_recording

from ..analysis.sensitivity import give_back, layer_sensitivity, plan, summed_damage
from .goals import Goal, graph_ms, meet_measured
from .qdq import checked_batches

Rank = Callable[[torch.Tensor, tuple[int, ...]], int]  # a matrix's singular values (descending), its shape → rank kept
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
FASTER = 0.9  # a timed split is taken where it takes at most this share of the original layer's time
SVD_MEMO_BYTES = 1 << 30  # what memoized_svds keeps at most: matrices and their decompositions
# within memoized_svds: [bytes still free, [(matrix, (u, s, vh)), ...]]
_SVDS: ContextVar[list | None] = ContextVar("fxforge_svds", default=None)


@dataclass(frozen=True)
class Stage:
    weight: torch.Tensor
    spatial: bool = False  # True: the original layer's stride/padding/dilation; False: a 1×1 conv or linear
    groups: int = 1

    def __post_init__(self) -> None:  # strided factors would make the layer's output strided too
        object.__setattr__(self, "weight", self.weight.contiguous())


def splittable(gm: fx.GraphModule, nodes: Sequence[fx.Node], stats: Counter) -> list[fx.Node]:
    """``nodes`` without the layers whose weight another call reads too (a layer called twice, tied weights),
    counted as ``skipped.shared_weight``: a split per call gave each call its own factors, so the tie broke and the
    "compressed" model grew (a 64×64 layer called twice: 4096 weights → 6656)."""
    kept = [n for n in nodes if readers(gm, weight_of(n)) <= 1]
    if len(kept) < len(nodes):
        stats["skipped.shared_weight"] += len(nodes) - len(kept)
    return kept


@contextmanager
def memoized_svds() -> Iterator[None]:
    """Within it, :func:`svd` of a matrix equal to one it decomposed before returns that decomposition (while
    ``SVD_MEMO_BYTES`` hold them): a pass weighing several ranks per layer decomposes each weight once, where it
    did so once per rank weighed and again per sensitivity run (r3d_18 under ``plan_splits``: 162 decompositions,
    31 s, of its weights)."""
    token = _SVDS.set([SVD_MEMO_BYTES, []])
    try:
        yield
    finally:
        _SVDS.reset(token)


def svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(u, s, vh)`` of a (batch of) float64 matrix, descending, via the smaller Gram matrix.

    eigh of M·Mᵀ is ~20× faster than LAPACK's SVD on a wide conv weight (512 × 4608) on a CPU, and in float64
    it resolves singular values down to ~1e-8·σ₀, far below what a float32 weight can hold.
    """
    memo = _SVDS.get()
    if memo is not None:
        for seen, known in memo[1]:  # a few values first: two weights of one shape differ there, at no full compare
            if seen.shape == mat.shape and torch.equal(seen.reshape(-1)[:64], mat.reshape(-1)[:64]) and \
                    torch.equal(seen, mat):
                return known
    wide = mat.shape[-2] <= mat.shape[-1]
    a = mat if wide else mat.transpose(-1, -2)
    evals, evecs = torch.linalg.eigh(a @ a.transpose(-1, -2))
    s = evals.flip(-1).clamp_min(0).sqrt()
    evecs = evecs.flip(-1)
    other = (a.transpose(-1, -2) @ evecs) / torch.where(s > 0, s, 1.0).unsqueeze(-2)
    result = (evecs, s, other.transpose(-1, -2)) if wide else (other, s, evecs.transpose(-1, -2))
    if memo is not None and (size := sum(t.nbytes for t in (mat, *result))) <= memo[0]:
        memo[0] -= size
        memo[1].append((mat, result))
    return result


def check_fraction(name: str, value: float | None) -> None:
    """Options such as energy and rank_ratio are fractions in (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise PassError(f"{name} must be in (0, 1], got {value!r}")


def energy_rank(s: torch.Tensor, energy: float, shape: Sequence[int]) -> int:
    """Fewest leading singular values of ``s`` (descending) whose squares hold ``energy`` of the total.

    energy=1.0 is the numerical rank of a float32 matrix of ``shape``: values above σ₀·max(shape)·eps.
    """
    if energy >= 1.0:
        return max(1, int((s > s[0] * max(shape) * FLOAT32_EPS).sum()))
    cum = torch.cumsum(s.double() ** 2, 0)
    return max(1, int(torch.searchsorted(cum, energy * cum[-1])) + 1)


def ratio_rank(ratio: float, full: int) -> int:
    return max(1, math.ceil(ratio * full))


def svd_split(w: torch.Tensor, rank: Rank) -> list[Stage] | str:
    """low_rank's SVD split of ``w`` (m × n·k²): a (k×k conv | linear) n → r then a (1×1 conv | linear) r → m,
    A·B = U_r √S_r · √S_r V_rᵀ; or why not (``rank_too_high``: r(m + n) MACs no fewer than mn)."""
    m = w.shape[0]
    mat = w.reshape(m, -1).double()
    n = mat.shape[1]
    u, s, vh = svd(mat)
    r = rank(s, (m, n))
    if r * (m + n) >= m * n:
        return "rank_too_high"
    root = s[:r].sqrt()
    first = (root[:, None] * vh[:r]).reshape(r, *w.shape[1:])
    second = (u[:, :r] * root).reshape(m, r, *[1] * (w.dim() - 2))
    return [Stage(first.to(w.dtype), spatial=True), Stage(second.to(w.dtype))]


def tucker2_split(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rank: Rank) -> list[Stage] | str:
    """low_rank's Tucker-2 split of the conv weight ``w`` (HOSVD) on its input ``x`` and output ``y``: 1×1 conv
    n → r_in, k×k core conv r_in → r_out, 1×1 conv r_out → m; or why not (``not_cheaper`` in FLOPs)."""
    m, n, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
    wd = w.double()
    u_out, s_out, _ = svd(wd.reshape(m, -1))
    u_in, s_in, _ = svd(wd.transpose(0, 1).reshape(n, -1))
    r_out, r_in = rank(s_out, (m, n * k)), rank(s_in, (n, m * k))
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    pixels_in, pixels_out = math.prod(x.shape[2:]), math.prod(y.shape[2:])
    if pixels_in * n * r_in + pixels_out * (r_out * r_in * k + r_out * m) >= pixels_out * m * n * k:
        return "not_cheaper"
    core = torch.einsum("ab...,ac,bd->cd...", wd, u_out, u_in)
    ones = [1] * (w.dim() - 2)
    return [Stage(u_in.T.reshape(r_in, n, *ones).to(w.dtype)), Stage(core.to(w.dtype), spatial=True),
            Stage(u_out.reshape(m, r_out, *ones).to(w.dtype))]


def stage_call(node: fx.Node, geom: tuple, x: Any, weight: Any, stage: Stage, bias: Any) -> tuple[Any, tuple]:
    """(target, args) computing ``stage`` of ``node`` on ``x`` with ``weight`` (fx nodes or tensors alike)."""
    if is_op(node, aten.linear):
        return aten.linear.default, (x, weight, bias)
    if stage.spatial:
        return node.target, (x, weight, bias, *geom, stage.groups)
    return node.target.overloadpacket.default, (x, weight, bias)


def run_stages(node: fx.Node, x: torch.Tensor, stages: Sequence[Stage], bias: torch.Tensor | None) -> torch.Tensor:
    """Evaluate the factorized layer on a tensor."""
    geom = conv_geometry(node)
    with torch.no_grad():
        for i, st in enumerate(stages):
            target, args = stage_call(node, geom, x, st.weight, st, bias if i == len(stages) - 1 else None)
            x = target(*args)
    return x


def run_original(node: fx.Node, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    groups = () if is_op(node, *LINEAR) else (conv_groups(node),)
    with torch.no_grad():
        return node.target(x, weight, bias, *conv_geometry(node), *groups)


def factorized(node: fx.Node, stages: list[Stage] | str) -> Callable[[list, dict], torch.Tensor] | str:
    """The layer function computing ``stages`` in place of ``node`` (or the refusal, passed through)."""
    if isinstance(stages, str):
        return stages
    return lambda args, kwargs: run_stages(node, value_of(node, args, kwargs, "input"), stages,
                                           value_of(node, args, kwargs, "bias"))


def split_layers(gm: fx.GraphModule, layers: Sequence[str], rules: dict[str, Pass] | None, own: Pass,
                 split: Callable[[fx.GraphModule, fx.Node, Pass, Counter], str | None], stats: Counter) -> None:
    """Split the ``layers`` (names) of ``gm``, the pass's graph or a copy a latency goal times, each by its rule
    (``own``, the pass, where ``rules`` is None; a layer with no rule is ``skipped.not_chosen``):
    ``split(gm, node, rule, stats)`` returns None when it split the layer, else why not, counted."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in layers:
        rule = own if rules is None else rules.get(name)
        reason = split(gm, nodes[name], rule, stats) if rule is not None else "not_chosen"
        stats["split" if reason is None else f"skipped.{reason}"] += 1
    if stats.get("split"):
        finalize(gm)


def emit_stages(gm: fx.GraphModule, node: fx.Node, stages: Sequence[Stage]) -> None:
    """Rewrite ``node`` in place into the last stage, inserting the earlier stages before it.

    The node keeps its name, users and meta (fusion tags, the output shape), so later passes and the
    backends see the same layer, now fed by a thinner one.
    """
    x, bias, geom = data(node), bias_of(node), conv_geometry(node)
    for i, st in enumerate(stages):
        w = add_tensor(gm, node, f"{node.name}_factor{i}", st.weight)
        last = i == len(stages) - 1
        target, args = stage_call(node, geom, x, w, st, bias if last else None)
        if last:
            node.target, node.args, node.kwargs = target, args, {}
        else:
            with gm.graph.inserting_before(node):
                x = gm.graph.create_node("call_function", target, args, name=f"{node.name}_stage{i}")


class Recording:
    """The inputs and outputs of every node on fresh random inputs: what layer errors are measured on."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
        self.inputs = fresh_inputs(example_inputs)
        self.output, self.values = run_recording(gm, self.inputs)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.values.update({p.name: t for p, t in zip(placeholders, self.inputs)})
        self.gm = gm

    def value(self, node: Any) -> torch.Tensor | None:
        if not isinstance(node, fx.Node):
            return None
        return self.values.get(node.name, get_tensor(self.gm, node))

    def model_error(self, gm: fx.GraphModule) -> float:
        """Relative output error of ``gm`` (rewritten) against the recorded outputs."""
        with torch.no_grad():
            return compare(list(gm(*self.inputs)), list(self.output)).max_rel


def layer_error(node: fx.Node, x: torch.Tensor, y: torch.Tensor, stages: Sequence[Stage],
                bias: torch.Tensor | None) -> float:
    """Relative output error (max|Δ| / max|y|) of the factorized layer on its recorded input."""
    return compare([run_stages(node, x, stages, bias)], [y]).max_rel


def split_ratio(node: fx.Node, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stages: Sequence[Stage], target: Target) -> float:
    """The factorized layer's time over the original's on its recorded input (``timing.paired_ratio``). Timings
    depend on shapes only: they are kept per target (compiler/cache.py), so a recompile reads them instead of
    timing again."""
    shape = [str(node.target), tuple(x.shape), tuple(weight.shape), bias is not None, conv_geometry(node),
             conv_groups(node), [(tuple(st.weight.shape), st.spatial, st.groups) for st in stages], str(x.dtype)]
    timing = cached_timing(target, repr(shape), lambda: {"ratio": paired_ratio(
        lambda: run_stages(node, x, stages, bias), lambda: run_original(node, x, weight, bias))})
    return timing["ratio"] if "ratio" in timing else timing["split_ms"] / timing["original_ms"]  # an older cache


def faster_on_host(node: fx.Node, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stages: Sequence[Stage], target: Target) -> bool:
    """Whether the factorized layer times faster than the original (:func:`split_ratio`) by a margin: at most
    ``FASTER`` of the original's time. The margin keeps the noise between the two from deciding where they time
    alike (a rank-½ split of a linear timed 0.97–1.03× the original: one seed gave three different `compress`
    models on four fresh caches), and a split that gains less costs accuracy for nothing."""
    return split_ratio(node, x, weight, bias, stages, target) <= FASTER


def plan_splits(gm: fx.GraphModule, ctx: PassContext, rec: Recording, owner: str, rules: Sequence[Pass],
                stages_of: Callable[[Pass, fx.Node, torch.Tensor], list[Stage] | str], layers: Sequence[fx.Node],
                goal: Goal | None, timed: bool, stats: Counter, max_error: float | None = None,
                trial: Callable[[dict[str, Pass], fx.GraphModule], None] | None = None) -> dict[str, Pass] | None:
    """Layer name → the rule (one of ``rules``, e.g. the pass at several ranks) that splits it, so that the graph
    keeps at most ``goal``'s fraction of its FLOPs or latency (lib/goals.py): each rule's effect on each layer
    alone is measured on the calibration data (the sensitivity analysis asks the rule's ``layer_effect``),
    ``stages_of(rule, node, weight)`` gives the stages, and ``sensitivity.plan`` takes the cheapest in accuracy per
    unit saved first. A split saves the layer's FLOPs × (1 − Σ stage weights / layer weight), all at the layer's
    output positions, or under a latency goal its timed saving (:func:`split_ratio`) of the graph's measured
    time. With ``timed`` or a latency goal a split that does not time faster on its recorded input is no
    candidate. ``max_error`` caps the summed per-layer damage (``sensitivity.plan``); with ``goal`` None the splits
    go as far as that cap allows. A latency goal is met as measured: ``trial(rules, copy)`` applies a plan to a
    copy of ``gm`` for ``goals.meet_measured`` to time. None when the goal cannot be met
    (``skipped.flops_goal_unreachable`` and ``flops_reachable`` in stats; ``latency_…`` for a latency goal; or as
    measured, ``skipped.latency_goal_missed_measured``), cannot be met within the cap
    (``skipped.flops_goal_not_within_error`` and ``flops_reachable_within_error``), no split fits the cap
    (``skipped.nothing_within_error``), or the goal asks for nothing (``skipped.flops_goal_met``: ``flops=1.0``)."""
    if ctx.calibration is None:
        raise missing_calibration(owner)
    if goal is not None:
        goal.check_target(owner, ctx.target)
    timed = timed or goal is not None and goal.timed
    by_spec = {str(r): r for r in rules}
    flops = ctx.analysis(Flops, gm)
    total = graph_ms(gm, rec.inputs) if goal is not None and goal.timed else sum(flops.values())
    need = None if goal is None else total * (1 - goal.fraction)
    if need is not None and need <= 0:  # flops=1.0: met as it is (it was "nothing within error", no cap given)
        stats[goal.stat("skipped.goal_met")] = 1
        return None
    saved: dict[tuple[str, str], float] = {}
    slower: set[str] = set()  # layers with a split that fits but does not time faster
    with memoized_svds():  # each rule's stages, here and in the sensitivity runs, from one decomposition per weight
        for node in layers:
            weight, x = get_tensor(gm, weight_of(node)), rec.value(data(node))
            if weight is None or not weight.numel() or x is None:
                continue
            bias = get_tensor(gm, bias_of(node)) if bias_of(node) is not None else None
            # timed now beside the graph's total, not read from the cache: a time cached in another process's
            # state made the layer's share of the total wrong (the cache keeps ratios, which pair their two sides)
            own = measure_latency(lambda t: run_original(node, t, weight, bias), (x,), budget_s=0.02) \
                if goal is not None and goal.timed else 0.0
            for spec, rule in by_spec.items():
                stages = stages_of(rule, node, weight)
                if isinstance(stages, str):
                    continue
                ratio = split_ratio(node, x, weight, bias, stages, ctx.target) if timed else None
                if ratio is not None and ratio > FASTER:
                    slower.add(node.name)
                    continue
                kept = sum(st.weight.numel() for st in stages) / weight.numel()
                saved[(spec, node.name)] = own * (1 - ratio) \
                    if goal is not None and goal.timed and ratio is not None else flops.get(node.name, 0) * (1 - kept)
        candidates: dict[str, set[str]] = {}
        for spec, layer in saved:
            candidates.setdefault(spec, set()).add(layer)
        if refused := slower - {layer for _, layer in saved}:  # no rule of theirs is a candidate: timing refused all
            stats["skipped.slower_measured"] = len(refused)
        sens = layer_sensitivity(gm, list(checked_batches(ctx.calibration, ctx.example_inputs)), list(by_spec),
                                 ctx.target, only=candidates)  # only candidates: timing refusals cost no model runs
    def plan_for(need: float | None) -> dict[str, str] | None:
        chosen = plan(sens, saved, need, max_error)
        if chosen and need is not None:
            chosen = give_back(sens, saved, chosen, lambda c: sum(saved[(s, n)] for n, s in c.items()) >= need
                               and (max_error is None or summed_damage(sens, c) <= max_error))
        return chosen

    chosen = plan_for(need)
    if chosen is not None and not chosen:
        stats["skipped.nothing_within_error"] = 1
        return None
    if chosen is None and max_error is not None and need is not None and plan(sens, saved, need, None) is not None:
        # the goal is reachable, only not within the cap: say so, and how far the cap lets the splits go
        capped = plan(sens, saved, None, max_error)
        if not capped:
            stats["skipped.nothing_within_error"] = 1
            return None
        stats[goal.stat("skipped.goal_not_within_error")] = 1
        stats[goal.stat("reachable_within_error")] = _left(saved, capped, total)
        return None
    if chosen is None:
        best: dict[str, float] = {}
        for (_, layer), gain in saved.items():
            best[layer] = max(best.get(layer, 0.0), gain)
        stats[goal.stat("skipped.goal_unreachable")] = 1
        stats[goal.stat("reachable")] = round(1 - sum(best.values()) / total, 4) if total else 1.0
        return None
    if goal is not None and goal.timed and trial is not None and need is not None:
        chosen = meet_measured(goal, total, need, plan_for,
                               lambda c, copy: trial({layer: by_spec[spec] for layer, spec in c.items()}, copy),
                               gm, rec.inputs, chosen, stats)
        if chosen is None:
            return None
        stats["latency.planned"] = _left(saved, chosen, total)
    return {layer: by_spec[spec] for layer, spec in chosen.items()}


def _left(saved: dict[tuple[str, str], float], chosen: dict[str, str], total: float) -> float:
    """The fraction of ``total`` a choice (layer → spec) leaves, by its summed savings."""
    return round(1 - sum(saved[(spec, layer)] for layer, spec in chosen.items()) / total, 4) if total else 1.0
