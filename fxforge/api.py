"""compile(): trace → PassManager → backend → CompiledModel."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxforge.backends.base import Artifact, get_backend
from fxforge.budget import Budget
from fxforge.compiler.errors import (CalibrationError, FallbackWarning, InputError, TargetError, TraceError,
                                     first_line, listed, missing_calibration, missing_train)
from fxforge.compiler.instruments import Phases
from fxforge.compiler.pass_manager import (NUMERIC_MODES, SAMPLED_OUT, Pass, PassContext, PassManager, VerifyMode,
                                           calibration_readers, train_readers)
from fxforge.compiler.quality import Copied, Metric, Validation, flat_batches, reiterable
from fxforge.compiler.report import SYNTHETIC, Report
from fxforge.compiler.target import Target, get_target
from fxforge.compiler.timing import measure_latency as measure_latency_of
from fxforge.compiler.trace import (Signature, ambient_autocast, as_plain, batch_size, byte_span, quantized_inputs,
                                   trace, without_autocast)
from fxforge.compiler.verify import (BOUND_OUTPUTS, ModelRuns, check_artifact, checks_made, copy_model, exact_tolerance,
                                    is_quantized, untouched)

InputKey = int | str | Sequence[int | str]  # input_key: where a calibration item holds the model's inputs


class CompiledModel:
    """The result of :func:`compile`: call it like the model; ``report`` says what each stage did."""

    def __init__(self, graph_module: fx.GraphModule, artifact: Artifact, report: Report) -> None:
        self.graph_module = graph_module
        self.artifact = artifact
        self.report = report

    @property
    def signature(self) -> Signature:
        return self.artifact.signature

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        return self.artifact(*inputs, **kwargs)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save the artifact (``fxforge.load(directory)`` gives it back) and the report beside it."""
        return self.artifact.save(directory, extra_files={"report.json": self.report.to_json()})


def _outside_autocast(compile_fn: Callable[..., CompiledModel]) -> Callable[..., CompiledModel]:
    """``compile_fn`` run with ``torch.autocast`` off, saying so where the caller had it on: fxforge compiles the
    model in the dtypes it holds (under autocast, int8 quantized nothing, ONNX export failed on a bfloat16 op, and a
    TorchScript artifact returned bfloat16 that every check, made under the same autocast, called exact)."""
    @functools.wraps(compile_fn)
    def compile(*args: Any, **kwargs: Any) -> CompiledModel:
        if ambient := ambient_autocast():
            warnings.warn(f"compile was called inside torch.autocast ({', '.join(ambient)}): fxforge compiles the "
                          "model in the dtypes it holds, with autocast off, and the compiled model runs so; convert "
                          "the model (model.bfloat16(), model.half()) to compile it in another precision",
                          UserWarning, stacklevel=2)
        with without_autocast():
            return compile_fn(*args, **kwargs)
    return compile


def _leaving_the_model_as_it_was(compile_fn: Callable[..., CompiledModel]) -> Callable[..., CompiledModel]:
    """``compile_fn`` held to leaving its model (the first argument) as it found it (:func:`verify.untouched`)."""
    @functools.wraps(compile_fn)
    def compile(*args: Any, **kwargs: Any) -> CompiledModel:
        with untouched(args[0] if args else kwargs.get("model")):
            return compile_fn(*args, **kwargs)
    return compile


