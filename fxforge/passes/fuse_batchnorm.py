"""fuse_batchnorm: fold inference batch norm into the conv/linear that feeds it. Exact.

    y = γ·(W∗x + b − μ)/√(σ²+ε) + β   ⇒   W' = s·W,  b' = s·(b − μ) + β,   s = γ/√(σ²+ε)

per output channel (scaled along the weight's first axis). Folding is done in float64 and cast back.
A BN whose input has other users, or whose producer is not a conv/linear with constant weights, is left
alone and counted; so is one whose producer's weight or bias other calls read too (``shared_weight``: a layer
called twice, whose other call the fold would change).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, finalize, get_tensor, readers, set_tensor
from fxforge.compiler.ops import (BATCH_NORM, LINEAR, WEIGHTED, aten, bias_of, bn_params, getitem_index, is_op,
                                  set_argument, weight_of)
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass
from fxforge.compiler.rewrite import Match, Rule, apply_rules, op

PATTERN = op(*BATCH_NORM, op(*WEIGHTED, name="producer", refusal="no_conv_producer",
                             sole_user="input_has_other_users"), name="bn")


def _outputs(bn: fx.Node) -> list[fx.Node]:
    """The nodes carrying the normalized tensor: ``bn`` itself, or the getitem[0] of the multi-output form."""
    return list(bn.users) if is_op(bn, aten._native_batch_norm_legit_no_training) else [bn]


def check(gm: fx.GraphModule, m: Match) -> str | None:
    bn, producer = m["bn"], m["producer"]
    p = bn_params(bn)
    if p.training:
        return "training_mode"
    if is_op(bn, aten._native_batch_norm_legit_no_training) and \
            not all(u.target is operator.getitem and getitem_index(u) == 0 for u in bn.users):
        return "uses_batch_stats"
    bias = bias_of(producer)
    if get_tensor(gm, weight_of(producer)) is None or get_tensor(gm, p.mean) is None or get_tensor(gm, p.var) is None \
            or any(t is not None and get_tensor(gm, t) is None for t in (bias, p.gamma, p.beta)):
        return "non_constant_params"
    if readers(gm, weight_of(producer)) > 1 or readers(gm, bias) > 1:
        return "shared_weight"
    if is_op(producer, *LINEAR) and producer.meta.get("val") is not None and producer.meta["val"].dim() != 2:
        return "linear_not_2d"
    return None


def fold(gm: fx.GraphModule, m: Match) -> None:
    bn, producer = m["bn"], m["producer"]
    p = bn_params(bn)
    gamma, beta, mean, var = (get_tensor(gm, t) if t is not None else None for t in p.tensors())
    weight, bias_node = get_tensor(gm, weight_of(producer)), bias_of(producer)
    bias = get_tensor(gm, bias_node) if bias_node is not None else None
    scale = (gamma.double() if gamma is not None else 1.0) / torch.sqrt(var.double() + p.eps)
    new_w = weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))
    new_b = ((bias.double() if bias is not None else 0.0) - mean.double()) * scale
    new_b = new_b + (beta.double() if beta is not None else 0.0)
    set_tensor(gm, weight_of(producer), new_w.to(weight.dtype))
    if bias_node is not None:
        set_tensor(gm, bias_node, new_b.to(weight.dtype))
    else:
        set_argument(producer, "bias", add_tensor(gm, producer, f"{producer.name}_bias", new_b.to(weight.dtype)))
    for out in _outputs(bn):
        out.replace_all_uses_with(producer)


RULE = Rule("folded", PATTERN, fold, check)


@register_pass
class FuseBatchNorm(Pass):
    """Fold inference batch norm into the preceding conv1d/2d/3d or linear (exact)."""

    name = "fuse_batchnorm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = apply_rules(gm, [RULE])
        if stats["folded"]:
            finalize(gm)
        return PassResult(changed=bool(stats["folded"]), stats=dict(stats))
