"""Passes, analyses, their registry, and the manager that runs a pipeline with instruments.

The manager is LLVM's new pass manager kept small: passes say which analyses they preserve (by type), analyses
are cached by type until a pass invalidates them, and every pass runs between instruments (timing, lint, a
numeric check against the previous stage, a report row: ``compiler/instruments.py``). Passes never print; the
manager reports.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import re
import warnings
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence, TypeVar

import torch
import torch.fx as fx

from .analysis.base import Analysis
from .errors import FxforgeError, PassError, first_line
from .graph import GraphState
from .instruments import Instrument, Lint, Progress, Stage, Timing, after_passes, step_bar
from .report import Report, StageRecorder
from .target import Target, get_target
from .verify import NumericCheck, ValidationCheck

A = TypeVar("A")
Preserved = frozenset[type[Analysis]] | Literal["all", "none"]
VerifyMode = Literal["off", "lint", "numerics", "full"]
VERIFY_MODES = ("off", "lint", "numerics", "full")
SAMPLED_OUT = "not_run_alone"  # report.meta key: the stages verify="numerics" did not run (NumericCheck.skipped)
NUMERIC_MODES = ("numerics", "full")  # the modes that compare outputs; "full" runs every changed stage (NumericCheck)


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
    train: Sequence[tuple[torch.Tensor, ...]] | None = None  # unlabeled input batches for passes that train
    teacher: fx.GraphModule | None = None  # the graph before the first lossy pass (kept when a pass reads train)
    # the user's model's flat outputs on flat inputs, by key (compile's verify.ModelRuns): the numeric check's bound
    # batches are compared with the model itself, and the artifact check reads the same runs; None: the traced graph
    model_outputs: Callable[[Any, tuple[torch.Tensor, ...]], list[Any]] | None = None
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

    def progress(self, items: Any = None, *, total: int | None = None, desc: str, unit: str) -> Any:
        """A progress bar over a pass's own long loop (``items``, or ``update()`` up to ``total``): the manager's
        instruments show it, so a pass never prints (it shows on a terminal only)."""
        return step_bar(items, total=total, desc=desc, unit=unit)

    def provide(self, kind: type[Analysis], gm: fx.GraphModule, result: Any) -> None:
        """Cache ``result`` as analysis ``kind`` of ``gm``: for an instrument that has just learned the same facts by
        other means (the numeric check's run of a stage gives every node's shape), so nothing computes them again."""
        if gm is not self._gm:
            self._gm, self._cache = gm, {}
        self._cache[kind] = result

    def invalidate(self, preserves: Preserved) -> None:
        """Drop every cached analysis except the ``preserves`` ones (Analysis subclasses, "all" or "none")."""
        if preserves == "all":
            return
        if isinstance(preserves, str) and preserves != "none":  # set("Shapes") would list its letters
            raise PassError(f"preserves must be 'all', 'none' or Analysis classes, got {preserves!r}")
        keep = set() if preserves == "none" else set(preserves)
        wrong = [k for k in keep if not (isinstance(k, type) and issubclass(k, Analysis))]
        if wrong:
            raise PassError(f"preserves must hold Analysis classes, got {wrong!r}")
        self._cache = {k: v for k, v in self._cache.items() if k in keep}


LayerFn = Callable[[list, dict], torch.Tensor]  # a layer's new function of its evaluated (args, kwargs)
# What a pass makes of one layer: the layer's new function; node name → new function when the change spans several
# nodes (the coupled channels of a pruned layer); or the reason it leaves the layer unchanged.
LayerEffect = LayerFn | dict[str, LayerFn] | str


@dataclass(frozen=True)
class LayerContext:
    """What a pass may read when asked about one conv/linear layer alone: its constant weight, the range its
    input took on calibration data, the target, and the cached analyses of the layer's graph (``analysis(kind)``)."""

    weight: torch.Tensor
    input_range: tuple[float, float]
    target: Target
    analysis: Callable[[type[Analysis]], Any] | None = None


