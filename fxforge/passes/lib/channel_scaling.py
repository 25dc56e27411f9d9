"""Scaling one channel of the tensor between two layers A → act → B, the arithmetic ``equalize`` and
``equalize_activations`` share: channel i divided by s_i in A's output (W_A[i] / s_i, b_A[i] / s_i) and multiplied
back in B's input (W_B[:, i] · s_i), a clipping act rescaled with its channel (clamp(y/s_i, 0, h/s_i) =
hardtanh(y, 0, h)/s_i). Exact for s_i > 0."""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, get_tensor
from fxforge.compiler.ops import LINEAR, aten, clamp_range, conv_groups, data, is_op, weight_of


def rescale_clip(gm: fx.GraphModule, a: fx.Node, act: fx.Node, total: torch.Tensor) -> None:
    """Replace ``act`` = hardtanh(y, 0, h) by clamp(y, 0, h / S) with a per-channel ceiling (channels on dim 1 of a
    conv output, on the last dim of a linear's)."""
    ceiling = clamp_range(act)[1] / total
    shape = (-1,) if is_op(a, *LINEAR) else (-1, *[1] * (get_tensor(gm, weight_of(a)).dim() - 2))
    ceiling = ceiling.reshape(shape).to(get_tensor(gm, weight_of(a)).dtype)
    top = add_tensor(gm, act, f"{act.name}_ceiling", ceiling)
    floor = add_tensor(gm, act, f"{act.name}_floor", torch.zeros_like(ceiling))
    with gm.graph.inserting_before(act):
        new = gm.graph.call_function(aten.clamp.Tensor, (data(act), floor, top))
    new.meta.update({k: v for k, v in act.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
    act.replace_all_uses_with(new)


def input_view(w: torch.Tensor, b: fx.Node) -> torch.Tensor:
    """B's weight as [groups, out/groups, in/groups, …]: channel i is column i % (in/groups) of group i // …"""
    g = conv_groups(b)
    return w.reshape(g, w.shape[0] // g, *w.shape[1:])


def scale_inputs(w_b: torch.Tensor, b: fx.Node, s: torch.Tensor) -> torch.Tensor:
    """B's weight with the weights reading input channel i multiplied by s_i."""
    view = input_view(w_b, b)
    factors = s.reshape(view.shape[0], 1, view.shape[2], *[1] * (view.dim() - 3))
    return (view * factors).reshape(w_b.shape)
