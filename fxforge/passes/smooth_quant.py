"""smooth_quant: move activation outliers from a LayerNorm's output into the linears reading it. Exact.

SmoothQuant (Xiao et al. 2023). Trained transformers have a few input channels j of their linears whose
activations are far larger than the rest (after LayerNorm); a per-tensor (or per-row) activation grid sized
for them leaves the other channels a handful of levels. For a LayerNorm y = n(x)·γ + β read by linears
W_k (k = 1…K, e.g. a block's query, key and value), with the calibration range a_j = max|y_j| (over every
calibration batch, every row) and w_j = max_k max_i |W_k[i, j]|:

    s_j = a_j^α / w_j^(1−α)            (s_j = 1 where a_j or w_j is 0)
    γ' = γ / s,   β' = β / s,   W_k' = W_k · diag(s)

so y' = y / s and W_k' y' = W_k y: every linear's output is unchanged (exact up to float rounding), while the
activation ranges are flattened (α = 1 moves all of the range into the weights, α = 0 none of it).

A LayerNorm that is also read by something other than those linears (a post-norm transformer's residual
stream, BERT's) is still smoothed in place, and its other readers read ``y' · s`` (one ``mul`` by a constant,
``rescaled`` counts them) instead of y. One LayerNorm stays one LayerNorm so the residual ``add → LayerNorm``
before it stays a single-reader chain that ONNX Runtime fuses into SkipLayerNormalization; the ``mul`` sits on
the residual input of the next ``add``, which that fusion accepts as it accepts any input. (A duplicated,
smoothed copy of the LayerNorm instead left the ``add`` with two LayerNorm readers and blocked the fusion in
11 of MiniLM's 12 layers.) Linears whose weight is not a constant, a LayerNorm without an affine weight and
bias, or one with no linear reader are left alone and counted.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Shapes
from fxforge.compiler.graph import add_tensor, get_tensor, readers, set_tensor
from fxforge.compiler.ops import LINEAR, argument, aten, data, is_op, weight_of
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.qdq import checked_batches


@register_pass
class SmoothQuant(Pass):
    """Fold per-channel smoothing factors s = max|X|^α / max|W|^(1−α) into LayerNorm → linear (exact)."""

    name = "smooth_quant"
    before = ("insert_qdq",)  # a quantized linear's weight is no float constant: nothing would be smoothed
    reads_calibration = True  # max|X_j| comes from the calibration data
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        plan: dict[fx.Node, list[fx.Node]] = {}
        for norm in [n for n in gm.graph.nodes if is_op(n, aten.layer_norm)]:
            linears, reason = self.match(gm, norm)
            if reason:
                stats[f"skipped.{reason}"] += 1
            else:
                plan[norm] = linears
        if not plan:
            return PassResult(changed=False, stats=dict(stats))
        ranges = _activation_ranges(gm, list(plan), ctx)
        rescaled = 0
        for norm, linears in plan.items():
            weights = [get_tensor(gm, weight_of(lin)).detach() for lin in linears]
            w = torch.stack([t.double().abs().amax(0) for t in weights]).amax(0)
            a = ranges[norm]
            s = torch.where((a > 0) & (w > 0), a.pow(self.alpha) / w.clamp(min=1e-300).pow(1 - self.alpha),
                            torch.ones_like(a)).clamp(min=1e-5, max=1e5)
            if len(norm.users) > len(linears):
                _rescale_other_readers(gm, norm, linears, s)
                rescaled += 1
            for name in ("weight", "bias"):  # computed in float64, stored in the model's own dtype
                tensor = get_tensor(gm, argument(norm, name)).detach()
                set_tensor(gm, argument(norm, name), (tensor.double() / s).to(tensor.dtype))
            for lin, weight in zip(linears, weights):
                set_tensor(gm, weight_of(lin), (weight.double() * s).to(weight.dtype))
        gm.recompile()
        stats.update({"layernorms": len(plan), "linears": sum(map(len, plan.values())), "rescaled": rescaled})
        # a rescaling mul is a node the cached shapes do not know
        return PassResult(changed=True, preserves=frozenset() if rescaled else frozenset({Shapes}), stats=dict(stats))

    @staticmethod
    def match(gm: fx.GraphModule, norm: fx.Node) -> tuple[list[fx.Node], str | None]:
        """The linears reading ``norm`` as their input, or why the LayerNorm is refused."""
        linears = [u for u in norm.users if is_op(u, *LINEAR) and data(u) is norm]
        if not linears:
            return [], "no_linear_reader"
        if any(argument(norm, n) is None or get_tensor(gm, argument(norm, n)) is None for n in ("weight", "bias")):
            return [], "no_affine"
        if any(get_tensor(gm, weight_of(lin)) is None for lin in linears):
            return [], "non_constant_weight"
        if any(readers(gm, argument(norm, n)) > 1 for n in ("weight", "bias")) or \
                any(readers(gm, weight_of(lin)) > 1 for lin in linears):
            return [], "shared_weight"  # read by another call too, which the scaling would change
        return linears, None


def _activation_ranges(gm: fx.GraphModule, norms: list[fx.Node], ctx: PassContext) -> dict[fx.Node, torch.Tensor]:
    """a_j = max|y_j| of each LayerNorm output over the calibration batches (the example inputs without them)."""
    ranges: dict[fx.Node, torch.Tensor] = {}

    class Observe(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n in norms:
                amax = out.detach().abs().flatten(0, -2).amax(0).double()
                ranges[n] = torch.maximum(ranges[n], amax) if n in ranges else amax
            return out

    batches = checked_batches(ctx.calibration, ctx.example_inputs) if ctx.calibration is not None \
        else [ctx.example_inputs]
    with torch.no_grad():
        for batch in batches:
            Observe(gm).run(*batch)
    return ranges


def _rescale_other_readers(gm: fx.GraphModule, norm: fx.Node, linears: list[fx.Node], s: torch.Tensor) -> None:
    """Make every reader of the smoothed ``norm`` (output y/s) other than ``linears`` read ``norm · s`` = y."""
    others = [u for u in norm.users if u not in linears]
    dtype = get_tensor(gm, argument(norm, "weight")).dtype
    scale = add_tensor(gm, norm.next, f"{norm.name}_unsmooth", s.to(dtype))
    with gm.graph.inserting_after(scale):
        mul = gm.graph.call_function(aten.mul.Tensor, (norm, scale))
    if "val" in norm.meta:
        mul.meta["val"] = norm.meta["val"]
    for user in others:
        user.replace_input_with(norm, mul)
