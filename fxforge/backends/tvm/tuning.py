"""Kernel tuning: TVM MetaSchedule over the prepared Relax module, with a persistent database per target.

``apply_tuning(mod, tvm_target, {"trials": 64, "db": path})`` extracts the module's tuning tasks (one per
fused PrimFunc), tunes only those the database does not hold yet, one task after another, and applies the
database (``MetaScheduleApplyDatabase``). A second compile of the same model and target tunes nothing.

With ``"rpc": {"tracker": "host:port", "key": "rpi5"}`` the candidates are built here for the target and
measured on the devices registered with a TVM RPC tracker under that key, as many at once as are free
(:mod:`.rpc`); without it they are measured on this machine.

The database directory holds MetaSchedule's two JSON-lines files plus ``fxforge_tuning.json``: the target
JSON, TVM version and device key (None: measured on this machine) it was made for and the tasks whose
tuning finished. A task counts as tuned only once it
is listed there, so an interrupted run keeps the finished tasks and the next run tunes the rest (records of
the interrupted task stay and seed its search). A database for another target or TVM version, or one whose
files are corrupt, is refused with a TuningError naming the file; nothing in it is changed. So is one
measured on other devices than those this run measures on or names (``rpc.key``).

Tuning follows the recipe measured on 2 cores: builder workers skip parsing the tensor intrinsics of other
hardware (importing them takes 70–140 s, longer than the builder timeout, so every build failed), two build
workers, 60 s build timeout, a short evaluator, the XGBoost cost model. Ctrl-C ends the current task after
its batch (see :func:`_deferred_interrupt`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import threading
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from fxforge.compiler.errors import TuningError, first_line
from fxforge.compiler.target import host_cpu, host_features, tvm_target_features

from .rpc import RpcDevices, device_threads, exporter, free_servers, rpc_devices, rpc_runner
from .schedules import default_schedule, is_gpu

if TYPE_CHECKING:
    import tvm

DEFAULT_TRIALS = 64
MIN_SEARCH = 4  # the fewest trials worth a search; smaller shares keep the measured default
META_FILE = "fxforge_tuning.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
FORMAT = 1
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 50}  # how candidates and the default are timed
# A searched kernel replaces the default schedule only when it was measured at least this much faster. Tasks are
# timed alone, run after run, their weights warm in cache; inside a model each linear's weight comes cold from
# memory, where the default's packed weight streams better. MiniLM 1 × 128 (2 threads, quiet machine): searched
# Q/K/V and FFN-up kernels 1.12× and 1.03× faster alone made the whole model 0.80× the untuned static build.
MIN_GAIN = 1.2
OPTIONS = ("trials", "db", "trials_per_task", "trials_per_iter", "timeout_s", "seed", "rpc")
OTHER_INTRINSICS = ("cuda", "rocm", "hexagon", "metal", "arm_cpu", "riscv_cpu")


@dataclass
class TaskResult:
    """One tuning task: its fused function, whether it was tuned now or found, its trials and best time."""

    name: str
    status: str  # "tuned" (now; 0 trials: its measured default stands), "reused" (found in the database) or
    # "untuned" (not in the database and trials=0: the default schedule, unmeasured)
    trials: int  # measured now (0 when reused)
    best_us: float | None  # best measured mean run time in the database, microseconds
    default_us: float | None = None  # the backend's default schedule, measured when the task was first tuned


def apply_tuning(mod: tvm.IRModule, tvm_target: tvm.target.Target, tune: dict[str, Any],
                 cross_compiler: str | None = None) -> tuple[tvm.IRModule, dict[str, Any]]:
    """Tune the tasks of ``mod`` missing from the database, then apply the database to ``mod``.

    ``mod`` is the prepared module (``fxforge.backends.tvm.prepare``). ``tune`` keys: ``trials`` (total budget
    of this run, default 64, shared by measured time), ``db`` (directory; default :func:`default_db_dir`), ``trials_per_task``,
    ``trials_per_iter`` (candidates per build batch, default 16), ``timeout_s`` (per build/run), ``seed``,
    ``rpc`` (``{"tracker": "host:port", "key": KEY}``: measure on those devices; ``cross_compiler`` links the
    candidates for them). ``trials=0`` applies the database and tunes nothing (the database must exist; tasks
    it lacks keep the default schedule), so a database tuned on the target machine can be used to compile for
    it anywhere. Returns the module with tuned schedules and stats: db, device_key, tasks, tuned_tasks,
    searched_tasks, reused_tasks, untuned_tasks, trials (measured now), scheduled_functions (PrimFuncs the
    database matched), min_gain (``MIN_GAIN``), below_min_gain (tasks whose searched kernel beat the default by
    less than that: they keep the default schedule), per_task (:class:`TaskResult`) and, with rpc, rpc (tracker,
    key, servers used).

    On CPUs the PrimFuncs first learn which parameters the caller binds to constants
    (``AttachAttrLayoutFreeBuffers``), as :func:`~.schedules.schedule` does for an untuned build: the default
    schedule (measured as a candidate) then packs a matmul's constant weight, once, at build time, and is timed
    without that packing. The search leaves MetaSchedule's ``RewriteLayout`` out (it fails on the packed default's
    trace, which seeds the search), so its candidates read the weight as it is. Without the mark the database held
    unpacked kernels, and the tuned MiniLM ran 0.90× (8 × 64) and 0.80× (1 × 128) the speed of the untuned static
    build (docs/tuning.md).
    """
    opts = tune_options(tune)
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    devices = rpc_devices(opts["rpc"], need_tracker=False) if "rpc" in opts else None
    servers = max(free_servers(devices), 1) if devices and opts["trials"] else 0  # before any work
    keep = _kept_intrinsics(tvm_target)
    skip_other_intrinsics(keep)
    key = devices.key if devices else None
    db_dir = Path(opts["db"]).expanduser() if opts.get("db") else default_db_dir(tvm_target, key)
    if opts["trials"] == 0 and not (db_dir / META_FILE).exists():
        raise TuningError(f"trials=0 applies a tuning database, but {db_dir} holds none")
    meta = _read_meta(db_dir, tvm_target, key, check_key=devices is not None or opts["trials"] > 0)
    database = open_database(db_dir)
    if not is_gpu(tvm_target):
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
    keys = [_task_key(t) for t in tasks]
    best = [_best_us(database, t) for t in tasks]
    todo = [i for i, k in enumerate(keys)
            if k not in meta["tasks"] or best[i] is None and not meta["tasks"][k].get("unrunnable")]
    results = [TaskResult(t.task_name, "untuned" if i in todo else "reused", 0, best[i],
                          meta["tasks"].get(keys[i], {}).get("default_us")) for i, t in enumerate(tasks)]
    if todo and opts["trials"]:
        if devices is None:
            _check_runnable(tvm_target)
        elif cross_compiler and shutil.which(cross_compiler) is None:
            raise TuningError(f"measuring {tvm_target.kind.name} code on devices {key!r} needs the cross "
                              f"compiler {cross_compiler} here to link the candidates, and it is not installed")
        tuned_for = tvm_target if devices is None else _with_cores(tvm_target, devices)
        tuner = _Tuner(tuned_for, db_dir, database, keep, opts, devices, servers, cross_compiler)
        _write_meta(db_dir, meta)  # before any record: a run interrupted in its first task leaves a known db
        defaults = [tuner.measure_default(tasks[i]) for i in todo]
        unrunnable = [tuner.unrunnable(tasks[i]) for i in todo]
        costs = [0.0 if bad else cost for cost, bad in zip(_costs(defaults, [tasks[i] for i in todo]), unrunnable)]
        budgets = _budgets(opts["trials"], costs, opts.get("trials_per_task"))
        for n, (i, budget, default, bad) in enumerate(zip(todo, budgets, defaults, unrunnable), 1):
            results[i] = tuner.tune(tasks[i], 0 if bad else budget, default,
                                    f"[{n}/{len(todo)}] ")
            meta["tasks"][keys[i]] = {"name": tasks[i].task_name, "trials": results[i].trials,
                                      "default_us": results[i].default_us, **({"unrunnable": True} if bad else {})}
            _write_meta(db_dir, meta)  # commit per task: an interrupted run keeps what finished
    with tvm_target, database:
        tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
    scheduled = sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled")) for f in tuned.functions.values()
                    if isinstance(f, tirx.PrimFunc))  # a record that does not match is a silent miss: count hits
    # where no searched kernel beat the default by MIN_GAIN, the function is left unscheduled: ``schedule`` gives it
    # the default rule, the kernel the default's record holds
    default = {r.name for r in results if r.best_us and r.default_us and r.best_us * MIN_GAIN > r.default_us}
    for gv in mod.get_global_vars():
        if gv.name_hint in default:
            tuned.update_func(gv, mod[gv])
    mod = tuned
    below = [r.name for r in results if r.name in default and r.best_us < r.default_us]
    count = {status: sum(r.status == status for r in results) for status in ("tuned", "reused", "untuned")}
    stats = {"db": str(db_dir), "device_key": meta.get("device_key"), "tasks": len(tasks),
             "tuned_tasks": count["tuned"], "searched_tasks": sum(r.trials > 0 for r in results),
             "reused_tasks": count["reused"], "untuned_tasks": count["untuned"],
             "trials": sum(r.trials for r in results), "scheduled_functions": scheduled,
             "min_gain": MIN_GAIN, "below_min_gain": below, "per_task": [asdict(r) for r in results]}
    if servers:
        stats["rpc"] = {"tracker": devices.address, "key": key, "servers": servers}
    return mod, stats


def default_db_dir(tvm_target: tvm.target.Target, device_key: str | None = None) -> Path:
    """``$XDG_CACHE_HOME/fxforge/tuning/<target key>[-<device key>]`` (``~/.cache`` without XDG_CACHE_HOME)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    name = target_key(tvm_target) + (f"-{device_key}" if device_key else "")
    return Path(cache) / "fxforge" / "tuning" / name