class Pass:
    """A graph rewrite. Subclasses are dataclasses whose fields are the pass's options."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True  # False: approximate; reports its error in stats
    after: ClassVar[tuple[str, ...]] = ()  # passes that must run earlier in the same pipeline
    before: ClassVar[tuple[str, ...]] = ()  # passes after which it cannot run (they leave nothing it can rewrite)
    reads_calibration: ClassVar[bool] = False  # True: needs PassContext.calibration (compile checks it up front)
    reads_train: ClassVar[bool] = False  # True: needs PassContext.train and .teacher (the manager keeps the teacher)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own ``__post_init__`` (its option checks) runs after the type check and raises PassError
        naming the pass, so ``LowRank(energy="high")`` fails as the string form ``low_rank{energy='high'}`` does."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "checks_types", False):
            return

        @functools.wraps(own)
        def post_init(self: Pass) -> None:
            Pass.__post_init__(self)
            try:
                own(self)
            except (TypeError, ValueError, PassError) as e:
                raise PassError(f"bad options for pass {self.name!r}: {e}") from None

        post_init.checks_types = True  # type: ignore[attr-defined]
        cls.__post_init__ = post_init  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        """Each option must be of its annotated type (dataclass fields do not check)."""
        try:
            hints = typing.get_type_hints(type(self))
        except NameError:  # an annotation this module cannot resolve: nothing to check against
            return
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints.get(f.name, Any)):
                raise PassError(f"option {f.name!r} of pass {self.name!r} must be {_type_name(hints[f.name])}, "
                                f"got {value!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def layer_effect(self, node: fx.Node, layer: LayerContext) -> LayerEffect | None:
        """What this pass would make of ``node`` (a conv/linear) alone: the layer's new function (or, for a change
        spanning coupled nodes, each node's), or the reason it leaves the layer unchanged; None when the pass does
        not answer per-layer questions. The sensitivity analysis and autotune ask this, so a pass's refusal rules
        and constants have one home."""
        return None

    @classmethod
    def description(cls) -> str:
        """The docstring's first paragraph on one line."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

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

    def refuse_unread(self, option: str, because: str | None) -> None:
        """Refuse ``option`` given away from its default where another option leaves it unread (``because`` says
        which, as "with X, which ..."; None: it is read): the report's row would name an option that changed
        nothing (``low_rank{rank_ratio=0.5,energy=0.01}`` ran as ``rank_ratio=0.5`` alone)."""
        if because is not None and option in self.changed_options():
            raise PassError(f"{option}={getattr(self, option)!r} has no effect {because}: drop it")

    def spec(self, full: bool = False) -> str:
        """The ``name{opt=value,...}`` string ``resolve`` turns back into this pass: the options that differ from
        their defaults, or with ``full`` every option (a record that must mean the same pipeline even if a
        default changes). Round-trips when the option values are Python literals."""
        opts = self.options() if full else self.changed_options()
        return self.name + ("{" + ",".join(f"{k}={v!r}" for k, v in opts.items()) + "}" if opts else "")

    def __str__(self) -> str:
        return self.spec()


# ---------------------------------------------------------------------------------------------- registry

_PASSES: dict[str, type[Pass]] = {}
_PRESETS: dict[str, tuple[str, ...]] = {}
_PRESET_DOCS: dict[str, str] = {}
_entry_points_loaded = False

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: make a Pass available by its ``name`` (``@fxforge.register_pass``); a built-in pass's name is
    refused (registering it again from another module replaced the built-in in every preset)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not isinstance(getattr(cls, "name", None), str):
        raise PassError(f"{cls!r} is not a Pass subclass with a string `name`")
    _check_name(cls.name, "pass")
    if cls.name in _PRESETS:  # the bare name ran the preset, and only name{} the pass
        raise PassError(f"pass name {cls.name!r} is a preset's; give {cls.__qualname__} another name")
    builtin = _PASSES.get(cls.name)
    if builtin is not None and builtin.__module__.startswith("fxforge.") and not cls.__module__.startswith("fxforge."):
        # a user's or a package's class of the same name would replace it in every preset, silently
        raise PassError(f"pass name {cls.name!r} is fxforge's own ({builtin.__module__}.{builtin.__qualname__}); "
                        f"give {cls.__qualname__} another name")
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(cls)  # type: ignore[assignment]
    _PASSES[cls.name] = cls
    return cls


