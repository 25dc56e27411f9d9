"""equalize_activations: give every channel of the tensor between a layer and the depthwise conv reading it the
same range, through the two layers' per-channel weights. Exact.

A per-tensor activation grid spends its 256 levels on the widest channel: a channel whose values reach a tenth
of the widest one's is quantized with 25 levels. Between A → act → B with B depthwise (channel i of the tensor is
read only by B's output channel i), act ∈ {identity, relu, hardtanh(·, 0, h)} and A's output read only by act
(and act's only by B), scaling channel i by 1/s_i,

    W_A'[i] = W_A[i] / s_i,   b_A'[i] = b_A[i] / s_i,   W_B'[i] = s_i · W_B[i],   act' = clamp(·, 0, h / s_i)

leaves B's output unchanged (relu(y/s) = relu(y)/s, clamp(y/s_i, 0, h/s_i) = hardtanh(y, 0, h)/s_i, s_i > 0), and
changes neither layer's weight quantization when its grid is per output channel (insert_qdq's default): row i of
W_A and of W_B is scaled as a whole, and so is its scale. Only the tensor between them changes. With m_i the
largest value channel i takes on the calibration data (after act), s_i = m_i / max_j m_j gives every channel the
range [0, max_j m_j] (a channel never above 0 keeps s_i = 1): the per-tensor grid then has the same resolution
for all of them, what a per-channel activation grid would give, which int8 kernels do not take.

cross-layer equalization (``equalize``) balances the *weight* ranges instead, sqrt(r_A,i · r_B,i), which per-channel
weight grids do not need, and moves the imbalance into this tensor. A clip's new ceilings h/s_i = h·max_j m_j/m_i
lie at or above the grid's top (m_i ≤ h after the clip, and calibration puts the top at or below max_j m_j), so
``fold_qdq`` folds every such clamp into the quantizer (measured on MobileNetV2: all 17 clamps folded). Runs before
``insert_qdq``, on the calibration data. Stats: ``pairs``, ``clips_rescaled``, ``max_scale`` (the largest
1/s_i), ``skipped.not_depthwise`` (pairs whose B mixes channels: scaling its input columns would widen its
weight rows' ranges).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fxforge.compiler.errors import CalibrationError, missing_calibration
from fxforge.compiler.graph import get_tensor, readers
from fxforge.compiler.ops import CLAMP, CONV, RELU, WEIGHTED, bias_of, clamp_range, conv_groups, data, is_op, weight_of
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.channel_scaling import rescale_clip, scale_channels
from .lib.qdq import checked_batches


@register_pass
class EqualizeActivations(Pass):
    """Scale the channels between a layer and the depthwise conv reading it to one range on calibration data (exact)."""

    name = "equalize_activations"
    before = ("insert_qdq",)  # a quantized layer's weight is no float constant: nothing would be scaled
    reads_calibration = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calibration is None:
            raise missing_calibration(self.name)
        stats: Counter[str] = Counter()
        pairs = {}  # the tensor between (act, or A) → (A, act or None, B)
        for a in gm.graph.nodes:
            if is_op(a, *WEIGHTED):
                match, reason = _match(gm, a)
                if reason:
                    stats[f"skipped.{reason}"] += 1
                elif match:
                    pairs[match[1] or a] = match
        if not pairs:
            return PassResult(changed=False, preserves="all", stats=dict(stats))
        peaks = _channel_peaks(gm, set(pairs), checked_batches(ctx.calibration, ctx.example_inputs))
        if not peaks:
            raise CalibrationError("pass 'equalize_activations' got an empty calibration iterable")
        largest = 1.0
        for tensor, (a, act, b) in pairs.items():
            m = peaks[tensor].double()
            s = torch.where(m > 0, m / m.max().clamp(min=1e-30), torch.ones_like(m))
            scale_channels(gm, a, b, s)
            if act is not None and not is_op(act, *RELU):
                rescale_clip(gm, a, act, s)
                stats["clips_rescaled"] += 1
            largest = max(largest, float(1 / s.min()))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        stats.update({"pairs": len(pairs), "max_scale": largest})
        return PassResult(changed=True, stats=dict(stats))


def _match(gm: fx.GraphModule, a: fx.Node) -> tuple[tuple | None, str | None]:
    """(A, act or None, B) when A feeds a depthwise B through act alone, or why not (None, None: no pair)."""
    if len(a.users) != 1:
        return None, None
    act = next(iter(a.users))
    if is_op(act, *CLAMP) and len(act.users) == 1:
        b = next(iter(act.users))
        if not is_op(act, *RELU) and clamp_range(act)[0] != 0:
            return None, "clip_not_at_zero"
    else:
        act, b = None, act
    if not is_op(b, *WEIGHTED) or data(b) is not (act or a) or not is_op(a, *CONV):
        return None, None
    w_a, w_b = get_tensor(gm, weight_of(a)), get_tensor(gm, weight_of(b))
    if w_a is None or w_b is None or (bias_of(a) is not None and get_tensor(gm, bias_of(a)) is None):
        return None, "non_constant_weight"
    if any(readers(gm, t) > 1 for t in (weight_of(a), bias_of(a), weight_of(b))):
        return None, "shared_weight"  # a layer called elsewhere too: the scaling would change that call
    if not (w_b.shape[1] == 1 and conv_groups(b) == w_a.shape[0] == w_b.shape[0]):
        return None, "not_depthwise"
    return (a, act, b), None


def _channel_peaks(gm: fx.GraphModule, tensors: set[fx.Node], batches) -> dict[fx.Node, torch.Tensor]:
    """The largest value of each channel (dim 1) of ``tensors`` over the calibration batches."""
    peaks: dict[fx.Node, torch.Tensor] = {}

    class Observe(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n in tensors:
                m = out.detach().transpose(0, 1).flatten(1).amax(1).clamp(min=0)
                peaks[n] = torch.maximum(peaks[n], m) if n in peaks else m
            return out

    with torch.no_grad():
        for batch in batches:
            Observe(gm).run(*batch)
    return peaks
