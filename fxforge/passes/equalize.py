"""equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"). Exact.

For a pair A → act → B of conv (or linear) layers, act ∈ {identity, relu, relu6/hardtanh(·, 0, h)}, where A's output is read only by
act and act's only by B, scale channel i of the tensor between them by 1/s_i (s_i > 0):

    W_A'[i] = W_A[i] / s_i,   b_A'[i] = b_A[i] / s_i,   W_B'[:, i] = s_i · W_B[:, i]

(W_B[:, i] is B's input slice for channel i: for a grouped or depthwise B, the rows of the group holding i).
relu(y / s) = relu(y) / s for s > 0 and B is linear in its input, so B's output is unchanged: exact up to
float rounding (the arithmetic runs in float64). With the ranges r_A,i = max|W_A[i]| and
r_B,i = max|W_B[:, i]|, the choice s_i = sqrt(r_A,i / r_B,i) makes both sqrt(r_A,i · r_B,i): neither layer has
a channel whose range dwarfs the others', which per-tensor weight grids and the per-tensor activation grid
between them need. A layer that is B of one pair and A of the next (a chain) is rescaled by both, so the
pass sweeps over all pairs until every s_i of a sweep is within ``tolerance`` of 1 (at most ``sweeps``).

A clipping activation c(y) = hardtanh(y, 0, h) (relu6: h = 6) commutes with the scaling only when its clip
is rescaled with the channel: hardtanh(y/s_i, 0, h) ≠ hardtanh(y, 0, h)/s_i, but

    clamp(y/s_i, 0, h/s_i) = hardtanh(y, 0, h) / s_i          (exact for s_i > 0)

so with ``clip="rescale"`` the pass equalizes such pairs too and replaces the activation by
``aten.clamp(y', 0, h/S)`` with a per-channel ceiling (S_i the product of the s_i the channel got over the sweeps),
counted in ``clips_rescaled``. A quantizer on that tensor whose top lies at or below every ceiling makes the
per-channel clamp redundant on the integers (fold_qdq drops it then); otherwise it stays a float op between the
int8 kernels. ``clip="skip"`` (default) leaves such pairs alone (``skipped.clipping_activation``): on the trained
MobileNetV2 rescaling all 34 relu6 pairs lowered the int8 preset's top-1 agreement from 0.867 to 0.852 and its
mean cosine from 0.983 to 0.976 (128 held-out views, docs/quantization.md), and 11 of the 34 clamps stayed float. Replacing relu6 by relu instead, as the paper does for MobileNetV2, changes the
float model (measured: top-1 agreement 0.91 with the original on real photos), so it is not done.

High-bias absorption (the paper's second step: move c = max(0, β − 3γ) from b_A to B through relu) is not
done: it assumes Gaussian pre-activations and changes the output whenever one falls below c, so it is not
exact, and the per-tensor asymmetric activation grid already represents a shifted range without loss.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Shapes
from fxforge.compiler.graph import get_tensor, readers, set_tensor
from fxforge.compiler.ops import (CLAMP, LINEAR, RELU, WEIGHTED, aten, bias_of, clamp_range, conv_groups, data, is_op,
                                 weight_of)
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.channel_scaling import input_view, rescale_clip, scale_inputs


@register_pass
class Equalize(Pass):
    """Cross-layer equalization of conv/linear pairs joined by relu, relu6 (clip rescaled) or nothing, chains
    iterated (exact)."""

    name = "equalize"
    before = ("insert_qdq",)  # a quantized layer's weight is no float constant: nothing would be scaled
    sweeps: int = 50
    tolerance: float = 1e-3  # stop when max_i |log s_i| of a sweep is below this
    clip: Literal["rescale", "skip"] = "skip"  # pairs joined by hardtanh(·, 0, h): leave them, or rescale the clip

    def __post_init__(self) -> None:
        if self.sweeps < 1 or not 0.0 < self.tolerance < math.inf:  # sweeps=0 equalized nothing, silently
            raise ValueError(f"equalize needs sweeps >= 1 and a finite tolerance > 0; got {self.options()}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        pairs, clips = [], {}
        for a in gm.graph.nodes:
            if is_op(a, *WEIGHTED):
                b, reason = self.match(gm, a)
                if reason:
                    stats[f"skipped.{reason}"] += 1
                elif b is not None:
                    pairs.append((a, b))
                    act = data(b)
                    if act is not a and not is_op(act, *RELU):
                        clips[a] = act
        if not pairs:
            return PassResult(changed=False, stats=dict(stats))
        weights = {n: get_tensor(gm, weight_of(n)).detach().double() for pair in pairs for n in pair}
        biases = {a: get_tensor(gm, bias_of(a)).detach().double() for a, _ in pairs if bias_of(a) is not None}
        total = {a: torch.ones(weights[a].shape[0], dtype=torch.float64) for a in clips}  # S_i per clipped channel
        done = 0
        for done in range(1, self.sweeps + 1):
            largest = 0.0
            for a, b in pairs:
                s = _scales(weights[a], weights[b], b)
                weights[a] = weights[a] / s.reshape(-1, *[1] * (weights[a].dim() - 1))
                if a in biases:
                    biases[a] = biases[a] / s
                weights[b] = scale_inputs(weights[b], b, s)
                if a in total:
                    total[a] = total[a] * s
                largest = max(largest, float(s.log().abs().max()))
            if largest < self.tolerance:
                break
        for node, w in weights.items():
            set_tensor(gm, weight_of(node), w.to(get_tensor(gm, weight_of(node)).dtype))  # computed in float64
        for node, bias in biases.items():
            set_tensor(gm, bias_of(node), bias.to(get_tensor(gm, bias_of(node)).dtype))
        for a, act in clips.items():
            rescale_clip(gm, a, act, total[a])
        if clips:
            stats["clips_rescaled"] = len(clips)
            gm.graph.eliminate_dead_code()
            gm.recompile()
        stats.update({"pairs": len(pairs), "sweeps": done,
                      "depthwise_pairs": sum(1 for p in pairs if any(conv_groups(n) > 1 for n in p))})
        return PassResult(changed=True, preserves=frozenset() if clips else frozenset({Shapes}), stats=dict(stats))

    def match(self, gm: fx.GraphModule, a: fx.Node) -> tuple[fx.Node | None, str | None]:
        """The layer B that A feeds through relu, nothing or (with ``clip="rescale"``) hardtanh(·, 0, h), or why the
        pair is refused (None, None: no pair)."""
        act = None
        if len(a.users) != 1:
            return None, None
        user = next(iter(a.users))
        if is_op(user, *CLAMP, aten.clamp):
            act = user
            if len(act.users) != 1:
                return None, None
            user = next(iter(act.users))
        if not is_op(user, *WEIGHTED) or data(user) is not (act or a):
            return None, None
        b = user
        if act is not None and not is_op(act, *RELU):
            lo, hi = clamp_range(act) if is_op(act, *CLAMP) else (None, None)
            if self.clip == "skip" or lo != 0 or not 0 < hi < float("inf"):
                return None, "clipping_activation"
        if is_op(a, *LINEAR) != is_op(b, *LINEAR):
            return None, "mixed_layer_kinds"
        if any(get_tensor(gm, weight_of(n)) is None for n in (a, b)):
            return None, "non_constant_weight"
        if bias_of(a) is not None and get_tensor(gm, bias_of(a)) is None:
            return None, "non_constant_bias"
        if any(readers(gm, t) > 1 for t in (weight_of(a), bias_of(a), weight_of(b))):
            return None, "shared_weight"  # a layer called elsewhere too: the scaling would change that call
        return b, None


def _scales(w_a: torch.Tensor, w_b: torch.Tensor, b: fx.Node) -> torch.Tensor:
    """s_i = sqrt(r_A,i / r_B,i); 1 where either range is 0 (a dead channel has nothing to balance)."""
    r_a = w_a.abs().flatten(1).amax(1)
    view = input_view(w_b, b)
    r_b = view.abs().transpose(1, 2).flatten(2).amax(2).flatten()  # [groups · in/groups] = [C]
    s = torch.where((r_a > 0) & (r_b > 0), (r_a / r_b.clamp(min=1e-300)).sqrt(), torch.ones_like(r_a))
    return s.clamp(min=math.ldexp(1.0, -40), max=math.ldexp(1.0, 40))
