"""Before/after table of the structural passes: params, FLOPs, latency and error on ResNet-18 and MobileNetV2.

    python benchmarks/passes_table.py [--size 224] [--rounds 7] [--models ResNet-18,MobileNetV2]

Prints one Markdown table (the one in docs/passes.md). Every pipeline compiles with the eager backend, so
the latency column shows what the rewritten graph itself costs in PyTorch; pipelines are timed interleaved by
fxforge.bench. Weights are random (torchvision's initialisation, random BN statistics): their spectra are
flat, so the truncated passes show their worst-case error here; trained weights keep far more energy in few
singular values.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # random BN statistics of the test zoo

from fxforge.bench import PEERS, Row, bench_model, fxforge_system, machine_name  # noqa: E402
from fxforge.bench import System  # noqa: E402

PIPELINES = [
    ["fuse"],
    ["fuse", "low_rank"],
    ["fuse", "low_rank{rank_ratio=0.25}"],
    ["fuse", "low_rank{method='tucker2',rank_ratio=0.25}"],
    ["fuse", "depthwise_separable{multiplier=2}"],
    ["fuse", "dead_channels", "low_rank"],  # the former compress preset (compress now reads calibration data)
]
MODELS = {"ResNet-18": "resnet18", "MobileNetV2": "mobilenet_v2"}


def build(name: str) -> torch.nn.Module:
    import torchvision
    from models import _randomize_bn
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    _randomize_bn(model)
    return model


def systems() -> list[System]:
    eager = next(s for s in PEERS if s.name == "eager")
    return [eager] + [System(" → ".join(p), fxforge_system(p, "eager")) for p in PIPELINES]


def table(results: dict[str, list[Row]]) -> str:
    head = ["model", "pipeline", "params", "GFLOPs", "latency ms (min–max)", "× eager", "max rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, rows in results.items():
        base = rows[0]
        for r in rows:
            if r.error:
                lines.append(f"| {model} | {r.system} | failed: {r.error} |" + " |" * (len(head) - 3))
                continue
            cells = [model, r.system, f"{r.params / 1e6:.2f}M ({r.params / base.params:.2f}×)",
                     f"{r.flops / 1e9:.3f} ({r.flops / base.flops:.2f}×)",
                     f"{r.median_ms:.2f} ({r.min_ms:.2f}–{r.max_ms:.2f})", f"{r.vs_eager:.2f}×",
                     f"{r.max_rel_err:.1e}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width (batch 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    results = {}
    for label in args.models.split(","):
        results[label] = bench_model(label, build(MODELS[label]), (x,), [], systems(), rounds=args.rounds,
                                     progress=lambda msg: print(msg, file=sys.stderr))
    print(f"Machine: {machine_name()}, {torch.get_num_threads()} threads, input 1×3×{args.size}×{args.size}.\n")
    print(table(results))


if __name__ == "__main__":
    main()
