"""Benchmark harness: fxforge pipelines against the peers, interleaved in one process so ratios are fair.

A *system* turns (model, example inputs, calibration) into a runner on flat tensors. Every system of a
model is built first (in an order rotated per model), then timed in rounds, each round running every
system once in turn, starting one system later each round, with a short pause between systems so one
system's spinning thread pool never runs into the next one's sample. Every ONNX Runtime session, a peer's
or fxforge's, gets the same options (:func:`ort_options`: level "all", PyTorch's thread count), and is built
anew before each of its samples (``rebuild``), so no system is timed on a session built earlier or later than
another's. Each sample is the mean of enough calls to last ``sample_ms``; a row reports the median sample with
min–max over rounds, its ratio to eager PyTorch and to the best peer (the median of the per-round ratios, with
their 90 % interval: load drifting between rounds cancels in a ratio of two samples of one round), size, FLOPs,
achieved GFLOP/s against the CPU's measured peak, the error against eager on fresh random inputs and, given
held-out data, quality on it (top-1 agreement, min and mean cosine vs eager). With ``self_check``, ORT fp32 is
built a second time, last: the identical graph must time within noise, or :func:`self_check` says the run is noisy.
``benchmarks/run.py`` runs it on the trained and the random-init zoo; ``fxforge bench`` on a user's model.
"""
from __future__ import annotations

import copy
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fxforge.compiler.errors import FxforgeError, first_line
from fxforge.compiler.timing import interleaved_latency, median_interval, paired_ratios
from fxforge.compiler.trace import silenced_warnings
from fxforge.compiler.verify import compare, fresh_inputs

Runner = Callable[[Sequence[torch.Tensor]], Any]


@dataclass
class Built:
    """A system ready to time: its runner, how long it took to build, and what it runs. ``rebuild`` makes a fresh
    runner (a new ONNX Runtime session of the same model): the timing rounds use it to time every sample on a
    session built just before it."""

    run: Runner
    compile_s: float
    params: int | None = None
    bytes: int | None = None
    flops: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    rebuild: Callable[[], Runner] | None = None
    model_flops: int | None = None  # the model's own FLOPs before any pass (fxforge systems count them)
    model_size: tuple[int, int] | None = None  # and its (params, bytes), as the report's input row counts them


@dataclass
class System:
    """A way to run a model. ``peer`` marks what users compare fxforge against."""

    name: str
    build: Callable[[torch.nn.Module, tuple, list], Built]
    peer: bool = False
    needs: tuple[str, ...] = ()  # importable modules the system needs
    budgeted: bool = False  # its build takes ``validation=``, the accuracy budget's data, when a model has some
    calibrates: tuple[str, ...] = ()  # a peer's own steps that read calibration data (fxforge's: its pipeline's)

    def calibration_readers(self) -> list[str]:
        """What of this system reads calibration data: for a fxforge pipeline, the passes the pass registry says
        read it (those ``fxforge.compile`` refuses to run without data); for a peer, ``calibrates``."""
        passes = getattr(self.build, "passes", None)
        if passes is None:
            return list(self.calibrates)
        from fxforge.compiler.pass_manager import calibration_readers
        return calibration_readers(list(passes))


def needing_calibration(systems: Sequence[System]) -> dict[str, list[str]]:
    """The systems that cannot be built without calibration data, each with what of it reads the data."""
    return {s.name: readers for s in systems if (readers := s.calibration_readers())}


@dataclass
class Row:
    model: str
    batch: int
    system: str
    peer: bool
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    vs_eager: float | None = None
    vs_best_peer: float | None = None
    vs_best_peer_interval: tuple[float, float] | None = None  # 90 % interval of the per-round ratios' median
    params: int | None = None
    bytes: int | None = None
    flops: int | None = None
    gflops: float | None = None
    peak_pct: float | None = None
    max_rel_err: float | None = None
    cosine: float | None = None
    compile_s: float | None = None
    error: str | None = None
    top1: float | None = None  # on held-out data, vs eager: classifier outputs
    cos_min: float | None = None  # on held-out data, per-sample cosine vs eager
    cos_mean: float | None = None
    samples_ms: list[float] = field(default_factory=list)  # one per round, in round order (paired across rows)


