"""Per-layer sensitivity: how much the model's output moves when one layer alone is changed.

For every conv/linear layer ℓ and setting σ (a pass spec such as ``"int8"``, ``"low_rank{energy=0.95}"``,
``"depthwise_separable{energy=0.95}"`` or ``"prune_channels{ratio=0.25}"``) the graph runs on calibration
batches with ℓ alone replaced by what σ would make of it, and is compared with the unchanged graph:

    drop(ℓ, σ)  = max_k 1 − agreement(y_k,ℓσ, y_k)    top-1 agreement for classifier logits, else the mean cosine
    rel(ℓ, σ)   = max_k ‖y_k,ℓσ − y_k‖ / ‖y_k‖

over the model's outputs y_k with a batch dimension (the first decides whether the model is a classifier: its
logits are scored by agreement, the others by cosine). Measured on the first output alone, a layer feeding only a
second head was "free": an error cap of 0.02 let low_rank split it to 0.6–0.9 relative error of that head.

The replacement is the pass's own answer, ``Pass.layer_effect(node, LayerContext)``: insert_qdq (in ``int8``)
fake-quantizes the layer's weight and its input on the grid of its calibration range (for every reader of that
input, which shares its pair), low_rank and
depthwise_separable evaluate the factor stages they would insert, prune_channels zeroes the channel groups it
would remove from the layer at every node they reach (coupled channels included: a change may span several
nodes). A setting that would leave a layer unchanged records the pass's reason instead (``"rank_too_high"``); this
module knows no pass by name.
Summing drops over layers is the first-order model the search uses to predict, and skip, settings
(as mixed-precision methods such as HAWQ do with their per-layer sensitivities).

:func:`plan` is the per-layer decision rule of the passes that take a global goal (``low_rank{flops=0.5}``) or an
error cap (``low_rank{max_error=0.02}``): given the FLOPs each (layer, setting) saves, it takes the moves
cheapest in accuracy per FLOP saved first,

    order by  (drop(ℓ, σ) / saved(ℓ, σ),  rel(ℓ, σ) / saved(ℓ, σ))  ascending,

replacing a layer's earlier choice only by one that saves more, until the goal's saving is reached; when even
the largest saving of every layer together falls short it chooses nothing. Under an error cap a move is taken only
while the summed max(drop, rel) of the chosen moves stays within the cap. The last move taken can save far more
than the goal still needed (a layer at rank 1/16 when ½ would do), so :func:`give_back` then revisits the chosen
layers, most damaging first, and gives each the lightest change that still meets the goal (none, or a setting
that saves less); a move within the exactness tolerance costs nothing and stays.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxforge.compiler.errors import PassError
from fxforge.compiler.graph import call_nodes, get_tensor, pure_calls
from fxforge.compiler.ops import WEIGHTED, data, is_op, weight_of
from fxforge.compiler.pass_manager import LayerContext, LayerFn, Pass, PassContext, resolve
from fxforge.compiler.quality import not_logits
from fxforge.compiler.target import Target
from fxforge.compiler.timing import faster_threads
from fxforge.compiler.verify import EXACT_TOLERANCE, first_float

# (layer, weight) → the layer's new function, or each changed node's, or why the layer stays
Prepare = Callable[[fx.Node, torch.Tensor], "LayerFn | dict[str, LayerFn] | str"]
# the values of the reference runs kept, at most this many bytes, so that each layer's run computes only the nodes
# its change reaches (r3d_18 under `compress`: its 78 layer effects took 147 s computing every node, 33 s so)
REUSE_BYTES = 1 << 30


@dataclass(frozen=True)
class Effect:
    """The model-level change caused by one layer's change."""

    drop: float
    rel_error: float


