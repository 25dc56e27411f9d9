"""SiLU split for static int8: silu(x) → x · sigmoid(x) (exact: SiLU's definition), so that both factors get grids
of their own and the plan quantizes them (an int8 backend has int8 kernels for sigmoid and mul, none for SiLU;
measured in passes/insert_qdq.py's docstring)."""
from __future__ import annotations

from typing import Collection

import torch.fx as fx

from fxforge.compiler.graph import FUSION_KEY, call_nodes, copy_value_meta, fusion_groups
from fxforge.compiler.ops import aten, data


def split_silus(gm: fx.GraphModule, planned: Collection[fx.Node], shapes: dict) -> int:
    """Rewrite each SiLU whose input is ``planned`` (gets a pair) as x · sigmoid(x); the new nodes take the SiLU's
    entry in ``shapes`` (the Shapes analysis of ``gm``), and the SiLU's fusion group (no longer one float kernel)
    loses its tags. The new nodes are named after the SiLU, so a copy of the same graph splits into the same names
    (``InsertQdq.with_float`` relies on it). Returns how many SiLUs were split."""
    silus = [n for n in call_nodes(gm, aten.silu) if data(n) in planned]
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
