"""fxforge against eager PyTorch, torch.compile, ONNX Runtime (fp32, its own static and dynamic int8) and TVM.

    python benchmarks/run.py [--quick] [--out DIR] [--models mobilenet_v2_imagenet,resnet18] [--batches 1,8]

First the trained zoo (fxforge/zoo.py), quality beside speed: ImageNet MobileNetV2 on held-out photo views
(batch 1; batch 8 outside ``--quick``), all-MiniLM-L6-v2 on held-out sentences (batch 8 × 64 and 1 × 128 tokens),
the wide digits CNN on held-out digits (batch 64); every row, peers included, gets top-1 agreement and min/mean
cosine against eager on data its calibration never saw. Then (not in ``--quick``) the random-init zoo at batch 1 and 8.
Writes DIR/<machine>.md (the tables and the self-check lines), DIR/<machine>.json, DIR/latency_vs_error.png
and DIR/speedup.png. ``--quick`` (the trained table, its main systems, 7 rounds, more up to 14 while a reported ratio is unresolved) takes
minutes on 2 cores.
Method: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fxforge import zoo
from fxforge.bench import (INT8_AT_TARGET, PEERS, Row, System, as_dicts, bench_model, caption, fxforge_system,
                           fxforge_systems, markdown, peak_gflops, plot, run_facts, self_check)

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


def _mobilenet(batch: int) -> Callable[[], tuple[nn.Module, tuple, zoo.Split]]:
    """64 calibration crops in batches of ``batch``, 64 held-out crops for the quality columns, and 128 other crops
    for the int8 preset's accuracy budget (``validation=``: disjoint from both, so all 64 calibration crops
    calibrate). The example (the static batch's shape) is the first calibration batch."""
    def make() -> tuple[nn.Module, tuple, zoo.Split]:
        split = zoo.photo_split(calibration=64, held_out=64, batch=batch, validation=128)
        return zoo.mobilenet_v2(), split.calibration[0], split
    return make


def _minilm(batch: int, seq: int) -> Callable[[], tuple[nn.Module, tuple, zoo.Split]]:
    def make() -> tuple[nn.Module, tuple, zoo.Split]:
        model, tokenizer = zoo.minilm()
        split = zoo.sentence_split(tokenizer, batch=batch, seq=seq)
        return model, split.calibration[0], split
    return make


def _digits() -> tuple[nn.Module, tuple, zoo.Split]:
    split = zoo.digits_split(batch=64)
    full = [b for b in split.held_out if len(b[0]) == 64]  # peers export static shapes
    return zoo.wide_digits_cnn(), split.held_out[0], zoo.Split(split.calibration[:8], full)


DISTILLED = "fxforge prune_channels{flops=0.5}+distill → onnx"
DISTILLED_INT8 = "fxforge prune_channels{flops=0.5}+distill+int8 → onnx"


def _distilled() -> list[System]:
    """Half the FLOPs by channel pruning chosen per layer, then distilled on the digits' unlabeled training images
    (disjoint from the held-out test digits), optionally int8 on top (docs/passes.md, "Distillation")."""
    from fxforge.passes import QUANTIZE
    train = [(b,) for b in zoo.digits_data()[0].split(64)]
    compress = ["fuse", "prune_channels{flops=0.5}", "distill"]
    onnx = ("onnxruntime", "onnxscript")
    return [System(DISTILLED, fxforge_system(compress, "onnx", train=train), needs=onnx),
            System(DISTILLED_INT8, fxforge_system([*compress, *QUANTIZE], "onnx", train=train), needs=onnx)]


INT8_CNN = ("ort int8 (quantize_static)", "fxforge int8 → onnx", INT8_AT_TARGET)
# issue 16's targets on the trained MobileNetV2: compress never below 0.99 top-1 agreement nor slower than fuse, all
# never below 0.97
COMPRESSED_CNN = ("fxforge compress → onnx", "fxforge all → onnx")
# the tuned TVM row (static shapes, the stored database) exists only where a database for this CPU is stored
MINILM = ("ort int8 (quantize_dynamic)", "fxforge int8 → onnx", "fxforge int8_dynamic → onnx",
          "fxforge fuse → tvm (tuned)")
TRAINED: dict[str, tuple[Callable[[], tuple[nn.Module, tuple, zoo.Split]], tuple[str, ...]]] = {
    "mobilenet_v2_imagenet": (_mobilenet(1), (*INT8_CNN, *COMPRESSED_CNN)),
    "mobilenet_v2_imagenet_b8": (_mobilenet(8), INT8_CNN),
    "all_minilm_l6_v2": (_minilm(8, 64), MINILM),
    "all_minilm_l6_v2_1x128": (_minilm(1, 128), MINILM),
    "digits_cnn_wide": (_digits, ("ort int8 (quantize_static)", "fxforge int8 → onnx", "fxforge compress → onnx",
                                  "fxforge compress+int8 → onnx", DISTILLED, DISTILLED_INT8)),
}
SLOW_TRAINED = ("mobilenet_v2_imagenet_b8",)  # left out of --quick
COMMON = ("eager", "torch.compile", "ort fp32", "tvm untuned", "fxforge fuse → torchscript", "fxforge fuse → onnx",
          "fxforge fuse → tvm")
QUICK_COMMON = ("eager", "ort fp32", "fxforge fuse → onnx")


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.replot:
        print("wrote", ", ".join(map(str, replot(args.replot, args.out))))
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # TVM's pool starts at its first call: the same threads
    tuning_db = stored_tuning_db() if importlib.util.find_spec("tvm") else None
    if tuning_db and not tuning_db.exists():
        print(f"no stored tuning database for this CPU and TVM ({tuning_db.name}): no tuned TVM rows "
              f"(benchmarks/tune_models.py writes one)")
        tuning_db = None
    every = PEERS + fxforge_systems(tuning_db=tuning_db) + _distilled()
    peak, how = peak_gflops()
    trained: list[Row] = []
    rows: list[Row] = []
    started = time.perf_counter()
    for i, name in enumerate(m for m in args.models if m in TRAINED):
        make, own = TRAINED[name]
        wanted = args.systems or [*(QUICK_COMMON if args.quick else COMMON), *own]
        systems = [s for s in every if s.name in wanted]
        model, example, split = make()
        trained += bench_model(name, model, example, split.calibration, systems, rounds=args.rounds,
                               max_rounds=args.max_rounds, held_out=split.held_out, rotate=i, self_check=True,
                               rebuild=not args.keep_sessions, validation=split.validation or None)
    systems = [s for s in every if not args.systems or s.name in args.systems]
    for i, name in enumerate(m for m in args.models if m in MODELS):
        make, inputs = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        for batch in args.batches:
            example = inputs(batch)
            calibration = [inputs(batch) for _ in range(CALIBRATION_BATCHES)]
            rows += bench_model(name, model, example, calibration, systems, rounds=args.rounds, rotate=i,
                                max_rounds=args.max_rounds, self_check=True, rebuild=not args.keep_sessions)
    _write(args.out, trained, rows, how, time.perf_counter() - started)
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
    p.add_argument("--quick", action="store_true", help="the trained table only, its main systems, 7 rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--models", type=lambda s: s.split(","),
                   help=f"comma-separated, from {', '.join([*TRAINED, *MODELS])}")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--systems", type=lambda s: s.split(";"), help="semicolon-separated system names")
    p.add_argument("--rounds", type=int)
    p.add_argument("--max-rounds", type=int, default=0,
                   help="more rounds, up to this many, while the reported ratios' 90 %% intervals exceed ±5 %% "
                        "(default: twice --rounds)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="only redraw the plots into --out from a results JSON this script wrote (no timing)")
    p.add_argument("--keep-sessions", action="store_true",
                   help="time the ORT sessions as built, in build order (the old way: to measure its order bias)")
    args = p.parse_args(argv)
    args.models = args.models or ([m for m in TRAINED if m not in SLOW_TRAINED] if args.quick else [*TRAINED, *MODELS])
    args.batches = args.batches or [1, 8]
    args.rounds = args.rounds or (7 if args.quick else 11)
    unknown = [m for m in args.models if m not in MODELS and m not in TRAINED]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join([*TRAINED, *MODELS])}")
    return args


def replot(results: Path, out: Path) -> list[Path]:
    """The plots of an earlier run, from its JSON: rows as recorded, the caption from the machine, threads and
    date it records."""
    data = json.loads(results.read_text())
    fields = {f.name for f in dataclasses.fields(Row)}
    rows = [Row(**{k: v for k, v in d.items() if k in fields}) for d in data.get("trained", []) + data["rows"]]
    out.mkdir(parents=True, exist_ok=True)
    return plot(rows, out, f"{caption(data)} (from {results.name})")


def _write(out: Path, trained: list[Row], rows: list[Row], how: str, elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    facts = run_facts()
    machine = facts["machine"]
    checks = [c for c in (self_check([r for r in trained + rows if (r.model, r.batch) == key])
                          for key in dict.fromkeys((r.model, r.batch) for r in trained + rows)) if c]
    text = (f"# Benchmark on {machine}\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads (ONNX Runtime: "
            f"the same, for every system); peak {how}; {elapsed / 60:.1f} min.\n")
    if trained:
        text += ("\n## Trained models: quality on held-out real data beside speed\n\n"
                 "Top-1 agreement and cosine are against eager PyTorch (fp32) on data calibration never saw.\n\n"
                 f"{markdown(trained)}\n")
    if rows:
        text += f"\n## Random-init models: speed, and error on random inputs\n\n{markdown(rows)}\n"
    text += "\n" + "\n".join(f"- {c}" for c in checks) + "\n" if checks else ""
    print("\n" + text)
    (out / f"{machine}.md").write_text(text)
    (out / f"{machine}.json").write_text(json.dumps({**facts, "peak": how, "trained": as_dicts(trained),
                                                     "rows": as_dicts(rows), "self_checks": checks}, indent=2))
    plot(trained + rows, out, caption(facts))
    print(f"wrote {out}/{machine}.md, .json, latency_vs_error.png, speedup.png")


if __name__ == "__main__":
    sys.exit(main())
