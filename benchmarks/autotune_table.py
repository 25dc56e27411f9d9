"""fxforge.autotune on the digits-trained CNN: every candidate, the Pareto front and the pick (docs/tuning.md).

    python benchmarks/autotune_table.py [--budget 12] [--backend onnx] [--out fxforge-autotune]

Trains the tests' digits CNN (seconds), searches within a 1-point top-1 budget on the held-out digits, prints
a Markdown table of the measured candidates (latency re-timed interleaved, bytes, accuracy) and what the
sensitivity analysis pruned, and leaves autotune.json and pareto.png in ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the digits CNN of the test zoo

import fxforge  # noqa: E402
from models import accuracy, digits_cnn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--out", default="fxforge-autotune")
    args = parser.parse_args()
    model, (x_train, _, x_test, y_test) = digits_cnn()
    calibration = [(x_train[i:i + 64],) for i in range(0, 256, 64)]
    result = fxforge.autotune(model, x_train[:32], backend=args.backend, budget=args.budget,
                              evaluate=lambda m: accuracy(m, x_test, y_test), max_accuracy_drop=0.01,
                              calibration=calibration, output_dir=args.out)
    fp32 = accuracy(model, x_test, y_test)
    print(f"float model top-1 {fp32:.4f}; search {result.meta['search_s']} s; record {result.record_path}\n")
    print("| passes | latency ms | × int8 preset | KB | top-1 | feasible | front |")
    print("|---|---|---|---|---|---|---|")
    for c in result.candidates:
        if c.latency_ms is None:
            print(f"| {' → '.join(c.passes)} | failed: {c.error} | | | | | |")
            continue
        mark = "best" if c is result.best else "yes" if c in result.pareto else ""
        print(f"| {' → '.join(c.passes)} | {c.latency_ms:.3f} | {result.reference.latency_ms / c.latency_ms:.2f}× "
              f"| {c.size_bytes / 1024:.0f} | {c.score:.4f} | {'yes' if c.feasible else 'no'} | {mark} |")
    print("\npruned without measuring:")
    for p in result.pruned:
        print(f"- {' → '.join(p['passes'])}: {p['reason']}")


if __name__ == "__main__":
    main()