def target_key(tvm_target: tvm.target.Target) -> str:
    """A directory name for a target and this TVM: ``llvm-znver3-<hash of target JSON + TVM version>``."""
    import tvm
    attrs = _target_json(tvm_target)
    cpu = attrs.get("mcpu") or attrs.get("mtriple") or attrs.get("arch") or "generic"
    digest = hashlib.sha256(f"{json.dumps(attrs, sort_keys=True)}|{tvm.__version__}".encode()).hexdigest()
    return f"{tvm_target.kind.name}-{cpu}-{digest[:12]}"


def skip_other_intrinsics(keep: tuple[str, ...] = ()) -> None:
    """Stand empty modules in for the tensor intrinsics of other hardware (their import takes 70–140 s), and import
    the real ones of ``keep`` where an earlier tuning in this process stood one in: tuning for arm64 after x86 failed
    ("TensorIntrin 'dot_4x4_i8i8s32_neon' is not registered").

    Runs in this process; :func:`_worker_initializer` does the same in every build worker.
    """
    for name in OTHER_INTRINSICS:
        module = f"tvm.s_tir.tensor_intrin.{name}"
        if name not in keep:
            sys.modules.setdefault(module, types.ModuleType(name))
        elif module in sys.modules and sys.modules[module].__spec__ is None:  # a stand-in, not the module
            del sys.modules[module]
            importlib.import_module(module)


