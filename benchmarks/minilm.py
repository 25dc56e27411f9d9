"""all-MiniLM-L6-v2 on held-out sentences: fxforge's fp32 and dynamic int8 ONNX models against ORT's, with the
transformer fusions of the onnx backend on and off, at batch 8 × 64 and 1 × 128 tokens.

    python benchmarks/minilm.py [--rounds 7] [--out benchmarks/results]

Quality beside speed, every system built and timed interleaved in one process by fxforge.bench: min and mean
cosine of the sentence embeddings against eager fp32, and nearest-neighbour agreement (each held-out sentence's
nearest other held-out sentence, by embedding cosine, is the one eager fp32 finds). Writes
OUT/minilm-<machine>.md. The table in docs/quantization.md comes from this script.

Nearest-neighbour agreement over 40 held-out sentences moves in steps of 0.025, and it is decided by near-ties:
a sentence whose nearest neighbour is ahead of its second by a cosine margin m flips when the model moves that
difference by more than m. In fp32 the smallest margins are 0.0004 and 0.0014, while quantizing any single one
of MiniLM's 36 linears to int8 moves some pairwise cosine by 0.002–0.005. So beside agreement over all sentences
the script reports it over the *resolved* ones, whose fp32 margin is at least ``RESOLVED`` (34 of 40), and
names each flipped sentence with its margin.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fxforge import zoo
from fxforge.bench import (PEERS, Row, System, build_all, fill_figures, fxforge_system, machine_name,
                           markdown, outputs, time_interleaved)

RESULTS = Path(__file__).parent / "results"
SHAPES = ((8, 64), (1, 128))
ONNX = ("onnxruntime", "onnxscript")


def systems() -> list[System]:
    peers = [s for s in PEERS if s.name in ("eager", "ort fp32", "ort int8 (quantize_dynamic)")]
    return [*peers,
            System("fxforge fuse → onnx", fxforge_system(["fuse"], "onnx"), needs=ONNX),
            System("fxforge fuse → onnx (fusions='none')", fxforge_system(["fuse"], "onnx", fusions="none"),
                   needs=ONNX),
            System("fxforge int8_dynamic → onnx", fxforge_system(["int8_dynamic"], "onnx"), needs=ONNX),
            System("fxforge int8_dynamic → onnx (fusions='none')",
                   fxforge_system(["int8_dynamic"], "onnx", fusions="none"), needs=ONNX)]


RESOLVED = 0.01  # fp32 cosine margin (nearest minus second nearest) at which a nearest neighbour counts as resolved


def nearest_neighbours(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each row's most similar other row (cosine of L2-normalised embeddings), and its margin over the
    second most similar."""
    sim = embeddings @ embeddings.T
    sim.fill_diagonal_(-2.0)
    top = sim.topk(2, dim=1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


def nn_agreement(run, reference: torch.Tensor, held_out: list) -> str:
    """Agreement over all held-out sentences, over the resolved ones, and the flipped ones with their fp32
    margins."""
    with torch.inference_mode():
        got = torch.cat([outputs(run(batch))[0] for batch in held_out])
    (want, margin), (have, _) = nearest_neighbours(reference), nearest_neighbours(got)
    same, resolved = have == want, margin >= RESOLVED
    flipped = ", ".join(f"#{i} (margin {float(margin[i]):.4f})" for i in (~same).nonzero().flatten().tolist())
    return (f"{float(same.float().mean()):.3f} ({float(same[resolved].float().mean()):.3f} over the "
            f"{int(resolved.sum())} resolved{'; flipped ' + flipped if flipped else ''})")


def measure(model: torch.nn.Module, tokenizer, batch: int, seq: int, rounds: int) -> tuple[list[Row], dict]:
    split = zoo.sentence_split(tokenizer, batch=batch, seq=seq)
    example = split.calibration[0]
    chosen = systems()
    built, rows = build_all(f"minilm {batch}×{seq}", model, example, split.calibration, chosen,
                            held_out=split.held_out)
    with torch.inference_mode():
        reference = torch.cat([model(*b) for b in split.held_out])
    agreement = {name: nn_agreement(b.run, reference, split.held_out) for name, b in built.items()
                 if rows[name].error is None}
    time_interleaved(example, built, rows, rounds, sample_ms=150.0)
    fill_figures([rows[s.name] for s in chosen], built)
    kernels = {name: {**b.info.get("ort_transformer_ops", {}), **b.info.get("ort_int8_ops", {})}
               for name, b in built.items() if b.info}
    return [rows[s.name] for s in chosen], {"nn": agreement, "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, tokenizer = zoo.minilm()
    started = time.perf_counter()
    text = (f"# all-MiniLM-L6-v2 on {machine_name()}\n\ntorch {torch.__version__}, {torch.get_num_threads()} "
            f"threads (ONNX Runtime: the same)\n")
    for batch, seq in SHAPES:
        rows, extra = measure(model, tokenizer, batch, seq, args.rounds)
        text += f"\n## batch {batch} × {seq} tokens\n\n{markdown(rows)}\n\nnearest-neighbour agreement vs eager: "
        text += "; ".join(f"{name} {v}" for name, v in extra["nn"].items()) + "\n\nORT kernels: "
        text += "; ".join(f"{name}: {k}" for name, k in extra["kernels"].items()) + "\n"
    text += f"\n{(time.perf_counter() - started) / 60:.1f} min\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"minilm-{machine_name()}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
