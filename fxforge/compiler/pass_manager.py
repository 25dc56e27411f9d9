"""Passes, analyses, their registry, and the manager that runs a pipeline with instruments.

The manager is LLVM's new pass manager kept small: passes say which analyses they preserve, analyses are
cached by type until a pass invalidates them, and every pass is followed by instruments (lint, a numeric
check against the previous stage, a report row). Passes never print; the manager reports.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import time
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence, TypeVar

import torch
import torch.fx as fx

from .errors import FxforgeError, PassError, VerificationError, first_line
from .target import Target, get_target

A = TypeVar("A")
Preserved = frozenset[str] | Literal["all", "none"]
VerifyMode = Literal["off", "lint", "numerics"]
VERIFY_MODES = ("off", "lint", "numerics")


class Analysis:
    """A pure computation over a graph whose result is cached until a pass invalidates it."""

    name: ClassVar[str]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Any:
        raise NotImplementedError


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, which analyses survive, and its counters."""

    changed: bool
    preserves: Preserved = "none"
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class PassContext:
    """Everything a pass may read besides the graph, and the analysis cache."""

    example_inputs: tuple[torch.Tensor, ...]
    target: Target = field(default_factory=lambda: get_target("x86"))
    calibration: Iterable[Any] | None = None
    verify: VerifyMode = "numerics"
    validation: Any = None  # a quality.Validation: the report's error columns come from the user's data
    state: dict[str, Any] = field(default_factory=dict)  # facts one pass leaves for a later one
    _gm: fx.GraphModule | None = None
    _cache: dict[type, Any] = field(default_factory=dict)

    def analysis(self, kind: type[Analysis], gm: fx.GraphModule | None = None) -> Any:
        """The (cached) result of analysis ``kind`` on the current graph."""
        gm = gm if gm is not None else self._gm
        if gm is None:
            raise PassError("analysis requested outside a pass run")
        if gm is not self._gm:
            self._gm, self._cache = gm, {}
        if kind not in self._cache:
            self._cache[kind] = kind().run(gm, self)
        return self._cache[kind]

    def invalidate(self, preserves: Preserved) -> None:
        if preserves == "all":
            return
        keep = set() if preserves == "none" else set(preserves)
        self._cache = {k: v for k, v in self._cache.items() if k.name in keep}