# ------------------------------------------------------------------------------------------------ systems

def _eager(model: torch.nn.Module, example: tuple, calib: list) -> Built:
    return Built(lambda xs: model(*xs), 0.0)  # its params and bytes: the report's input row (fill_figures)


def _torch_compile(model: torch.nn.Module, example: tuple, calib: list) -> Built:
    compiled = torch.compile(copy.deepcopy(model), options={"freezing": True})
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*example)  # compiles on the first call
    return Built(lambda xs: compiled(*xs), time.perf_counter() - start)


def _onnx_file(model: torch.nn.Module, example: tuple, directory: Path) -> Path:
    path = directory / "model.onnx"
    with silenced_warnings():
        torch.onnx.export(copy.deepcopy(model), example, str(path), dynamo=True, verbose=False, optimize=True,
                          external_data=False)
    return path


def ort_options() -> dict[str, Any]:
    """The ONNX Runtime session options every system gets, peers and fxforge's onnx backend alike."""
    return {"graph_optimization_level": "all", "intra_op_num_threads": torch.get_num_threads(),
            "inter_op_num_threads": 0}


def _ort_session(model: Path | bytes):
    import onnxruntime as ort

    from fxforge.backends.onnx import SessionConfig
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model,
                                SessionConfig(**ort_options()).session_options(), providers=["CPUExecutionProvider"])


def _ort_runner(session) -> Runner:
    names = [i.name for i in session.get_inputs()]
    return lambda xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs)})


def _ort_built(model: bytes, start: float, **figures: Any) -> Built:
    """An ORT peer's Built: a session of ``model`` and the means to make it anew."""
    return Built(_ort_runner(_ort_session(model)), time.perf_counter() - start, **figures,
                 rebuild=lambda: _ort_runner(_ort_session(model)))


def _ort_fp32(model: torch.nn.Module, example: tuple, calib: list) -> Built:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxforge-bench-") as work:
        onnx_model = _onnx_file(model, example, Path(work)).read_bytes()
    return _ort_built(onnx_model, start)


def _ort_int8(model: torch.nn.Module, example: tuple, calib: list) -> Built:
    """ONNX Runtime's own static quantization: QDQ, per-channel int8 weights, uint8 activations."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxforge-bench-") as tmp:
        int8 = _quantize_static(model, example, calib, Path(tmp))
    return _ort_built(int8, start, bytes=_constant_bytes(int8))


def _constant_bytes(model: bytes) -> int:
    """The bytes of an ONNX model's initializers: what the size column counts for fxforge's rows too (the constants
    its graph reads). The whole file's length counted the graph and its names as well, and fxforge looked 2.1×
    smaller beside a peer with fewer weight bytes."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(init).nbytes for init in onnx.load_from_string(model).graph.initializer)


def _quantize_static(model: torch.nn.Module, example: tuple, calib: list, work: Path) -> bytes:
    """The int8 model quantize_static writes into ``work``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = _onnx_file(model, example, work)
    pre = work / "pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    names = [i.name for i in _ort_session(pre).get_inputs()]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{n: t.numpy() for n, t in zip(names, batch)} for batch in calib])

        def get_next(self):
            return next(self.items, None)

    out = work / "int8.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)
    return out.read_bytes()


def _ort_dynamic(model: torch.nn.Module, example: tuple, calib: list) -> Built:
    """ONNX Runtime's dynamic quantization: int8 weights of MatMul/Gemm, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxforge-bench-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        quant_pre_process(str(_onnx_file(model, example, work)), str(pre), skip_symbolic_shape=True)
        out = work / "int8.onnx"
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        int8 = out.read_bytes()
    return _ort_built(int8, start, bytes=_constant_bytes(int8))


