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
from typing import Any, Callable, Literal

import torch
import torch.fx as fx

from fxforge.compiler.analysis import Shapes
from fxforge.compiler.graph import (FUSION_KEY, add_tensor, call_nodes, copy_value_meta, fusion_groups, get_tensor,
                                    set_tensor)
from fxforge.compiler.ops import (LINEAR, MATMUL, WEIGHTED, aten, bias_of, call_with, data, is_op, qd, set_argument,
                                 value_of, weight_of)
from fxforge.compiler.pass_manager import (LayerContext, LayerEffect, LayerFn, Pass, PassContext, PassResult,
                                          register_pass)
from fxforge.compiler.target import Target

from .analysis.qdq_float_rules import FloatRules, no_int8_kernel
from .lib.channel_scaling import restore_clips
from .lib.qdq import (DTYPES, INT32, QDQ_KEY, activation_qparams, bias_scales, bounds, check_skip, fit_activations,
                      is_dq, is_q, role, weight_scales)
from .lib.qdq_dynamic import dynamic_effect, to_dynamic


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
        shapes = dict(ctx.analysis(Shapes, gm))
        split = self.split_silus(gm, shapes)
        if split:
            stats["silu_split"] = split
        plan, weighted = self.rules.plan(gm, shapes, stats)
        for tensor, group in plan.items():
            self.quantize_activation(gm, tensor, group)
        reduce_range = self.reduced(ctx.target)
        for op in weighted:
            self.quantize_weight(gm, op, 63 if reduce_range else 127)
        restored = restore_clips(gm)  # where the plan put no grid
        if restored:
            stats["clips_restored"] = restored
        if plan:  # a first guess from the example inputs; calibrate replaces it
            stats.update({k: v for k, v in fit_activations(gm, [ctx.example_inputs], "minmax").items()
                          if k == "weight_scales_widened"})
        stats.update({"activations": len(plan), "weights": len(weighted)})
        stats.update(no_int8_kernel(gm))
        if weighted:
            stats["weight_bits"] = 7 if reduce_range else 8
        cut = _untag_split_groups(gm)
        if cut:
            stats["fusion_groups_split"] = cut
        return PassResult(changed=bool(plan) or bool(restored), stats=dict(stats))

    def run_dynamic(self, gm: fx.GraphModule, ctx: PassContext, stats: Counter) -> PassResult:
        """Replace each constant-weight linear by ``fxforge::dynamic_linear`` with int8 per-channel weights."""
        shapes, qmax = ctx.analysis(Shapes, gm), 63 if self.reduced(ctx.target) else 127
        linears = to_dynamic(gm, lambda n: self.rules.refusal(gm, n, shapes), qmax, self.shifted_inputs, stats)
        return PassResult(changed=bool(linears), stats=dict(stats))

    def split_silus(self, gm: fx.GraphModule, shapes: dict) -> int:
        """Rewrite each SiLU whose input gets a pair as x · sigmoid(x) (exact: SiLU's definition) so that both
        factors get grids of their own and the plan quantizes them (an int8 backend has int8 kernels for sigmoid and
        mul, none for SiLU); the new nodes take the SiLU's entry in ``shapes``, and the SiLU's fusion group (no longer
        one float kernel) loses its tags. The new nodes are named after the SiLU, so a copy of the same graph
        splits into the same names (``with_float`` relies on it)."""
        plan, _ = self.rules.plan(gm, shapes)
        silus = [n for n in call_nodes(gm, aten.silu) if data(n) in plan]
        for node in silus:
            group = node.meta.get(FUSION_KEY, {}).get("group")
            for member in fusion_groups(gm).get(group, []):
                del member.meta[FUSION_KEY]
            with gm.graph.inserting_before(node):
                gate = gm.graph.create_node("call_function", aten.sigmoid.default, (data(node),),
                                            name=f"{node.name}_sigmoid")
                product = gm.graph.create_node("call_function", aten.mul.Tensor, (data(node), gate),
                                               name=f"{node.name}_mul")
            for new in (gate, product):
                copy_value_meta(new, node)
                shapes[new.name] = shapes[node.name]
            node.replace_all_uses_with(product)
            gm.graph.erase_node(node)
        if silus:
            gm.recompile()
        return len(silus)

    def layer_effect(self, node: fx.Node, layer: LayerContext) -> LayerEffect:
        """The layer on int8: its weight fake-quantized as ``quantize_weight`` does (symmetric, q_max from
        ``reduce_range``), its input on the activation grid of its calibration range (``activation_dtype``), for
        every other reader of that tensor too (they share its pair); with
        ``activations="dynamic"``, a linear becomes the ``dynamic_linear`` that ``run_dynamic`` writes (per-row
        activations, no calibration range) and any other layer stays float."""
        shapes = layer.analysis(Shapes) if layer.analysis else None
        if reason := self.rules.stem_refusal(node, layer.weight, shapes):
            return reason
        qmax = 63 if self.reduced(layer.target) else 127
        if self.activations == "dynamic":
            return dynamic_effect(node, layer.weight, qmax, self.shifted_inputs) if is_op(node, *LINEAR) else \
                "dynamic_float"
        s = weight_scales(layer.weight, qmax, self.per_channel)
        wq = (torch.fake_quantize_per_channel_affine(layer.weight, s, torch.zeros_like(s, dtype=torch.int32), 0,
                                                     -qmax - 1, qmax) if self.per_channel else
              torch.fake_quantize_per_tensor_affine(layer.weight, float(s), 0, -qmax - 1, qmax))
        dtype = DTYPES[self.activation_dtype]
        qmin, qmax_a = bounds(dtype)
        scale, zero = activation_qparams(*layer.input_range, dtype, self.symmetric_activations)

        def rounded(x: torch.Tensor) -> torch.Tensor:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax_a)

        def layer_fn(args: list, kwargs: dict) -> torch.Tensor:
            return call_with(node, args, kwargs, weight=wq, input=rounded(value_of(node, args, kwargs, "input")))
        # the pair on the layer's input is one for all readers of that tensor (quantize_activation): a reader kept
        # float reads it rounded too, which quantizing this layer alone does to it (a head beside this one: 0.012 of
        # its top-1 agreement, where this layer alone was measured at 1e-6)
        x = data(node)
        others = [r for r in x.users if r is not node and r.op == "call_function" and
                  not (is_op(r, *WEIGHTED) and x in (weight_of(r), bias_of(r)))]
        return {node.name: layer_fn, **{r.name: _reading_rounded(r, x, rounded) for r in others}}

    def with_float(self, quantized: fx.GraphModule, before: fx.GraphModule, layers: tuple[str, ...],
                   ctx: PassContext) -> fx.GraphModule:
        """A copy of ``quantized`` (this pass's graph, calibrated, from ``before``) as this pass with ``layers``
        added to ``skip`` would have made it: those layers' weights and biases float again (``before``'s values, as
        ``adaround`` and ``bias_correction`` may have moved the float constants behind their quantizers),
        and the activation pairs that the smaller plan would not insert passed through. Every other grid keeps its
        calibrated scale, which a skip does not change (calibration observes the float graph); a cheap estimate of
        rerunning the quantizing passes, for searches over which layers stay float. With ``activations="dynamic"``
        it is that rerun itself: the dynamic rewrite reads no calibration and only replaces linears, so rerunning
        it on ``before`` is as cheap as undoing it (``quantized`` holds no node named after a linear of ``before``
        to undo)."""
        p = type(self)(**{**self.options(), "skip": (*self.skip, *layers)})
        if self.activations == "dynamic":
            gm = copy.deepcopy(before)
            p.run_dynamic(gm, ctx, Counter())
            return gm
        shapes = dict(ctx.analysis(Shapes, before))
        before = copy.deepcopy(before)
        p.split_silus(before, shapes)
        keep = {t.name for t in p.rules.plan(before, shapes)[0]}
        by_name = {n.name for n in call_nodes(before, *WEIGHTED, *MATMUL)
                   if p.rules.refusal(before, n, shapes) == "by_name"}
        gm = copy.deepcopy(quantized)
        for node in list(gm.graph.nodes):
            if is_q(node) and role(node) == "activation" and data(node).name not in keep:
                for dq in [u for u in node.users if is_dq(u)]:
                    dq.replace_all_uses_with(data(node))
            elif is_op(node, *WEIGHTED) and node.name in by_name and is_dq(weight_of(node)):
                original = next(n for n in before.graph.nodes if n.name == node.name)
                for kind, of in (("weight", weight_of), ("bias", bias_of)):  # rounding and correction undone
                    if is_dq(of(node)):
                        constant = data(data(of(node)))
                        set_tensor(gm, constant, get_tensor(before, of(original)).detach().clone())
                        set_argument(node, kind, constant)
        gm.graph.eliminate_dead_code()
        restore_clips(gm)
        gm.recompile()
        return gm

    def reduced(self, target: Target) -> bool:
        """7-bit weights: by default where the target's u8s8 products saturate (x86 without VNNI or AMX)."""
        return self.reduce_range if self.reduce_range is not None else target.saturates_u8s8()

    # ---------------------------------------------------------------------------------------- rewriting

    def quantize_activation(self, gm: fx.GraphModule, tensor: fx.Node, group: int) -> None:
        dtype = DTYPES[self.activation_dtype]
        qmin, qmax = bounds(dtype)
        meta = {"role": "activation", "group": group, "symmetric": self.symmetric_activations}
        with gm.graph.inserting_after(tensor):
            q = gm.graph.call_function(qd.quantize_per_tensor.default, (tensor, 1.0, 0, qmin, qmax, dtype))
        with gm.graph.inserting_after(q):
            dq = gm.graph.call_function(qd.dequantize_per_tensor.default, (q, 1.0, 0, qmin, qmax, dtype))
        q.meta[QDQ_KEY], dq.meta[QDQ_KEY] = meta, dict(meta)
        # a constant read as an activation (``h @ enc.weight``, a tied head) keeps its own quantizer where a layer
        # reads it as its weight or bias: per channel, as quantize_weight gives every weight
        tensor.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q and not (
            is_op(user, *WEIGHTED) and tensor in (weight_of(user), bias_of(user))))

    def quantize_weight(self, gm: fx.GraphModule, op: fx.Node, qmax: int) -> None:
        weight = get_tensor(gm, weight_of(op))
        scales = weight_scales(weight, qmax, self.per_channel)
        if self.per_channel:
            params = (add_tensor(gm, op, f"{op.name}_weight_scale", scales),
                      add_tensor(gm, op, f"{op.name}_weight_zero_point", torch.zeros(len(scales), dtype=torch.int64)))
            self._pair(gm, op, "weight", (*params, 0, -qmax - 1, qmax, torch.int8), qd.quantize_per_channel.default,
                       qd.dequantize_per_channel.default)
        else:
            self._pair(gm, op, "weight", (float(scales), 0, -qmax - 1, qmax, torch.int8),
                       qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)
        bias = bias_of(op)
        if bias is not None:
            channels = get_tensor(gm, bias).shape[0]
            scale = add_tensor(gm, op, f"{op.name}_bias_scale", bias_scales(gm, op, channels))
            zero = add_tensor(gm, op, f"{op.name}_bias_zero_point", torch.zeros(channels, dtype=torch.int64))
            self._pair(gm, op, "bias", (scale, zero, 0, *INT32, torch.int32), qd.quantize_per_channel.default,
                       qd.dequantize_per_channel.default)

    @staticmethod
    def _pair(gm: fx.GraphModule, op: fx.Node, kind: str, params: tuple, q_op, dq_op) -> None:
        """Route ``op``'s argument ``kind`` ("weight" or "bias") through a new Q → DQ pair."""
        with gm.graph.inserting_before(op):
            q = gm.graph.call_function(q_op, (weight_of(op) if kind == "weight" else bias_of(op), *params))
            dq = gm.graph.call_function(dq_op, (q, *params))
        q.meta[QDQ_KEY], dq.meta[QDQ_KEY] = {"role": kind}, {"role": kind}
        set_argument(op, kind, dq)


def _reading_rounded(reader: fx.Node, x: fx.Node, rounded: Callable[[torch.Tensor], torch.Tensor]) -> LayerFn:
    """``reader`` computed with its argument ``x`` (a node) passed through ``rounded``."""
    places = [i for i, a in enumerate(reader.args) if a is x]
    names = [k for k, a in reader.kwargs.items() if a is x]

    def fn(args: list, kwargs: dict) -> Any:
        for i in places:
            args[i] = rounded(args[i])
        for k in names:
            kwargs[k] = rounded(kwargs[k])
        return reader.target(*args, **kwargs)
    return fn


def _untag_split_groups(gm: fx.GraphModule) -> int:
    """Drop fuse_activation's tags from groups a Q/DQ pair now cuts (conv → Q → DQ → add + relu): their
    members are no longer one float kernel; an int8 backend fuses the QDQ form itself."""
    split = 0
    for nodes in fusion_groups(gm).values():
        if any(a not in b.all_input_nodes for a, b in zip(nodes, nodes[1:])):
            for n in nodes:
                del n.meta[FUSION_KEY]
            split += 1
    return split