@_outside_autocast
@_leaving_the_model_as_it_was
def compile(model: torch.nn.Module, example_inputs: Any, passes: str | Pass | Sequence[str | Pass] | None = None,
            backend: str = "eager", target: str | Target = "x86", calibration: Iterable[Any] | None = None,
            calibration_fn: Callable[[Any], Any] | None = None, input_key: InputKey | None = None,
            verify: VerifyMode = "numerics", measure_latency: bool = False, static_batch: bool = False,
            validation: Iterable[Any] | None = None, metric: Metric = None, train: Iterable[Any] | None = None,
            max_drop: float | None = None, strict: bool = False, **backend_options: Any) -> CompiledModel:
    """Capture ``model``, optimize it with ``passes``, and lower it with ``backend`` for ``target``.

    The user's model, example inputs and calibration data are never mutated.

    Args:
        model: the ``torch.nn.Module`` to compile (a copy is captured in eval mode with ``torch.export``; a
            warning names the dropout and batch-norm modules that were left in training mode).
        example_inputs: a tensor or a tuple of inputs (tensors, or dicts/lists of them) the model runs on; their
            shapes fix the compiled signature, with a dynamic batch dimension unless ``static_batch``.
        passes: pass and preset names (``"fuse"``, ``"int8"``, ``"low_rank{energy=0.9}"``), ``Pass`` instances,
            or a list of them; ``fxforge.available_passes()`` lists them. None: no passes.
        backend: ``"eager"``, ``"torchscript"``, ``"onnx"`` or ``"tvm"``.
        target: a target name (``"x86"``, ``"arm64"``, ``"cuda"``, named x86 variants) or a ``Target``.
        calibration: an iterable of input tuples like ``example_inputs``, for passes that read data
            (``calibrate``, ``bias_correction``); a warning says so when no pass reads it.
        calibration_fn: maps each calibration item to an input tuple, e.g. ``lambda b: b[:1]`` for the
            ``(input, label)`` batches of a DataLoader.
        input_key: picks the inputs out of each calibration, validation and train item by index or dict key
            (instead of a ``calibration_fn``, which reads calibration items alone): ``0`` for a DataLoader's
            ``(input, label)`` batches, ``"pixel_values"`` for dict batches; a tuple of keys
            (``("input_ids", "attention_mask")``) gives several inputs in that order. A ``metric`` callable gets the
            validation items as given, labels and all.
        verify: ``"numerics"`` checks every exact pass against the stage before it on fresh inputs and the
            artifact against the graph and the model (``VerificationError`` outside the bounds), sampled: an
            approximate stage that only the next approximate stage reads (``calibrate`` before ``bias_correction``)
            is not run on its own; ``"full"`` runs every changed stage too; ``"lint"`` checks graphs only; ``"off"``
            checks nothing. ``report.meta["checked"]`` says what was compared.
        measure_latency: also time every stage's graph in PyTorch eager and the artifact (off by default: it
            can double compile time).
        static_batch: compile for the example's batch size only.
        validation: an iterable of input tuples (like ``calibration``, never overlapping it) that the report's
            error columns come from: min and mean cosine, max relative error, top-1 agreement for classifier
            outputs (compiler/quality.py). Without it they come from synthetic N(0,1) inputs, and say so.
        metric: the task measure on ``validation``: ``"agreement"``, ``"cosine"`` (mean), ``"min_cosine"`` or
            ``metric(outputs, inputs) -> float`` (higher is better), reported per stage.
        train: an iterable of unlabeled input tuples (like ``calibration``, never overlapping ``validation``) for
            passes that train (``distill``); a warning says so when no pass reads it.
        max_drop: the accuracy budget (fxforge/budget.py): the pipeline must end within ``max_drop`` of the fp32
            model in ``metric`` on ``validation`` (or on calibration batches held out from calibrating). The
            ``int8``, ``int8_dynamic`` and ``all`` presets default to 0.01 (agreement for classifier logits, with the
            min cosine of any outputs after them; else min cosine); ``math.inf`` measures only. A miss of static
            int8 where linears hold most of the FLOPs (a transformer) takes dynamic int8 activations where they hold;
            otherwise a miss keeps the layers whose quantization costs most float; either with a warning.
            ``report.meta["budget"]`` records the outcome.
        strict: raise ``BudgetError`` instead of changing the quantization when the pipeline misses its budget, and
            ``TargetError`` instead of warning when the backend falls back from ``target`` (e.g. the onnx backend
            without ONNX Runtime's CUDA provider for ``target="cuda"``). A portable artifact (eager, TorchScript,
            or ONNX for ``arm64``) is built for the target and checked by running it here: no fallback.
        **backend_options: options of the backend, checked before any work: ``onnx`` takes ``opset`` and ONNX
            Runtime session options (``intra_op_num_threads``, ``graph_optimization_level``, ...); ``tvm``
            takes ``tune={"trials": N, "db": DIR, ...}`` (docs/tuning.md).

    Returns:
        A ``CompiledModel``: call it like the model; ``.report`` says what each stage did; ``.save(dir)``.
    """
    tgt = get_target(target)
    be = get_backend(backend)
    be.check_target(tgt)
    be.check_options(backend_options)
    manager = PassManager(passes or (), verify=verify, measure_latency=measure_latency)  # names checked first
    budget = Budget.of(passes, max_drop, metric, strict)
    example = as_plain(tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    pick = calibration_picker(calibration_fn, input_key, example)
    calibration, validation, train = (reiterable(d, kind) for d, kind in ((calibration, "calibration"),
                                                                        (validation, "validation"), (train, "train")))
    for kind, data, readers in (("calibration", calibration, calibration_readers(manager.passes)),
                                ("train", train, train_readers(manager.passes))):
        if readers and _shared_tensors(data, validation):
            warnings.warn(f"validation and {kind} data share tensors: the report's quality and the accuracy budget "
                          f"are then measured on data the passes {'calibrated' if kind == 'calibration' else 'trained'}"
                          " on, which says little about unseen data; give held-out validation data", UserWarning,
                          stacklevel=3)
    _check_data(manager, "calibration", calibration, calibration_readers(manager.passes), missing_calibration,
                budget_reads=budget is not None and validation is None)
    _check_data(manager, "train", train, train_readers(manager.passes), missing_train)
    _check_tensors(model)
    constant = _constant_integer_inputs(example)
    if constant and verify != "off":
        warnings.warn(f"the example's integer inputs {constant} hold one value each (an all-black image?): the checks "
                      f"draw fresh integers from the example's values, so they ran on that value alone and left the "
                      f"compiled model unchecked on any other; give an example of real values", UserWarning,
                      stacklevel=3)
    training = _training_modules(model)
    if training:
        warnings.warn(f"the model is in training mode ({training}): fxforge compiles it as model.eval() computes, "
                      "as inference runs it; call model.eval() first to say so", UserWarning, stacklevel=3)
    hooked = _hooked_modules(model)
    if hooked:
        warnings.warn(f"the model has hooks ({hooked}): compiling runs them on the example and on random inputs and "
                      "captures what they compute into the graph, but the compiled model does not call them (a "
                      "hook's side effects, such as an activation log, happen in eager only)", UserWarning,
                      stacklevel=3)
    # a portable artifact (eager, TorchScript, ONNX) runs here whatever its target, and is checked here
    runs_here = tgt.runs_on_host or be.artifact.portable
    checks_artifact = runs_here and verify in NUMERIC_MODES
    phases = Phases(3 + (budget is not None) + checks_artifact)
    with phases.phase("trace", "capturing with torch.export"):
        gm, signature, runs, uncached = _capture(model, example, static_batch)
    if runs.state_changes:
        warnings.warn(f"forward changes the model's own state ({listed(runs.state_changes)}); the compiled model "
                      "computes every call from the state at compile time and changes nothing (a call counter stays "
                      "as it was; a value forward writes and then reads in one call is computed as before)",
                      UserWarning, stacklevel=3)
    flat = tuple(signature.flatten(example))
    calibration = passes_calibration(calibration, signature, example, pick)
    given_train = train
    keyed = pick[0] if input_key is not None else None  # input_key picks from every data argument
    if not signature.dynamic_batch:
        validation, train = (None if data is None else _Rebatched(data, example, kind, keyed) for data, kind in
                             ((validation, "validation"), (train, "train")))
    checked = None if validation is None and metric is None else \
        Validation.from_user(validation, signature.flatten, metric, keyed)
    if budget is not None:
        calibration = budget.hold_out(calibration, checked, flat)
        if validation is None and budget.data is not None and train_readers(manager.passes) and \
                _shared_tensors(given_train, budget.data.batches):
            warnings.warn("the accuracy budget's held-out calibration batches are train data too: the budget is then "
                          "measured on data the passes trained on, which says little about unseen data; give "
                          "validation= data, or train data without those batches (every fourth calibration batch)",
                          UserWarning, stacklevel=3)
    spec = pytree.tree_flatten(example)[1]
    ctx = PassContext(example_inputs=flat, target=tgt, calibration=calibration, validation=checked,
                      train=None if train is None else flat_batches(train, signature.flatten, "train", keyed)[1],
                      model_outputs=None if runs is None else
                      lambda key, x: runs.outputs(key, pytree.tree_unflatten(list(x), spec)))
    original = copy.deepcopy(gm) if budget is not None else None  # the search's start, should the budget miss
    with phases.phase("passes", "passes"):
        gm, report = manager.run(gm, ctx)
    _warn_if_only_other_dtypes(report)
    if budget is not None:
        with phases.phase("budget", "accuracy budget"):
            fitted = budget.fit(manager, original, ctx, result=gm, unlowered=None if be.dynamic_int8 else
                                f"the {be.name} backend has no dynamic int8 linears",
                                lowered=_lowered_runner(be, flat, signature, tgt, backend_options, budget.data)
                                if runs_here else None)
            if fitted is not manager:  # missed: run the pipeline that keeps the costliest layers float
                gm, report = fitted.run(original, ctx)
    with phases.phase("backend", f"lowering to {be.name}"):
        artifact = _lower(be, gm, flat, signature, tgt, strict, backend_options)
        stored = artifact.stored_bytes()  # a TVM library is linked here, once
    row = dataclasses.replace(report.final, stage=f"backend:{artifact.backend}", exact=True,
                              time_s=phases.times["backend"],
                              latency_ms=None, max_rel_err=None, cosine=None, cosine_mean=None, top1=None, metric=None,
                              stats={})  # what is measured below, on the artifact; nothing copied from the graph
    row.bytes = stored or row.bytes  # else the graph's constants, which eager's program stores
    report.rows.append(row)
    elsewhere = artifact.unrunnable()  # why this machine cannot run it ("": it can)
    if checks_artifact and elsewhere:
        phases.skip()
    elif checks_artifact:
        with phases.phase("artifact_check", "checking the artifact against the model"):
            err = check_artifact(artifact, runs, gm, example, all(r.exact for r in report.rows))
        row.max_rel_err, row.cosine = err.max_rel, err.cosine
        if err.discrete:  # an approximate pipeline moved an argmax or a mask: the float errors above do not say it
            report.meta["discrete_outputs"] = f"differ from your model's (the example and fresh inputs): {err.discrete}"
            warnings.warn(f"the compiled model's integer or bool outputs {report.meta['discrete_outputs']}; the "
                          "report's errors cover its float outputs alone", UserWarning, stacklevel=3)
    gm.meta.pop(BOUND_OUTPUTS, None)  # the numeric check's last outputs, kept for the artifact check only
    if tgt.runs_on_host and not elsewhere and measure_latency and report.rows[0].latency_ms is not None:  # own CPU
        row.latency_ms = measure_latency_of(lambda *x: artifact.run(x), flat)
    if checked is not None and not elsewhere:
        if why := _not_taken(artifact, checked):
            report.meta["artifact_quality"] = f"not measured: {why}"
            warnings.warn(f"the report's error columns of the artifact were not measured: {why}", UserWarning,
                          stacklevel=3)
        else:
            row.set_quality(checked.measure(lambda *x: artifact.run(x)))
    if budget is not None:
        why = elsewhere or _not_taken(artifact, budget.data)
        if why and not elsewhere:
            warnings.warn(f"the accuracy budget was measured on the graph, not on the artifact: {why}", UserWarning,
                          stacklevel=3)
        budget.check(None if why else (lambda *x: artifact.run(x)), report, artifact.backend, why)
    report.meta.update({"backend": backend, "target": tgt.name, "dynamic_batch": artifact.signature.dynamic_batch,
                        **({"note": artifact.signature.note} if artifact.signature.note else {}), **artifact.info})
    report.meta["errors"] = checked.describe() if checked is not None else SYNTHETIC if verify in NUMERIC_MODES else \
        f"not measured (verify={verify!r}): no stage was run on inputs"
    report.meta["checked"] = checks_made(verify, all(r.exact for r in report.rows), is_quantized(gm), artifact.backend,
                                         elsewhere, exact_tolerance(gm), report.meta.get(SAMPLED_OUT, ()),
                                         artifact.signature.dynamic_batch, checked is not None,
                                         None if tgt.runs_on_host else tgt.name)
    report.meta["compile_s"] = {k: round(v, 2) for k, v in phases.times.items()}  # where compile time went
    if uncached:
        report.meta["use_cache"] = (f"False for {', '.join(uncached)}: transformers' KV cache (an output torch.export "
                                    "cannot capture) is off in the compiled model, which computes the no-cache forward; "
                                    "docs/backends.md shows a decoder step with its cache as inputs and outputs")
    if gm.meta.get("input_writes_dropped"):
        report.meta["input_writes_dropped"] = (f"the model writes into input(s) "
                                               f"{', '.join(gm.meta['input_writes_dropped'])}; the compiled model "
                                               "returns the same outputs without writing back")
    return CompiledModel(gm, artifact, report)


def _lower(be: Any, gm: fx.GraphModule, flat: tuple, signature: Signature, tgt: Target, strict: bool,
           options: dict[str, Any]) -> Artifact:
    """The backend's artifact; its fallbacks (``Artifact.fallbacks``) are warned of, or under ``strict`` a
    TargetError."""
    artifact = _build(be, gm, flat, signature, tgt, options)
    for fallback in artifact.fallbacks:
        if strict:
            raise TargetError(f"{fallback} (strict=True)")
        warnings.warn(fallback, FallbackWarning, stacklevel=4)  # the caller's compile(...)
    return artifact


def _build(be: Any, gm: fx.GraphModule, flat: tuple, signature: Signature, tgt: Target,
           options: dict[str, Any]) -> Artifact:
    """``be``'s artifact of ``gm``, its signature refusing NaN and Inf in the inputs an int8 graph quantizes (an
    older reader ignores the field as it did before: it skips the check, reads nothing wrong; format the same)."""
    be.check_graph(gm)
    return be.lower(gm, flat, dataclasses.replace(signature, finite_inputs=quantized_inputs(gm)), tgt, **options)


def _lowered_runner(be: Any, flat: tuple, signature: Signature, tgt: Target, options: dict[str, Any],
                    data: Validation | None) -> Callable[[fx.GraphModule], Callable[..., Any] | None]:
    """A graph → its artifact's run, for the accuracy budget to measure what the backend computes (None where it
    cannot: the artifact does not run here or not on ``data``'s batches, or lowering failed, which the chosen
    graph's own lowering reports where it fails too). A trial: its fallbacks are not warned of (the chosen graph's
    are), and it is not tuned (``tune``: a schedule changes no value, and tuning each trial took minutes)."""
    trial = {k: v for k, v in options.items() if k != "tune"}

    def lowered(gm: fx.GraphModule) -> Callable[..., Any] | None:
        try:
            artifact = _build(be, gm, flat, signature, tgt, trial)
        except Exception:
            return None
        return None if artifact.unrunnable() or _not_taken(artifact, data) else lambda *x: artifact.run(x)
    return lowered


def _constant_integer_inputs(example: Any) -> list[int]:
    """The positions (flat) of the example's integer tensors of more than one element that hold one value: fresh
    inputs draw integers from the example's values (``verify.random_like``), so they hold that value alone too. Not
    a mask or type ids of 0s or 1s alone (an attention mask of ones is a typical example, not a dummy), unless an
    image's (uint8, or three dimensions or more)."""
    return [i for i, t in enumerate(pytree.tree_leaves(example)) if isinstance(t, torch.Tensor) and t.numel() > 1
            and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
            and t.layout == torch.strided and not t.is_meta and bool(t.min() == t.max())
            and (t.dtype == torch.uint8 or t.dim() >= 3 or int(t.min()) not in (0, 1))]


def _check_data(manager: PassManager, kind: str, data: Iterable[Any] | None, readers: list[str],
                missing: Callable[[str], Exception], budget_reads: bool = False) -> None:
    """Before any work: a pipeline whose passes read ``kind`` data (calibration, train) must get it; data that
    neither a pass nor the accuracy budget (``budget_reads``: it holds out calibration batches) reads is pointed
    out."""
    if readers and data is None:
        raise missing(readers[0])
    if readers and isinstance(data, Sequence) and not data:  # passes with no check of their own failed raw
        raise type(missing(readers[0]))(f"pass {readers[0]!r} got an empty {kind} iterable: pass "
                                        f"{kind}=[(x1,), (x2,), ...]")
    if (readers or budget_reads) and isinstance(data, Sequence) and data:
        tensors = [t for t in pytree.tree_leaves(list(data)) if isinstance(t, torch.Tensor) and t.numel() > 1
                   and t.layout == torch.strided and not t.is_meta]
        if tensors and all(bool(t.min() == t.max()) for t in tensors):
            warnings.warn(f"every input tensor of the {kind} data holds one value (all zeros?): what the "
                          f"passes measure on it ({', '.join(readers) or 'the accuracy budget'}: activation ranges, "
                          "layer sensitivities) says nothing of real inputs; give real data", UserWarning,
                          stacklevel=4)
    if not readers and data is not None and not budget_reads:
        warnings.warn(f"{kind} data given, but no pass of this pipeline reads it "
                      f"({', '.join(p.name for p in manager.passes) or 'no passes'}); it is ignored", UserWarning,
                      stacklevel=4)


def _warn_if_only_other_dtypes(report: Report) -> None:
    """Warn when a quantizing pass quantized no layer because every one computes in another dtype than float32 (a
    float16 or float64 model): int8 gave such a model back unquantized, the budget "held" with no layer float, and
    only a count in the report's stats (``skipped.not_float32``) said why."""
    stats = [row.stats for row in report.rows if row.stats]
    skipped = sum(s.get("skipped.not_float32", 0) for s in stats)
    if skipped and not any(s.get("weights", 0) or s.get("dynamic_linears", 0) for s in stats):
        warnings.warn(f"int8 quantized no layer: {skipped} compute in another dtype than float32, and int8 quantizes "
                      "float32 layers only (convert the model with .float() first)", UserWarning, stacklevel=4)


def _training_modules(model: Any) -> str:
    """The submodules of ``model`` left in training mode whose output eval mode changes (dropout with p > 0, batch
    and instance norm with running statistics, the hook of ``torch.nn.utils.spectral_norm``, whose power iteration
    runs in training only: 7.5× off eval's output unwarned, attention and RNNs with a dropout option), in words; ""
    when there are none. Code that reads ``self.training`` itself is not seen."""
    if not isinstance(model, torch.nn.Module):
        return ""
    from torch.nn.utils.spectral_norm import SpectralNorm
    kinds = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)
    found = [f"{name or 'the model'}: {type(m).__name__}" for name, m in model.named_modules()
             if getattr(m, "training", False) and isinstance(m, kinds) and getattr(m, "track_running_stats", True)
             and getattr(m, "p", 1) != 0]
    found += [f"{name or 'the model'}: spectral_norm" for name, m in model.named_modules()
              if getattr(m, "training", False) and  # (a TorchScript module has no such attribute)
              any(isinstance(h, SpectralNorm) for h in getattr(m, "_forward_pre_hooks", {}).values())]
    found += [f"{name or 'the model'}: {type(m).__name__}(dropout={m.dropout})" for name, m in model.named_modules()
              if getattr(m, "training", False) and isinstance(m, (torch.nn.MultiheadAttention, torch.nn.RNNBase))
              and m.dropout > 0 and getattr(m, "num_layers", 2) > 1]  # an option (an RNN's: between layers)
    return listed(found)