def fxforge_system(passes: Sequence[str], backend: str, **options: Any) -> Callable[..., Built]:
    """A system compiling with ``fxforge.compile(passes, backend)``."""
    def build(model: torch.nn.Module, example: tuple, calib: list, validation: list | None = None) -> Built:
        import fxforge
        from fxforge.compiler.pass_manager import calibration_readers
        start = time.perf_counter()
        shared = ort_options() if backend == "onnx" else {}
        reads = bool(calibration_readers(list(passes)))
        cm = fxforge.compile(model, example, passes=list(passes), backend=backend, measure_latency=False,
                             calibration=calib or None if reads else None,
                             **({"validation": validation} if validation else {}), **{**shared, **options})
        final = cm.report.final
        return Built(lambda xs: cm.artifact.run(xs), time.perf_counter() - start, final.params, final.bytes,
                     final.flops, dict(cm.artifact.info), rebuild=_fresh_session(cm.artifact),
                     model_flops=cm.report.rows[0].flops,
                     model_size=(cm.report.rows[0].params, cm.report.rows[0].bytes))
    build.passes = tuple(passes)  # type: ignore[attr-defined]  # what System.calibration_readers asks about
    return build


def _fresh_session(artifact: Any) -> Callable[[], Runner] | None:
    """For an onnx artifact: a factory of runners on a new session of the same model, built as the artifact was."""
    from fxforge.backends.onnx import OnnxArtifact
    if not isinstance(artifact, OnnxArtifact):
        return None
    a = artifact
    return lambda: (lambda xs, fresh=OnnxArtifact(a.model, a.signature, a.target, a.info): fresh.run(xs))


def _tuned_tvm(db: Path) -> Callable[..., Built]:
    """``fuse`` → tvm compiled against the MetaSchedule database ``db`` (``trials=0``: nothing is tuned). A
    database without records for some of the model's kernels at this batch fails the row: it is not a tuned build."""
    build = fxforge_system(["fuse"], "tvm", tune={"trials": 0, "db": str(db)})

    def tuned(model: torch.nn.Module, example: tuple, calib: list) -> Built:
        built = build(model, example, calib)
        stats = built.info["tuning"]
        if stats["untuned_tasks"]:
            raise FxforgeError(f"the tuning database has no records for {stats['untuned_tasks']} of {stats['tasks']} "
                               f"kernels at this batch (benchmarks/tune_models.py --batch N tunes them)")
        return built
    tuned.passes = build.passes  # type: ignore[attr-defined]
    return tuned


PEERS = [
    System("eager", _eager, peer=True),
    System("torch.compile", _torch_compile, peer=True),
    System("ort fp32", _ort_fp32, peer=True, needs=("onnxruntime", "onnxscript")),
    System("ort int8 (quantize_static)", _ort_int8, peer=True, needs=("onnxruntime", "onnxscript"),
           calibrates=("quantize_static",)),
    System("ort int8 (quantize_dynamic)", _ort_dynamic, peer=True, needs=("onnxruntime", "onnxscript")),
    System("tvm untuned", fxforge_system([], "tvm"), peer=True, needs=("tvm",)),
]


INT8_AT_TARGET = "fxforge int8 → onnx (max_drop 0.03)"  # the budget at issue 14's target: agreement >= 0.97


def fxforge_systems(tuning_db: Path | None = None) -> list[System]:
    """fxforge's pipelines: ``fuse`` on every backend, ``int8``, ``int8_dynamic``, ``compress``, ``compress`` +
    ``int8`` and ``all``; with ``tuning_db``, also ``fuse`` on TVM with that stored MetaSchedule database applied (no
    tuning) and, as its untuned baseline, with the same static shapes."""
    onnx = ("onnxruntime", "onnxscript")
    tuned = [System("fxforge fuse → tvm (static batch)", fxforge_system(["fuse"], "tvm", static_batch=True),
                    needs=("tvm",)),
             System("fxforge fuse → tvm (tuned)", _tuned_tvm(tuning_db), needs=("tvm",))] if tuning_db else []
    return [
        System("fxforge fuse → torchscript", fxforge_system(["fuse"], "torchscript")),
        System("fxforge fuse → onnx", fxforge_system(["fuse"], "onnx"), needs=onnx),
        System("fxforge fuse → tvm", fxforge_system(["fuse"], "tvm"), needs=("tvm",)),
        *tuned,
        System("fxforge int8 → onnx", fxforge_system(["int8"], "onnx"), needs=onnx, budgeted=True),
        System("fxforge int8 → onnx (static batch)", fxforge_system(["int8"], "onnx", static_batch=True), needs=onnx,
               budgeted=True),
        System(INT8_AT_TARGET, fxforge_system(["int8"], "onnx", max_drop=0.03), needs=onnx, budgeted=True),
        System("fxforge int8_dynamic → onnx", fxforge_system(["int8_dynamic"], "onnx"), needs=onnx, budgeted=True),
        System("fxforge compress → onnx", fxforge_system(["compress"], "onnx"), needs=onnx),
        System("fxforge compress+int8 → onnx", fxforge_system(["compress", "int8"], "onnx"), needs=onnx,
               budgeted=True),
        System("fxforge all → onnx", fxforge_system(["all"], "onnx"), needs=onnx, budgeted=True),
    ]