@dataclass
class Sensitivity:
    """``effects[setting][layer]`` is an Effect, or the reason the setting leaves that layer alone."""

    layers: list[str]
    effects: dict[str, dict[str, Effect | str]] = field(default_factory=dict)

    def changed(self, setting: str) -> list[str]:
        """Layers the setting changes, most sensitive first."""
        hits = [(e.drop, e.rel_error, n) for n, e in self.effects[setting].items() if isinstance(e, Effect)]
        return [n for *_, n in sorted(hits, reverse=True)]

    def predicted_drop(self, setting: str, layers: Iterable[str] | None = None) -> float:
        """Σ drop over ``layers`` (default: every layer the setting changes)."""
        chosen = self.changed(setting) if layers is None else layers
        return sum(e.drop for n in chosen if isinstance(e := self.effects[setting].get(n), Effect))

    def to_dict(self) -> dict[str, Any]:
        return {s: {n: e.__dict__ if isinstance(e, Effect) else e for n, e in per.items()}
                for s, per in self.effects.items()}


def agreement(output: torch.Tensor, reference: torch.Tensor, logits: bool) -> float:
    """Top-1 agreement over the last dimension for classifier ``logits``, the share of equal elements for integer
    outputs (class ids), else the mean cosine similarity of the samples (dimension 0; of the whole for a 1-D
    output). Whether an output is logits is the budget's decision (``quality.not_logits``): the argmax over the
    384 dimensions of unit sentence embeddings ranked MiniLM's linears by flips of a meaningless maximum."""
    if not reference.is_floating_point():
        return float((output == reference).double().mean())
    if logits and reference.dim() >= 2 and reference.shape[-1] > 1:
        return float((output.argmax(-1) == reference.argmax(-1)).double().mean())
    if reference.dim() >= 2:
        a, b = output.double().flatten(1), reference.double().flatten(1)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        both_zero = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)  # a sample zero in both agrees
        return float(torch.where(both_zero, torch.ones_like(cos), cos).mean())
    a, b = output.double().flatten(), reference.double().flatten()
    if not (a.norm() and b.norm()):
        return float(torch.equal(a, b))
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def layer_sensitivity(gm: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, ...]],
                      settings: Sequence[str | Pass], target: Target, only: dict[str, set[str]] | None = None,
                      ctx: PassContext | None = None, logits: bool | None = None) -> Sensitivity:
    """Effect of each setting (a spec, or a Pass keyed by its spec) on each conv/linear layer of ``gm`` alone, on
    the calibration ``batches`` (with ``only``: on the layers ``only[spec]`` names, the candidates a caller already
    narrowed down). A pass answering reads ``gm``'s analyses from ``ctx`` (a fresh context when None). ``logits``:
    whether the drop is of top-1 agreement or of the mean cosine (a budget measuring a classifier by its cosine
    says so); None decides by the outputs (``quality.not_logits``)."""
    layers = [n.name for n in call_nodes(gm, *WEIGHTED)]
    result = Sensitivity(layers)
    ctx = ctx if ctx is not None else PassContext(example_inputs=tuple(batches[0]), target=target)
    # many model runs: on a busy machine one thread may run them faster than several (compiler/timing.py)
    with torch.no_grad(), faster_threads(lambda: _Run(gm).run(*batches[0])):
        reference, ranges, kept = _reference(gm, batches)
        logits = not not_logits([[r[0]] for r in reference]) if logits is None else logits
        for setting in settings:
            spec = str(setting)
            prepare = _preparation(setting, ranges, target, lambda kind: ctx.analysis(kind, gm))
            result.effects[spec] = {n.name: _effect(gm, n, prepare, batches, reference, kept, logits)
                                    for n in call_nodes(gm, *WEIGHTED) if only is None or n.name in only.get(spec, ())}
    return result


def plan(sens: Sensitivity, saved: dict[tuple[str, str], float], need: float | None,
         max_error: float | None = None) -> dict[str, str] | None:
    """Layer → setting, cheapest in accuracy per FLOP first, saving at least ``need`` FLOPs (None: as many as
    ``max_error`` allows); None when the goal cannot be met. ``saved[(setting, layer)]`` is what that change
    saves (> 0). With ``max_error`` a move is taken only while the chosen moves' summed damage, max(drop, rel)
    each (first order), stays at most ``max_error``."""
    moves = [(e.drop / gain, e.rel_error / gain, setting, layer) for (setting, layer), gain in saved.items()
             if gain > 0 and isinstance(e := sens.effects[setting].get(layer), Effect)
             and (max_error is None or _damage(e) <= max_error)]
    best: dict[str, float] = {}
    for *_, setting, layer in moves:
        best[layer] = max(best.get(layer, 0.0), saved[(setting, layer)])
    if need is not None and sum(best.values()) < need:
        return None
    chosen: dict[str, str] = {}
    total, error = 0.0, 0.0
    for *_, setting, layer in sorted(moves):
        if need is not None and total >= need:
            break
        before = saved[(chosen[layer], layer)] if layer in chosen else 0.0
        err_before = _damage(sens.effects[chosen[layer]][layer]) if layer in chosen else 0.0
        grown = error - err_before + _damage(sens.effects[setting][layer])
        if saved[(setting, layer)] > before and (max_error is None or grown <= max_error):
            chosen[layer] = setting
            total += saved[(setting, layer)] - before
            error = grown
    if need is not None and total < need:
        return None
    return chosen


