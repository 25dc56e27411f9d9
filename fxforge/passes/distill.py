"""distill: fine-tune the compressed graph's weights to match the fp32 teacher on unlabeled data. Approximate.

The teacher T is the graph as it stood before the pipeline's first lossy pass (``PassContext.teacher``, a copy
the pass manager keeps; never the user's module). On the user's unlabeled batches x (``compile(...,
train=[(x1,), ...])``) the student S, this graph, minimises with Adam (``optimizer='sgd'``: SGD, momentum 0.9)
over its conv/linear weights and biases

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
from typing import Literal

import torch
import torch.fx as fx

from fxforge.compiler.dynamic_quant import DYNAMIC_LINEAR
from fxforge.compiler.errors import CalibrationError, PassError, missing_train
from fxforge.compiler.graph import call_nodes
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.distillation import Batch, Runner, Student
from .lib.distillation_training import Objective, train
from .lib.qdq import refuse_if_folded


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
        student = Student(gm, self.params, teacher_gm if self.features else None, stats)
        objective = Objective(Runner(teacher_gm, {}, student.record), held_out, self.temperature, self.features)
        if not objective.trains or not student.weights:
            stats["skipped.no_float_output" if student.weights else "skipped.no_trainable_weights"] += 1
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        start = time.perf_counter()
        opt = torch.optim.Adam(student.learned.values(), lr=self.lr) if self.optimizer == "adam" else \
            torch.optim.SGD(student.learned.values(), lr=self.lr, momentum=0.9)
        bar = ctx.progress(total=self.steps, desc="distill", unit="step")
        run = train(student, objective, fit, opt, steps=self.steps, eval_every=self.eval_every, patience=self.patience,
                    seed=self.seed, threads=self.threads, bar=bar)
        bar.close()
        before, best, step = run.before, run.best, run.steps
        if best > before:  # else the graph stays as it came, its very tensors (the pass then changed nothing)
            student.write(run.state)
        metric = objective.metric
        return PassResult(changed=best > before, stats={
            **stats, "steps": step, "seconds": round(time.perf_counter() - start, 2),
            "stopped_early": int(step < self.steps), "threads": run.threads, "params_trained": len(student.weights),
            "scales_trained": len(student.groups), "feature_layers": len(student.record),
            f"held_out_{metric}_before": before[0], f"held_out_{metric}_after": best[0],
            "held_out_loss_before": -before[1], "held_out_loss_after": -best[1]})