def _hooked_modules(model: Any) -> str:
    """The submodules of ``model`` with forward or backward hooks, and whether global module hooks are set, in
    words; "" when there are none."""
    if not isinstance(model, torch.nn.Module):
        return ""
    kinds = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
             "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}
    found = [f"{name or 'the model'}: {kind}" for name, m in model.named_modules() for attr, kind in kinds.items()
             if getattr(m, attr, None)]
    module = torch.nn.modules.module
    if module._global_forward_hooks or module._global_forward_pre_hooks:
        found.append("global module hooks")
    return listed(found)


def _check_tensors(model: torch.nn.Module) -> None:
    """Refuse weights without data or holding NaN. Inf is legitimate in buffers (causal and padding masks hold
    -inf) but not in parameters or batch-norm statistics, where it turns what it touches into NaN or zero.
    Anything but a module is left to ``trace``, which names it."""
    if not isinstance(model, torch.nn.Module):
        return
    params = {name for name, _ in model.named_parameters()}
    bn_stats = {f"{name}.{stat}" for name, m in model.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._NormBase) for stat in ("running_mean", "running_var")}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if torch.nn.parameter.is_lazy(t):  # its detach raised a raw ValueError
            raise InputError(f"model tensor {name!r} is an uninitialized lazy parameter (LazyLinear, LazyConv2d, ...): "
                             "run the model once on an example input first, which gives it its shape")
        t = t.detach()  # a parameter made under inference_mode refuses isinf's autograd (a raw RuntimeError)
        if t.is_meta:
            raise InputError(f"model tensor {name!r} is on the meta device (it has no data); load the weights "
                             "first, e.g. model.load_state_dict(state, assign=True)")
        if not t.is_floating_point():
            continue
        if torch.isnan(t).any():
            raise InputError(f"model tensor {name!r} holds NaN")
        if (name in params or name in bn_stats) and torch.isinf(t).any():
            raise InputError(f"model tensor {name!r} holds Inf")


