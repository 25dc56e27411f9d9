"""MetaSchedule kernel tuning: the per-target database, tuning only what is missing, resuming, refusing bad dbs.

One module-scoped fixture tunes a two-task model with 4 trials per task as a user would: Ctrl-C during the
second task, a rerun, a compile that reuses everything; the other tests read or copy its database. Reuse is
asserted through the tuning counters, never wall-clock.
"""
import json
import os
import platform
import shutil
import signal

import pytest
import torch
from torch import nn

import fxforge
from fxforge.cli import main, tuning_summary
from fxforge.compiler.errors import TuningError
from fxforge.backends.tvm import tuning as ms_tuning

pytest.importorskip("tvm")

TRIALS = {"trials": 8, "trials_per_task": 4, "trials_per_iter": 4}


class Head(nn.Module):
    """One tuning task: fused matmul + bias + relu."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Two(nn.Module):
    """Two tasks: Head's, and matmul + bias."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.out = Head(), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(x))


def _compile(model: nn.Module, db, **tune):
    return fxforge.compile(model.eval(), torch.randn(4, 32), passes=["fuse"], backend="tvm",
                           tune={"db": str(db), **TRIALS, **tune})


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A database built as a user would: Ctrl-C during the second task, then a rerun, then a reuse."""
    db = tmp_path_factory.mktemp("tuning") / "db"
    torch.manual_seed(0)
    model = Two()
    batches = []
    update = ms_tuning._Progress.update

    def ctrl_c_in_second_task(self, built, ran):
        update(self, built, ran)
        batches.append(self.name)
        if len(batches) == 2:  # the first batch of the second task (the first task is one batch of 4)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ms_tuning._Progress, "update", ctrl_c_in_second_task)
        with pytest.raises(KeyboardInterrupt):
            _compile(model, db)
    interrupted = {"meta": json.loads((db / ms_tuning.META_FILE).read_text()), "batches": batches,
                   "records": len((db / ms_tuning.RECORD_FILE).read_text().splitlines())}
    runs, metas = [], []
    for _ in range(2):
        runs.append(_compile(model, db))
        metas.append(json.loads((db / ms_tuning.META_FILE).read_text()))
    return db, model, interrupted, runs, metas


def test_ctrl_c_ends_the_task_and_keeps_what_finished(tuned):
    _, _, interrupted, _, _ = tuned
    first, second = interrupted["batches"]
    assert first != second  # one batch per task: interrupted in the second task, after its first batch
    assert [t["name"] for t in interrupted["meta"]["tasks"].values()] == [first]
    assert interrupted["records"] == 2 + 8  # each task's default schedule and both batches were committed


def test_rerun_tunes_only_the_interrupted_task(tuned):
    _, _, interrupted, runs, metas = tuned
    stats = runs[0].report.meta["tuning"]
    assert (stats["tasks"], stats["tuned_tasks"], stats["reused_tasks"], stats["trials"]) == (2, 1, 1, 4)
    reused = [p["name"] for p in stats["per_task"] if p["status"] == "reused"]
    assert reused == [interrupted["batches"][0]]
    assert len(metas[0]["tasks"]) == 2 and metas[0]["tvm"] and metas[0]["target"]["kind"] == "llvm"


def test_next_compile_applies_the_database_without_tuning(tuned):
    _, model, _, runs, metas = tuned
    stats = runs[1].report.meta["tuning"]
    assert (stats["tuned_tasks"], stats["reused_tasks"], stats["trials"]) == (0, 2, 0)
    assert stats["scheduled_functions"] == 2  # both records matched the module's functions
    assert all(p["best_us"] > 0 for p in stats["per_task"])
    assert metas[1] == metas[0]
    x = torch.randn(4, 32)  # tuning is for static shapes: the artifact runs the example batch
    torch.testing.assert_close(runs[1](x), model(x), rtol=1e-5, atol=1e-5)


def test_default_schedule_is_measured_and_never_beaten_by_a_slower_record(tuned):
    _, _, _, runs, metas = tuned
    for stats in (runs[0].report.meta["tuning"], runs[1].report.meta["tuning"]):
        for task in stats["per_task"]:
            assert 0 < task["best_us"] <= task["default_us"]  # the default is one of the records
    assert all(t["default_us"] > 0 for t in metas[1]["tasks"].values())


def test_zero_trials_applies_the_database_and_tunes_nothing(tuned, tmp_path):
    db, model, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "db").iterdir())
    stats = _compile(model, tmp_path / "db", trials=0).report.meta["tuning"]
    assert (stats["reused_tasks"], stats["trials"], stats["scheduled_functions"]) == (2, 0, 2)
    wide = fxforge.compile(nn.Linear(32, 24).eval(), torch.randn(4, 32), passes=["fuse"], backend="tvm",
                           tune={"db": str(tmp_path / "db"), "trials": 0})
    assert (wide.report.meta["tuning"]["untuned_tasks"], wide.report.meta["tuning"]["trials"]) == (1, 0)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "db").iterdir()) == before


def test_a_tuned_build_packs_constant_weights_at_build_time_as_the_untuned_build_does(tuned, tmp_path, monkeypatch):
    """The tuned PrimFuncs know which parameters the caller binds to constants (``layout_free_buffers``), so the
    default schedule, measured and stored as a record, packs each linear's constant weight in a block that moves
    out to build time, as in an untuned build; it was measured without that packing (a weight packed once). Before,
    the database held a default that read the weight unpacked."""
    from fxforge.backends.tvm import lower
    db, model, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    scheduled = []
    schedule = lower.schedule
    monkeypatch.setattr(lower, "schedule", lambda mod, tgt: scheduled.append(mod) or schedule(mod, tgt))
    monkeypatch.setattr(ms_tuning, "MIN_GAIN", 1.0)  # every record applies, the default's included
    stats = _compile(model, tmp_path / "db", trials=0).report.meta["tuning"]
    assert stats["scheduled_functions"] == 2
    funcs = {name.name_hint: f for name, f in scheduled[0].functions.items()
             if f.attrs and f.attrs.get("tirx.is_scheduled")}
    assert len(funcs) == 2 and all(f.attrs.get("layout_free_buffers") for f in funcs.values())
    defaults = [t["name"] for t in stats["per_task"] if t["best_us"] == t["default_us"]]  # the default stood
    assert all("meta_schedule.layout_rewrite_preproc" in funcs[name].script() for name in defaults)


def test_a_searched_kernel_replaces_the_default_only_when_min_gain_faster(tuned, tmp_path, monkeypatch):
    """Tasks are timed alone, weights warm in cache; inside a model a kernel that was a little faster alone can be
    slower than the packed default. Applying a database, a searched record wins only when it was measured
    ``MIN_GAIN`` times faster than the default; otherwise the function keeps the default rule, and the stats and
    the CLI summary name it."""
    from fxforge.backends.tvm import lower
    db, model, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    scheduled = []
    schedule = lower.schedule
    monkeypatch.setattr(lower, "schedule", lambda mod, tgt: scheduled.append(mod) or schedule(mod, tgt))
    x = torch.randn(4, 32)
    for gain, applied in ((1.0, 2), (float("inf"), 0)):
        monkeypatch.setattr(ms_tuning, "MIN_GAIN", gain)
        cm = _compile(model, tmp_path / "db", trials=0)
        stats = cm.report.meta["tuning"]
        assert stats["scheduled_functions"] == 2  # both records match either way
        assert sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled")) for f in scheduled[-1].functions.values()) \
            == applied
        won = [t["name"] for t in stats["per_task"] if t["best_us"] < t["default_us"]]
        assert stats["below_min_gain"] == (won if gain > 1 else [])
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)
    summary = tuning_summary({**stats, "below_min_gain": ["fused_matmul"]})
    assert "kept the default schedule where the best searched kernel was less than inf" in summary


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


def test_a_task_that_cannot_run_on_random_inputs_is_kept_not_searched(tmp_path):
    model, ids = Embed().eval(), torch.randint(0, 100, (2, 8))  # take: random int64 indices fall out of range
    cm = fxforge.compile(model, (ids,), backend="tvm", tune={"trials": 8, "db": str(tmp_path)}, measure_latency=False)
    # the embedding's function: "take", or "take1" once the layout-free attributes made a copy of it
    assert [t["trials"] for t in cm.report.meta["tuning"]["per_task"] if t["name"].startswith("take")] == [0]
    meta = json.loads((tmp_path / ms_tuning.META_FILE).read_text())
    assert [t["name"].rstrip("0123456789") for t in meta["tasks"].values() if t.get("unrunnable")] == ["take"]
    again = fxforge.compile(model, (ids,), backend="tvm", tune={"trials": 0, "db": str(tmp_path)},
                            measure_latency=False)
    assert again.report.meta["tuning"]["untuned_tasks"] == 0  # listed as done: a benchmark's tuned row accepts it
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_zero_trials_needs_an_existing_database(tmp_path):
    with pytest.raises(TuningError, match="trials=0 applies a tuning database, but .* holds none"):
        _compile(Head(), tmp_path / "nothing", trials=0)


def test_tuned_artifact_saves_its_tuning_stats(tuned, tmp_path):
    _, model, _, runs, _ = tuned
    loaded = fxforge.load(runs[1].save(tmp_path / "art"))
    assert loaded.info["tuning"]["reused_tasks"] == 2
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_task_of_another_model_is_found_in_the_database(tuned, tmp_path):
    db, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    stats = _compile(Head(), tmp_path / "db").report.meta["tuning"]
    assert (stats["tasks"], stats["tuned_tasks"], stats["reused_tasks"]) == (1, 0, 1)


def test_cli_tune_reports_each_task(tuned, tmp_path, capsys):
    db, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    assert main(["tune", "test_tvm_tuning:Two", "--input-shape", "4,32", "--trials", "4",
                 "--db", str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert "fused_matmul_add_relu" in out and "reused" in out and "2 tasks: 0 tuned now" in out


def test_cli_bench_compiles_the_tuned_row_against_a_database(tuned, tmp_path, capsys):
    db, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    assert main(["bench", "test_tvm_tuning:Two", "--input-shape", "4,32", "--rounds", "1", "--tuning-db",
                 str(tmp_path / "db"), "--systems", "eager;fxforge fuse → tvm (tuned)"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|") and "(tuned)" in line]
    assert len(row) == 1 and "failed" not in row[0]


def _damaged(tuned, tmp_path, damage) -> str:
    db, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    damage(tmp_path / "db")
    with pytest.raises(TuningError) as info:
        _compile(Two(), tmp_path / "db")
    message = str(info.value)
    assert "\n" not in message
    return message


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_records_name_the_file(tuned, tmp_path):
    message = _damaged(tuned, tmp_path, lambda db: _truncate(db / ms_tuning.RECORD_FILE))
    assert ms_tuning.RECORD_FILE in message and "corrupt" in message


def test_garbled_workloads_name_the_file(tuned, tmp_path):
    message = _damaged(tuned, tmp_path, lambda db: (db / ms_tuning.WORKLOAD_FILE).write_text("{not json\n"))
    assert ms_tuning.WORKLOAD_FILE in message


def test_corrupt_metadata_names_the_file(tuned, tmp_path):
    message = _damaged(tuned, tmp_path, lambda db: _truncate(db / ms_tuning.META_FILE))
    assert ms_tuning.META_FILE in message


def _edit_meta(db, **fields):
    path = db / ms_tuning.META_FILE
    meta = json.loads(path.read_text())
    for key, value in fields.items():
        if key == "mcpu":
            meta["target"]["mcpu"] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_database_of_another_target_is_refused(tuned, tmp_path):
    message = _damaged(tuned, tmp_path, lambda db: _edit_meta(db, mcpu="cortex-a72"))
    assert "another target" in message and "cortex-a72" in message


def test_database_of_another_tvm_version_is_refused(tuned, tmp_path):
    message = _damaged(tuned, tmp_path, lambda db: _edit_meta(db, tvm="0.19.0"))
    assert "TVM 0.19.0" in message


def test_records_without_metadata_are_refused(tuned, tmp_path):
    message = _damaged(tuned, tmp_path, lambda db: (db / ms_tuning.META_FILE).unlink())
    assert ms_tuning.META_FILE in message and "unknown" in message


def test_cli_reports_a_bad_database_in_one_line(tuned, tmp_path, capsys):
    db, *_ = tuned
    shutil.copytree(db, tmp_path / "db")
    _truncate(tmp_path / "db" / ms_tuning.RECORD_FILE)
    assert main(["tune", "test_tvm_tuning:Two", "--input-shape", "4,32", "--db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxforge: error:") and ms_tuning.RECORD_FILE in err and "\n" not in err


@pytest.mark.parametrize("tune, message", [
    ({"trails": 8}, "unknown tune option(s) trails"),
    ({"trials": -1}, "trials must be an integer of at least 0"),
    ({"trials": 8, "timeout_s": "60"}, "timeout_s must be an integer of at least 1"),
])
def test_bad_tune_options_are_refused(tune, message):
    with pytest.raises(TuningError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ms_tuning.apply_tuning(None, None, tune)


def test_default_database_is_per_target_under_the_cache_dir(monkeypatch, tmp_path):
    import tvm
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    x86 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert ms_tuning.default_db_dir(x86).parent == tmp_path / "fxforge" / "tuning"
    assert ms_tuning.default_db_dir(x86).name.startswith("llvm-znver3-")
    assert ms_tuning.default_db_dir(arm) != ms_tuning.default_db_dir(x86)


@pytest.mark.skipif(platform.machine() == "aarch64", reason="AArch64 code runs here")
def test_a_target_that_cannot_run_here_is_not_tuned(tmp_path):
    import tvm

    from fxforge.backends.tvm import lower as tvm_backend
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    gm = torch.export.export(Head().eval(), (torch.randn(4, 32),)).module()
    mod = tvm_backend.prepare(tvm_backend.relax_module(gm, (torch.randn(4, 32),)), arm)
    with pytest.raises(TuningError, match="cannot run aarch64-linux-gnu code"):
        ms_tuning.apply_tuning(mod, arm, {"db": str(tmp_path / "db"), **TRIALS})


def test_an_x86_target_with_features_this_cpu_lacks_is_not_tuned(tmp_path):
    """A VNNI target on an AVX2 CPU was "tuned": every candidate failed here, nothing was measured, and each task
    was recorded unrunnable in the database, which no later tuning (on such a CPU, or over RPC) would try again."""
    import tvm

    from fxforge.backends.tvm import lower as tvm_backend
    from fxforge.compiler.target import host_features
    if {"avx512", "vnni", "amx"} <= host_features():
        pytest.skip("this CPU runs Sapphire Rapids code")
    spr = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
    gm = torch.export.export(Head().eval(), (torch.randn(4, 32),)).module()
    mod = tvm_backend.prepare(tvm_backend.relax_module(gm, (torch.randn(4, 32),)), spr)
    with pytest.raises(TuningError, match=r"this machine, which lacks .*amx.* that code for sapphirerapids uses"):
        ms_tuning.apply_tuning(mod, spr, {"db": str(tmp_path / "db"), **TRIALS})
    assert not any("unrunnable" in f.read_text() for f in (tmp_path / "db").glob("*.json"))


@pytest.mark.parametrize("total, costs, per_task, expected", [
    (32, [0.0, 1e3, 2e3, 0.0], None, [0, 11, 21, 0]),  # shares by time; largest remainder gets the odd trial
    (20, [1.0, 1.0, 18.0], None, [0, 0, 20]),  # shares under MIN_SEARCH go to the others
    (40, [1.0, 3.0, 6.0], None, [4, 12, 24]),
    (3, [1.0, 2.0, 3.0, 4.0], None, [0, 0, 0, 3]),  # too few for any search: the costliest gets them
    (64, [5.0] * 20, None, [4] * 16 + [0] * 4),  # equal tasks: as many as get MIN_SEARCH each
    (8, [1.0, 1.0, 1.0], None, [4, 4, 0]),
    (10, [0.0, 0.0, 0.0], None, [5, 5, 0]),  # nothing measured: equal shares
    (10, [1.0, 2.0], 4, [4, 4]),
    (6, [1.0, 2.0], 4, [4, 2]),
])
def test_trial_budget_split(total, costs, per_task, expected):
    budgets = ms_tuning._budgets(total, costs, per_task)
    assert budgets == expected and sum(budgets) <= total


def test_costs_are_measured_time_times_calls():
    calls = [type("Task", (), {"weight": w}) for w in (1, 12, 2)]
    assert ms_tuning._costs([100.0, 50.0, None], calls) == [100.0, 600.0, 600.0]  # no default: the costliest


SEEDED = '''
import torch
from torch import nn


def head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU())
'''


@pytest.mark.slow
def test_console_tune_then_compile_with_its_database_then_run(tmp_path):
    """The command-line path end to end through the installed console script: `fxforge tune` makes a real
    database (one task, 4 trials), `fxforge compile --tuning-db` builds against it without tuning, and
    `fxforge run` serves the saved artifact, which computes what the model does."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    def console(*argv):
        done = subprocess.run([str(Path(sys.executable).with_name("fxforge")), *argv], capture_output=True,
                              text=True, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    (tmp_path / "seeded.py").write_text(SEEDED)
    tuned = console("tune", "seeded:head", "--input-shape", "4,32", "--trials", "4", "--db", "db")
    assert "1 tasks: 1 tuned now" in tuned, tuned
    records = (tmp_path / "db" / ms_tuning.RECORD_FILE).read_text().splitlines()
    assert len(records) >= 2  # the default schedule and the tuned trials
    console("compile", "seeded:head", "--input-shape", "4,32", "--passes", "fuse", "--backend", "tvm",
            "--tuning-db", "db", "--out", "art")
    meta = json.loads((tmp_path / "art" / "report.json").read_text())["meta"]
    stats = meta["tuning"]
    assert meta["dynamic_batch"] is False and fxforge.load(tmp_path / "art").signature.dynamic_batch is False
    assert (stats["tasks"], stats["reused_tasks"], stats["trials"], stats["scheduled_functions"]) == (1, 1, 0, 1)
    assert (tmp_path / "db" / ms_tuning.RECORD_FILE).read_text().splitlines() == records  # applied, not extended
    x = torch.randn(4, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    console("run", "art", "--input", "x.npy", "--save", "y.npz")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU()).eval()
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["arr_0"], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_tuning_for_arm64_after_x86_imports_the_arm_intrinsics_an_x86_tuning_stood_in_for(monkeypatch):
    """Before: tuning for x86 stood empty modules in for other hardware's tensor intrinsics, and a later arm64 tuning
    in the same process failed ("TensorIntrin 'dot_4x4_i8i8s32_neon' is not registered"; the slow suite ran the two
    in one worker). Expected: the stand-in of a kept intrinsic is replaced by the real module (its import, 40 s, is
    recorded here instead of run)."""
    import sys
    import types
    name = "tvm.s_tir.tensor_intrin.arm_cpu"
    monkeypatch.setitem(sys.modules, name, types.ModuleType("arm_cpu"))  # what an x86 tuning left
    imported = []
    monkeypatch.setattr(ms_tuning.importlib, "import_module", imported.append)
    ms_tuning.skip_other_intrinsics(("arm_cpu",))
    assert imported == [name] and name not in sys.modules
    real = types.ModuleType("arm_cpu")
    real.__spec__ = object()  # an imported module has a spec: left as it is
    monkeypatch.setitem(sys.modules, name, real)
    ms_tuning.skip_other_intrinsics(("arm_cpu",))
    assert imported == [name] and sys.modules[name] is real