def register_preset(name: str, passes: Sequence[str], doc: str) -> None:
    """Name a sequence of passes (or other presets), e.g. ``"fuse"``. The name must not be a pass's (the bare name
    would run the preset and ``name{...}`` the pass) nor another preset's (the same steps again are fine: a module
    reloaded). Steps are resolved where the preset is used (a plugin's preset may name a pass another plugin
    registers later); one that contains itself is refused there."""
    if not isinstance(passes, (list, tuple)) or not all(isinstance(p, str) for p in passes):
        raise PassError(f"preset {name!r} must be a list of pass names, got {passes!r}")
    _check_name(name, "preset")
    if name in _PASSES or name in _PRESETS and _PRESETS[name] != tuple(passes):
        kind = "pass" if name in _PASSES else "preset"
        raise PassError(f"{name!r} is already a {kind}; give the preset another name")
    _PRESETS[name] = tuple(passes)
    _PRESET_DOCS[name] = doc


def _check_name(name: str, what: str) -> None:
    """A pass or preset name the spec grammar can write: an identifier ("my-pass" registered, and was then
    "unknown" in a list that named it)."""
    if not name.isidentifier():
        raise PassError(f"{what} name {name!r} is not an identifier (letters, digits, _): the pass spec "
                        f"name{{key=value,...}} could not name it")


def pass_class(name: str) -> type[Pass] | None:
    """The registered pass class named ``name``; None for a preset or an unknown name."""
    _load_entry_points()
    return _PASSES.get(name)


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
    for ep in metadata.entry_points(group="fxforge.passes"):
        try:
            ep.load()
        except Exception as e:  # one broken package must not break every compile
            dist = ep.dist.name if getattr(ep, "dist", None) is not None else "an unknown distribution"
            warnings.warn(f"skipping pass entry point {ep.name!r} of {dist}: {type(e).__name__}: {first_line(e)}",
                          RuntimeWarning, stacklevel=2)


_SPEC = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?:\{(.*)\})?\s*$")


def split_passes(text: str) -> list[str]:
    """``fuse,low_rank{energy=0.9,budget='flops'}`` → the pass specs (commas inside braces belong to options); ""
    is none, but an empty item between commas (``fuse,,int8``, ``,,``) is a typo, refused."""
    items = [p.strip() for p in re.split(r",(?![^{]*\})", text)]
    if items == [""]:
        return []
    if "" in items:
        raise PassError(f"empty pass name in {text!r} (two commas in a row, or one at an end)")
    return items


def resolve(spec: str | Pass | Sequence[str | Pass]) -> list[Pass]:
    """Turn names, presets and ``name{opt=value,...}`` strings into Pass instances.

    An item whose passes begin with every pass of the item before it (``fuse, int8``: int8 starts with fuse)
    would run those passes twice in a row; exact ones run once (with a warning), approximate ones are warned of.
    """
    _load_entry_points()
    if isinstance(spec, (str, Pass)):
        spec = [spec]
    if not isinstance(spec, Iterable) or isinstance(spec, (set, frozenset, dict, bytes)):  # no order, or not names
        raise PassError(f"passes must be a pass name, a fxforge.Pass or a list of them, got {type(spec).__name__}")
    out: list[Pass] = []
    before: tuple[str, list[Pass]] | None = None
    for item in spec:
        steps = _expand(item)
        if before is not None and len(steps) > len(before[1]) and \
                [str(p) for p in steps[:len(before[1])]] == [str(p) for p in before[1]]:
            repeated = before[1]
            if all(p.exact for p in repeated):
                warnings.warn(f"pass {item!r} already begins with {before[0]!r}; those passes run once",
                              UserWarning, stacklevel=2)
                steps = steps[len(repeated):]
            else:
                warnings.warn(f"pass {item!r} already begins with {before[0]!r}, which is approximate: "
                              "it runs twice", UserWarning, stacklevel=2)
        out.extend(steps)
        before = (str(item), _expand(item))
    return out


def calibration_readers(spec: str | Pass | Sequence[str | Pass]) -> list[str]:
    """The passes of a pipeline that read ``PassContext.calibration`` (compile requires data for them)."""
    return [p.name for p in resolve(spec) if p.reads_calibration]


