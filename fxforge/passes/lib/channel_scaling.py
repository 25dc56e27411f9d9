"""Scaling one channel of the tensor between two layers A → act → B, the arithmetic ``equalize`` and
``equalize_activations`` share: channel i divided by s_i in A's output (W_A[i] / s_i, b_A[i] / s_i) and multiplied
back in B's input (W_B[:, i] · s_i), a clipping act rescaled with its channel (clamp(y/s_i, 0, h/s_i) =
hardtanh(y, 0, h)/s_i), and that rescaling undone (``one_ceiling``; ``restore_clips`` where no grid sits between
the two layers). Exact for s_i > 0."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, copy_value_meta, get_tensor, readers, set_tensor
from fxforge.compiler.ops import (LINEAR, WEIGHTED, aten, argument, bias_of, clamp_range, conv_groups, data, is_op,
                                 weight_of)
from fxforge.compiler.rewrite import Match, Rule, apply_rules, op


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
    copy_value_meta(new, act)
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


def scale_channels(gm: fx.GraphModule, a: fx.Node, b: fx.Node, s: torch.Tensor) -> None:
    """Channel i of the tensor between A and B divided by s_i: W_A[i] / s_i, b_A[i] / s_i, W_B[:, i] · s_i, computed in
    float64 and stored in each constant's own dtype. Exact for s_i > 0 (B's output is unchanged)."""
    w_a = get_tensor(gm, weight_of(a)).detach()
    set_tensor(gm, weight_of(a), (w_a.double() / s.reshape(-1, *[1] * (w_a.dim() - 1))).to(w_a.dtype))
    if bias_of(a) is not None:
        bias = get_tensor(gm, bias_of(a)).detach()
        set_tensor(gm, bias_of(a), (bias.double() / s).to(bias.dtype))
    w_b = get_tensor(gm, weight_of(b)).detach()
    set_tensor(gm, weight_of(b), scale_inputs(w_b.double(), b, s).to(w_b.dtype))


def ceilings(act: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(floor, ceiling) of a clamp.Tensor whose two ends are constants, else None."""
    gm = act.graph.owning_module
    ends = [get_tensor(gm, argument(act, end, None)) for end in ("min", "max")]
    return None if any(e is None for e in ends) else (ends[0], ends[1])


def one_ceiling(gm: fx.GraphModule, a: fx.Node, act: fx.Node, b: fx.Node) -> None:
    """Undo a rescaled clip between A and B, act = clamp(y, 0, h_c): channel c of A scaled by t_c = H / h_c and
    B's input channel c by 1 / t_c, H = min_c h_c, so act becomes hardtanh(y, 0, H) (H is the model's own
    ceiling where a channel kept its scale). Exact in real arithmetic; float rounding moves the values by ulps."""
    ceiling = ceilings(act)[1].detach().double().flatten()
    scale_channels(gm, a, b, ceiling / ceiling.min())  # s_c = 1 / t_c
    with gm.graph.inserting_before(act):
        clip = gm.graph.call_function(aten.hardtanh.default, (a, 0.0, float(ceiling.min().float())))
    clip.meta.update(act.meta)
    act.replace_all_uses_with(clip)


def _float_constant(gm: fx.GraphModule, node: Any) -> bool:
    value = get_tensor(gm, node)
    return value is not None and value.is_floating_point()


def _between_float_layers(act: fx.Node) -> bool:
    """``act`` = clamp(·, 0, h_c > 0) per channel, read only by a float conv/linear B as its data input (no pair
    between), of a float conv/linear A of B's kind that only ``act`` reads."""
    gm, a, ends = act.graph.owning_module, data(act), ceilings(act)
    if ends is None or len(act.users) != 1 or not is_op(a, *WEIGHTED) or len(a.users) != 1:
        return False
    b, (floor, ceiling) = next(iter(act.users)), ends
    if not (is_op(b, *WEIGHTED) and data(b) is act and is_op(a, *LINEAR) == is_op(b, *LINEAR)
            and _float_constant(gm, weight_of(a)) and _float_constant(gm, weight_of(b))
            and (bias_of(a) is None or _float_constant(gm, bias_of(a)))
            and all(readers(gm, t) <= 1 for t in (weight_of(a), bias_of(a), weight_of(b)))):
        return False
    channels = get_tensor(gm, weight_of(a)).shape[0]
    return (ceiling.numel() == channels and floor.numel() in (1, channels) and bool((floor == 0).all())
            and bool((ceiling > 0).all()) and bool(ceiling.isfinite().all()))


def _restore(gm: fx.GraphModule, m: Match) -> None:
    one_ceiling(gm, m["a"], m["act"], next(iter(m["act"].users)))


RESTORE_CLIP = Rule("clips_restored", op(aten.clamp.Tensor, op(*WEIGHTED, name="a"), name="act",
                                         where=_between_float_layers), _restore)


def restore_clips(gm: fx.GraphModule) -> int:
    """One ceiling back (``one_ceiling``) for every per-channel clip between two float conv/linear layers of one kind,
    neither with a quantizer: where no grid sits between them the scaling has nothing to serve, and backends fuse
    hardtanh(·, 0, H) into the conv before it, not a per-channel clamp. Returns how many."""
    clamps = [n for n in gm.graph.nodes if is_op(n, aten.clamp.Tensor)]
    if not clamps:
        return 0
    restored = apply_rules(gm, [RESTORE_CLIP], roots=clamps)[RESTORE_CLIP.name]
    if restored:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return restored
