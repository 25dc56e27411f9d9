"""insert_qdq: put quantize→dequantize pairs where an int8 backend needs them. Approximate.

    conv/linear(x, W, b)  →  conv/linear(DQ(Q(x)), DQ(Q_c(W)), DQ(Q_c32(b)))  followed by  Q→DQ

- Where: passes/analysis/quant_plan.py decides which tensors get a pair and which share one grid (conv, linear,
  matmul inputs and outputs, quantized residual adds, cat and pooling on one grid); this pass rewrites.
- Activations: one asymmetric uint8 (or int8) per-tensor pair per planned tensor, shared by all its readers.
- Weights: symmetric int8 per output channel (or per tensor), s_c = max|W_c| / q_max, with q_max = 63
  (``reduce_range``) where the target's u8s8 kernels saturate at 8 bits (x86 without VNNI or AMX, see
  compiler/target.py), else 127; the stat ``weight_bits`` says which (7 or 8).
- Bias: int32 with scale s_x · s_c, so an int8 kernel adds it to its accumulator unchanged.
- SiLU: silu(x) → x · sigmoid(x) (exact) where x gets a pair, so that the plan can quantize the sigmoid and the
  product (int8 backends have kernels for those, ONNX Runtime's QLinearSigmoid and QLinearMul, not for SiLU);
  measured on EfficientNet-B0 with ONNX Runtime 1.32: 1.27× the CPU time of ORT's own int8 model (0.75× with the
  SiLUs and squeeze-excitation gates in float between DQ and Q).

With ``activations="dynamic"`` each constant-weight linear instead becomes one ``fxforge::dynamic_linear`` (see
compiler/dynamic_quant.py): int8 per-output-channel weights, activations quantized per row (token) to symmetric int8
at run time, s_r = max_k |x_rk| / 127; nothing else is quantized (``skipped.dynamic_float`` counts the convs and
matmuls left float) and no calibration is needed. A linear reading a GELU (≥ −0.17; its tanh form ≥ −0.1701) or a
relu/relu6 (≥ 0) passes that lower bound on (``shifted_inputs``, stat ``dynamic_shifted``): its input is then
quantized as x − m on an unsigned per-row grid, twice as fine as the symmetric one. Measured on all-MiniLM-L6-v2
(the six FFN down-projections), min cosine of held-out embeddings 0.9990 against 0.9983, what keeping those six
linears float gives (0.9991), at the int8 speed (docs/quantization.md).

Static activation ranges start as the example inputs' min/max; ``calibrate`` replaces them. What cannot be
lowered (weights that are not constants, non-float tensors) and layers named in ``skip`` stay float and
are counted.

A stem conv (fewer than 4 input channels: RGB or grey pixels) whose input window (channels × kernel area) holds
fewer than ``min_input_window`` values, a 3×3 stem, stays float (``skipped.narrow_input``): int8 conv kernels
vectorize over that window and leave most lanes idle on 27 values. Measured with ONNX Runtime 1.32 on x86 (AVX-512
VNNI, 1 thread, interleaved with ORT's own int8 model): MobileNetV2's int8 3×3 stem took 2.8 of 15 ms, a fifth of
the network for 4 % of its MACs; with it in float the network's CPU time per run was 1.10× better than ORT's
(three runs; 0.94–1.04× with the stem in int8), and its input is no longer rounded to 8 bits either. ResNet-18's
7×7 stem (a window of 147) is another matter: in float the network ran at 0.60× ORT's speed, so it stays int8. So
is a stem whose output at the example batch holds more than ``max_stem_output`` values (2^20): a float stem's output
is reordered out of ORT's NCHWc layout and quantized in float, which outgrows the cache with the batch. Measured on
the trained MobileNetV2 (Xeon, AVX-512 VNNI, 1 thread, CPU time, interleaved, load average 6–9): at batch 1 (0.4 M
stem output values) the float stem ran 1.02–1.09× ORT's own int8 model and the int8 stem 1.02×; at batch 8 (3.2 M)
the float stem ran 0.91–0.94× and the int8 stem 1.01× (its reorder alone took 1.7 of 44 ms).
A depthwise conv that reads a float stem (through its clamp) stays float too (``skipped.after_float_stem``;
``float_stem_depthwise``): ORT runs it as a float NCHWc conv beside the stem, and the int8 grid starts after it.
Measured on the trained MobileNetV2 at batch 1 (same conditions, load average 9–10): 1.04–1.08× faster than with that
depthwise conv in int8, and top-1 agreement with fp32 on 96 held-out views 0.948 against 0.854 (mean logit cosine
0.991 against 0.986; every other layer int8): the first depthwise conv is the network's most damaging int8 layer.

A relu6 that ``equalize`` or ``equalize_activations`` rescaled per channel, clamp(y, 0, h_c), scales its channels
for the grid of the tensor between its two layers. Where both stay float, no grid sits there, and the clip gets one
ceiling back (``clips_restored``; ``lib.channel_scaling.restore_clips``): backends fuse hardtanh(·, 0, H) into the
conv before it, a per-channel clamp they do not (ONNX Runtime runs it as float Max and Min over the tensor). Undone
here, before calibration, because the undoing is exact in real arithmetic only: after a quantizer, a float rounding
moved by an ulp can change an integer.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Literal

import torch.fx as fx

from fxforge.compiler.analysis import Shapes
from fxforge.compiler.graph import call_nodes
from fxforge.compiler.ops import LINEAR, MATMUL, WEIGHTED, is_op
from fxforge.compiler.pass_manager import LayerContext, LayerEffect, Pass, PassContext, PassResult, register_pass

from .analysis.qdq_float_rules import FloatRules
from .lib.qdq import DTYPES, check_skip
from .lib.qdq_dynamic import dynamic_effect, to_dynamic
from .lib.qdq_pairs import weight_qmax
from .lib.qdq_static import float_again, static_effect, to_static


@register_pass
class InsertQdq(Pass):
    """Insert quantize/dequantize pairs on conv/linear/matmul inputs, weights, biases and outputs (approximate)."""

    name = "insert_qdq"
    exact = False
    before = ("insert_qdq",)  # once: a second one quantized what the first kept float, which its record missed
    per_channel: bool = True
    reduce_range: bool | None = None  # None: on where the target's u8s8 products saturate
    activation_dtype: Literal["uint8", "int8"] = "uint8"
    symmetric_activations: bool = False
    skip: tuple[str, ...] = ()  # layers kept float: node names or weight prefixes ("stem.0")
    activations: Literal["static", "dynamic"] = "static"
    min_input_window: int = 32  # stems (< 4 channels) reading fewer values (channels × kernel area) stay float
    max_stem_output: int = 1 << 20  # ... unless their output at the example batch holds more values than this
    float_stem_depthwise: bool = True  # a depthwise conv reading a float stem (through a clamp) stays float too
    shifted_inputs: bool = True  # dynamic: an input with a known lower bound (GELU, relu) on an unsigned grid

    # options dynamic activations do not read (weights per channel, each row on its own grid; only linears)
    STATIC_OPTIONS = ("per_channel", "activation_dtype", "symmetric_activations", "min_input_window",
                      "max_stem_output", "float_stem_depthwise")

    def __post_init__(self) -> None:
        if self.min_input_window < 0 or self.max_stem_output < 0:
            raise ValueError(f"min_input_window and max_stem_output must be >= 0; got {self.options()}")
        for option in self.STATIC_OPTIONS:  # (shifted_inputs is read by static too: the budget's dynamic fallback)
            self.refuse_unread(option, "with activations='dynamic' (per-channel int8 weights, each input row on "
                                       "its own grid at run time)" if self.activations == "dynamic" else None)

    @property
    def rules(self) -> FloatRules:
        """The options that keep layers float, as the analysis that applies them (analysis/qdq_float_rules.py)."""
        return FloatRules(self.skip, self.min_input_window, self.max_stem_output, self.float_stem_depthwise)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        check_skip(self.name, self.skip, list(call_nodes(gm, *WEIGHTED, *MATMUL)))
        if self.activations == "dynamic":
            return self.run_dynamic(gm, ctx, stats)
        qmax = weight_qmax(self.reduce_range, ctx.target)
        changed = to_static(gm, ctx.example_inputs, self.rules, dict(ctx.analysis(Shapes, gm)), qmax, self.per_channel,
                            DTYPES[self.activation_dtype], self.symmetric_activations, stats)
        return PassResult(changed=changed, stats=dict(stats))

    def run_dynamic(self, gm: fx.GraphModule, ctx: PassContext, stats: Counter) -> PassResult:
        """Replace each constant-weight linear by ``fxforge::dynamic_linear`` with int8 per-channel weights."""
        shapes, qmax = ctx.analysis(Shapes, gm), weight_qmax(self.reduce_range, ctx.target)
        linears = to_dynamic(gm, lambda n: self.rules.refusal(gm, n, shapes), qmax, self.shifted_inputs, stats)
        return PassResult(changed=bool(linears), stats=dict(stats))

    def layer_effect(self, node: fx.Node, layer: LayerContext) -> LayerEffect:
        """The layer on int8 alone, as ``run`` makes it (``qdq_static.static_effect``: weight and input rounded as
        their pairs round them, the input on the grid of its calibration range, for its other readers too), or the
        reason ``run`` keeps it float; with ``activations="dynamic"``, a linear becomes the ``dynamic_linear`` that
        ``run_dynamic`` writes (per-row activations, no calibration range) and any other layer stays float."""
        shapes = layer.analysis(Shapes) if layer.analysis else None
        if reason := self.rules.stem_refusal(node, layer.weight, shapes):
            return reason
        qmax = weight_qmax(self.reduce_range, layer.target)
        if self.activations == "dynamic":
            return dynamic_effect(node, layer.weight, qmax, self.shifted_inputs) if is_op(node, *LINEAR) else \
                "dynamic_float"
        return static_effect(node, layer.weight, layer.input_range, qmax, self.per_channel,
                             DTYPES[self.activation_dtype], self.symmetric_activations)

    def with_float(self, quantized: fx.GraphModule, before: fx.GraphModule, layers: tuple[str, ...],
                   ctx: PassContext) -> fx.GraphModule:
        """A copy of ``quantized`` (this pass's graph of ``before``, calibrated) as this pass with ``layers`` added
        to ``skip`` would have made it (``qdq_static.float_again``): a cheap estimate of rerunning the quantizing
        passes, for searches over which layers stay float. With ``activations="dynamic"`` it is that rerun itself:
        the dynamic rewrite reads no calibration and only replaces linears, so rerunning it on ``before`` is as cheap
        as undoing it (``quantized`` holds no node named after a linear of ``before`` to undo)."""
        p = type(self)(**{**self.options(), "skip": (*self.skip, *layers)})
        if self.activations == "dynamic":
            gm = copy.deepcopy(before)
            p.run_dynamic(gm, ctx, Counter())
            return gm
        return float_again(quantized, before, p.rules, ctx.analysis(Shapes, before))
