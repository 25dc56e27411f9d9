"""distill: fine-tune the compressed graph's weights to match the fp32 teacher on unlabeled data. Approximate.

The teacher T is the graph as it stood before the pipeline's first lossy pass (``PassContext.teacher``, a copy
the pass manager keeps; never the user's module). On the user's unlabeled batches x (``compile(...,
train=[(x1,), ...])``) the student S, this graph, minimises with Adam (``optimizer='sgd'``: SGD, momentum 0.9) over its conv/linear weights and biases

    classifier logits (the first output, when the report judges it so: 2-D rows that are not unit vectors,
    no probabilities, an argmax that moves):         L = τ² · KL(softmax(T(x)/τ) ‖ softmax(S(x)/τ))
    any other float output (embeddings, maps, a box or score head beside the logits):
                                                     L = mean_i (1 − cos(S_i, T_i)) + ‖S − T‖² / ‖T‖²
    with ``features`` = λ > 0, at each compressed layer ℓ (a conv/linear whose weight differs from the
    teacher's layer of the same name, output shape unchanged):  L += λ · Σ_ℓ ‖S_ℓ − T_ℓ‖² / ‖T_ℓ‖²

With ``params="biases+scales"`` the activation grids learn as well (LSQ, Esser et al. 2019): each activation
group's scale is s = s₀·e^u with u learned (one relative step size for every tensor; LSQ's gradient scale
1/sqrt(N·q_max) only rescales what Adam normalises), and its Q/DQ pair is computed as

    v = x/s,   q = clamp(v + (round(v) − v).detach() + z, q_min, q_max),   x̂ = (q − z)·s

so ∂x̂/∂x is 1 inside the grid and 0 outside (the straight-through estimator), and ∂x̂/∂s is round(v) − v inside
and q_min − z or q_max − z outside: the step size trades rounding error against clipping on the network's loss.
The zero points stay; the learned scales are written into every Q/DQ node of the group, rounded to float32, and
the biases' grids s_x · s_w refreshed. Measured on the trained MobileNetV2 (equalize_activations, percentile
calibration, bias correction, 100 steps at lr 3e-4; docs/quantization.md): top-1 agreement 0.875 → 0.906 and
0.938 in two runs (biases alone: 0.891), mean logit cosine 0.987 → 0.988–0.989 (biases alone: 0.990).

With ``params="biases"`` only the biases learn: through Q/DQ pairs a bias's int32 grid (s_x · s_w) is fine enough
to move continuously, where a weight moves by whole 8-bit steps, so this is bias correction fitted end to end
(every layer's shift at once, against the network's output instead of each layer's mean). Measured on the trained
MobileNetV2 after the int8 preset's ``bias_correction`` (docs/quantization.md, 128 held-out views): 100 steps at lr
3e-4 raised the mean logit cosine 0.983 → 0.990 and the smallest 0.86 → 0.97 (top-1 agreement unchanged, 0.867),
where training every weight with Adam made all three worse (agreement 0.820 after 150 steps at lr 5e-5).

(Hinton et al., 2015: τ² keeps the gradient scale independent of the temperature.) Through Q/DQ pairs the
rounding has no gradient, so each DQ(Q(x)) is computed as x + (DQ(Q(x)) − x).detach(): the forward pass stays
quantized and the gradient passes straight through (the straight-through estimator); scales stay fixed.
Weights that are already int8 (after ``fold_qdq``) cannot learn: run distill before it. Nor can dynamic int8 linears
(``insert_qdq{activations='dynamic'}``), which have no gradient: a graph holding them is refused by name.

Training steps are many small ops, which on a busy machine can run 25× faster on one thread than on two: by
default (``threads=0``) a step without the update is timed twice on 1 thread and on PyTorch's count,
alternately, and training runs on the faster (``compiler/timing.faster_threads``; stat ``threads``). Float sums
may round differently on another thread count: a run that must reproduce its weights bit for bit fixes
``threads``.

Every fifth train batch is held out (the last one when there are fewer than five; never the validation data).
Every ``eval_every`` steps the held-out batches are scored, top-1 agreement with the teacher for classifiers
or mean per-sample cosine otherwise, ties broken by the held-out loss; training stops after ``patience``
scores without improvement, and the best weights are kept. A score counts only with a finite held-out loss no
higher than before training: a diverged run (NaN rows argmax to class 0, which "agreed" with a teacher calling
most held-out samples 0; or logits 50× the teacher's whose agreement rose by 3 of 256 samples, the loss 41×) is
never kept. Batches are visited in an order drawn from
``seed``, so a run on the same thread count is reproducible. Stats: steps, seconds, threads, the held-out
metric and loss before and after.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Literal, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from fxforge.compiler.dynamic_quant import DYNAMIC_LINEAR
from fxforge.compiler.errors import CalibrationError, PassError, missing_train
from fxforge.compiler.graph import call_nodes, get_tensor, set_tensor
from fxforge.compiler.ops import DEQUANTIZE, QUANTIZE, WEIGHTED, bias_of, data, is_op, q_params, weight_of
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass
from fxforge.compiler.quality import not_logits
from fxforge.compiler.timing import faster_threads

from .lib.qdq import QDQ_KEY, is_q, refresh_bias_scales, refuse_if_folded, role, set_params

Batch = tuple[torch.Tensor, ...]


@register_pass
class Distill(Pass):
    """Fine-tune weights to match the fp32 teacher on unlabeled train data (knowledge distillation)."""

    name = "distill"
    exact = False
    reads_train = True
    before = ("fold_qdq",)  # folded weights are int8 constants: nothing that trains would be left but stray biases
    steps: int = 300
    lr: float = 1e-3
    temperature: float = 2.0
    features: float = 0.0  # weight λ of the intermediate-feature loss at the compressed layers (0: outputs only)
    params: Literal["all", "biases", "biases+scales"] = "all"  # conv/linear weights and biases, the biases alone,
    # or the biases and the activation scales (LSQ)
    optimizer: Literal["adam", "sgd"] = "adam"  # sgd: plain SGD with momentum 0.9 at ``lr``
    eval_every: int = 25
    patience: int = 3
    seed: int = 0
    threads: int = 0  # PyTorch threads to train on; 0: the faster of 1 and PyTorch's count, timed on the first steps

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.lr, self.temperature, self.features)):
            raise ValueError(f"needs finite lr, temperature and features (inf trains to NaN); got {self.options()}")
        if self.steps < 1 or self.lr <= 0 or self.temperature <= 0 or self.features < 0 or self.eval_every < 1 \
                or self.patience < 1 or self.threads < 0 or self.optimizer not in ("adam", "sgd") \
                or self.params not in ("all", "biases", "biases+scales"):
            raise ValueError(f"needs steps, eval_every, patience >= 1, lr, temperature > 0, features, threads >= 0, "
                             f"optimizer 'adam' or 'sgd' and params 'all', 'biases' or 'biases+scales'; "
                             f"got {self.options()}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.train is None:
            raise missing_train(self.name)
        if ctx.teacher is None:  # no lossy pass ran before: the graph is the teacher
            return PassResult(changed=False, preserves="all", stats={"skipped.nothing_to_recover": 1})
        refuse_if_folded(gm, self.name)
        if any(call_nodes(gm, DYNAMIC_LINEAR)):
            # its backward raised "no autograd formula" from deep inside the first step
            raise PassError("distill cannot train through dynamic int8 linears (fxforge::dynamic_linear has no "
                            "gradient): run distill before insert_qdq{activations='dynamic'} (int8_dynamic)")
        with torch.inference_mode(False), torch.enable_grad():  # compile may be called under either
            batches = [tuple(t.clone() for t in b) for b in ctx.train]  # not inference tensors
            if len(batches) < 2:
                raise CalibrationError(f"pass 'distill' needs at least 2 train batches (one is held out for early "
                                       f"stopping), got {len(batches)}")
            return self.fit(gm, ctx.teacher, batches, ctx)

    def fit(self, gm: fx.GraphModule, teacher_gm: fx.GraphModule, batches: list[Batch],
            ctx: PassContext) -> PassResult:
        """Train ``gm`` towards ``teacher_gm`` on ``batches`` (every fifth held out) and keep the best weights."""
        held = set(range(4, len(batches), 5)) or {len(batches) - 1}
        fit = [b for i, b in enumerate(batches) if i not in held]
        held_out = [batches[i] for i in sorted(held)]
        stats: Counter = Counter()
        params, nodes = trainable(gm, stats, biases_only=self.params != "all")
        scales = activation_scales(gm) if self.params == "biases+scales" else {}
        student = _Runner(gm, params, compressed_layers(gm, teacher_gm) if self.features else [], scales)
        teacher = _Runner(teacher_gm, {}, student.record)
        with torch.no_grad():
            targets = [teacher.run(*b) for b in held_out]
        kinds = _kinds([t[0] for t in targets])
        if "float" not in kinds and "logits" not in kinds or not params:
            stats["skipped.no_float_output" if params else "skipped.no_trainable_weights"] += 1
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        start = time.perf_counter()
        before = self.score(student, held_out, targets, kinds)
        learned = {**params, **{f"scale.{g}": u for g, (u, _) in scales.items()}}
        best, best_state, stale, step = before, _snapshot(learned), 0, 0
        opt = torch.optim.Adam(learned.values(), lr=self.lr) if self.optimizer == "adam" else \
            torch.optim.SGD(learned.values(), lr=self.lr, momentum=0.9)
        order = torch.Generator().manual_seed(self.seed)
        cache: dict[int, tuple] = {}
        bar = ctx.progress(total=self.steps, desc="distill", unit="step")
        probe = lambda: self.loss(student.run(*held_out[0]), targets[0], kinds).backward()  # a step, no update
        with faster_threads(probe, self.threads) as threads:  # small batches: on a busy machine 1 thread may win
            while step < self.steps and stale < self.patience:
                for i in torch.randperm(len(fit), generator=order).tolist():
                    if i not in cache:
                        with torch.no_grad():
                            cache[i] = teacher.run(*fit[i])
                    opt.zero_grad()
                    self.loss(student.run(*fit[i]), cache[i], kinds).backward()
                    opt.step()
                    step += 1
                    bar.update()
                    if step % self.eval_every == 0 or step == self.steps:
                        score = self.score(student, held_out, targets, kinds)
                        if score > best and score[1] >= before[1]:  # never a model that fits the teacher worse
                            best, best_state, stale = score, _snapshot(learned), 0
                        else:
                            stale += 1
                    if step >= self.steps or stale >= self.patience:
                        break
        bar.close()
        if best > before:  # else the graph stays as it came, its very tensors (the pass then changed nothing)
            for name, value in best_state.items():
                if name in nodes:
                    set_tensor(gm, nodes[name], value)
            for g, (_, qs) in scales.items():
                for q in qs:
                    set_params(q, q_params(q).scale * float(best_state[f"scale.{g}"].exp()), q_params(q).zero_point)
            if scales:
                refresh_bias_scales(gm)
        metric = "agreement" if "logits" in kinds else "cosine"
        return PassResult(changed=best > before, stats={
            **stats, "steps": step, "seconds": round(time.perf_counter() - start, 2),
            "stopped_early": int(step < self.steps), "threads": threads, "params_trained": len(params),
            "scales_trained": len(scales),
            "feature_layers": len(student.record),
            f"held_out_{metric}_before": before[0], f"held_out_{metric}_after": best[0],
            "held_out_loss_before": -before[1], "held_out_loss_after": -best[1]})

    def loss(self, student: tuple, teacher: tuple, kinds: Sequence[str]) -> torch.Tensor:
        """The distillation loss of one batch (see the module docstring)."""
        (s_out, s_feat), (t_out, t_feat) = student, teacher
        total = torch.zeros((), dtype=torch.float64)
        for s, t, kind in zip(s_out, t_out, kinds):
            if kind == "logits":
                log_s, log_t = _log_softmax(s / self.temperature), _log_softmax(t / self.temperature)
                kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
                total = total + self.temperature ** 2 * kl
            elif kind == "float":
                rows = s.reshape(s.shape[0], -1) if s.dim() else s.reshape(1, 1)
                ref = t.reshape(rows.shape)
                total = total + (1 - F.cosine_similarity(rows, ref, dim=1, eps=1e-12)).mean() + _rel_mse(s, t)
        for name, f in s_feat.items():
            total = total + self.features * _rel_mse(f, t_feat[name])
        return total

    def score(self, student: _Runner, batches: Sequence[Batch], targets: Sequence[tuple],
              kinds: Sequence[str]) -> tuple[float, float]:
        """(held-out metric, −held-out loss): higher is better."""
        with torch.no_grad():
            outs = [student.run(*b) for b in batches]
            loss = sum(float(self.loss(o, t, kinds)) for o, t in zip(outs, targets)) / len(batches)
        if not math.isfinite(loss):  # diverged: NaN rows argmax to class 0, which once "agreed" 100 %
            return -math.inf, -math.inf
        i = kinds.index("logits") if "logits" in kinds else kinds.index("float")
        s = torch.cat([o[0][i] for o in outs])
        t = torch.cat([t[0][i] for t in targets])
        if kinds[i] == "logits":
            metric = float((s.argmax(-1) == t.argmax(-1)).double().mean())
        else:
            metric = float(F.cosine_similarity(s.reshape(len(s), -1).double(), t.reshape(len(t), -1).double(),
                                               dim=1).mean())
        return metric, -loss


def _kinds(outputs: list[tuple[torch.Tensor, ...]]) -> list[str]:
    """Per output of the teacher (``outputs``: its outputs on each held-out batch): "logits" for the first when it is
    classifier logits as the report and the budget judge them (``quality.not_logits``: 2-D rows that are not unit
    vectors, not independent probabilities, not a regression whose largest column never moves), "float" for every
    other float output (a box or score head beside the logits: softmax-KL ignores a shift of its row, and repaired
    a pruned CNN's 4-value regression from 0.78 to 0.66 relative error where this loss reached 0.02), "other" for
    what the loss ignores (integer outputs)."""
    kinds = ["float" if t.is_floating_point() else "other" for t in outputs[0]]
    if kinds and kinds[0] == "float" and not not_logits([list(o) for o in outputs]):
        kinds[0] = "logits"
    return kinds


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dim as x − logsumexp(x) (measured: torch.log_softmax on a 32 × 10 tensor
    took 20 ms per call on a loaded 2-core machine, waking its OpenMP threads; logsumexp takes 0.02 ms)."""
    return x - x.logsumexp(-1, keepdim=True)


def _rel_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).double().pow(2).sum() / t.double().pow(2).sum().clamp(min=1e-12)


