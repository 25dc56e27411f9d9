"""int8 convolutions shaped for ONNX Runtime's fastest x86 kernel: input channels padded to a multiple of 4. Exact.

ORT runs a ``QLinearConv`` (what DQ → conv → Q becomes) with uint8 activations and int8 weights of zero point 0 as
MLAS's symmetric indirect convolution (``MlasConvSym``: requantization fused, no im2col buffer) only when the conv is
ungrouped, its input channels are a multiple of 4 and its output channels a multiple of 8 and at least 16 (the
packing sizes of its AVX2, AVX-VNNI, AVX-512 and AVX-512 VNNI kernels, ``MlasConvSymPackWSize``). Otherwise it
falls back to im2col and a GEMM with a separate requantization pass. An RGB stem reads 3 channels, so it falls back:
MobileNetV2's 3×3 stem took 615–695 µs of a 3.8–4.8 ms int8 network at batch 1 (ORT profiler, 1 thread), and
240–256 µs with its input padded to 4 channels (docs/quantization.md, "Speed against quantize_static").

The rewrite, on the graph the onnx backend exports (x86 targets only: ARM's symmetric kernel needs 64 input channels):

    conv(DQ(q), DQ(W))  →  conv(DQ(pad_C(q, z)), DQ([W | 0]))       q uint8 with zero point z, W int8 [O, C, kh, kw]

The added channels hold z, which dequantizes to exactly 0, and their weight columns are 0, so every product they add is
0: the same integers, the same output. ``pad_C`` is ``aten.constant_pad_nd`` on the uint8 tensor between its
quantize and dequantize (ONNX ``Pad`` on uint8, 16 µs at 3×224×224), so ORT still fuses DQ → conv → Q.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.compiler.graph import get_tensor, set_tensor
from fxforge.compiler.ops import argument, aten, conv_groups, data, is_op, weight_of, with_data
from fxforge.compiler.target import Target

qd = torch.ops.quantized_decomposed
CHANNEL_ALIGNMENT = 4  # MLAS's symmetric conv: input channels a multiple of this (every x86 kernel)
OUTPUT_ALIGNMENT = 8  # and output channels a multiple of this (AVX2's; AVX-512's is 4)
MIN_OUTPUTS = 16  # and at least this many output channels (FilterOutputChannelPackCount)


def pad_conv_channels(gm: fx.GraphModule, target: Target) -> int:
    """Pads, in place, the uint8 input and int8 weight of each int8 conv2d that misses ORT's symmetric x86 kernel only
    by its input channel count (:data:`CHANNEL_ALIGNMENT`); returns how many convs it padded."""
    if "x86_64" not in target.features():
        return 0
    padded = 0
    for conv in list(gm.graph.find_nodes(op="call_function", target=aten.conv2d.default)):
        extra = _missing_channels(gm, conv)
        if not extra:
            continue
        dq, weight = data(conv), weight_of(conv)
        w = get_tensor(gm, data(weight))
        set_tensor(gm, data(weight), torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], 1))
        with gm.graph.inserting_before(dq):
            pad = gm.graph.call_function(aten.constant_pad_nd.default,
                                         (data(dq), [0, 0, 0, 0, 0, extra], argument(dq, "zero_point")))
            widened = gm.graph.call_function(dq.target, with_data(dq, pad), dict(dq.kwargs))
        conv.replace_input_with(dq, widened)
        padded += 1
    if padded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return padded


def _missing_channels(gm: fx.GraphModule, conv: fx.Node) -> int:
    """How many zero channels make ``conv`` fit the symmetric kernel (0: it fits already, or it is no such conv:
    grouped, its input not a uint8 dequantize_per_tensor, its weight not a constant int8 tensor read by this conv alone
    through a dequantize with zero points 0, or its output channels off the kernel's alignment)."""
    dq, weight = data(conv), weight_of(conv)
    if conv_groups(conv) != 1 or not isinstance(dq, fx.Node) or not isinstance(weight, fx.Node):
        return 0
    if not is_op(dq, qd.dequantize_per_tensor.default) or argument(dq, "dtype") != torch.uint8 \
            or not isinstance(argument(dq, "zero_point"), int):
        return 0
    if not is_op(weight, qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default) \
            or len(weight.users) != 1 or not isinstance(data(weight), fx.Node) or len(data(weight).users) != 1:
        return 0
    w = get_tensor(gm, data(weight))
    zeros = argument(weight, "zero_points") if is_op(weight, qd.dequantize_per_channel.default) \
        else argument(weight, "zero_point")
    zeros = get_tensor(gm, zeros) if isinstance(zeros, fx.Node) else torch.tensor(zeros)
    if w is None or w.dtype != torch.int8 or w.dim() != 4 or zeros is None or bool(zeros.any()):
        return 0
    outputs, channels = w.shape[:2]
    if outputs < MIN_OUTPUTS or outputs % OUTPUT_ALIGNMENT:
        return 0
    return -channels % CHANNEL_ALIGNMENT
