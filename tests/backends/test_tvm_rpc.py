"""Tuning through TVM's RPC stack: the host builds, RPC servers registered under a device key measure.

The slow test runs a real loopback fleet (`fxforge rpc tracker` and two `fxforge rpc server` on 127.0.0.1),
kills one server during the run, and checks the database and the compiled result; `local_fleet` kills every
process it started on exit, whatever happened. The fast tests cover what is refused before any work: an
unreachable tracker, a key with no server, a database from other devices, bad options.
"""
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends.tvm import rpc, tuning
from fxforge.cli import main
from fxforge.compiler.errors import TuningError

pytest.importorskip("tvm")

TRIALS = {"trials": 8, "trials_per_task": 4, "trials_per_iter": 4}


class Two(nn.Module):
    """Two tuning tasks: matmul + bias + relu, and matmul + bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(32, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))


def _compile(model: nn.Module, **tune):
    return fxforge.compile(model, torch.randn(4, 32), passes=["fuse"], backend="tvm", tune=tune)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.mark.slow
def test_two_servers_one_killed_mid_run_then_resume(tmp_path):
    db = tmp_path / "db"
    model = Two().eval()
    batches = []
    update = tuning._Progress.update
    with rpc.local_fleet("x86", servers=2, threads=1) as fleet:

        def kill_after_first_batch(self, built, ran):
            update(self, built, ran)
            batches.append([r.error_msg for r in ran])
            if len(batches) == 1:
                fleet.kill_server(1)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tuning._Progress, "update", kill_after_first_batch)
            first = _compile(model, db=str(db), rpc={"tracker": fleet.tracker, "key": "x86"}, **TRIALS)
        left = rpc.tracker_summary(rpc.parse_address(fleet.tracker, "tracker"))["server_info"]
        again = _compile(model, db=str(db), rpc={"tracker": fleet.tracker, "key": "x86"}, **TRIALS)
    stats = first.report.meta["tuning"]
    assert stats["rpc"] == {"tracker": fleet.tracker, "key": "x86", "servers": 2}
    assert (stats["tuned_tasks"], stats["trials"], stats["scheduled_functions"]) == (2, 8, 2)
    assert len(batches) == 2 and len(left) == 1  # the second task was measured by the surviving server alone
    assert all(err is None for err in batches[1])
    assert all(t["default_us"] > 0 and 0 < t["best_us"] <= t["default_us"] for t in stats["per_task"])
    meta = json.loads((db / tuning.META_FILE).read_text())
    assert meta["device_key"] == "x86" and meta["target"]["kind"] == "llvm" and len(meta["tasks"]) == 2
    records = [json.loads(line) for line in (db / tuning.RECORD_FILE).read_text().splitlines()]
    assert len(records) == 2 + 8  # each task's default schedule, and every candidate measured
    x = torch.randn(4, 32)
    torch.testing.assert_close(first(x), model(x), rtol=1e-5, atol=1e-5)
    # a restart finds every task in the database: nothing is measured again
    resumed = again.report.meta["tuning"]
    assert (resumed["tuned_tasks"], resumed["reused_tasks"], resumed["trials"]) == (0, 2, 0)
    torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)
    # the database applies without a tracker when the key matches (trials=0)
    applied = _compile(model, db=str(db), trials=0, rpc={"key": "x86"}).report.meta["tuning"]
    assert (applied["reused_tasks"], applied["scheduled_functions"], applied["device_key"]) == (2, 2, "x86")


QEMU_ROOT = Path(os.environ.get("FXFORGE_QEMU_ROOT") or
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxforge" / "arm64-qemu")


def _run_on_device(library: Path, fleet: rpc.LocalFleet, x: torch.Tensor) -> torch.Tensor:
    """Load ``library`` on a server of the fleet and run its ``main`` on ``x`` there (the Relax VM over RPC)."""
    import tvm
    from tvm import relax
    from tvm import rpc as tvm_rpc
    session = tvm_rpc.connect_tracker(*rpc.parse_address(fleet.tracker, "tracker")).request(fleet.key)
    session.upload(str(library))
    device = session.cpu()
    vm = relax.VirtualMachine(session.load_module(library.name), device)
    vm.set_input("main", tvm.runtime.tensor(x.numpy(), device))
    vm.invoke_stateful("main")
    (out,) = vm.get_outputs("main")
    return torch.from_numpy(out.numpy())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="qemu-aarch64 missing (apt-get install qemu-user)")
@pytest.mark.skipif(not (QEMU_ROOT / "site" / "tvm").is_dir(),
                    reason=f"no AArch64 python and TVM in {QEMU_ROOT}: run tools/arm64-qemu-root.sh (or set "
                           f"FXFORGE_QEMU_ROOT)")
def test_arm64_tuned_through_an_emulated_server(tmp_path):
    db = tmp_path / "db"
    model = Two().eval()
    with rpc.local_fleet("arm64-qemu", servers=1, qemu_root=QEMU_ROOT, ready_s=600) as fleet:
        cm = fxforge.compile(model, torch.randn(4, 32), passes=["fuse"], backend="tvm", target="arm64",
                             tune={"db": str(db), "rpc": {"tracker": fleet.tracker, "key": "arm64-qemu"}, **TRIALS})
        cm.save(tmp_path / "out")
        x = torch.randn(4, 32)
        y = _run_on_device(tmp_path / "out" / "model.so", fleet, x)
    stats = cm.report.meta["tuning"]
    assert (stats["tuned_tasks"], stats["trials"], stats["scheduled_functions"]) == (2, 8, 2)
    assert all(t["default_us"] > 0 and t["best_us"] > 0 for t in stats["per_task"])  # measured on the device
    meta = json.loads((db / tuning.META_FILE).read_text())
    assert meta["device_key"] == "arm64-qemu" and meta["target"]["mtriple"] == "aarch64-linux-gnu"
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


def test_unreachable_tracker_is_one_error_naming_it(tmp_path):
    port = _closed_port()
    with pytest.raises(TuningError, match=rf"RPC tracker at 127\.0\.0\.1:{port} cannot be reached"):
        _compile(Two().eval(), db=str(tmp_path / "db"), rpc={"tracker": f"127.0.0.1:{port}", "key": "x86"},
                 **TRIALS)
    assert not (tmp_path / "db").exists()  # refused before any work


def test_tracker_without_a_server_under_the_key(tmp_path):
    from tvm.rpc.tracker import Tracker
    port = _closed_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 100, silent=True)
    try:
        with pytest.raises(TuningError, match=r"no RPC server is registered under key 'rpi5' .*keys there: none"):
            _compile(Two().eval(), db=str(tmp_path / "db"),
                     rpc={"tracker": f"127.0.0.1:{tracker.port}", "key": "rpi5"}, **TRIALS)
    finally:
        tracker.terminate()


def _database(tmp_path, key):
    """A database directory whose metadata says it was measured under device ``key`` (None: the host)."""
    import tvm
    from fxforge.backends.tvm.lower import tvm_target
    from fxforge.compiler.target import get_target
    db = tmp_path / f"db-{key}"
    db.mkdir()
    meta = {"format": tuning.FORMAT, "target": json.loads(str(tvm_target(get_target("x86")))),
            "tvm": tvm.__version__, "device_key": key, "tasks": {}}
    (db / tuning.META_FILE).write_text(json.dumps(meta))
    return db


def test_database_of_other_devices_is_refused(tmp_path):
    db = _database(tmp_path, "rpi5")
    with pytest.raises(TuningError, match=r"measurements from the RPC devices under key 'rpi5', not from the "
                                          r"RPC devices under key 'x86'"):
        _compile(Two().eval(), db=str(db), trials=0, rpc={"key": "x86"})
    with pytest.raises(TuningError, match=r"under key 'rpi5', not from the tuning machine itself"):
        _compile(Two().eval(), db=str(db), **TRIALS)  # local tuning never adds to a device's database
    local = _database(tmp_path, None)
    with pytest.raises(TuningError, match=r"from the tuning machine itself .*, not from the RPC devices under "
                                          r"key 'x86'"):
        _compile(Two().eval(), db=str(local), trials=0, rpc={"key": "x86"})


@pytest.mark.parametrize("value, message", [
    ({"tracker": "127.0.0.1:9190"}, "needs 'key'"),
    ({"key": "x86"}, "needs 'tracker'"),
    ({"tracker": "nohost", "key": "x86"}, "must be 'host:port'"),
    ({"tracker": "h:1", "key": "x86", "port": 2}, "must be a dict like"),
    ("h:1", "must be a dict like"),
])
def test_bad_rpc_options_are_refused(value, message):
    with pytest.raises(TuningError, match=message):
        tuning.tune_options({"trials": 4, "rpc": value})


def test_cli_rpc_options_are_checked_in_one_line(capsys):
    assert main(["tune", "torch.nn:Identity", "--input-shape", "2,3", "--rpc-tracker", "h:1"]) == 2
    assert "--rpc-tracker and --rpc-key go together" in capsys.readouterr().err
    assert main(["rpc", "server", "--tracker", "nohost", "--key", "x86"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tracker must be 'host:port'" in err


def test_cli_tune_names_the_unreachable_tracker(capsys):
    port = _closed_port()
    assert main(["tune", "torch.nn:Linear", "--model-kwargs", '{"in_features": 3, "out_features": 2}',
                 "--input-shape", "2,3", "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "x86"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port} cannot be reached" in err
