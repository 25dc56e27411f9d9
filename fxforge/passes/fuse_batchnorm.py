"""fuse_batchnorm: fold inference batch norm into the conv/linear that feeds it. Exact.

    y = γ·(W∗x + b − μ)/√(σ²+ε) + β   ⇒   W' = s·W,  b' = s·(b − μ) + β,   s = γ/√(σ²+ε)

per output channel (scaled along the weight's first axis). Folding is done in float64 and cast back.
A BN whose input has other users, or whose producer is not a conv/linear with constant weights, is left
alone and counted.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxforge.compiler.graph import add_tensor, arg, aten, call_nodes, finalize, get_tensor, is_op, set_arg, set_tensor
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
PRODUCERS = (*CONVS, aten.linear)


@register_pass
class FuseBatchNorm(Pass):
    """Fold inference batch norm into the preceding conv1d/2d/3d or linear (exact)."""

    name = "fuse_batchnorm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, float] = {}
        for bn in list(call_nodes(gm, aten._native_batch_norm_legit_no_training, aten.batch_norm)):
            reason = self.fold(gm, bn)
            key = "folded" if reason is None else f"skipped.{reason}"
            stats[key] = stats.get(key, 0) + 1
        if stats.get("folded"):
            finalize(gm)
        return PassResult(changed=bool(stats.get("folded")), stats=stats)

    def fold(self, gm: fx.GraphModule, bn: fx.Node) -> str | None:
        """Fold one BN; return why not, or None when folded."""
        legit = is_op(bn, aten._native_batch_norm_legit_no_training)
        if not legit and arg(bn, 5, "training", False):
            return "training_mode"
        producer = bn.args[0]
        if not is_op(producer, *PRODUCERS):
            return "no_conv_producer"
        if len(producer.users) != 1:
            return "input_has_other_users"
        outputs = [u for u in bn.users if legit] if legit else [bn]
        if legit and not all(u.target is operator.getitem and u.args[1] == 0 for u in outputs):
            return "uses_batch_stats"
        weight = get_tensor(gm, producer.args[1])
        bias_node = arg(producer, 2, "bias")
        bias = get_tensor(gm, bias_node) if bias_node is not None else None
        gamma, beta, mean, var = (get_tensor(gm, bn.args[i]) if bn.args[i] is not None else None for i in (1, 2, 3, 4))
        eps = bn.args[6] if legit else arg(bn, 7, "eps", 1e-5)
        if weight is None or mean is None or var is None or (bias_node is not None and bias is None) \
                or (bn.args[1] is not None and gamma is None) or (bn.args[2] is not None and beta is None):
            return "non_constant_params"
        if is_op(producer, aten.linear) and producer.meta.get("val") is not None and producer.meta["val"].dim() != 2:
            return "linear_not_2d"
        scale = (gamma.double() if gamma is not None else 1.0) / torch.sqrt(var.double() + eps)
        new_w = weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))
        new_b = ((bias.double() if bias is not None else 0.0) - mean.double()) * scale
        new_b = new_b + (beta.double() if beta is not None else 0.0)
        set_tensor(gm, producer.args[1], new_w.to(weight.dtype))
        if bias_node is not None:
            set_tensor(gm, bias_node, new_b.to(weight.dtype))
        else:
            set_arg(producer, 2, "bias", add_tensor(gm, producer, f"{producer.name}_bias", new_b.to(weight.dtype)))
        for out in outputs:
            out.replace_all_uses_with(producer)
        return None
