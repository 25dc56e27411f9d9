"""Tuning throughput through TVM RPC on this machine: one vs two loopback servers (x86, key ``x86``).

    python benchmarks/rpc_tuning.py [--servers 1,2] [--trials 32] [--threads 1]

For each server count, starts ``fxforge rpc tracker`` and that many ``fxforge rpc server`` on 127.0.0.1
(``fxforge.backends.tvm.rpc.local_fleet``; every process is killed on exit), tunes a two-layer MLP (two
tasks) into a fresh database with ``trials`` trials, and prints wall time, trials per minute and tasks per
minute. The builder runs here in both cases, so the ratio says how much of tuning is measurement.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn

import fxforge
from fxforge.backends.tvm.rpc import local_fleet


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="1,2")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="threads per server (TVM_NUM_THREADS)")
    args = parser.parse_args()
    model, x = mlp(), torch.randn(8, 256)
    rows = []
    for servers in [int(n) for n in args.servers.split(",")]:
        with local_fleet("x86", servers, threads=args.threads) as fleet, tempfile.TemporaryDirectory() as db:
            start = time.perf_counter()
            cm = fxforge.compile(model, x, passes=["fuse"], backend="tvm",
                                 tune={"trials": args.trials, "trials_per_task": args.trials // 2,
                                       "trials_per_iter": 8, "db": db,
                                       "rpc": {"tracker": fleet.tracker, "key": "x86"}})
            wall = time.perf_counter() - start
        stats = cm.report.meta["tuning"]
        error = (cm(x) - model(x)).abs().max().item()
        rows.append((servers, stats["tasks"], stats["trials"], wall, error))
    print("| servers | tasks | trials | wall s | trials/min | tasks/min | max abs error vs eager |")
    print("|---|---|---|---|---|---|---|")
    for servers, tasks, trials, wall, error in rows:
        print(f"| {servers} | {tasks} | {trials} | {wall:.0f} | {60 * trials / wall:.1f} | {60 * tasks / wall:.2f} "
              f"| {error:.1e} |")


if __name__ == "__main__":
    main()
