"""The static int8 plan: which tensors get a Q/DQ pair, which share one grid, what a refusal leaves float."""
from collections import Counter

import torch
from torch import nn

import fxforge
from fxforge.compiler.analysis import Shapes
from fxforge.compiler.pass_manager import PassContext
from fxforge.passes.analysis.quant_plan import plan_static


class Net(nn.Module):
    """conv → relu → maxpool → conv, the two branches joined by cat, then a skipped linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 2)

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.relu(self.a(x)), 2)
        return self.head(torch.cat([y, self.b(y)], 1).flatten(1))


def _plan(refuse=()):
    gm, _ = fxforge.trace(Net().eval(), (torch.randn(1, 3, 8, 8),))
    shapes = PassContext(example_inputs=(torch.randn(1, 3, 8, 8),)).analysis(Shapes, gm)
    is_float = lambda n: n.name in shapes and shapes[n.name].dtype.is_floating_point
    stats = Counter()
    plan, weighted = plan_static(gm, is_float, lambda node: "by_name" if node.name in refuse else None, stats)
    return {n.name: g for n, g in plan.items()}, [n.name for n in weighted], stats


def test_relu_and_maxpool_outputs_share_the_conv_grid_and_cat_joins_its_inputs():
    plan, weighted, stats = _plan(refuse=("linear",))
    assert weighted == ["conv2d", "conv2d_1"]
    assert "relu" in plan and "conv2d" not in plan  # the conv's output is read after its relu
    assert plan["max_pool2d"] == plan["relu"]  # no requantization at the pool
    assert plan["cat"] == plan["max_pool2d"] == plan["relu"] == plan["conv2d_1"]  # one grid across the cat
    assert "x" in plan and plan["x"] != plan["cat"]
    assert stats == Counter({"quantized.conv2d": 2, "skipped.by_name": 1})


def test_a_refused_head_reads_float_and_gets_no_weight_pair():
    plan, weighted, _ = _plan(refuse=("linear",))
    assert "linear" not in weighted and "linear" not in plan
    plan, weighted, stats = _plan()
    assert weighted[-1] == "linear" and stats["quantized.linear"] == 1
