"""eliminate_dead_code: remove nodes whose values nothing uses, and the constants nobody reads. Exact."""
from __future__ import annotations

import torch.fx as fx

from fxforge.compiler.graph import remove_unused_tensors
from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateDeadCode(Pass):
    """Remove unused nodes and the parameters no node reads (exact)."""

    name = "eliminate_dead_code"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        nodes = before - len(gm.graph.nodes)
        tensors = remove_unused_tensors(gm)
        return PassResult(changed=bool(nodes or tensors), stats={"nodes_removed": nodes, "tensors_removed": tensors})