def give_back(sens: Sensitivity, saved: dict[tuple[str, str], float], chosen: dict[str, str],
              meets: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    """``chosen`` with what the goal spares given back: for each chosen layer, most damaging first (its effect's
    drop, then error), the first of "unchanged" and the layer's settings that save less than its choice and were
    measured no more damaging (drop, then error: a layer's effect is not monotone in its setting), the lightest
    first, with which the whole choice still ``meets`` the goal replaces that layer's choice. A plan's last move may
    save far more than the goal still needed; this keeps the damage to what the goal asks. A move whose damage is
    within ``EXACT_TOLERANCE`` (an exact split) costs nothing and is kept."""
    for layer in sorted(chosen, key=lambda n: astuple(sens.effects[chosen[n]][n]), reverse=True):
        current = sens.effects[chosen[layer]][layer]
        if _damage(current) <= EXACT_TOLERANCE:
            continue
        lighter = sorted((gain, spec) for (spec, name), gain in saved.items() if name == layer
                         and gain < saved[(chosen[layer], layer)] and isinstance(e := sens.effects[spec].get(name),
                                                                                  Effect)
                         and astuple(e) <= astuple(current))
        for spec in [None, *(spec for _, spec in lighter)]:
            trial = {**{n: s for n, s in chosen.items() if n != layer}, **({layer: spec} if spec else {})}
            if meets(trial):
                chosen = trial
                break
    return chosen


def summed_damage(sens: Sensitivity, chosen: dict[str, str]) -> float:
    """What an error cap charges a whole choice (layer → setting): its moves' damages summed (first order)."""
    return sum(_damage(sens.effects[setting][layer]) for layer, setting in chosen.items())


def _damage(effect: Effect | str) -> float:
    """What an error cap charges a move: its top-1 drop or its relative output error, whichever is larger."""
    assert isinstance(effect, Effect)
    return max(effect.drop, effect.rel_error)


class _Run(fx.Interpreter):
    """Runs the graph with the nodes ``changes`` names computed by their new functions, or (no changes) plainly
    while recording layer input ranges and keeping each run's values (``kept``: None once the runs' values pass
    ``keep`` bytes) for changed runs to start from."""

    def __init__(self, gm: fx.GraphModule, changes: dict[str, LayerFn] | None = None, keep: int = 0) -> None:
        super().__init__(gm)
        self.changes = changes or {}
        self.ranges: dict[str, tuple[float, float]] = {}
        self.keep = keep
        self.kept: dict[fx.Node, Any] | None = None
        self.counted: set[int] = set()  # the storages kept so far (alive while kept: their addresses stay theirs)

    def run(self, *args: Any, initial_env: dict[fx.Node, Any] | None = None) -> Any:  # type: ignore[override]
        self.kept = {} if self.keep > 0 else None
        return super().run(*args, initial_env=initial_env)

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.changes:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self.changes[n.name](list(args), dict(kwargs))
        if not self.changes and is_op(n, *WEIGHTED) and self.env[data(n)].numel():  # an empty input has no range
            x = self.env[data(n)]
            lo, hi = self.ranges.get(n.name, (0.0, 0.0))  # the range holds 0, as an affine grid must
            self.ranges[n.name] = (min(lo, float(x.min())), max(hi, float(x.max())))
        value = super().run_node(n)
        if self.kept is not None and n.op != "output":
            # what keeping costs: the storages calls make, each once (a view shares its input's; the inputs and
            # constants are held anyway)
            for t in pytree.tree_leaves(value) if n.op == "call_function" else ():
                if isinstance(t, torch.Tensor) and t.layout == torch.strided and \
                        t.untyped_storage().data_ptr() not in self.counted:
                    self.counted.add(t.untyped_storage().data_ptr())
                    self.keep -= t.untyped_storage().nbytes()
            if self.keep < 0:
                self.kept = None  # past the budget: this batch's changed runs compute every node again
            else:
                self.kept[n] = value
        return value


def _outputs(out: Any) -> list[torch.Tensor]:
    """The outputs of one run that sensitivity compares: each float one with a batch dimension, the first first
    (the one whose logits decide agreement); ``first_float``'s answer where there is none. Integer outputs beside
    them (an argmax of the logits) add nothing but a relative error of class ids."""
    batched = [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor) and v.dim() and v.is_floating_point()]
    first = first_float(out)
    return [first, *(v for v in batched if v is not first)]