def trainable(gm: fx.GraphModule, stats: Counter, biases_only: bool = False
              ) -> tuple[dict[str, torch.Tensor], dict[str, fx.Node]]:
    """Trainable copies of the float weights and biases (``biases_only``: the biases) of every conv/linear, read
    directly or through Q/DQ, by attribute name, and the get_attr node of each. Integer weights (after fold_qdq)
    stay as they are; a tensor several get_attr nodes read (tied weights) is left and counted."""
    params: dict[str, torch.Tensor] = {}
    nodes: dict[str, fx.Node] = {}
    readers = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    for node in call_nodes(gm, *WEIGHTED):
        for arg in (bias_of(node),) if biases_only else (weight_of(node), bias_of(node)):
            while is_op(arg, *QUANTIZE, *DEQUANTIZE):
                arg = data(arg)
            t = get_tensor(gm, arg)
            if t is None or not t.is_floating_point() or arg.target in params:
                continue
            if readers[arg.target] > 1:
                stats["skipped.shared_weight"] += 1
                continue
            params[arg.target], nodes[arg.target] = t.detach().clone().requires_grad_(True), arg
    return params, nodes


def activation_scales(gm: fx.GraphModule) -> dict[int, tuple[torch.Tensor, list[fx.Node]]]:
    """Per activation group of per-tensor Q nodes: a trainable log-ratio u (0: the calibrated scale) and its Q nodes."""
    groups: dict[int, tuple[torch.Tensor, list[fx.Node]]] = {}
    for q in gm.graph.nodes:
        if is_q(q) and role(q) == "activation" and q_params(q).axis is None:
            group = groups.setdefault(q.meta[QDQ_KEY]["group"], (torch.zeros((), requires_grad=True), []))
            group[1].append(q)
    return groups