def _shared_tensors(a: Iterable[Any] | None, b: Iterable[Any] | None) -> bool:
    """Whether two lists of batches hold memory in common (the same list passed twice, or the same batches; two
    slices of one tensor, ``x[:500]`` and ``x[500:]``, do not); data that are not lists are not read here, but the
    same object twice, or two DataLoaders over one dataset, share."""
    a, b = (d.data if isinstance(d, Copied) else d for d in (a, b))  # the user's own data
    if a is not None and (a is b or getattr(a, "dataset", None) is getattr(b, "dataset", object())):
        picked = [getattr(getattr(d, "sampler", None), "indices", None) for d in (a, b)]  # SubsetRandomSampler's
        return a is b or None in picked or bool(set(picked[0]) & set(picked[1]))
    if not (isinstance(a, Sequence) and isinstance(b, Sequence)):
        return False

    def spans(data: Sequence[Any]) -> list[tuple[int, int]]:
        return [byte_span(t) for t in pytree.tree_leaves(list(data)) if isinstance(t, torch.Tensor) and t.numel()
                and t.layout == torch.strided and not t.is_meta]  # others have no bytes (the signature refuses them)

    events = sorted([(start, end, 0) for start, end in spans(a)] + [(start, end, 1) for start, end in spans(b)])
    reach = [0, 0]  # the furthest end of a span of each list seen so far, in order of their starts
    for start, end, side in events:
        if start < reach[1 - side]:
            return True
        reach[side] = max(reach[side], end)
    return False