def _worker_initializer(keep: tuple[str, ...]) -> Callable[[], None]:
    """The builder workers' initializer: a closure, so cloudpickle ships it by value and a worker (started
    afresh for every build batch) does not import fxforge and torch just to unpickle it."""
    names = tuple(n for n in OTHER_INTRINSICS if n not in keep)

    def skip() -> None:
        import sys
        import types
        for name in names:
            sys.modules.setdefault(f"tvm.s_tir.tensor_intrin.{name}", types.ModuleType(name))

    return skip


def open_database(db_dir: Path) -> Any:
    """The JSON database in ``db_dir`` (created when missing); corrupt files raise a TuningError."""
    from tvm.s_tir import meta_schedule as ms
    for name in (WORKLOAD_FILE, RECORD_FILE):
        _check_json_lines(db_dir / name)
    db_dir.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")
    except Exception as e:
        raise TuningError(f"the MetaSchedule database in {db_dir} cannot be read ({first_line(e)}); "
                          f"delete the directory to tune again") from None


# ------------------------------------------------------------------------------------------- tuning


def _task_logger(db_dir: Path, task_name: str) -> logging.Logger:
    """MetaSchedule's log of one task's search: ``logs/<task>.log`` in the database directory, nothing on the console.

    fxforge makes this logger itself: TVM's ``get_loggers_from_work_dir`` re-runs ``logging.config.dictConfig``
    over the process's logging on every call, naming the handlers already on its logger, and fails with
    "'NoneType' object has no attribute 'format'" once anything has put an unnamed handler there (pytest's log
    capture did, after a console-script tune in the same process)."""
    log_dir = db_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"fxforge.tuning.{task_name[:100]}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for old in list(logger.handlers):  # the same task tuned into another database earlier in this process
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(log_dir / f"{task_name[:100]}.log", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    return logger


class _Tuner:
    """Tunes one task at a time with one builder, runner and database (committing records as measured).

    The builder links every candidate into a shared library here (with ``cross_compiler`` for another ISA);
    the runner times it on this machine, or with ``devices`` on ``servers`` RPC servers at once.
    """

    def __init__(self, tvm_target: tvm.target.Target, db_dir: Path, database: Any, keep: tuple[str, ...],
                 opts: dict[str, Any], devices: RpcDevices | None = None, servers: int = 0,
                 cross_compiler: str | None = None) -> None:
        from tvm.s_tir import meta_schedule as ms
        timeout = opts.get("timeout_s", 60)
        self.target, self.db_dir, self.database, self.opts = tvm_target, db_dir, database, opts
        self.export = exporter(cross_compiler if devices else None)
        self.builder = ms.builder.LocalBuilder(max_workers=2, timeout_sec=timeout, f_export=self.export,
                                               initializer=_worker_initializer(keep))
        if devices is None:
            self.runner = ms.runner.LocalRunner(timeout_sec=min(timeout, 30),
                                                evaluator_config=ms.runner.EvaluatorConfig(**EVALUATOR))
        else:
            self.runner = rpc_runner(devices, servers, EVALUATOR, min(timeout, 30))
        self._unrunnable: set[str] = set()

    def unrunnable(self, task: Any) -> bool:
        """Whether the task's default schedule built but failed to run on the runner's random inputs: an
        embedding's ``take`` reads random int64 indices far out of range (the importer's ``take`` does not
        clip). Every candidate would fail the same way, so such a task is not searched; it keeps its default
        schedule and is listed ``unrunnable`` in the database."""
        return _task_key(task) in self._unrunnable

    def tune(self, task: Any, trials: int, default_us: float | None, progress: str | None) -> TaskResult:
        """Search ``trials`` schedules for ``task`` (none: its measured default stands); ``progress``: the bar's
        prefix ("[2/4] "), None for no bar."""
        from tvm.s_tir import meta_schedule as ms

        if trials == 0:
            return TaskResult(task.task_name, "tuned", 0, _best_us(self.database, task), default_us)
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # console: the bar; files: all
        space = "post-order-apply" if self.target.kind.name != "llvm" else ms.space_generator.PostOrderApply(
            postprocs=[p for p in ms.postproc.Postproc.create("llvm") if not isinstance(p, ms.postproc.RewriteLayout)])
        context = ms.TuneContext(mod=task.dispatched[0], target=self.target, space_generator=space,
                                 search_strategy="evolutionary", task_name=task.task_name,
                                 logger=_task_logger(self.db_dir, task.task_name),
                                 rand_state=self.opts.get("seed", 0), num_threads="physical").clone()
        watch = _Progress(task.task_name, trials, progress)
        with _deferred_interrupt() as watch.interrupted:
            self._run(context, trials, watch)
        best = _best_us(self.database, task)
        if best is None:
            raise TuningError(f"no trial of task {task.task_name} built and ran ({watch.trials} tried); first "
                              f"error: {watch.first_error or 'none reported'}")
        return TaskResult(task.task_name, "tuned", watch.trials, best, default_us)

    def measure_default(self, task: Any) -> float | None:
        """Build the backend's default schedule of ``task``, time it where the candidates are timed, commit it
        as a tuning record and return its mean time in µs (None when no default rule fits or it fails).

        With it in the database, applying the database picks the default wherever the search found nothing
        faster: a small trial budget no longer replaces a good default kernel by a slower one (measured on a
        ResNet BasicBlock: 32 trials were 1.3x slower than the default schedule). It is built in this process
        (one build, no builder start-up) and handed to the tuning runner, so it is timed exactly like the
        candidates: on this machine, or on one of the RPC devices.
        """
        import tvm
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = task.dispatched[0]
        sch = default_schedule(mod["main"], self.target)
        if sch is None:
            return None
        args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)  # a packed weight: its layout
        try:
            path = self.export(tvm.compile(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(sch.mod),
                                           target=self.target).mod)
        except Exception:  # noqa: BLE001 (a default that does not build is simply not offered)
            return None
        try:
            device = "cpu" if self.target.kind.name == "llvm" else self.target.kind.name
            (future,) = self.runner.run([ms.runner.RunnerInput(path, device, args)])
            ran = future.result()
        finally:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        if ran.error_msg or not ran.run_secs:  # a default that does not run is not offered either
            self._unrunnable.add(_task_key(task))
            return None
        secs = [float(s) for s in ran.run_secs]
        self.database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, self.database.commit_workload(mod), secs, self.target, args))
        return 1e6 * sum(secs) / len(secs)

    def _run(self, context: Any, trials: int, watch: _Progress) -> None:
        from tvm.s_tir import meta_schedule as ms
        try:
            ms.tune_tasks(tasks=[context], task_weights=[1.0], work_dir=str(self.db_dir), max_trials_global=trials,
                          max_trials_per_task=trials, num_trials_per_iter=min(trials, self.opts["trials_per_iter"]),
                          builder=self.builder, runner=self.runner, database=self.database, cost_model="xgb",
                          measure_callbacks=[*ms.MeasureCallback.create("default"), watch.callback()])
        except Exception as e:
            raise TuningError(f"MetaSchedule failed on task {context.task_name}: {first_line(e)}") from None
        finally:
            watch.close()


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[list[bool]]:
    """Turn Ctrl-C during a task into: finish the batch in flight, end the task, raise KeyboardInterrupt.

    A KeyboardInterrupt raised inside MetaSchedule's C++ loop is lost (tuning went on to the end), so the
    handler only raises a flag that the measure callback reads. A second Ctrl-C interrupts at once.
    """
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
    if flag[0]:
        raise KeyboardInterrupt


