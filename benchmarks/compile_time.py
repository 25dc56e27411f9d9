"""Compile time of fxforge's default compiles beside torch.compile's cold start, each compile in a fresh process.

    python benchmarks/compile_time.py [--models swin_t,efficientnet_v2_s] [--rounds 2] [--threads 2]

The goal (docs/architecture.md, "Compile time"): default compiles of models up to ~30 M parameters in under 30 s,
the cold start of torch.compile on the same machine being the yardstick. A compile's time moves with the host's
speed from hour to hour, so the systems are timed side by side: every (model, system) compile runs in its own Python
process (nothing imported, traced or cached by another), the rounds interleave the systems, and torch.compile gets
an empty inductor cache each time. Seconds are wall clock of the compile alone (imports and model construction
excluded; torch.compile's is its first call, where it compiles); fxforge's stages come from
``report.meta["compile_s"]``. Models are torchvision's, random init (compile time does not depend on the weights),
with 8 random 224² calibration images for ``int8``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

COLD = "torch.compile (cold)"
# each system's (preset, backend); torch.compile has none
SYSTEMS: dict[str, tuple[str, str] | None] = {"fxforge int8 → onnx": ("int8", "onnx"),
                                              "fxforge fuse → torchscript": ("fuse", "torchscript"), COLD: None}


def _child(model_name: str, system: str, threads: int) -> dict:
    """Compile one model with one system in this (fresh) process; its seconds and, for fxforge, its stages."""
    pipeline = SYSTEMS[system]
    if pipeline is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxforge-cold-")
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    import torch
    import torchvision
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)().eval()
    example = torch.randn(1, 3, 224, 224)
    stages: dict = {}
    start = time.perf_counter()
    if pipeline is None:
        with torch.no_grad():
            torch.compile(model)(example)
    else:
        import fxforge
        preset, backend = pipeline
        calibration = [torch.randn(1, 3, 224, 224) for _ in range(8)] if preset == "int8" else None
        compiled = fxforge.compile(model, (example,), passes=[preset], backend=backend, calibration=calibration)
        stages = compiled.report.meta["compile_s"]
    return {"s": time.perf_counter() - start, "stages": stages}


def _run(model_name: str, system: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", model_name, system, str(threads)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise SystemExit(f"{model_name} / {system} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="swin_t,efficientnet_v2_s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], int(args.child[2]))))
        return
    models = args.models.split(",")
    times: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for model_name in models:
            for system in SYSTEMS:
                result = _run(model_name, system, args.threads)
                times.setdefault((model_name, system), []).append(result)
                print(f"round {r + 1}: {model_name} / {system}: {result['s']:.1f} s", file=sys.stderr, flush=True)
    print(f"{args.threads} threads, {args.rounds} rounds, one fresh process per compile, wall seconds\n")
    print("| model | system | seconds (each round) | median | stages (median s) | torch.compile cold ÷ this |")
    print("|---|---|---|---|---|---|")
    for model_name in models:
        cold = statistics.median(t["s"] for t in times[(model_name, COLD)])
        for system in SYSTEMS:
            runs = times[(model_name, system)]
            median = statistics.median(t["s"] for t in runs)
            stages = ", ".join(f"{k} {statistics.median(t['stages'][k] for t in runs):.1f}" for k in runs[0]["stages"])
            each = ", ".join(f"{t['s']:.1f}" for t in runs)
            print(f"| {model_name} | {system} | {each} | {median:.1f} | {stages or '—'} | {cold / median:.2f}× |")


if __name__ == "__main__":
    main()