def compressed_layers(gm: fx.GraphModule, teacher: fx.GraphModule) -> list[str]:
    """Conv/linear layers whose weight differs from the teacher's layer of the same name (split by low_rank,
    quantized, ...) while their output keeps its shape: where the feature loss applies."""
    theirs = {n.name: n for n in call_nodes(teacher, *WEIGHTED)}
    out = []
    for node in call_nodes(gm, *WEIGHTED):
        t = theirs.get(node.name)
        mine, ref = _weight(gm, node), _weight(teacher, t) if t is not None else None
        same_shape = t is not None and node.meta.get("val") is not None and t.meta.get("val") is not None and \
            node.meta["val"].shape == t.meta["val"].shape
        if same_shape and (mine is None or ref is None or mine.shape != ref.shape or not torch.equal(mine, ref)):
            out.append(node.name)
    return out


def _weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    arg = weight_of(node)
    while is_op(arg, *QUANTIZE, *DEQUANTIZE):
        arg = data(arg)
    return get_tensor(gm, arg)


def _snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def _learned_qdq(x: torch.Tensor, q: fx.Node, u: torch.Tensor) -> torch.Tensor:
    """DQ(Q(x)) on the grid of ``q`` with its scale times e^u, differentiable in x and u (module docstring)."""
    p = q_params(q)
    s = torch.tensor(p.scale, dtype=torch.float64) * u.double().exp()  # the op's own arithmetic: x · float32(1/s)
    v = x * (1 / s).to(x.dtype)                                           # rounded, then z added (exact integers)
    q_ = (v + (torch.round(v) - v).detach() + p.zero_point).clamp(p.quant_min, p.quant_max)
    return (q_ - p.zero_point) * s.to(x.dtype)