def _not_taken(artifact: Artifact, data: Validation | None) -> str:
    """Why ``artifact`` cannot run ``data``'s batches, or "" where it can: a backend that fixed the batch (a
    TorchScript trace, a TVM build for the example's shapes) takes no other, and run past its signature it computed
    with the example's batch (a model scaling by its batch size came out 0.5 off, stated as the artifact's error;
    TVM raised a raw RuntimeError)."""
    for i, flat in enumerate(data.flat if data is not None else ()):
        for t, spec in zip(flat, artifact.signature.inputs):
            if t.dim() != len(spec.shape) or any(e is not None and e != d for e, d in zip(spec.shape, t.shape)):
                return (f"the {artifact.backend} artifact takes shape {list(spec.shape)} only (the backend fixed its "
                        f"batch: {artifact.signature.note or 'static'}), and batch {i} of that data holds "
                        f"{list(t.shape)}; give batches of the example's size")
    return ""


class _Rebatched:
    """``data`` in batches of the example's size, for an artifact whose batch is static (``static_batch``, or a
    model that branches on its batch size): calibration, validation and train batches hold samples, and a batch of
    n·b samples becomes n batches of the b the graph was captured for, which is all that graph can run. Inputs
    whose leading size is not the example's batch pass whole; a batch that does not divide is a named error."""

    def __init__(self, data: Iterable[Any], example: tuple[Any, ...], kind: str,
                 pick: Callable[[Any], Any] | None = None) -> None:
        leaves = pytree.tree_leaves(example)
        # the batch is the first input's with a dimension, as the signature takes it: the smallest leading size
        # took a side table of 2 rows beside a batch of 4 for the batch, and no batch was split
        self.size = batch_size(leaves) or 1
        self.batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and int(t.shape[0]) == self.size for t in leaves]
        self.data, self.kind, self.pick = data, kind, pick

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            try:
                inputs = batch if self.pick is None else self.pick(batch)
            except Exception:  # flat_batches names why the inputs cannot be picked out of it
                yield batch
                continue
            leaves, spec = torch.utils._pytree.tree_flatten(inputs if isinstance(inputs, (tuple, list)) else (inputs,))
            counts = {int(t.shape[0]) for t, b in zip(leaves, self.batched) if b and isinstance(t, torch.Tensor)}
            if len(leaves) != len(self.batched) or counts <= {self.size}:
                yield batch  # as the graph takes it, or wrong otherwise: the signature's check names how
                continue
            n = counts.pop() if len(counts) == 1 else None
            if n is None or n % self.size:
                error = CalibrationError if self.kind == "calibration" else InputError
                raise error(f"{self.kind} batch {i} holds {n if n is not None else 'unequal numbers of'} samples, "
                            f"which the compiled batch of {self.size} does not divide (the artifact's batch is "
                            f"static): give batches of a multiple of {self.size}")
            for k in range(0, n, self.size):
                if self.pick is None:
                    yield torch.utils._pytree.tree_unflatten(
                        [t[k:k + self.size] if b else t for t, b in zip(leaves, self.batched)], spec)
                else:  # an item the inputs are picked out of: its labels (n rows) are cut along with them, and
                    whole = {id(t) for t, b in zip(leaves, self.batched) if not b}  # inputs of no batch pass whole
                    yield pytree.tree_map(lambda t: t[k:k + self.size] if isinstance(t, torch.Tensor) and t.dim()
                                          and int(t.shape[0]) == n and id(t) not in whole else t, batch)