class _Progress:
    """A tqdm bar per task: tasks done, trials measured and the best latency so far; remembers the first failure."""

    def __init__(self, name: str, trials: int, prefix: str | None) -> None:
        from tqdm.auto import tqdm
        self.name = name
        self.bar = tqdm(total=trials, desc=f"{prefix or ''}{name}", unit="trial", disable=prefix is None,
                        leave=True, file=sys.stderr)
        self.trials, self.best_us, self.first_error = 0, math.inf, ""
        self.interrupted = [False]  # set by _deferred_interrupt

    def callback(self) -> Any:
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
        progress = self

        @derived_object
        class Callback(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                progress.update(builder_results, runner_results)
                if progress.interrupted[0] and progress.trials < progress.bar.total:  # at the total it ends anyway
                    progress.bar.set_postfix_str("interrupted")
                    task_scheduler.terminate_task(task_id)

        return Callback()

    def update(self, builder_results: Any, runner_results: Any) -> None:
        for built, ran in zip(builder_results, runner_results):
            error = built.error_msg or ran.error_msg
            if error and not self.first_error:
                self.first_error = first_line(Exception(error))
            if ran.run_secs:
                self.best_us = min(self.best_us, 1e6 * sum(float(s) for s in ran.run_secs) / len(ran.run_secs))
        self.trials += len(runner_results)
        self.bar.update(len(runner_results))
        if self.best_us < math.inf:
            self.bar.set_postfix_str(f"best {self.best_us:.1f} us")

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------- database


def _read_meta(db_dir: Path, tvm_target: tvm.target.Target, device_key: str | None,
               check_key: bool) -> dict[str, Any]:
    """The database's metadata, checked against this target and TVM, and with ``check_key`` against the
    devices that measure (``device_key``; None: this machine); a fresh one for a new directory."""
    import tvm
    want = {"format": FORMAT, "target": _target_json(tvm_target), "tvm": tvm.__version__, "device_key": device_key}
    path = db_dir / META_FILE
    if not path.exists():
        if any((db_dir / n).exists() and (db_dir / n).stat().st_size for n in (WORKLOAD_FILE, RECORD_FILE)):
            raise TuningError(f"{db_dir} holds MetaSchedule records but no {META_FILE}, so its target and TVM "
                              f"version are unknown; use another db directory")
        return {**want, "tasks": {}}
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), dict):
            raise ValueError("not a tuning metadata object")
    except (ValueError, OSError) as e:
        raise TuningError(f"tuning database metadata {path} is corrupt ({first_line(e)})") from None
    if meta.get("tvm") != want["tvm"]:
        raise TuningError(f"tuning database {db_dir} was made with TVM {meta.get('tvm')}, this is TVM "
                          f"{want['tvm']}; use another db directory")
    if meta.get("target") != want["target"]:
        old, new = meta.get("target") or {}, want["target"]
        diff = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in sorted({*old, *new})
                         if old.get(k) != new.get(k))
        raise TuningError(f"tuning database {db_dir} was made for another target ({diff}); use another db "
                          f"directory")
    if check_key and meta.get("device_key") != device_key:  # databases from before device keys: this machine
        raise TuningError(f"tuning database {db_dir} holds measurements from {_devices(meta.get('device_key'))}, "
                          f"not from {_devices(device_key)}; use another db directory")
    return meta


