"""What distillation fits the student to, and the fit (passes/distill.py, whose docstring holds the formulas): which
teacher output is classifier logits (softmax-KL at temperature τ), which are other float outputs (cosine + relative
MSE), the feature loss at the recorded layers, the held-out score early stopping compares, (metric, −loss), and the
training loop that stops early and keeps the best learned tensors."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from fxforge.compiler.quality import not_logits
from fxforge.compiler.timing import faster_threads

from .distillation import Batch, Runner, Student


def output_kinds(outputs: list[tuple[torch.Tensor, ...]]) -> list[str]:
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


class Objective:
    """Matching the ``teacher``: its outputs on the ``held_out`` batches (computed once) and on each train batch (at
    its first visit), the kind of each output (``output_kinds``), the loss of a student's ``Runner.run`` against
    them at ``temperature`` τ with the feature loss weighted by ``features`` λ, and the held-out score."""

    def __init__(self, teacher: Runner, held_out: list[Batch], temperature: float, features: float) -> None:
        self.teacher, self.held_out, self.temperature, self.features = teacher, held_out, temperature, features
        with torch.no_grad():
            self.targets = [teacher.run(*b) for b in held_out]
        self.kinds = output_kinds([t[0] for t in self.targets])
        self.cache: dict[int, tuple] = {}  # train batch index → the teacher's outputs

    @property
    def trains(self) -> bool:
        """Does any output carry a loss (a float output)?"""
        return "logits" in self.kinds or "float" in self.kinds

    @property
    def metric(self) -> str:
        """The held-out metric: top-1 agreement with the teacher for classifiers, else mean per-sample cosine."""
        return "agreement" if "logits" in self.kinds else "cosine"

    def target(self, i: int, batch: Batch) -> tuple:
        """The teacher's outputs on train batch ``i``, ``batch``."""
        if i not in self.cache:
            with torch.no_grad():
                self.cache[i] = self.teacher.run(*batch)
        return self.cache[i]

    def loss(self, student: tuple, teacher: tuple) -> torch.Tensor:
        """The distillation loss of one batch (see passes/distill.py's docstring)."""
        (s_out, s_feat), (t_out, t_feat) = student, teacher
        total = torch.zeros((), dtype=torch.float64)
        for s, t, kind in zip(s_out, t_out, self.kinds):
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

    def score(self, student: Runner) -> tuple[float, float]:
        """(held-out metric, −held-out loss) of ``student``: higher is better."""
        with torch.no_grad():
            outs = [student.run(*b) for b in self.held_out]
            loss = sum(float(self.loss(o, t)) for o, t in zip(outs, self.targets)) / len(self.held_out)
        if not math.isfinite(loss):  # diverged: NaN rows argmax to class 0, which once "agreed" 100 %
            return -math.inf, -math.inf
        kinds = self.kinds
        i = kinds.index("logits") if "logits" in kinds else kinds.index("float")
        s = torch.cat([o[0][i] for o in outs])
        t = torch.cat([t[0][i] for t in self.targets])
        if kinds[i] == "logits":
            metric = float((s.argmax(-1) == t.argmax(-1)).double().mean())
        else:
            metric = float(F.cosine_similarity(s.reshape(len(s), -1).double(), t.reshape(len(t), -1).double(),
                                               dim=1).mean())
        return metric, -loss


class Trained(NamedTuple):
    """What ``train`` ends with: the held-out score before and the best one, its learned tensors, steps, threads."""

    before: tuple[float, float]
    best: tuple[float, float]
    state: dict[str, torch.Tensor]
    steps: int
    threads: int


def train(student: Student, objective: Objective, batches: list[Batch], opt: torch.optim.Optimizer, *, steps: int,
          eval_every: int, patience: int, seed: int, threads: int, bar: Any) -> Trained:
    """Train ``student`` with ``opt`` on ``batches``, visited in an order drawn from ``seed``, for at most ``steps``
    steps: every ``eval_every`` steps and at the last it is scored, and training stops after ``patience`` scores
    without improvement; a score counts only with a held-out loss no higher than before training. It trains on
    ``threads`` PyTorch threads (0: the faster of 1 and PyTorch's count, ``faster_threads``); ``bar`` counts steps."""
    before = objective.score(student)
    best, state, stale, step = before, student.snapshot(), 0, 0
    order = torch.Generator().manual_seed(seed)
    probe = lambda: objective.loss(student.run(*objective.held_out[0]), objective.targets[0]).backward()  # no update
    with faster_threads(probe, threads) as threads:  # small batches: on a busy machine 1 thread may win
        while step < steps and stale < patience:
            for i in torch.randperm(len(batches), generator=order).tolist():
                target = objective.target(i, batches[i])
                opt.zero_grad()
                objective.loss(student.run(*batches[i]), target).backward()
                opt.step()
                step += 1
                bar.update()
                if step % eval_every == 0 or step == steps:
                    score = objective.score(student)
                    if score > best and score[1] >= before[1]:  # never a model that fits the teacher worse
                        best, state, stale = score, student.snapshot(), 0
                    else:
                        stale += 1
                if step >= steps or stale >= patience:
                    break
    return Trained(before, best, state, step, threads)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dim as x − logsumexp(x) (measured: torch.log_softmax on a 32 × 10 tensor
    took 20 ms per call on a loaded 2-core machine, waking its OpenMP threads; logsumexp takes 0.02 ms)."""
    return x - x.logsumexp(-1, keepdim=True)


def _rel_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² / ‖t‖², in float64."""
    return (s - t).double().pow(2).sum() / t.double().pow(2).sum().clamp(min=1e-12)