def passes_calibration(calibration: Iterable[Any] | None, signature: Signature, example: tuple[Any, ...],
                       pick: tuple[Callable[[Any], Any], str] | None) -> Iterable[Any] | None:
    """The user's calibration data as the passes read it: the inputs picked out of each item (``pick``, from
    :func:`calibration_picker`), flattened where the model's inputs nest (:func:`_flattener`), cut into the
    example's batch where the captured graph's batch is static, and checked against the signature
    (:func:`_checker`). ``compile`` and ``autotune`` both read it so:
    autotune, reading the items as given, refused a dict-input model's batches and ran a static-batch graph on
    batches it cannot take (a raw error deep in torch.fx)."""
    if calibration is None:
        return None
    if pick is not None:
        calibration = MappedBatches(calibration, *pick)
    if not all(isinstance(e, torch.Tensor) for e in example):  # a dict, a namedtuple among the inputs
        calibration = MappedBatches(calibration, _flattener(signature), "calibration")
    if not signature.dynamic_batch:
        calibration = _Rebatched(calibration, example, "calibration")
    return MappedBatches(calibration, _checker(signature), "calibration")


def _flattener(signature: Signature) -> Callable[[Any], Any]:
    """For a model whose inputs nest (a dict, a namedtuple): a calibration item given like the example inputs,
    ``(dict,)``, as the flat tuple the passes read, in the compiled order (a dict's keys in any order; a static batch
    then cuts it); one already flat (as many tensors as the graph takes) stays."""
    count = len(signature.inputs)

    def flat(item: Any) -> Any:
        if isinstance(item, (tuple, list)) and len(item) == count and all(isinstance(t, torch.Tensor) for t in item):
            return tuple(item)
        return tuple(signature.flat(item if isinstance(item, (tuple, list)) else (item,)))
    return flat