def _devices(key: str | None) -> str:
    return f"the RPC devices under key {key!r}" if key else "the tuning machine itself (no RPC device key)"


def _write_meta(db_dir: Path, meta: dict[str, Any]) -> None:
    tmp = db_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, db_dir / META_FILE)


def _check_json_lines(path: Path) -> None:
    """MetaSchedule's files are JSON lines; a truncated or garbled line is a TuningError naming the file."""
    if not path.exists():
        return
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TuningError(f"tuning database file {path} cannot be read ({first_line(e)})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, list):
            raise TuningError(f"tuning database file {path} is corrupt at line {number}; delete the directory "
                              f"to tune again")


def _best_us(database: Any, task: Any) -> float | None:
    """The best mean run time the database holds for ``task`` (None when it has no measured record)."""
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return None
    records = database.get_top_k(database.commit_workload(mod), 1)
    secs = [float(s) for s in records[0].run_secs] if records and records[0].run_secs else []
    return 1e6 * sum(secs) / len(secs) if secs else None


def _task_key(task: Any) -> str:
    """A stable name for a task: its function name and the structural hash of its PrimFunc module."""
    import tvm_ffi
    return f"{task.task_name}:{tvm_ffi.structural_hash(task.dispatched[0]) & 0xFFFFFFFFFFFF:012x}"


# ------------------------------------------------------------------------------------------- helpers


def tune_options(tune: dict[str, Any]) -> dict[str, Any]:
    """``tune`` checked (TuningError for an unknown or bad option) and completed with the defaults."""
    if not isinstance(tune, dict):
        raise TuningError(f"tune must be a dict like {{'trials': 64, 'db': 'path'}}, got {tune!r}")
    unknown = sorted(set(tune) - set(OPTIONS))
    if unknown:
        raise TuningError(f"unknown tune option(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    opts = {"trials": DEFAULT_TRIALS, "trials_per_iter": 16, **tune}
    for key in ("trials", "trials_per_task", "trials_per_iter", "timeout_s"):
        value, least = opts.get(key), 0 if key == "trials" else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise TuningError(f"tune option {key} must be an integer of at least {least}, got {value!r}")
    if opts.get("db") is not None and not isinstance(opts["db"], (str, os.PathLike)):  # else pathlib's TypeError
        raise TuningError(f"tune option db must be a directory path (str or os.PathLike), got {opts['db']!r}")
    if "rpc" in opts:
        rpc_devices(opts["rpc"], need_tracker=opts["trials"] > 0)
    return opts


def _budgets(total: int, costs: list[float], per_task: int | None) -> list[int]:
    """Trials per task: ``per_task`` each while the total lasts, or else shares of ``total`` in proportion to
    ``costs`` (the time each task takes in the model). A task whose share is below MIN_SEARCH trials is not
    searched and keeps its measured default (a search that short finds nothing, and each searched task costs
    a builder start-up); its share goes to the others."""
    if per_task:
        out = []
        for _ in costs:
            out.append(min(per_task, total))
            total -= out[-1]
        return out
    costs = costs if sum(costs) > 0 else [1.0] * len(costs)
    active = sorted(range(len(costs)), key=lambda i: -costs[i])  # drop the cheapest until every share is enough
    while len(active) > 1 and total * costs[active[-1]] / sum(costs[i] for i in active) < MIN_SEARCH:
        active.pop()
    weight = sum(costs[i] for i in active)
    shares = {i: total * costs[i] / weight for i in active}
    out = [int(shares.get(i, 0)) for i in range(len(costs))]
    for i in sorted(active, key=lambda i: shares[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def _costs(defaults: list[float | None], tasks: list[Any]) -> list[float]:
    """Each task's share of the model's run time: its measured default time × the number of calls. A task
    without a default runs unscheduled (the slowest code there is) and counts as the costliest measured one.
    Measured time, not FLOPs: softmax or gelu (exp, erf) cost far more than their FLOPs say."""
    times = [d * t.weight if d is not None else None for d, t in zip(defaults, tasks)]
    worst = max((t for t in times if t is not None), default=1.0)
    return [t if t is not None else worst for t in times]


def _kept_intrinsics(tvm_target: tvm.target.Target) -> tuple[str, ...]:
    attrs = _target_json(tvm_target)
    return ("arm_cpu",) if "aarch64" in str(attrs.get("mtriple", "")) or "arm_cpu" in attrs.get("keys", ()) else ()


def _check_runnable(tvm_target: tvm.target.Target) -> None:
    """MetaSchedule measures every candidate here: the target must run on this machine."""
    import tvm
    kind, triple = tvm_target.kind.name, str(_target_json(tvm_target).get("mtriple", ""))
    if kind == "llvm":
        if triple and not triple.startswith(platform.machine()):
            raise TuningError(f"tuning measures kernels on this machine ({platform.machine()}), which cannot run "
                              f"{triple} code; tune on such a machine and copy its database here")
        cpu = str(tvm_target.attrs.get("mcpu", ""))
        # every candidate would fail, and be recorded unrunnable for good (this machine's own CPU is runnable, where
        # its features read otherwise: torch's capability sees no VNNI)
        if cpu != host_cpu() and (lacks := sorted(tvm_target_features(tvm_target) - host_features())):
            raise TuningError(f"tuning measures kernels on this machine, which lacks {', '.join(lacks)} that code "
                              f"for {cpu} uses; tune on such a machine (or give rpc=) and copy its database here")
    elif not tvm.device(kind, 0).exist:
        raise TuningError(f"tuning measures kernels on this machine, which has no {kind} device; tune on such a "
                          f"machine and copy its database here")


def _with_cores(tvm_target: tvm.target.Target, devices: RpcDevices) -> tvm.target.Target:
    """``tvm_target`` with ``num-cores`` (asked of one of the devices: its thread count) where it has none:
    MetaSchedule's parallelization rules need it. Records match workloads, not targets, so they apply to
    ``tvm_target`` as it is."""
    import tvm
    attrs = _target_json(tvm_target)
    if tvm_target.kind.name != "llvm" or "num-cores" in attrs:
        return tvm_target
    host = attrs.pop("host", None)
    attrs["num-cores"] = device_threads(devices)
    return tvm.target.Target(attrs, host=host) if host else tvm.target.Target(attrs)


def _target_json(tvm_target: tvm.target.Target) -> dict[str, Any]:
    """The target as plain JSON data (host included), the form compared between database and compile."""
    return json.loads(str(tvm_target))
