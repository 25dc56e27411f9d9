"""bias_correction: remove the mean output shift that quantization causes (Nagel et al. 2019, §4.2). Approximate.

A conv/linear layer y = W x + b whose weight is quantized to W_q = DQ(Q(W)) computes y_q = W_q x + b. The rounding
error ε = W_q − W is a fixed tensor, so it shifts every output channel c by a mean

    E[y_q − y]_c = E[(ε x)_c] = (ε E[x])_c              (mean over the samples and the output positions)

which is not zero when E[x] is not (inputs after relu/relu6 are all ≥ 0; a depthwise 3×3 channel has only 9
weights, so its rounding errors do not average out). Subtracting it from the bias leaves the error zero-mean:

    shift="weights" (default):  b' = b − E[ε x̂]                    the weight rounding alone
    shift="output":             b' = b − E[W_q x̂ − W x]             everything upstream as well

x̂ is the layer's input in the quantized graph (every Q/DQ applied, what the int8 kernel reads), x its input in
the float graph (Q/DQ passed through), both on the calibration data, and E[ε x̂] is the mean of the layer applied
to x̂ with weight ε and no bias (so zero padding at the borders is accounted for). "output" also removes the mean
error that activation clipping and rounding upstream leave in this layer's output (the paper's empirical
variant). The layers are corrected in graph order on the calibration set (its first ``max_samples``
samples, run batch by batch in lockstep, so a graph captured with a static batch is fed only that batch size; with a
dynamic batch, consecutive batches are concatenated up to 16 samples a run: the same sums, fewer runs),
each measured after the corrections upstream of it (so no shift is corrected twice). The pass runs after ``insert_qdq`` and
``calibrate``, which fix the weight and activation grids, and before ``fold_qdq``: the corrected float bias is
then quantized to int32 on its grid s_x · s_w like any bias (after ``fold_qdq`` the pass is refused: the
weights' rounding is stored as integers). Layers without a bias are counted and left alone.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import torch
import torch.fx as fx

from fxforge.compiler.errors import CalibrationError, missing_calibration
from fxforge.compiler.analysis import Shapes
from fxforge.compiler.graph import get_tensor, readers, set_tensor
from fxforge.compiler.ops import LINEAR, WEIGHTED, bias_of, call_with, data, is_op, weight_of
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.qdq import (Lockstep, batch_symbol, checked_batches, concatenated, first_samples, is_dq, is_q,
                     refuse_if_folded, role)


@register_pass
class BiasCorrection(Pass):
    """Subtract the mean output shift of weight rounding from each quantized layer's bias, measured on the
    calibration data (approximate)."""

    name = "bias_correction"
    exact = False
    reads_calibration = True
    after = ("insert_qdq", "calibrate")
    before = ("fold_qdq",)  # it observes the float graph or moves a weight's rounding: nothing once folded
    shift: Literal["weights", "output"] = "weights"
    max_samples: int = 256  # the first samples of the calibration data that are measured (held in memory at once)

    def __post_init__(self) -> None:
        if self.shift not in ("weights", "output"):
            raise ValueError(f"shift must be 'weights' or 'output', got {self.shift!r}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise missing_calibration(self.name)
        refuse_if_folded(gm, self.name)
        stats: Counter[str] = Counter()
        errors: dict[fx.Node, torch.Tensor] = {}
        for op in gm.graph.nodes:
            if is_op(op, *WEIGHTED):
                reason = self.refusal(gm, op)
                if reason is None:
                    errors[op] = _rounding_error(gm, weight_of(op))
                elif reason != "not_quantized":
                    stats[f"skipped.{reason}"] += 1
        if not errors:
            return PassResult(changed=False, preserves="all", stats={"corrected": 0, **stats})  # never a bare {}
        batches = list(checked_batches(ctx.calibration, ctx.example_inputs))
        if not batches:
            raise CalibrationError("pass 'bias_correction' got an empty calibration iterable")
        dynamic = batch_symbol(gm) is not None
        chunks, samples = first_samples(batches, self.max_samples, cut=dynamic)
        if dynamic:  # a dynamic batch: fewer, larger runs (the means are the same sums)
            chunks = [joined for _, joined in concatenated(chunks)]
        run = _PairRun(gm, errors, self.shift, len(chunks))
        with torch.no_grad():
            run.run(*[list(parts) for parts in zip(*chunks)])
        shifts = []
        for op, shift in run.shifts.items():
            bias = data(data(bias_of(op)))  # bias DQ ← bias Q ← float constant
            set_tensor(gm, bias, (get_tensor(gm, bias).detach().double() - shift).float())
            shifts.append(shift.abs())
        shifts = torch.cat(shifts)
        stats.update({"corrected": len(run.shifts), "samples": samples,
                      "mean_abs_shift": float(shifts.mean()), "max_abs_shift": float(shifts.max())})
        return PassResult(changed=True, preserves=frozenset({Shapes}), stats=dict(stats))

    @staticmethod
    def refusal(gm: fx.GraphModule, op: fx.Node) -> str | None:
        """Why the layer's bias is not corrected, or None."""
        w_dq = weight_of(op)
        if not (is_dq(w_dq) and role(w_dq) == "weight"):
            return "not_quantized"
        bias = bias_of(op)
        if bias is None:
            return "no_bias"
        if not (is_dq(bias) and is_q(data(bias)) and get_tensor(gm, data(data(bias))) is not None):
            return "bias_folded"
        if readers(gm, data(data(bias))) > 1:
            return "shared_weight"  # another call reads this bias, and its correction would differ
        return None


