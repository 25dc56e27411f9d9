"""The demo: compile a randomly initialised torchvision ResNet-18 through the full pipeline and report.

The full pipeline is structural compression (fusion, dead-channel elimination, low-rank splitting) then int8
quantization (QDQ insertion, calibration, QDQ folding), lowered to ONNX Runtime. With no pretrained weights
and no dataset here, the model is randomly initialised and calibrated on random images: the report's error
column (max relative error and cosine vs eager) is the honest measure of what the pipeline changed.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    import torchvision

    import fxforge
    from fxforge.compiler.pass_manager import split_passes
    from fxforge.compiler.timing import measure_latency

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", default="all", help="comma-separated passes/presets")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--out", default="artifacts/resnet18")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    calibration = [(torch.randn(4, 3, 224, 224),) for _ in range(args.calibration_batches)]  # random images
    print(f"compiling torchvision resnet18 (random init) with passes={args.passes} backend={args.backend}, "
          f"calibrating on {len(calibration)} batches of random images ...", flush=True)
    cm = fxforge.compile(model, (x,), passes=split_passes(args.passes), backend=args.backend, target="x86",
                         calibration=calibration)
    print(cm.report)
    eager = measure_latency(model, (x,), budget_s=2.0)
    compiled = measure_latency(cm, (x,), budget_s=2.0)
    print(f"\nbatch 1, 224×224: eager {eager:.1f} ms, fxforge {compiled:.1f} ms → {eager / compiled:.2f}× speedup")
    print(f"artifact saved to {cm.save(args.out)} (reload with fxforge.load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
