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

from fxforge.compiler.graph import FUSION_KEY
from fxforge.compiler.ops import ACTIVATION, RELU, WEIGHTED, aten, op_name
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass
from fxforge.compiler.rewrite import Match, Rule, apply_rules, op


def _free(node: fx.Node) -> bool:
    return FUSION_KEY not in node.meta


PLAIN = op(*ACTIVATION, op(*WEIGHTED, name="producer", where=_free, sole_user="producer_has_other_users"),
           name="act", where=_free)
RESIDUAL = op(*RELU, op(aten.add, op(*WEIGHTED, name="producer", where=_free, sole_user=True), name="add",
                        either_operand=True, sole_user=True, where=lambda n: len(n.all_input_nodes) == 2 and _free(n)),
              name="act", where=_free)


def _chain(m: Match) -> list[fx.Node]:
    return [m[k] for k in ("producer", "add", "act") if k in m]


def _pattern(m: Match) -> str:
    return "+".join(op_name(n) for n in _chain(m))


class _Tagger:
    """Tags each matched chain as one group, numbered after the groups already in the graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.count = sum(1 for n in gm.graph.nodes if FUSION_KEY in n.meta)

    def __call__(self, gm: fx.GraphModule, m: Match) -> None:
        tag = {"group": f"fused_{self.count}", "pattern": _pattern(m)}
        self.count += 1
        for n in _chain(m):
            n.meta[FUSION_KEY] = tag


@register_pass
class FuseActivation(Pass):
    """Group conv/linear + relu/relu6/silu/gelu/hardswish (and add+relu) into fused units (exact)."""

    name = "fuse_activation"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        tag = _Tagger(gm)
        stats = apply_rules(gm, [Rule(_pattern, PLAIN, tag), Rule(_pattern, RESIDUAL, tag)])
        changed = any(not k.startswith("skipped.") for k in stats)
        return PassResult(changed=changed, preserves="all", stats=dict(stats))