class Pass:
    """A graph rewrite. Subclasses are dataclasses whose fields are the pass's options."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True  # False: approximate; reports its error in stats
    requires: ClassVar[tuple[type[Analysis], ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()  # passes that must run earlier in the same pipeline

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}

    def changed_options(self) -> dict[str, Any]:
        """The options that differ from their defaults: what a report needs to tell two runs apart."""
        if not dataclasses.is_dataclass(self):
            return {}
        fields = dataclasses.fields(self)
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
                    for f in fields}
        return {k: v for k, v in self.options().items() if defaults[k] is dataclasses.MISSING or defaults[k] != v}

    def __str__(self) -> str:
        opts = self.changed_options()
        return self.name + ("{" + ",".join(f"{k}={v!r}" for k, v in opts.items()) + "}" if opts else "")


# ---------------------------------------------------------------------------------------------- registry

_PASSES: dict[str, type[Pass]] = {}
_PRESETS: dict[str, tuple[str, ...]] = {}
_PRESET_DOCS: dict[str, str] = {}
_entry_points_loaded = False

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: make a Pass available by its ``name`` (``@fxforge.register_pass``)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not isinstance(getattr(cls, "name", None), str):
        raise PassError(f"{cls!r} is not a Pass subclass with a string `name`")
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(cls)  # type: ignore[assignment]
    _PASSES[cls.name] = cls
    return cls


def register_preset(name: str, passes: Sequence[str], doc: str) -> None:
    """Name a sequence of passes (or other presets), e.g. ``"fuse"``."""
    _PRESETS[name] = tuple(passes)
    _PRESET_DOCS[name] = doc


def available_passes() -> dict[str, str]:
    """Every registered pass and preset with a one-line description."""
    _load_entry_points()
    out = {name: cls.description() for name, cls in sorted(_PASSES.items())}
    out.update({name: f"preset: {_PRESET_DOCS[name]} ({' → '.join(steps)})" for name, steps in _PRESETS.items()})
    return out


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import fxforge.passes  # noqa: F401  (the built-in passes register themselves)
    for ep in metadata.entry_points(group="fxforge.passes"):
        try:
            ep.load()
        except Exception as e:
            raise PassError(f"third-party pass entry point {ep.name!r} failed to load: {e}") from e


_SPEC = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?:\{(.*)\})?\s*$")


def split_passes(text: str) -> list[str]:
    """``fuse,low_rank{energy=0.9,budget='flops'}`` → the pass specs (commas inside braces belong to options)."""
    return [p.strip() for p in re.split(r",(?![^{]*\})", text) if p.strip()]


def resolve(spec: str | Pass | Sequence[str | Pass]) -> list[Pass]:
    """Turn names, presets and ``name{opt=value,...}`` strings into Pass instances."""
    _load_entry_points()
    if isinstance(spec, (str, Pass)):
        spec = [spec]
    out: list[Pass] = []
    for item in spec:
        if isinstance(item, Pass):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise PassError(f"a pass must be a name or a fxforge.Pass instance, got {type(item).__name__}")
        m = _SPEC.match(item)
        name = m.group(1) if m else item
        if m and name in _PRESETS and m.group(2) is None:
            out.extend(resolve(list(_PRESETS[name])))
        elif m and name in _PASSES:
            out.append(_instantiate(_PASSES[name], _parse_options(name, m.group(2) or "")))
        else:
            raise PassError(f"unknown pass {item!r}; valid passes: {', '.join(sorted(_PASSES))}; "
                            f"presets: {', '.join(sorted(_PRESETS))}")
    return out


def _parse_options(name: str, text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        assert isinstance(call, ast.Call) and not call.args
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except Exception:
        raise PassError(f"cannot parse options of {name!r}: {text!r} (write name{{key=value,...}})") from None


def _instantiate(cls: type[Pass], options: dict[str, Any]) -> Pass:
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    hints = typing.get_type_hints(cls) if fields else {}
    for key, value in options.items():
        if key not in fields:
            raise PassError(f"pass {cls.name!r} has no option {key!r}; options: {', '.join(fields) or 'none'}")
        if not _type_ok(value, hints.get(key, Any)):
            raise PassError(f"option {key!r} of pass {cls.name!r} must be {_type_name(hints[key])}, "
                            f"got {value!r}")
    try:
        return cls(**options)
    except (TypeError, ValueError, PassError) as e:
        raise PassError(f"bad options for pass {cls.name!r}: {e}") from None


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    base = origin or hint
    return isinstance(base, type) and isinstance(value, base)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------------------------- manager

Instrument = Callable[["PassManager", Pass | None, fx.GraphModule, PassResult | None, float], None]


class PassManager:
    """Runs passes in order on a graph, with verification and a report row after each."""

    def __init__(self, passes: str | Pass | Sequence[str | Pass] = (), verify: VerifyMode = "numerics",
                 measure_latency: bool = True) -> None:
        if verify not in VERIFY_MODES:
            raise PassError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.passes = resolve(passes)
        self.verify = verify
        self.measure_latency = measure_latency
        check_order(self.passes)

    def run(self, gm: fx.GraphModule, ctx: PassContext):
        """Run the pipeline on ``gm`` (mutated in place: callers hand in their own copy)."""
        from .report import Report, StageRecorder
        from .verify import NumericCheck

        ctx.verify = self.verify
        report = Report()
        recorder = StageRecorder(report, ctx, self.measure_latency)
        check = NumericCheck(gm, ctx.example_inputs) if self.verify == "numerics" else None
        recorder.record("input", gm, exact=True, elapsed=0.0, stats={}, error=check.first_error() if check else None)
        done: list[str] = []
        for p in self.passes:
            ctx._gm = gm
            start = time.perf_counter()
            try:
                result = p.run(gm, ctx)
            except FxforgeError:
                raise
            except Exception as e:
                raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e}"
                                f"{_after(done)}") from e
            elapsed = time.perf_counter() - start
            if result.changed:
                gm.recompile()
            self._lint(p, gm, done)
            ctx.invalidate(result.preserves if result.changed else "all")
            error = self._check(check, p, gm, done)
            recorder.record(str(p), gm, exact=p.exact, elapsed=elapsed, stats=result.stats, error=error)
            done.append(p.name)
        return gm, report

    @staticmethod
    def _check(check: Any, p: Pass, gm: fx.GraphModule, done: list[str]) -> Any:
        """The numeric check after ``p``; a graph that no longer runs is the pass's fault, named as such."""
        if check is None:
            return None
        try:
            return check.after(p, gm, done)
        except FxforgeError:
            raise
        except Exception as e:
            node = re.search(r"While executing %(\w+)", str(e))
            where = f" at node {node.group(1)!r}" if node else ""
            raise VerificationError(f"pass {p.name!r} left a graph that fails to run{where}: {type(e).__name__}: "
                                    f"{first_line(e)}{_after(done)}") from e

    def _lint(self, p: Pass, gm: fx.GraphModule, done: list[str]) -> None:
        if self.verify == "off":
            return
        try:
            gm.graph.lint()
        except Exception as e:
            raise VerificationError(f"pass {p.name!r} left a malformed graph: {e}{_after(done)}") from None


def check_order(passes: Sequence[Pass]) -> None:
    """Refuse pipelines in which a pass runs before a pass it depends on."""
    seen: set[str] = set()
    for p in passes:
        missing = [a for a in p.after if a not in seen]
        if missing:
            raise PassError(f"pass {p.name!r} must come after {', '.join(map(repr, missing))} in the pipeline "
                            f"(got: {' → '.join(q.name for q in passes)})")
        seen.add(p.name)


def _after(done: list[str]) -> str:
    return f" (after: {', '.join(done)})" if done else " (it was the first pass)"