# ----------------------------------------------------------------------------------------------- measuring

_PEAK: dict[int, tuple[float, str]] = {}


def peak_gflops() -> tuple[float, str]:
    """The CPU's fp32 peak on PyTorch's threads, measured: the best of 5 timed 1024² fp32 matmuls (sgemm
    runs near the FMA units' limit at the clock the cores really hold, boost included, and the vector
    width they really execute, e.g. AVX-512 on 256-bit pipes), beside the nominal figure from /proc/cpuinfo."""
    threads = torch.get_num_threads()
    if threads not in _PEAK:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        best = min(interleaved_latency({"mm": lambda: torch.mm(a, b)}, rounds=5, sample_ms=0)["mm"]) / 1e3
        peak = 2 * 1024 ** 3 / best / 1e9
        flags, mhz, _ = _cpuinfo()
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
        nominal = threads * (2 if "fma" in flags else 1) * lanes * 2 * mhz / 1e3
        _PEAK[threads] = (peak, f"{peak:.0f} GFLOP/s measured (1024² sgemm, {threads} threads; nominal "
                                f"{threads} × 2 FMA × {lanes} lanes × 2 × {mhz / 1e3:.2f} GHz = {nominal:.0f})")
    return _PEAK[threads]


def _cpuinfo() -> tuple[set[str], float, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), 2000.0, ""
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    return flags, max(mhz) if mhz else 2000.0, vendor.group(1) if vendor else ""


