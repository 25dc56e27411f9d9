"""Untuned vs MetaSchedule-tuned TVM vs eager vs ONNX Runtime on a small conv block, one database per trial budget.

    python benchmarks/tuning_table.py [--trials 32,64] [--db-root tuning-dbs] [--rounds 7]

Tunes one database per trial budget under ``--db-root`` (a later run reuses them and tunes nothing), prints
each tuning run's per-task stats, then times every system interleaved with fxforge.bench and prints a
Markdown table. The block is torchvision's ResNet BasicBlock, 64 channels, on a 1×64×56×56 input.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fxforge
from fxforge.bench import PEERS, System, bench_model, fxforge_system, markdown


def block() -> torch.nn.Module:
    from torchvision.models.resnet import BasicBlock
    torch.manual_seed(0)
    model = BasicBlock(64, 64).eval()
    for bn in (model.bn1, model.bn2):  # random statistics: folding must carry real numbers
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", default="32,64", help="comma-separated trial budgets, one database each")
    parser.add_argument("--db-root", default="tuning-dbs", help="directory holding one database per budget")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model, example = block(), (torch.randn(1, 64, 56, 56),)
    systems = [s for s in PEERS if s.name in ("eager", "ort fp32")]
    systems.append(System("fxforge fuse → tvm (untuned)", fxforge_system(["fuse"], "tvm")))
    for trials in (int(t) for t in args.trials.split(",")):
        tune = {"trials": trials, "db": str(Path(args.db_root) / f"trials{trials}")}
        start = time.perf_counter()
        stats = fxforge.compile(model, example, passes=["fuse"], backend="tvm", tune=tune,
                                measure_latency=False).report.meta["tuning"]
        print(f"tuning, {trials} trials: {time.perf_counter() - start:.0f} s", json.dumps(stats))
        systems.append(System(f"fxforge fuse → tvm, tuned {trials} trials",
                              fxforge_system(["fuse"], "tvm", tune=tune)))
    print(markdown(bench_model("BasicBlock 1×64×56×56", model, example, [], systems, rounds=args.rounds)))


if __name__ == "__main__":
    main()