def train_readers(spec: str | Pass | Sequence[str | Pass]) -> list[str]:
    """The passes of a pipeline that read ``PassContext.train`` (compile requires data for them)."""
    return [p.name for p in resolve(spec) if p.reads_train]


_EXPANDING: list[str] = []  # the presets being expanded, outermost first (one thread resolves a pipeline at a time)


def _expand(item: str | Pass) -> list[Pass]:
    if isinstance(item, Pass):
        if not isinstance(getattr(item, "name", None), str):  # a raw AttributeError later
            raise PassError(f"{type(item).__name__} is a Pass without a string `name`: give the class one")
        return [item]
    if not isinstance(item, str):
        raise PassError(f"a pass must be a name or a fxforge.Pass instance, got {type(item).__name__}")
    m = _SPEC.match(item)
    name = m.group(1) if m else item
    if m and name in _PRESETS and m.group(2) is None:
        if name in _EXPANDING:  # a preset among its own steps: a bare RecursionError
            raise PassError(f"preset {name!r} contains itself (through {' → '.join(_EXPANDING)})")
        _EXPANDING.append(name)
        try:
            return resolve(list(_PRESETS[name]))
        finally:
            _EXPANDING.pop()
    if m and name in _PASSES:
        return [_instantiate(_PASSES[name], _parse_options(name, m.group(2) or ""))]
    if m and name in _PRESETS:
        raise PassError(f"preset {name!r} takes no options; give them to one of its passes "
                        f"({', '.join(dict.fromkeys(p.split('{')[0] for p in _PRESETS[name]))})")
    known = re.match(r"\s*(\w+)\s*\{", item)
    if m is None and known and (known.group(1) in _PASSES or known.group(1) in _PRESETS):
        raise PassError(f"cannot parse {item!r}: write name{{key=value,...}}, the options in one pair of braces")
    raise PassError(f"unknown pass {item!r}; valid passes: {', '.join(sorted(_PASSES))}; "
                    f"presets: {', '.join(sorted(_PRESETS))}")