def _checker(signature: Signature) -> Callable[[Any], Any]:
    """A flat calibration item checked against the signature as a call's inputs are (:meth:`Signature.check`: a
    meta or sparse tensor, inputs of two batch sizes or token ids past an embedding failed deep in a pass or in
    autotune, with torch's own words). Items of another count or kind pass as they are: ``checked_batches`` names
    them with hints ((input, label) pairs: ``input_key``)."""
    count = len(signature.inputs)

    def checked(item: Any) -> Any:
        tensors = item if isinstance(item, (tuple, list)) else (item,)
        if len(tensors) == count and all(isinstance(t, torch.Tensor) for t in tensors):
            return tuple(signature.check(list(tensors)))
        return item
    return checked


def _capture(model: Any, example: tuple, static_batch: bool
             ) -> tuple[fx.GraphModule, Signature, ModelRuns | None, list[str]]:
    """``trace`` with the model's reference runs on a copy (calling the user's model must not change it). A
    transformers decoder whose output holds its KV cache (a ``DynamicCache``: export refuses it) is captured again
    without the cache (``_without_kv_cache``); the last item names the modules whose cache was turned off."""
    runs = ModelRuns(copy_model(model).eval()) if isinstance(model, torch.nn.Module) else None
    try:
        return (*trace(model, example, static_batch=static_batch, runs=runs), runs, [])
    except TraceError as e:
        uncached_model, uncached = _without_kv_cache(model)
        if not uncached or "Cache" not in str(e):
            raise
    runs = ModelRuns(uncached_model.eval())
    return (*trace(uncached_model, example, static_batch=static_batch, runs=runs), runs, uncached)


