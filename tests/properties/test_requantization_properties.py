"""fold_qdq on random requantization chains Q₁→DQ₁→Q₂→DQ₂: the same integers, whichever rewrite it picks.

Grids are drawn at random (scale, zero point, 8-bit dtype, a possibly narrower [quant_min, quant_max]); the
input holds every value of grid 1, so "same integers" is checked on the whole requantization table, not
on a sample.
"""
import torch
import torch.fx as fx
from hypothesis import event, given
from hypothesis import strategies as st

from fxforge.compiler.pass_manager import PassContext
from fxforge.passes.fold_qdq import FoldQdq
from fxforge.passes.lib.qdq import qd


@st.composite
def grids(draw):
    dtype = draw(st.sampled_from([torch.uint8, torch.int8]))
    info = torch.iinfo(dtype)
    lo = draw(st.integers(info.min, info.max - 15))
    hi = draw(st.integers(lo + 15, info.max))
    scale = draw(st.sampled_from([0.01, 0.02, 0.05, 0.1, 0.2])) * draw(st.sampled_from([1.0, 0.5, 1.5, 3.0]))
    return scale, draw(st.integers(lo, hi)), lo, hi, dtype


class Chain(torch.nn.Module):
    def __init__(self, first, second) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        y = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *self.first), *self.first)
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(y, *self.second), *self.second)


@given(first=grids(), second=grids())
def test_folded_chain_gives_the_same_integers(first, second):
    model = Chain(first, second)
    reach = 1.1 * max(abs(g[0]) * (abs(g[2] - g[1]) + abs(g[3] - g[1])) for g in (first, second))
    x = torch.cat([torch.linspace(-reach, reach, 40001), _ties(first, second)])
    gm = torch.export.export(model, (x,)).module()
    gm = fx.GraphModule(gm, gm.graph)
    stats = FoldQdq().run(gm, PassContext((x,))).stats
    gm.recompile()
    event("removed" if stats["requantizations_removed"] else "merged")
    assert stats["requantizations_removed"] + stats["requantizations_merged"] == 1
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def _ties(first, second) -> torch.Tensor:
    """Every value of grid 1 (so every code of Q₁ is hit) and the midpoints of grid 2 next to them."""
    s1, z1, lo, hi, _ = first
    s2, z2 = second[:2]
    values = (torch.arange(lo, hi + 1, dtype=torch.float32) - z1) * s1
    halfway = (torch.floor(values / s2) + 0.5) * s2
    return torch.cat([values, halfway])
