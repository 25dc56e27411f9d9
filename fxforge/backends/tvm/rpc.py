"""Measuring tuning candidates on remote devices through TVM's own RPC stack: a tracker and RPC servers.

Topology: this machine builds every candidate for the target (cross-compiling it into a shared library) and
MetaSchedule's ``RPCRunner`` ships each library to a device registered with the tracker under a key
(``rpi5``, ``x86``), which loads it, times it and answers. One runner worker per free server, so as many
candidates are measured at once as there are free devices. A device that dies mid-run fails only the
measurements it held; the tracker drops it and the other servers take the next ones.

    fxforge rpc tracker --port 9190                                # on any machine all can reach
    fxforge rpc server --tracker HOST:9190 --key rpi5             # on every device
    fxforge tune MODEL --input-shape ... --target arm64 --rpc-tracker HOST:9190 --rpc-key rpi5

The ``fxforge rpc`` commands become ``python -m tvm.exec.rpc_tracker`` / ``rpc_server`` (the same process,
through exec) with the settings that make MetaSchedule measurement work: a port range that starts at the
given port (TVM's fixed default end, 9199, refuses any port above it), and on servers the number of threads
a measurement may use (``TVM_NUM_THREADS``). ``--qemu-root`` runs an AArch64 server under qemu-user
(:func:`qemu_server_argv`); :func:`local_fleet` starts a loopback tracker and servers for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fxforge.compiler.errors import TuningError, first_line

CONNECT_TIMEOUT_S = 5.0  # reaching the tracker; a tracker that does not answer in this time is reported
PORT_SPAN = 100  # a tracker or server binds the first free port in [port, port + PORT_SPAN)


@dataclass(frozen=True)
class RpcDevices:
    """The devices registered with a tracker under one key. ``tracker`` is None when only the key is known
    (applying a database, ``trials=0``: nothing is measured)."""

    key: str
    tracker: tuple[str, int] | None = None

    @property
    def address(self) -> str:
        return f"{self.tracker[0]}:{self.tracker[1]}" if self.tracker else "(no tracker)"


def rpc_devices(value: Any, need_tracker: bool) -> RpcDevices:
    """``{"tracker": "host:port", "key": "rpi5"}`` checked (TuningError naming what is wrong)."""
    if not isinstance(value, dict) or set(value) - {"tracker", "key"}:
        raise TuningError(f"tune option rpc must be a dict like {{'tracker': 'host:9190', 'key': 'rpi5'}}, "
                          f"got {value!r}")
    key, tracker = value.get("key"), value.get("tracker")
    if not isinstance(key, str) or not key or ":" in key or key != key.strip():
        raise TuningError(f"tune option rpc needs 'key': the device key servers registered with (e.g. 'rpi5'), "
                          f"got {key!r}")
    if tracker is None:
        if need_tracker:
            raise TuningError("tune option rpc needs 'tracker': 'host:port' to measure on the devices")
        return RpcDevices(key)
    return RpcDevices(key, parse_address(tracker, "tune option rpc's tracker"))


def parse_address(text: Any, what: str) -> tuple[str, int]:
    """``"host:port"`` as (host, port); TuningError naming ``what`` otherwise."""
    host, sep, port = str(text).rpartition(":")
    if not isinstance(text, str) or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TuningError(f"{what} must be 'host:port', got {text!r}")
    return host, int(port)


def tracker_summary(address: tuple[str, int], timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """The tracker's summary (``queue_info``: free and pending per key; ``server_info``: one entry per server).

    Spoken directly with a socket timeout: TVM's own client retries a refused connection for 60 s.
    """
    from tvm.rpc import base
    where = f"{address[0]}:{address[1]}"
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise TuningError(f"{where} answered, but it is not a TVM RPC tracker")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            code, summary = base.recvjson(sock)
    except TuningError:
        raise
    except (OSError, RuntimeError, ValueError, struct.error) as e:
        raise TuningError(f"the RPC tracker at {where} cannot be reached ({first_line(e) or type(e).__name__}); "
                          f"start one with `fxforge rpc tracker --port {address[1]}`") from None
    if code != base.TrackerCode.SUCCESS or not isinstance(summary, dict):
        raise TuningError(f"the RPC tracker at {where} refused a summary request ({code!r})")
    return summary


def free_servers(devices: RpcDevices) -> int:
    """How many servers under ``devices.key`` are free now; TuningError when the tracker cannot be reached or
    no server is registered under the key (naming the keys it has)."""
    assert devices.tracker is not None
    summary = tracker_summary(devices.tracker)
    keys = [str(s.get("key", "")).partition(":")[2] for s in summary.get("server_info", [])]
    if devices.key not in keys:
        have = ", ".join(sorted(set(keys))) or "none"
        raise TuningError(f"no RPC server is registered under key {devices.key!r} at the tracker "
                          f"{devices.address} (keys there: {have}); start one with `fxforge rpc server "
                          f"--tracker {devices.address} --key {devices.key}`")
    return int(summary.get("queue_info", {}).get(devices.key, {}).get("free", 0))


def device_threads(devices: RpcDevices, timeout_s: int = 60) -> int:
    """The threads a kernel gets on one of the devices (its TVM thread pool: TVM_NUM_THREADS or its cores)."""
    from tvm import rpc
    assert devices.tracker is not None
    try:
        session = rpc.connect_tracker(*devices.tracker).request(devices.key, session_timeout=timeout_s)
        return int(session.get_function("runtime.NumThreads")())
    except Exception as e:
        raise TuningError(f"asking an RPC server under key {devices.key!r} at {devices.address} for its thread "
                          f"count failed: {first_line(e)}") from None


def rpc_runner(devices: RpcDevices, workers: int, evaluator: dict[str, Any], timeout_s: int) -> Any:
    """MetaSchedule's RPCRunner with ``workers`` parallel measurements.

    Each measurement asks the tracker for a free server and gives up after ``wait_s`` (TVM's request waits
    for ever, so a run whose servers all died would hang): it becomes a failed measurement instead.
    """
    from tvm.s_tir import meta_schedule as ms
    assert devices.tracker is not None
    config = ms.runner.RPCConfig(tracker_host=devices.tracker[0], tracker_port=devices.tracker[1],
                                 tracker_key=devices.key, session_timeout_sec=timeout_s)
    return ms.runner.RPCRunner(config, ms.runner.EvaluatorConfig(**evaluator), max_workers=workers,
                               f_create_session=_session_within(4 * timeout_s))


def _session_within(wait_s: float) -> Callable[[Any], Any]:
    """A closure (shipped by value to the runner's workers, which need not import fxforge) that requests a
    session from the tracker and raises TimeoutError when no server under the key is free within ``wait_s``."""

    def create_session(config: Any) -> Any:
        import threading
        out: list[Any] = []

        def request() -> None:
            try:
                out.append(config.connect_server())
            except Exception as e:  # noqa: BLE001 (re-raised in the worker below)
                out.append(e)

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        thread.join(wait_s)
        if not out:
            raise TimeoutError(f"no server under key {config.tracker_key!r} was free within {wait_s:.0f} s")
        if isinstance(out[0], Exception):
            raise out[0]
        return out[0]

    return create_session


def exporter(cross_compiler: str | None) -> Callable[[Any], str]:
    """The builder's export function: the candidate as a shared library linked on this machine (with
    ``cross_compiler`` for another ISA), so a device needs no compiler (TVM's default ships a .tar that the
    device links itself). A closure, shipped by value to the build workers."""

    def export(rt_mod: Any) -> str:
        import os
        import tempfile
        from tvm.support import cc
        path = os.path.join(tempfile.mkdtemp(prefix="fxforge-ms-"), "candidate.so")
        fcompile = cc.cross_compiler(cross_compiler) if cross_compiler else None
        rt_mod.export_library(path, fcompile=fcompile)
        return path

    return export


# ------------------------------------------------------------------------------- fxforge rpc tracker/server


def tracker_argv(host: str, port: int) -> list[str]:
    """``python -m tvm.exec.rpc_tracker`` listening on ``host:port`` (or the next free port)."""
    return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
            "--port-end", str(port + PORT_SPAN)]


def server_argv(tracker: str, key: str, host: str, port: int) -> list[str]:
    """``python -m tvm.exec.rpc_server`` registered with ``tracker`` under ``key``."""
    parse_address(tracker, "--tracker")
    return [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", tracker, "--key", key, "--host", host,
            "--port", str(port), "--port-end", str(port + PORT_SPAN)]


# TVM's rpc_server runs its server in a child Python (PopenWorker); under qemu-user without binfmt_misc a
# child AArch64 binary cannot be executed, so the emulated server runs TVM's server loop in its own process.
IN_PROCESS_SERVER = """import sys
from tvm.rpc import server
host, port, tracker, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tracker_host, tracker_port = tracker.rsplit(":", 1)
server._popen_start_rpc_server(host, port, port + %d, tracker_addr=(tracker_host, int(tracker_port)), key=key)
server.PopenRPCServerState.current.thread.join()
""" % PORT_SPAN


def qemu_server_argv(tracker: str, key: str, host: str, port: int, root: Path) -> tuple[list[str], dict[str, str]]:
    """An AArch64 RPC server emulated by qemu-user: ``root`` holds ``sysroot/`` (Debian's arm64 python3.11
    and the libraries it links, unpacked) and ``site/`` (the AArch64 wheels of apache-tvm and its imports,
    unpacked); ``tools/arm64-qemu-root.sh`` makes it. Returns the command and its extra environment."""
    parse_address(tracker, "--tracker")
    python = root / "sysroot" / "usr" / "bin" / "python3.11"
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        raise TuningError("an emulated AArch64 server needs qemu-aarch64: apt-get install qemu-user")
    if not python.exists() or not (root / "site" / "tvm").is_dir():
        raise TuningError(f"{root} holds no AArch64 python (sysroot/usr/bin/python3.11) and TVM (site/tvm); make "
                          f"it with tools/arm64-qemu-root.sh {root}")
    argv = [qemu, "-L", str(root / "sysroot"), str(python), "-c", IN_PROCESS_SERVER, host, str(port), tracker, key]
    return argv, {"PYTHONPATH": str(root / "site")}


def exec_tvm(argv: list[str], threads: int | None = None, env: dict[str, str] | None = None) -> None:
    """Replace this process by TVM's (signals and exit status are then TVM's own)."""
    if "tvm.exec.rpc_tracker" in argv:
        try:
            import tornado  # noqa: F401
        except ModuleNotFoundError:
            from fxforge.compiler.errors import missing_dependency
            raise missing_dependency("tornado", "tvm", "the RPC tracker") from None
    env = {**os.environ, **(env or {}), **({"TVM_NUM_THREADS": str(threads)} if threads else {})}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


@dataclass
class LocalFleet:
    """A tracker and RPC servers running on this machine (see :func:`local_fleet`)."""

    tracker: str  # "127.0.0.1:port"
    key: str
    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # "tracker", "server0", ...

    def kill_server(self, index: int) -> None:
        """Kill server ``index`` (and its session processes) at once, as a device that loses power."""
        _kill(self.processes[f"server{index}"])


@contextlib.contextmanager
def local_fleet(key: str, servers: int, threads: int | None = None, qemu_root: Path | None = None,
                ready_s: float = 180.0) -> Iterator[LocalFleet]:
    """``fxforge rpc tracker`` and ``servers`` × ``fxforge rpc server --key key`` on 127.0.0.1 (free ports), for
    tests and loopback measurements; with ``qemu_root``, emulated AArch64 servers (``--qemu-root``). Yields once
    every server is registered; every process (each in its own process group, with the session processes it
    forks) is killed on exit, whatever happened."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[3]),
                                                                       os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="fxforge-rpc-") as logs:
        port = _free_port()
        fleet = LocalFleet(f"127.0.0.1:{port}", key, Path(logs))

        def start(name: str, *args: str) -> None:
            with open(fleet.logs / f"{name}.log", "wb") as log:
                fleet.processes[name] = subprocess.Popen([sys.executable, "-m", "fxforge", "rpc", *args], env=env,
                                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            start("tracker", "tracker", "--host", "127.0.0.1", "--port", str(port))
            for i in range(servers):
                start(f"server{i}", "server", "--tracker", fleet.tracker, "--key", key, "--host", "127.0.0.1",
                      "--port", str(_free_port()), *(["--threads", str(threads)] if threads else []),
                      *(["--qemu-root", str(qemu_root)] if qemu_root else []))
            _wait_registered(fleet, servers, ready_s)
            yield fleet
        finally:
            for process in fleet.processes.values():
                _kill(process)


def _wait_registered(fleet: LocalFleet, servers: int, ready_s: float) -> None:
    deadline = time.monotonic() + ready_s
    address = parse_address(fleet.tracker, "tracker")
    while True:
        for name, process in fleet.processes.items():
            if process.poll() is not None:
                log = (fleet.logs / f"{name}.log").read_text(errors="replace").strip()
                raise TuningError(f"the local RPC {name} exited: {log.splitlines()[-1] if log else 'no output'}")
        with contextlib.suppress(TuningError):
            summary = tracker_summary(address, timeout=1.0)
            if sum(s.get("key") == f"server:{fleet.key}" for s in summary.get("server_info", [])) >= servers:
                return
        if time.monotonic() > deadline:
            raise TuningError(f"the local RPC fleet did not register {servers} server(s) within {ready_s:.0f} s")
        time.sleep(0.5)


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