def _parse_options(name: str, text: str) -> dict[str, Any]:
    """``key=value`` pairs, each value a Python literal (a quoted string, a number, True/False/None, a tuple)."""
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    # the call must be f's own: "energy=0.01)(" parses as f(energy=0.01)(), whose options were dropped silently
    if not isinstance(call, ast.Call) or not (isinstance(call.func, ast.Name) and call.func.id == "f") or \
            call.args or any(kw.arg is None for kw in call.keywords):
        raise PassError(f"cannot parse options of {name!r}: {text!r} (write name{{key=value,...}})")
    options: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg in options:
            raise PassError(f"option {kw.arg!r} of {name!r} is given twice")
        try:
            options[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            value = ast.unparse(kw.value)
            raise PassError(f"option {kw.arg!r} of {name!r}: {value} is not a value; a string needs quotes "
                            f"({kw.arg}='{value}')") from None
    return options


def _instantiate(cls: type[Pass], options: dict[str, Any]) -> Pass:
    """``cls(**options)``; unknown names are refused here, types and values by the pass's construction."""
    fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    for key in options:
        if key not in fields:
            raise PassError(f"pass {cls.name!r} has no option {key!r}; options: {', '.join(fields) or 'none'}")
    return cls(**options)


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
    if hint is int:  # True is an int to Python; as a count it is a typo (sweeps=True ran one sweep)
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    if origin is tuple and isinstance(value, tuple):  # the elements too: skip=(1,) failed deep in the pass
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return not args or len(args) == len(value) and all(_type_ok(v, h) for v, h in zip(value, args))
    base = origin or hint
    return isinstance(base, type) and isinstance(value, base)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_args(hint):  # tuple[str, ...], not "tuple"
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------------------------- manager

class PassManager:
    """Runs passes in order on a graph between instruments: timing, lint (unless ``verify="off"``), the numeric
    check (``verify="numerics"``, sampled; ``"full"``, every changed stage), a report row, then any ``instruments``
    given."""

    def __init__(self, passes: str | Pass | Sequence[str | Pass] = (), verify: VerifyMode = "numerics",
                 measure_latency: bool = True, instruments: Sequence[Instrument] = ()) -> None:
        if verify not in VERIFY_MODES:
            raise PassError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.passes = resolve(passes)
        self.verify = verify
        self.measure_latency = measure_latency
        self.extra_instruments = tuple(instruments)
        check_order(self.passes)

    def run(self, gm: fx.GraphModule, ctx: PassContext):
        """Run the pipeline on ``gm`` (mutated in place: callers hand in their own copy).

        When a pass of the pipeline reads training data, the graph as it stands before the first lossy pass
        that does not itself train is copied into ``ctx.teacher``: the fp32 model a distilling pass learns
        from, a copy of the traced graph, never the user's module."""
        ctx.verify = self.verify
        ctx.teacher = None
        keep_teacher = any(p.reads_train for p in self.passes)
        report = Report()
        numeric = [NumericCheck(gm, ctx.example_inputs, self.passes, sample=self.verify == "numerics",
                                model=ctx.model_outputs)] if self.verify in NUMERIC_MODES else []
        instruments = [Timing(), *([Lint()] if self.verify != "off" else []), *numeric,
                       StageRecorder(report, self.measure_latency),
                       *([ValidationCheck(gm)] if numeric else []), *self.extra_instruments,
                       Progress(len(self.passes) + 1)]  # last: a stage counts once its checks and row are done
        done: list[str] = []
        for p in (None, *self.passes):
            ctx._gm = gm
            if keep_teacher and ctx.teacher is None and p is not None and not p.exact and not p.reads_train:
                ctx.teacher = copy.deepcopy(gm)
            for instrument in instruments:
                instrument.before(p, gm, ctx)
            result = self._run_pass(p, gm, ctx, instruments, done) if p is not None else None
            stage = Stage("input" if p is None else str(p), p, result, list(done))
            for instrument in instruments:
                instrument.after(p, gm, ctx, stage)
            if p is not None:
                done.append(p.name)
        if numeric and numeric[0].skipped:
            report.meta[SAMPLED_OUT] = list(numeric[0].skipped)
        return gm, report

    @staticmethod
    def _run_pass(p: Pass, gm: fx.GraphModule, ctx: PassContext, instruments: list[Instrument],
                  done: list[str]) -> PassResult:
        before = GraphState(gm)
        try:
            result = p.run(gm, ctx)
        except Exception as e:
            for instrument in instruments:
                instrument.failed(p, gm, ctx, e)
            if isinstance(e, FxforgeError):
                raise
            raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {first_line(e)}{after_passes(done)}") from e
        if not isinstance(result, PassResult):
            got = "None" if result is None else f"a {type(result).__name__}"
            raise PassError(f"pass {p.name!r} returned {got}, not a PassResult{after_passes(done)}")
        if not result.changed and not GraphState(gm) == before:
            # the manager would skip its check and show the previous stage's error: the change would go unverified
            raise PassError(f"pass {p.name!r} changed the graph or its constants but returned changed=False"
                            f"{after_passes(done)}")
        if result.changed:
            gm.recompile()
        ctx.invalidate(result.preserves if result.changed else "all")
        return result


def check_order(passes: Sequence[Pass]) -> None:
    """Refuse pipelines in which a pass runs before a pass it depends on (its ``after``) or after one that leaves it
    nothing to rewrite (its ``before``: channel pruning after quantization changed nothing and said nothing). A pass
    that must run once (it names itself in ``before``) is named first: ``["int8", "int8_dynamic"]`` repeats
    insert_qdq, which says more than the smooth_quant it brings after the first one."""
    once = [p.name for p in passes if p.name in p.before]
    twice = next((name for name in once if once.count(name) > 1), None)
    if twice is not None:
        raise PassError(f"pass {twice!r} runs once in a pipeline (got: {' → '.join(q.name for q in passes)})")
    seen: set[str] = set()
    for p in passes:
        missing = [a for a in p.after if a not in seen]
        if missing:
            raise PassError(f"pass {p.name!r} must come after {', '.join(map(repr, missing))} in the pipeline "
                            f"(got: {' → '.join(q.name for q in passes)})")
        late = [b for b in p.before if b in seen]
        if late:
            raise PassError(f"pass {p.name!r} must come before {', '.join(map(repr, late))} in the pipeline "
                            f"(got: {' → '.join(q.name for q in passes)})")
        seen.add(p.name)

