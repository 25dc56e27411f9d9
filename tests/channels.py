"""Test helper for the channel passes: a model in which a random share of its channel groups is zeroed."""
from __future__ import annotations

import torch

from fxforge.compiler.graph import call_nodes
from fxforge.compiler.ops import WEIGHTED
from fxforge.compiler.pass_manager import PassContext
from fxforge.compiler.trace import trace
from fxforge.passes.analysis.channel_groups import ChannelGroups
from fxforge.passes.lib.channel_surgery import zero_groups


def zero_random_groups(model: torch.nn.Module, example: tuple, share: float, seed: int = 0) -> int:
    """Zero a random ``share`` of the prunable channel groups of ``model`` in place (producer weight rows and
    biases, BN γ and β), so that those channels are exactly 0; returns how many conv/linear output channels
    were zeroed."""
    gm, sig = trace(model, example)
    ctx = PassContext(tuple(sig.flatten(example)))
    cg = ctx.analysis(ChannelGroups, gm)
    groups = cg.prunable()
    g = torch.Generator().manual_seed(seed)
    chosen = [groups[i] for i in torch.randperm(len(groups), generator=g)[:round(share * len(groups))].tolist()]
    zero_groups(gm, cg, chosen)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in gm.state_dict().items():
            if name in state:
                state[name].copy_(t)
    ids = torch.tensor([i for grp in chosen for i in grp.ids])
    return sum(int((~cg.map(n).keep(ids)).sum()) for n in call_nodes(gm, *WEIGHTED))
