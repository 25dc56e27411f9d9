"""The demo: compile a randomly initialised torchvision ResNet-18 through the full pipeline and report."""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    import torchvision

    import fxforge
    from fxforge.compiler.report import measure_latency

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", default="fuse", help="comma-separated passes/presets")
    parser.add_argument("--backend", default="torchscript")
    parser.add_argument("--out", default="artifacts/resnet18")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    print(f"compiling torchvision resnet18 with passes={args.passes} backend={args.backend} ...", flush=True)
    cm = fxforge.compile(model, (x,), passes=args.passes.split(","), backend=args.backend, target="x86")
    print(cm.report)
    eager = measure_latency(model, (x,), budget_s=2.0)
    compiled = measure_latency(cm, (x,), budget_s=2.0)
    print(f"\nbatch 1, 224×224: eager {eager:.1f} ms, fxforge {compiled:.1f} ms → {eager / compiled:.2f}× speedup")
    print(f"artifact saved to {cm.save(args.out)} (reload with fxforge.load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