class _Runner(fx.Interpreter):
    """Runs a graph with some constants replaced by trainable tensors, Q/DQ pairs as straight-through
    estimators, and the outputs of the ``record`` layers kept: ``run(*x) -> (float outputs, {layer: output})``."""

    def __init__(self, gm: fx.GraphModule, params: dict[str, torch.Tensor], record: Sequence[str],
                 scales: dict[int, tuple[torch.Tensor, list[fx.Node]]] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)  # a DQ reads the input of its Q
        self.params, self.record = params, list(record)
        self.scales = {q: u for u, qs in (scales or {}).values() for q in qs}  # Q node → its group's log-ratio
        self.features: dict[str, torch.Tensor] = {}
        self.normal: dict[str, torch.Tensor] = {}  # copies of constants made under torch.inference_mode

    def run(self, *args: Any, **kwargs: Any) -> tuple:  # type: ignore[override]
        self.features = {}
        out = super().run(*args, **kwargs)
        return tuple(torch.as_tensor(v) for v in pytree.tree_leaves(out)), self.features

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "get_attr" and n.target in self.params:
            return self.params[n.target]
        if n.op == "get_attr":
            out = super().run_node(n)
            # a constant made while compile ran under torch.inference_mode (batch norm's statistics, a buffer) cannot
            # be saved for the backward of an op reading it: autograd's raw error, where the same call outside worked
            if isinstance(out, torch.Tensor) and out.is_inference():
                if n.target not in self.normal:
                    self.normal[n.target] = out.clone()
                out = self.normal[n.target]
        elif is_op(n, *DEQUANTIZE) and data(n) in self.scales:
            out = _learned_qdq(self.env[data(data(n))], data(n), self.scales[data(n)])
        elif is_op(n, *DEQUANTIZE) and is_op(data(n), *QUANTIZE) and self.env[data(data(n))].requires_grad:
            x = self.env[data(data(n))]
            with torch.no_grad():
                y = super().run_node(n)
            out = x + (y - x).detach()
        else:
            out = super().run_node(n)
        if n.name in self.record:
            self.features[n.name] = out
        return out


