"""fxforge against eager PyTorch, torch.compile, ONNX Runtime (fp32 and its own int8) and untuned TVM.

    python benchmarks/run.py [--quick] [--out DIR] [--models resnet18,bert] [--batches 1,8]

Writes DIR/<machine>.md (the table), DIR/<machine>.json, DIR/latency_vs_error.png and DIR/speedup.png.
``--quick`` (two CNNs, batch 1, fewer systems and rounds) finishes in a few minutes on 2 cores.
Method: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the digits CNN of the test zoo

from fxforge.bench import (PEERS, Row, as_dicts, bench_model, build_all, fxforge_systems, machine_name,  # noqa: E402
                           markdown, outputs, peak_gflops)

RESULTS = Path(__file__).parent / "results"
TUNING_DBS = Path(__file__).parent / "tuning-db"
CALIBRATION_BATCHES = 8


def _tv(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision
        return getattr(torchvision.models, name)()
    return make


def _vit() -> nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False)


class Bert(nn.Module):
    """A transformers BertModel, 4 layers, hidden 384 (MiniLM-sized), returning the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel
        cfg = BertConfig(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536)
        self.bert = BertModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _image(batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 224, 224),)


def _tokens(batch: int) -> tuple[torch.Tensor, ...]:
    return torch.randint(0, 30522, (batch, 128)), torch.ones(batch, 128, dtype=torch.long)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple]]] = {
    "resnet18": (_tv("resnet18"), _image),
    "resnet50": (_tv("resnet50"), _image),
    "mobilenet_v2": (_tv("mobilenet_v2"), _image),
    "efficientnet_b0": (_tv("efficientnet_b0"), _image),
    "vit_tiny": (_vit, _image),
    "bert": (Bert, _tokens),
}
QUICK_MODELS = ("resnet18", "mobilenet_v2")
QUICK_SYSTEMS = ("eager", "ort fp32", "ort int8 (quantize_static)", "fxforge fuse → torchscript",
                 "fxforge fuse → onnx", "fxforge int8 → onnx")


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    torch.set_num_threads(args.threads)
    tuning_db = stored_tuning_db() if importlib.util.find_spec("tvm") else None
    if tuning_db and not tuning_db.exists():
        print(f"no stored tuning database for this CPU and TVM ({tuning_db.name}): no tuned TVM rows "
              f"(benchmarks/tune_models.py writes one)")
        tuning_db = None
    systems = [s for s in PEERS + fxforge_systems(tuning_db=tuning_db) if not args.systems or s.name in args.systems]
    peak, how = peak_gflops()
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.models:
        make, inputs = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        for batch in args.batches:
            example = inputs(batch)
            calibration = [inputs(batch) for _ in range(CALIBRATION_BATCHES)]
            rows += bench_model(name, model, example, calibration, systems, rounds=args.rounds)
    accuracy = _digits_accuracy(systems) if not args.no_accuracy else []
    _write(args.out, rows, accuracy, how, time.perf_counter() - started)
    return 0


def stored_tuning_db(target: str = "x86") -> Path:
    """The stored MetaSchedule database for ``target`` on this machine and TVM: tuning-db/<target key>
    (``llvm-<cpu>-<hash>``), written by benchmarks/tune_models.py."""
    from fxforge.backends.tvm import tvm_target
    from fxforge.compiler.target import get_target
    from fxforge.backends.tvm.tuning import target_key
    return TUNING_DBS / target_key(tvm_target(get_target(target)))


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two CNNs, batch 1, the main systems, 3 rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--models", type=lambda s: s.split(","), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--systems", type=lambda s: s.split(";"), help="semicolon-separated system names")
    p.add_argument("--rounds", type=int)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-accuracy", action="store_true", help="skip the digits-CNN accuracy table")
    args = p.parse_args(argv)
    args.models = args.models or list(QUICK_MODELS if args.quick else MODELS)
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    args.systems = args.systems or (list(QUICK_SYSTEMS) if args.quick else None)
    args.rounds = args.rounds or (3 if args.quick else 7)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return args


def _digits_accuracy(systems) -> list[dict]:
    """Top-1 accuracy of every system on scikit-learn digits with a CNN trained in seconds."""
    from models import digits_cnn
    model, (x_train, _, x_test, y_test) = digits_cnn()
    n = len(x_test)  # peers export static shapes: calibrate with batches of the evaluation size
    calibration = [(x_train[i:i + n],) for i in range(0, len(x_train) - n + 1, n)]
    built, rows = build_all("digits_cnn", model, (x_test,), calibration, systems, progress=lambda s: None)
    out = []
    for system in systems:
        row, runner = rows[system.name], built.get(system.name)
        acc = None
        if runner is not None and row.error is None:
            with torch.no_grad():
                acc = (outputs(runner.run((x_test,)))[0].argmax(-1) == y_test).float().mean().item()
        out.append({"system": system.name, "accuracy": acc, "cosine": row.cosine, "error": row.error})
    return out


def _write(out: Path, rows: list[Row], accuracy: list[dict], how: str, elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_name()
    table = markdown(rows)
    acc_table = "\n".join(["| system | top-1 | cosine vs fp32 |", "|---|---|---|"] + [
        f"| {a['system']} | {a['accuracy'] * 100:.1f}% | {a['cosine']:.4f} |" if a["accuracy"] is not None
        else f"| {a['system']} | failed: {a['error']} | |" for a in accuracy])
    text = (f"# Benchmark on {machine}\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"peak {how}; {elapsed / 60:.1f} min.\n\n{table}\n")
    if accuracy:
        text += f"\n## Accuracy: CNN trained on scikit-learn digits (397 test images)\n\n{acc_table}\n"
    print("\n" + text)
    (out / f"{machine}.md").write_text(text)
    (out / f"{machine}.json").write_text(json.dumps({"machine": machine, "peak": how, "rows": as_dicts(rows),
                                                     "accuracy": accuracy}, indent=2))
    _plots(out, rows)
    print(f"wrote {out}/{machine}.md, .json, latency_vs_error.png, speedup.png")


def _plots(out: Path, rows: list[Row]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.median_ms and r.max_rel_err is not None]
    models = sorted({(r.model, r.batch) for r in ok})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False)
    for ax, (model, batch) in zip(axes[0], models):
        for r in (r for r in ok if (r.model, r.batch) == (model, batch)):
            ax.scatter(max(r.max_rel_err, 1e-8), r.median_ms, marker="o" if r.peer else "*", s=60)
            ax.annotate(r.system, (max(r.max_rel_err, 1e-8), r.median_ms), fontsize=6)
        ax.set(xscale="log", xlabel="max relative error vs eager", ylabel="latency (ms)", title=f"{model} b{batch}")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_error.png", dpi=110)
    plt.close(fig)

    systems = sorted({r.system for r in ok if r.system != "eager"})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models) * len(systems) / 3), 4))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        ys = [next((r.vs_eager for r in ok if (r.model, r.batch, r.system) == (m, b, system)), 0) or 0
              for m, b in models]
        ax.bar([j + i * width for j in range(len(models))], ys, width, label=system)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], [f"{m} b{b}" for m, b in models], fontsize=8)
    ax.set(ylabel="speedup over eager PyTorch")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
