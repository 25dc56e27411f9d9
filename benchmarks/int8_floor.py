"""What 8-bit activation grids can reach on the trained MobileNetV2's views, whatever their ranges (issue 14).

    python benchmarks/int8_floor.py [--batches 1,8] [--bits 8,10]

Issue 14 asks the all-int8 trained MobileNetV2 for top-1 agreement ≥ 0.97 and mean logit cosine ≥ 0.995 with fp32
on the benchmark's views. This script asks what any choice of activation ranges could give there. It compiles
the `int8` preset up to `fold_qdq` (not included) with the eager backend on the benchmark's data
(`zoo.photo_split(calibration=64, held_out=64, batch=b, validation=128)`, the preset's default budget off), so the
graph holds each activation's quantize → dequantize pair and its ReLU6s, then scores that graph with every
activation pair replaced, the weights and biases int8 as the preset rounded and corrected them:

- *per tensor*: the preset itself (one grid per tensor, calibrated by percentile);
- *per channel, calibration ranges*: one grid per channel (dim 1), its min/max over the calibration views, which
  ONNX Runtime's int8 kernels cannot take; what per-channel equalization could give at best;
- *per channel, clipping nothing*: one grid per channel spanning its min/max over the calibration **and the scored
  views** (an oracle: it sees the data it is scored on, so no value is clipped and only rounding is left);
- *float*: the pairs removed (weights and biases int8 only).

A row short of the target with ranges that clip nothing bounds every method that chooses activation ranges
(calibration methods, equalization, mixed grids): only finer grids or fewer quantized tensors can pass it.
Prints one Markdown table per batch: top-1 agreement, mean and min cosine against fp32 on the benchmark's 64
held-out views (the photos' right halves) and on its 128 validation views (left halves, other crops).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.fx as fx

import fxforge
from fxforge import zoo
from fxforge.compiler.graph import add_tensor
from fxforge.compiler.ops import aten, data, is_op
from fxforge.passes import QUANTIZE
from fxforge.passes.lib.qdq import is_dq, is_q, role

Ranges = dict[str, tuple[torch.Tensor, torch.Tensor]]


def simulated_int8(batch: int) -> tuple[torch.nn.Module, fx.GraphModule, zoo.Split]:
    """The fp32 model, the `int8` preset's graph before `fold_qdq`, and the benchmark's views at ``batch``."""
    split = zoo.photo_split(calibration=64, held_out=64, batch=batch, validation=128)
    model = zoo.mobilenet_v2()
    passes = ["fuse", *[p for p in QUANTIZE if p != "fold_qdq"]]
    compiled = fxforge.compile(model, split.calibration[0], passes=passes, backend="eager",
                               calibration=split.calibration, max_drop=math.inf)
    return model, compiled.graph_module, split


def activation_pairs(gm: fx.GraphModule) -> list[fx.Node]:
    """The activation quantize nodes (each with its dequantize readers)."""
    return [n for n in gm.graph.nodes if is_q(n) and role(n) == "activation"]


def replaced(gm: fx.GraphModule, grid: Ranges | None, bits: int = 8) -> fx.GraphModule:
    """A copy of ``gm`` whose activation pairs read their input directly (``grid`` None) or through a per-channel
    fake quantizer of ``bits`` bits spanning ``grid[name]`` (asymmetric, the range widened to hold 0)."""
    out = fx.GraphModule(gm, gm.graph.__deepcopy__())
    for q in activation_pairs(out):
        x = data(q)
        new = x
        if grid is not None:
            lo, hi = grid[x.name]
            levels = 2 ** bits - 1
            scale = ((hi - lo) / levels).clamp(min=1e-12).float()
            zero = torch.round(-lo / scale).clamp(0, levels).to(torch.int32)
            args = (add_tensor(out, q, "floor_scale", scale), add_tensor(out, q, "floor_zero", zero))
            with out.graph.inserting_before(q):
                new = out.graph.call_function(torch.fake_quantize_per_channel_affine, (x, *args, 1, 0, levels))
        for dq in [u for u in q.users if is_dq(u)]:
            dq.replace_all_uses_with(new)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def channel_ranges(gm: fx.GraphModule, batches: list[tuple[torch.Tensor, ...]]) -> Ranges:
    """Per channel (dim 1), the min (at most 0) and max (at least 0) of every quantized activation over ``batches``,
    run on ``gm`` with its activation pairs removed."""
    float_acts = replaced(gm, None)
    names = {data(q).name for q in activation_pairs(gm)}
    ranges: Ranges = {}

    class Observe(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n.name in names:
                flat = out.detach().transpose(0, 1).flatten(1)
                lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
                if n.name in ranges:
                    lo, hi = torch.minimum(lo, ranges[n.name][0]), torch.maximum(hi, ranges[n.name][1])
                ranges[n.name] = (lo, hi)
            return out

    with torch.no_grad():
        for batch in batches:
            Observe(float_acts).run(*batch)
    return ranges


def scores(model: torch.nn.Module, gm: fx.GraphModule, views: list[tuple[torch.Tensor, ...]]) -> str:
    """'agreement / mean cosine / min cosine' of ``gm``'s logits against ``model``'s on ``views``."""
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in views])
        out = torch.cat([gm(*b)[0] for b in views])
    cos = torch.nn.functional.cosine_similarity(ref, out)
    agreement = (ref.argmax(1) == out.argmax(1)).float().mean()
    return f"{agreement:.3f} / {cos.mean():.4f} / {cos.min():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--bits", default="8,10")
    args = parser.parse_args()
    for batch in (int(b) for b in args.batches.split(",")):
        model, gm, split = simulated_int8(batch)
        scored = split.held_out + split.validation
        calibration = channel_ranges(gm, split.calibration)
        everything = channel_ranges(gm, split.calibration + scored)
        rows = [("per tensor (the preset)", gm),
                ("per channel, 8 bits, calibration ranges", replaced(gm, calibration, 8))]
        rows += [(f"per channel, {bits} bits, clipping nothing", replaced(gm, everything, bits))
                 for bits in (int(b) for b in args.bits.split(","))]
        rows.append(("float (weights and biases int8 only)", replaced(gm, None)))
        print(f"\nbatch {batch}: {len(activation_pairs(gm))} activation pairs, "
              f"{sum(is_op(n, aten.conv2d, aten.linear) for n in gm.graph.nodes)} layers\n")
        print("| activation grids | held-out: agreement / mean cos / min cos | validation: the same |")
        print("|---|---|---|")
        for name, graph in rows:
            print(f"| {name} | {scores(model, graph, split.held_out)} | {scores(model, graph, split.validation)} |")


if __name__ == "__main__":
    main()
