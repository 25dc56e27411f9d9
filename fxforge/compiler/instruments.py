"""Instruments: what the pass manager runs around every pass, each a small object with three hooks.

    before(p, gm, ctx)            a pass is about to run (``p`` is None for the input stage)
    after(p, gm, ctx, stage)      it ran; ``stage`` carries what earlier instruments found (time, error)
    failed(p, gm, ctx, error)     it raised; the manager re-raises after every instrument has seen it

The manager's own instruments, in order: :class:`Timing`, :class:`Lint`, the numeric check
(``verify.NumericCheck``) and the report rows (``report.StageRecorder``); ``PassManager(instruments=...)`` adds
more (progress bars, IR dumps). An instrument never changes the graph. :class:`Phases` is compile's own bar, over
the phases around the pipeline (capture, passes, budget, backend, artifact check).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from tqdm.auto import tqdm

from .errors import VerificationError, first_line

if TYPE_CHECKING:
    from .pass_manager import Pass, PassContext, PassResult


@dataclass
class Stage:
    """One stage as the instruments see it: its row name, the pass and its result (None for the input),
    the passes before it, its wall time and its numeric error."""

    name: str
    pass_: Pass | None
    result: PassResult | None
    done: list[str]
    elapsed: float = 0.0
    error: Any = None

    @property
    def exact(self) -> bool:
        """Whether the stage computes what the stage before it did: an exact pass, or any pass that left the graph
        unchanged (a ``low_rank`` that found no split within its cap), so a pipeline of such stages is held to
        the exact tolerance."""
        return self.pass_ is None or self.pass_.exact or (self.result is not None and not self.result.changed)


class Instrument:
    """Hooks around every pass; override the ones needed."""

    def before(self, p: Pass | None, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after(self, p: Pass | None, gm: fx.GraphModule, ctx: PassContext, stage: Stage) -> None:
        pass

    def failed(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, error: BaseException) -> None:
        pass


def after_passes(done: list[str]) -> str:
    """`` (after: a, b)`` for error messages: the passes that ran before the failing one."""
    return f" (after: {', '.join(done)})" if done else " (it was the first pass)"


class Timing(Instrument):
    """Wall time of each pass (``stage.elapsed``)."""

    def before(self, p: Pass | None, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.start = time.perf_counter()

    def after(self, p: Pass | None, gm: fx.GraphModule, ctx: PassContext, stage: Stage) -> None:
        stage.elapsed = 0.0 if p is None else time.perf_counter() - self.start


class Progress(Instrument):
    """A progress bar over the pipeline's stages, naming the one running (its checks and report row included): a
    compile printed nothing at all, through passes that ran half a minute and more. Shown on a terminal only (tqdm's
    ``disable=None``) and gone when the pipeline ends."""

    def __init__(self, stages: int) -> None:
        self.bar = tqdm(total=stages, desc="passes", unit="stage", disable=None, leave=False)

    def before(self, p: Pass | None, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.bar.set_postfix_str("input" if p is None else p.name)

    def after(self, p: Pass | None, gm: fx.GraphModule, ctx: PassContext, stage: Stage) -> None:
        self.bar.update()
        if self.bar.n >= self.bar.total:
            self.bar.close()

    def failed(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, error: BaseException) -> None:
        self.bar.close()


def step_bar(items: Any = None, *, total: int | None = None, desc: str, unit: str) -> Any:
    """A bar over the steps of one long pass (calibration batches, training steps), for ``PassContext.progress``:
    shown on a terminal only and gone when it closes, like :class:`Progress` beside it."""
    return tqdm(items, total=total, desc=desc, unit=unit, disable=None, leave=False)


class Phases:
    """compile's progress over its phases, naming the one running, and the seconds each took (``times``, the
    report's ``compile_s``): torch.export's capture and a backend's own export run a minute and more in one call
    each, during which compile printed nothing (the pipeline's stages have their own bar, :class:`Progress`). Shown
    on a terminal only, and gone when the last phase ends or one raises."""

    def __init__(self, phases: int) -> None:
        self.times: dict[str, float] = {}
        self.bar = tqdm(total=phases, desc="compile", unit="phase", disable=None, leave=False)

    def skip(self) -> None:
        """One phase counted at the start will not run (the artifact cannot run here to be checked)."""
        self.bar.total -= 1
        if len(self.times) == self.bar.total:
            self.bar.close()

    @contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        """Time the body as phase ``name``, shown as ``what`` while it runs."""
        self.bar.set_postfix_str(what)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.bar.close()
            raise
        self.times[name] = time.perf_counter() - start
        self.bar.update()
        if len(self.times) == self.bar.total:  # counted here: a disabled bar (no terminal) counts nothing
            self.bar.close()


class Lint(Instrument):
    """``graph.lint()`` after every pass: a malformed graph is the pass's fault, named as such."""

    def after(self, p: Pass | None, gm: fx.GraphModule, ctx: PassContext, stage: Stage) -> None:
        if p is None:
            return
        try:
            gm.graph.lint()
        except Exception as e:
            raise VerificationError(f"pass {p.name!r} left a malformed graph: {first_line(e)}"
                                    f"{after_passes(stage.done)}") from None
