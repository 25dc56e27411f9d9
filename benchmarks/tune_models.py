"""Tune the benchmark models' TVM kernels for this machine into the stored database the benchmark uses.

    python benchmarks/tune_models.py [--models resnet18,bert] [--trials 400,200] [--batch 1]

Each model is compiled as the benchmark compiles it (``fuse`` passes, TVM backend, target ``x86``, the
benchmark's batch; a trained model of the benchmark's first table, e.g. ``all_minilm_l6_v2_1x128``, at its own
example's shape) with ``tune={"trials": N, "db": benchmarks/tuning-db/<target key>}``. Rerunning tunes
only what is missing; a model's budget is spent on the tasks other models have not already tuned.
``benchmarks/run.py`` then compiles its "fxforge fuse → tvm (tuned)" row with ``trials=0`` against that
directory: no tuning while benchmarking. Prints the per-task stats (default vs tuned kernel time).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxforge  # noqa: E402
from fxforge.cli import tuning_summary  # noqa: E402
from run import MODELS, TRAINED, stored_tuning_db  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,bert,vit_tiny,efficientnet_b0")
    parser.add_argument("--trials", default="400,200,200,200,250", help="comma-separated trial budgets, one per model "
                        "(the defaults wrote the stored database)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    models, budgets = args.models.split(","), [int(t) for t in args.trials.split(",")]
    if len(budgets) != len(models):
        parser.error("give one trial budget per model")
    db = stored_tuning_db()
    unknown = [m for m in models if m not in MODELS and m not in TRAINED]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join([*MODELS, *TRAINED])}")
    for name, trials in zip(models, budgets):
        torch.manual_seed(0)
        if name in TRAINED:
            model, example, _ = TRAINED[name][0]()
        else:
            make, inputs = MODELS[name]
            model, example = make().eval(), inputs(args.batch)
        start = time.perf_counter()
        cm = fxforge.compile(model, example, passes=["fuse"], backend="tvm", target="x86",
                             tune={"trials": trials, "db": str(db)}, measure_latency=False)
        stats = cm.report.meta["tuning"]
        print(f"{name}: {time.perf_counter() - start:.0f} s")
        print(tuning_summary(stats))

if __name__ == "__main__":
    main()
