"""fuse_activation: mark conv/linear + activation (and conv + residual add + relu) as one fused unit. Exact.

    act(conv(x))          → one kernel: the activation is applied in the conv's epilogue
    relu(conv(x) + skip)  → one kernel: residual add and relu in the epilogue

The pass decides the partition; it does not change any value. Each group's nodes carry
``meta["fxforge.fusion"] = {"group", "pattern"}`` and every backend lowers a group as one kernel (eager:
in-place epilogue; TorchScript/oneDNN, ONNX Runtime and TVM: their fused conv kernels) and reports how many
it realized. A producer whose output has other users cannot be fused and is counted.
"""
from __future__ import annotations

import torch.fx as fx

from fxforge.compiler.graph import FUSION_KEY, aten, call_nodes, is_op
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

PRODUCERS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.linear)
ACTIVATIONS = (aten.relu, aten.hardtanh, aten.silu, aten.gelu, aten.hardswish)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def match(producer: fx.Node) -> tuple[list[fx.Node], str | None]:
    """The chain producer → [add →] activation starting at ``producer``, or why there is none."""
    user = _only_user(producer)
    if user is None:
        return [], "producer_has_other_users" if any(is_op(u, *ACTIVATIONS) for u in producer.users) else None
    if is_op(user, *ACTIVATIONS):
        return [producer, user], None
    if is_op(user, aten.add) and len(user.all_input_nodes) == 2:
        act = _only_user(user)
        if act is not None and is_op(act, aten.relu):
            return [producer, user, act], None
    return [], None


@register_pass
class FuseActivation(Pass):
    """Group conv/linear + relu/relu6/silu/gelu/hardswish (and add+relu) into fused units (exact)."""

    name = "fuse_activation"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: dict[str, float] = {}
        count = sum(1 for n in gm.graph.nodes if FUSION_KEY in n.meta)
        for producer in call_nodes(gm, *PRODUCERS):
            if FUSION_KEY in producer.meta:
                continue
            chain, refusal = match(producer)
            if refusal:
                stats[f"skipped.{refusal}"] = stats.get(f"skipped.{refusal}", 0) + 1
            if not chain or any(FUSION_KEY in n.meta for n in chain):
                continue
            pattern = "+".join(n.target.overloadpacket.__name__ for n in chain)
            tag = {"group": f"fused_{count}", "pattern": pattern}
            count += 1
            for n in chain:
                n.meta[FUSION_KEY] = tag
            stats[pattern] = stats.get(pattern, 0) + 1
        changed = any(not k.startswith("skipped.") for k in stats)
        return PassResult(changed=changed, preserves="all", stats=stats)