def _rounding_error(gm: fx.GraphModule, w_dq: fx.Node) -> torch.Tensor:
    """ε = DQ(Q(W)) − W, computed with the graph's own quantize/dequantize ops (float64 for the difference)."""
    q = data(w_dq)
    weight = get_tensor(gm, data(q)).detach()

    def evaluated(node: fx.Node) -> tuple[Any, Any]:
        return fx.node.map_arg((node.args, node.kwargs), lambda a: get_tensor(gm, a))

    codes = call_with(q, *evaluated(q), input=weight)
    return (call_with(w_dq, *evaluated(w_dq), input=codes).double() - weight.double()).float()


def _per_channel_sum(d: torch.Tensor, channel: int) -> torch.Tensor:
    """Σ of ``d`` over every dim but ``channel`` (an unbatched linear's output is the channel dim alone: ``sum([])``
    would reduce it to a scalar)."""
    dims = [k for k in range(d.dim()) if k != channel]
    return d.sum(dims) if dims else d


class _PairRun(Lockstep):
    """At each corrected layer (the quantized graph and, for shift="output", the float one in lockstep,
    :class:`Lockstep`) it measures the mean shift per output channel over all batches and removes it from the
    quantized side before going on."""

    def __init__(self, gm: fx.GraphModule, errors: dict[fx.Node, torch.Tensor], shift: str, batches: int) -> None:
        super().__init__(gm, batches)
        self.errors, self.shift, self.shifts = errors, shift, {}

    def step(self, n: fx.Node, fp_inputs: list, q_inputs: list) -> tuple[list | None, list]:
        q = [n.target(*args, **kwargs) for args, kwargs in q_inputs]
        fp = self.float_side(n, fp_inputs) if self.shift == "output" else None  # needed only to measure "output"
        if n in self.errors:
            channel = q[0].dim() - 1 if is_op(n, *LINEAR) else 1
            deltas = [call_with(n, args, kwargs, weight=self.errors[n], bias=None) for args, kwargs in q_inputs] \
                if self.shift == "weights" else [qi - fi for qi, fi in zip(q, fp)]
            total = sum(_per_channel_sum(d.double(), channel) for d in deltas)
            shift = total / sum(d.numel() // d.shape[channel] for d in deltas)
            self.shifts[n] = shift
            q = [v - shift.float().reshape(-1, *[1] * (v.dim() - channel - 1)) for v in q]
        return fp, q