def _available(system: System) -> str | None:
    import importlib.util
    missing = [m for m in system.needs if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def _error_row(model_name: str, batch: int, system: System, e: BaseException) -> Row:
    return Row(model_name, batch, system.name, system.peer, error=f"{type(e).__name__}: {first_line(e)}"[:200])


def build_all(model_name: str, model: torch.nn.Module, example: tuple, calib: list, systems: Sequence[System],
              progress: Callable[[str], None] = print, held_out: list | None = None,
              rotate: int = 0, validation: list | None = None) -> tuple[dict[str, Built], dict[str, Row]]:
    """Build every system, starting at ``systems[rotate % n]``; a system that fails gets a row saying why
    instead of stopping the benchmark. ``held_out`` batches (shaped like ``example``) give quality columns;
    ``validation`` batches (disjoint from calibration and held-out data) go to the budgeted systems' accuracy
    budgets, which otherwise hold out a quarter of the calibration batches."""
    batch = example[0].shape[0]
    built: dict[str, Built] = {}
    rows: dict[str, Row] = {}
    k = rotate % max(1, len(systems))
    for system in [*systems[k:], *systems[:k]]:
        progress(f"  {model_name} batch {batch}: building {system.name}")
        reason = _available(system)
        try:
            if reason:
                raise FxforgeError(reason)
            with torch.no_grad():
                more = {"validation": validation} if validation and system.budgeted else {}
                built[system.name] = system.build(model, example, calib, **more)
            rows[system.name] = Row(model_name, batch, system.name, system.peer)
        except Exception as e:  # noqa: BLE001 (any failure of a third-party system is reported in its row)
            rows[system.name] = _error_row(model_name, batch, system, e)
    measure_errors(model, example, built, rows)
    if held_out:
        measure_quality(model, held_out, built, rows)
    return built, rows


def measure_quality(model: torch.nn.Module, held_out: list, built: dict[str, Built], rows: dict[str, Row]) -> None:
    """Each system's top-1 agreement and min/mean per-sample cosine against eager on held-out batches."""
    from fxforge.compiler.quality import Validation
    validation = Validation.from_user(held_out, list, None)
    validation.measure(model)  # the reference: eager PyTorch
    for name, b in built.items():
        if rows[name].error is None:
            try:
                q = validation.measure(lambda *xs: outputs(b.run(xs)))
                rows[name].top1, rows[name].cos_min, rows[name].cos_mean = q.top1, q.cosine_min, q.cosine_mean
            except Exception as e:  # noqa: BLE001 (a system that cannot run the held-out data says so)
                rows[name].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


SELF_CHECK = "ort fp32 (built last: self-check)"


def bench_model(model_name: str, model: torch.nn.Module, example: tuple, calib: list, systems: Sequence[System],
                rounds: int = 7, sample_ms: float = 150.0, progress: Callable[[str], None] = print,
                held_out: list | None = None, rotate: int = 0, self_check: bool = False,
                rebuild: bool = True, validation: list | None = None, max_rounds: int = 0) -> list[Row]:
    """Build every system for one model and batch, then time them interleaved; one Row per system (and, with
    ``self_check`` and an ORT fp32 peer among them, a second ORT fp32 built last). ``rebuild`` times every ORT
    session on a fresh copy built just before each sample (False: on the sessions as built, in build order).
    Past ``rounds``, timing goes on up to ``max_rounds`` (default twice ``rounds``) until :func:`ratios_resolved`."""
    systems = list(systems)
    if self_check and any(s.name == "ort fp32" for s in systems):
        systems.append(System(SELF_CHECK, _ort_fp32, needs=("onnxruntime", "onnxscript")))
        built, rows = build_all(model_name, model, example, calib, systems[:-1], progress, held_out, rotate,
                                validation)
        more, more_rows = build_all(model_name, model, example, calib, systems[-1:], progress, held_out)
        built.update(more)
        rows.update(more_rows)
    else:
        built, rows = build_all(model_name, model, example, calib, systems, progress, held_out, rotate, validation)
    time_interleaved(example, built, rows, rounds, sample_ms, rebuild, max_rounds=max_rounds or 2 * rounds)
    fill_figures([rows[s.name] for s in systems], built)
    return [rows[s.name] for s in systems]


def self_check(rows: Sequence[Row], noise: float = 0.05, limit: float = 0.2) -> str | None:
    """Whether the identical ORT fp32 graph, built early and built last, timed within noise: a verdict line.

    The gap is the median of the per-round ratios of the two rows' samples, minus 1; noise is the larger of
    ``noise`` and the half-width of that median's 90 % interval. An interval wider than ±``limit`` is itself a
    noisy run (no ratio under it can be resolved)."""
    a = next((r for r in rows if r.system == "ort fp32" and r.median_ms), None)
    b = next((r for r in rows if r.system == SELF_CHECK and r.median_ms), None)
    if a is None or b is None:
        return None
    ratio, low, high = median_interval(paired_ratios(b.samples_ms, a.samples_ms))
    spread = max(noise, (high - low) / 2)
    gap = ratio - 1
    verdict = "within noise" if abs(gap) <= spread <= limit else \
        "NOISY: the same graph timed apart; ratios in this table are unreliable" if abs(gap) > spread else \
        f"NOISY: rounds spread over ±{limit:.0%}; ratios in this table are unreliable"
    return (f"self-check {a.model} batch {a.batch}: ort fp32 built early {a.median_ms:.2f} ms, the same graph "
            f"built last {b.median_ms:.2f} ms ({gap:+.1%}, noise ±{spread:.1%}, {len(a.samples_ms)} rounds): {verdict}")


def measure_errors(model, example, built: dict[str, Built], rows: dict[str, Row]) -> None:
    """Each system's error against eager on fresh random inputs, into its row."""
    inputs = fresh_inputs(example, seed=3)
    with torch.no_grad():
        reference = model(*inputs)
        for name, b in built.items():
            try:
                err = compare(outputs(b.run(inputs)), outputs(reference))
                rows[name].max_rel_err, rows[name].cosine = err.max_rel, err.cosine
            except Exception as e:
                rows[name].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def outputs(value: Any) -> list[torch.Tensor]:
    """A runner's or model's result as a list of tensors (ONNX Runtime returns numpy arrays)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [torch.as_tensor(v) for v in values]


PAUSE_S = 0.05


def ratios_resolved(rows: dict[str, Row], noise: float = 0.05) -> Callable[[dict[str, list[float]]], bool]:
    """Whether the ratios a run reports are resolved by the samples so far: the 90 % interval of each fxforge
    row's per-round ratio to the fastest peer, and of the self-check pair's ratio, within ±``noise`` of its
    median (the self-check's own noise floor). What lets extra timing rounds stop."""
    def settled(samples: dict[str, list[float]]) -> bool:
        peers = [n for n in samples if rows[n].peer]
        best = min(peers, key=lambda n: statistics.median(samples[n]), default=None)
        pairs = [(n, best) for n in samples if best and not rows[n].peer and n != SELF_CHECK]
        pairs += [(SELF_CHECK, "ort fp32")] if SELF_CHECK in samples and "ort fp32" in samples else []
        for a, b in pairs:
            ratio, low, high = median_interval(paired_ratios(samples[b], samples[a]))
            if (high - low) / 2 > noise * ratio:
                return False
        return True
    return settled


def time_interleaved(example: tuple, built: dict[str, Built], rows: dict[str, Row], rounds: int,
                      sample_ms: float, rebuild: bool = True, max_rounds: int = 0) -> None:
    """Time the systems that built, in rounds; with ``rebuild``, every ORT session anew before each sample;
    past ``rounds``, up to ``max_rounds`` until :func:`ratios_resolved`."""
    live = {n: b for n, b in built.items() if rows[n].error is None}
    runners = {n: (lambda run=b.run: run(example)) for n, b in live.items()}
    fresh = {n: (lambda make=b.rebuild: (lambda run=make(): run(example)))
             for n, b in live.items() if rebuild and b.rebuild is not None}
    for name, times in interleaved_latency(runners, rounds, sample_ms, pause_s=PAUSE_S, rebuild=fresh,
                                            settled=ratios_resolved(rows), max_rounds=max_rounds).items():
        row = rows[name]
        row.samples_ms = times
        row.median_ms, row.min_ms, row.max_ms = statistics.median(times), min(times), max(times)


def fill_figures(rows: list[Row], built: dict[str, Built]) -> None:
    eager = next((r for r in rows if r.system == "eager" and r.median_ms), None)
    best_peer = min((r for r in rows if r.peer and r.median_ms), key=lambda r: r.median_ms, default=None)
    peak, _ = peak_gflops()
    # the model's own params and bytes, for systems that count none (eager, the peers): counted once, by the
    # report (compiler/report.model_size), not by a second rule here
    params, nbytes = next((b.model_size for b in built.values() if b is not None and b.model_size), (None, None))
    for r in rows:
        b = built.get(r.system)
        if b is not None:
            r.compile_s = b.compile_s
            r.params = b.params if b.params is not None else params
            r.bytes = b.bytes if b.bytes is not None else nbytes
            r.flops = b.flops
        if r.median_ms:
            r.vs_eager = median_interval(paired_ratios(eager.samples_ms, r.samples_ms))[0] if eager else None
            if best_peer:
                r.vs_best_peer, *interval = median_interval(paired_ratios(best_peer.samples_ms, r.samples_ms))
                r.vs_best_peer_interval = tuple(interval)
    # the model's own FLOPs, for systems that count none (eager, the peers): the first fxforge row's own were a
    # compressed graph's when that system came first (434k for a model of 2.14M)
    flops = next((b.model_flops for b in built.values() if b is not None and b.model_flops), None)
    for r in rows:
        r.flops = r.flops or flops
        if r.median_ms and r.flops:
            r.gflops = r.flops / r.median_ms / 1e6
            r.peak_pct = 100 * r.gflops / peak


# ------------------------------------------------------------------------------------------------- output

COLUMNS = ["model", "batch", "system", "median ms (min–max)", "× eager", "× best peer (90 % interval)", "params",
           "size", "GFLOPs", "GFLOP/s (% peak)", "max rel err", "cosine", "compile s"]
QUALITY_COLUMNS = ["model", "batch", "system", "top-1 agreement", "min cosine", "mean cosine", "median ms (min–max)",
                   "× eager", "× best peer (90 % interval)", "size", "compile s"]


def markdown(rows: Sequence[Row]) -> str:
    """The results as one Markdown table (quality on held-out data first when the rows have it)."""
    quality = any(r.cos_mean is not None for r in rows)
    columns = QUALITY_COLUMNS if quality else COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r.error or r.median_ms is None:
            cells = [r.model, str(r.batch), r.system, f"failed: {r.error}"] + [""] * (len(columns) - 4)
        elif quality:
            cells = [r.model, str(r.batch), r.system, _num(r.top1, "{:.1%}"), _num(r.cos_min, "{:.4f}"),
                     _num(r.cos_mean, "{:.4f}"), f"{r.median_ms:.2f} ({r.min_ms:.2f}–{r.max_ms:.2f})",
                     _num(r.vs_eager, "{:.2f}×"), _ratio(r), _mb(r.bytes),
                     _num(r.compile_s, "{:.1f}")]
        else:
            cells = [r.model, str(r.batch), r.system, f"{r.median_ms:.2f} ({r.min_ms:.2f}–{r.max_ms:.2f})",
                     _num(r.vs_eager, "{:.2f}×"), _ratio(r), _si(r.params), _mb(r.bytes),
                     _num(r.flops and r.flops / 1e9, "{:.2f}"),
                     f"{r.gflops:.1f} ({r.peak_pct:.1f}%)" if r.gflops else "",
                     _num(r.max_rel_err, "{:.1e}"), _num(r.cosine, "{:.5f}"), _num(r.compile_s, "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(r: Row) -> str:
    """The ratio to the best peer with its 90 % interval, e.g. ``1.21× (1.15–1.27)``."""
    if r.vs_best_peer is None:
        return ""
    low, high = r.vs_best_peer_interval or (r.vs_best_peer, r.vs_best_peer)
    return f"{r.vs_best_peer:.2f}× ({low:.2f}–{high:.2f})"


def _num(v: float | None, fmt: str) -> str:
    return fmt.format(v) if v is not None else ""


def _si(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f} MiB"


def as_dicts(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def machine_name() -> str:
    """A short name for this machine's CPU and core count (results files are per machine)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", m.group(1) if m else os.uname().machine).strip("-").lower()
    return f"{cpu}-{os.cpu_count()}c"


def run_facts() -> dict[str, Any]:
    """What a results file records beside its rows, and its plots' caption reads: machine, threads, date."""
    return {"machine": machine_name(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def caption(facts: dict[str, Any]) -> str:
    """``machine, N threads, date`` from ``run_facts`` (or a results file; an older one lacks threads and date)."""
    threads = f"{facts['threads']} threads" if facts.get("threads") else "threads not recorded"
    return f"{facts['machine']}, {threads}, {facts.get('date') or 'date not recorded'}"


# ------------------------------------------------------------------------------------------------ plots

ZERO_ERROR = 1e-9  # where an error of exactly 0 is drawn on the log axis (labelled "0")


def plot(rows: Sequence[Row], out: Path, caption: str) -> list[Path]:
    """``latency_vs_error.png`` (a panel per model and batch) and ``speedup.png``: one colour per system in
    both, min–max error bars, failed systems drawn as failed, the machine, threads and date in a caption."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r.system for r in rows))
    colour = {s: plt.get_cmap("tab20")(i % 20) for i, s in enumerate(systems)}
    cases = list(dict.fromkeys((r.model, r.batch) for r in rows))
    paths = [out / "latency_vs_error.png", out / "speedup.png"]

    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(max(7.0, 4.5 * len(cases)), 4.2), squeeze=False)
    fig.suptitle(caption, fontsize=8)
    for ax, case in zip(axes[0], cases):
        here = [r for r in rows if (r.model, r.batch) == case]
        for r in here:
            if r.median_ms is None or r.max_rel_err is None:
                continue
            x = max(r.max_rel_err, ZERO_ERROR)
            ax.errorbar([x], [r.median_ms], yerr=[[r.median_ms - (r.min_ms or r.median_ms)],
                                                  [(r.max_ms or r.median_ms) - r.median_ms]],
                        fmt="o" if r.peer else "*", ms=7, color=colour[r.system], capsize=3)
        failed = [r.system for r in here if r.error]  # named under the axis: text inside it overprinted points
        timed = [r.median_ms for r in here if r.median_ms]
        wide = bool(timed) and max(timed) > 20 * min(timed)  # e.g. eager beside ONNX Runtime: a linear axis
        ax.set(xscale="log", yscale="log" if wide else "linear", ylabel="latency (ms)" + (", log" if wide else ""),
               title=f"{case[0]} b{case[1]}")
        ax.set_xlabel("max relative error vs eager (0 drawn at 1e-9)" + "".join(
            f"\nfailed: {name}" for name in failed), color="red" if failed else "black", fontsize=9)
        ax.axvline(ZERO_ERROR, color="0.8", lw=0.6)
        ax.annotate("0", (ZERO_ERROR, 0), xycoords=("data", "axes fraction"), fontsize=7, ha="center",
                    va="bottom", color="0.4")
    _legend(fig, systems, colour, rows)
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    shown = [s for s in systems if s != "eager"]
    most = max([1, *(len([r for r in rows if (r.model, r.batch) == c and r.system in shown]) for c in cases)])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cases) * most / 3), 4.2))
    width = 0.8 / most
    for j, case in enumerate(cases):  # each case's own systems side by side, centred on its tick (no gaps)
        here = [r for s in shown for r in rows if (r.model, r.batch, r.system) == (*case, s)]
        for i, r in enumerate(here):
            system, x = r.system, j + (i - (len(here) - 1) / 2) * width
            if r.error or not r.vs_eager:  # hatched in the system's colour, so that the legend names it
                ax.bar([x], [0.05], width, color="none", edgecolor=colour[system], hatch="xx")
                ax.text(x, 0.1, "failed", rotation=90, fontsize=7, color="red", ha="center", va="bottom")
            else:
                ax.bar([x], [r.vs_eager], width, color=colour[system])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title(caption, fontsize=8)
    ax.set_xticks(range(len(cases)), [f"{m} b{b}" for m, b in cases], fontsize=8)
    ax.set(ylabel="speedup over eager PyTorch (median)", xlabel="model, batch size")
    _legend(fig, shown, colour, rows, bars=True)
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def _legend(fig: Any, systems: Sequence[str], colour: dict[str, Any], rows: Sequence[Row],
            bars: bool = False) -> None:
    """One legend under the panels, as wide as the figure (labels never overprint the data, nor leave a gap
    beside it): ● peers, ★ fxforge; squares for bars. Lays the figure out around it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    peer = {r.system: r.peer for r in rows}
    label = {s: s + (" (failed)" if all(r.error for r in rows if r.system == s) else "") for s in systems}
    handles = [Patch(color=colour[s], label=label[s]) if bars else
               Line2D([], [], marker="o" if peer.get(s) else "*", color=colour[s], ls="", ms=7, label=label[s])
               for s in systems]
    ncol = max(1, min(len(handles), int(fig.get_figwidth() / 2.6)))
    lines = -(-len(handles) // ncol)
    legend_in = 0.2 * lines + 0.15  # 8-point text: about 0.2 inch a line
    fig.set_figheight(fig.get_figheight() + legend_in)  # the legend gets room of its own, the panels keep theirs
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
