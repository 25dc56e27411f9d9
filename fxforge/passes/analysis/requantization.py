"""What a requantization Q₂(DQ₁(q₁)) does to each integer q₁: its table T = Q₂(DQ₁(q_min..q_max)), computed with the
chain's own ops, so what fold_qdq decides from it (a round trip to drop, a lookup to insert) is exact by
construction. Pure: nothing here changes the graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.compiler.ops import DQ_PER_TENSOR, Q_PER_TENSOR, data, is_op, q_params


def requantization_table(q: fx.Node) -> torch.Tensor | None:
    """For Q₂(DQ₁(q₁)) on per-tensor 8-bit grids with constant parameters: Q₂(DQ₁(c)) for every code c of grid 1,
    computed with the two ops themselves. None for any other Q node."""
    dq1 = data(q)
    if not (is_op(q, Q_PER_TENSOR) and is_op(dq1, DQ_PER_TENSOR) and is_op(data(dq1), Q_PER_TENSOR)):
        return None
    grids = [q_params(n) for n in (q, dq1, data(dq1))]
    if not all(isinstance(a, (int, float, torch.dtype)) for g in grids for a in g.args()):
        return None  # scales held in tensors: not known at compile time
    if q.kwargs or dq1.kwargs or data(dq1).kwargs:
        return None  # e.g. a DQ with out_dtype=bfloat16: its values are not the float32 ones the table assumes
    if not all(g.dtype in (torch.uint8, torch.int8) for g in grids):
        return None
    return Q_PER_TENSOR(DQ_PER_TENSOR(codes(data(dq1)), *grids[1].args()), *grids[0].args())


def codes(q: fx.Node) -> torch.Tensor:
    """Every integer a per-tensor Q node produces, quant_min to quant_max, in its dtype."""
    grid = q_params(q)
    return torch.arange(grid.quant_min, grid.quant_max + 1, dtype=torch.int32).to(grid.dtype)


def is_identity(q: fx.Node, table: torch.Tensor) -> bool:
    """Q₂(DQ₁(q₁)) gives back q₁ itself: the table of ``q`` (Q₂) maps every code of grid 1 to itself."""
    grid1 = codes(data(data(q)))
    return table.dtype == grid1.dtype and torch.equal(table, grid1)


def coarser_round_trip(q: fx.Node, table: torch.Tensor) -> bool:
    """DQ₂(Q₂(DQ₁(q₁))) gives back every value DQ₁ produces (a finer or wider grid 2)."""
    dq1, grid = data(q), q_params(q).args()
    if not q.users or not all(is_op(u, DQ_PER_TENSOR) and q_params(u).args() == grid and not u.kwargs
                              for u in q.users):
        return False
    return torch.equal(DQ_PER_TENSOR(table, *grid), DQ_PER_TENSOR(codes(data(dq1)), *q_params(dq1).args()))