def _reference(gm: fx.GraphModule, batches: Sequence[tuple]) -> tuple[list[list[torch.Tensor]], dict, list]:
    """The unchanged graph's outputs on ``batches``, its layers' input ranges, and each batch's values (node →
    value) for the changed runs to start from: within ``REUSE_BYTES`` in all, and only where every call is pure
    (a value computed again would be the same), else None."""
    run = _Run(gm, keep=REUSE_BYTES if pure_calls(gm) else 0)
    outs, kept = [], []
    with torch.no_grad():
        for batch in batches:
            outs.append(_outputs(run.run(*batch)))
            kept.append(run.kept)
    return outs, run.ranges, kept


def _reached(gm: fx.GraphModule, names: Iterable[str]) -> set[fx.Node]:
    """The nodes ``names`` names and every node reading them, directly or not: what their change recomputes."""
    names = set(names)
    todo, reached = [n for n in gm.graph.nodes if n.name in names], set()
    while todo:
        n = todo.pop()
        if n not in reached:
            reached.add(n)
            todo.extend(n.users)
    return reached


def _effect(gm: fx.GraphModule, node: fx.Node, prepare: Prepare, batches: Sequence[tuple],
            reference: list[list[torch.Tensor]], kept: list[dict | None], logits: bool) -> Effect | str:
    weight = get_tensor(gm, weight_of(node))
    if weight is None:
        return "non_constant_weight"
    change = prepare(node, weight.detach())
    if isinstance(change, str):
        return change
    changes = change if isinstance(change, dict) else {node.name: change}
    run, reached = _Run(gm, changes), _reached(gm, changes)
    with torch.no_grad():  # what the change does not reach is the reference's value, where kept
        runs = [_outputs(run.run(*batch, initial_env=None if env is None else
                                 {n: v for n, v in env.items() if n not in reached}))
                for batch, env in zip(batches, kept)]
    drop = rel = 0.0
    for k in range(len(reference[0])):
        y, ref = torch.cat([r[k] for r in runs]), torch.cat([r[k] for r in reference])
        rel = max(rel, float((y.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-12)))
        drop = max(drop, 1.0 - agreement(y, ref, logits and k == 0))
    return Effect(drop=drop, rel_error=rel)


# ------------------------------------------------------------------------------------------ replacements

def _preparation(setting: str | Pass, ranges: dict[str, tuple[float, float]], target: Target,
                 analysis: Callable[[type], Any]) -> Prepare:
    """What ``setting`` makes of one layer, asked of the one pass in it that answers per-layer questions
    (``Pass.layer_effect``): from its node and weight, the layer's new function (or its nodes') or a refusal."""
    answering = [p for p in resolve(setting) if type(p).layer_effect is not Pass.layer_effect]
    if len(answering) != 1:
        raise PassError(f"no per-layer sensitivity for setting {setting!r} (it needs exactly one pass with a "
                        f"layer_effect; found {[p.name for p in answering]})")
    (p,) = answering
    return lambda node, w: p.layer_effect(node, LayerContext(w, ranges.get(node.name, (0.0, 0.0)), target, analysis))