def _without_kv_cache(model: Any) -> tuple[Any, list[str]]:
    """``model``, or a copy of it in which every transformers submodule whose config asks for a KV cache
    (``config.use_cache``) computes without one, and the names of those submodules. The cache comes back as a
    ``DynamicCache`` output, which torch.export cannot capture (a TraceError); the user's model keeps its config."""
    if not isinstance(model, torch.nn.Module):
        return model, []
    configs = {}  # config → the first (outermost) module holding it: submodules share their model's config
    for name, m in model.named_modules():
        if getattr(getattr(m, "config", None), "use_cache", None) is True:
            configs.setdefault(id(m.config), name or type(model).__name__)
    cached = list(configs.values())
    if not cached:
        return model, []
    model = copy_model(model)
    for m in model.modules():
        if getattr(getattr(m, "config", None), "use_cache", None) is True:
            m.config.use_cache = False
    return model, cached


def calibration_picker(calibration_fn: Callable[[Any], Any] | None, input_key: InputKey | None,
                       example: tuple[Any, ...] = ()) -> tuple[Callable[[Any], Any], str] | None:
    """What picks the inputs out of each calibration item, and its name for errors: ``calibration_fn``, or
    ``input_key`` (checked here, before any work); None when neither is given. Where the model takes one dict
    (``example``) and the keys name its entries, the picked values fill those entries by name: taken as the model's
    flat inputs in the order given, ``("aux", "img")`` calibrated the "img" entry on the "aux" data."""
    if calibration_fn is not None and input_key is not None:
        raise InputError("give calibration_fn or input_key, not both: each picks the inputs out of a calibration "
                         "batch")
    if calibration_fn is not None:
        if not callable(calibration_fn):
            raise InputError(f"calibration_fn must be callable, got {type(calibration_fn).__name__}")
        return calibration_fn, "calibration_fn"
    if input_key is None:
        return None
    keys = input_key if isinstance(input_key, (tuple, list)) else (input_key,)
    if not keys or not all(isinstance(k, (int, str)) and not isinstance(k, bool) for k in keys):
        raise InputError(f"input_key must be an index, a dict key or a tuple of them (e.g. 0, 'pixel_values', "
                         f"('input_ids', 'attention_mask')), got {input_key!r}")

    def pick(batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):  # indexing would take a sample, not an input
            raise CalibrationError("input_key picks from tuples, lists and dicts, but the batch is a tensor; "
                                   "leave input_key out")
        found = []
        for k in keys:
            try:
                found.append(batch[k])
            except (KeyError, IndexError, TypeError):
                held = f"a {type(batch).__name__} with keys {list(batch)}" if isinstance(batch, Mapping) else \
                    f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, Sized) else \
                    f"a {type(batch).__name__}"
                raise CalibrationError(f"input_key {k!r} is not in it ({held})") from None
        if by_name:
            return ({k: found[keys.index(k)] for k in example[0]},)
        return tuple(found) if isinstance(input_key, (tuple, list)) else found[0]
    by_name = isinstance(input_key, (tuple, list)) and len(example) == 1 and isinstance(example[0], Mapping) and \
        set(example[0]) == set(keys) and len(set(keys)) == len(keys)
    return pick, "input_key"


class MappedBatches:
    """``fn`` applied to each item of ``data``, anew on each iteration (several passes may read calibration data):
    picks the inputs out of batches shaped otherwise, e.g. ``(input, label)`` pairs of a DataLoader. ``name``
    (``calibration_fn``, ``input_key``) names it in the error of an item it fails on."""

    def __init__(self, data: Iterable[Any], fn: Callable[[Any], Any], name: str) -> None:
        self.data, self.fn, self.name = data, fn, name

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            try:
                item = self.fn(batch)
            except (CalibrationError, InputError) as e:  # the picking's or the signature's own message
                raise CalibrationError(f"calibration batch {i}: {e}") from None
            except Exception as e:
                raise CalibrationError(f"{self.name} failed on batch {i}: {type(e).__name__}: "
                                       f"{first_line(e)}") from None
            yield item
