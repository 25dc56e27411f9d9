"""fuse_activation: tags conv/linear+activation and conv+add+relu groups without changing any value."""
import pytest
import torch
from torch import nn

from fxforge.compiler.graph import fusion_groups
from models import ZOO
from pipeline import apply, error_vs_eager


@pytest.mark.parametrize("act, pattern", [
    (nn.ReLU(), "conv2d+relu"), (nn.ReLU6(), "conv2d+hardtanh"), (nn.SiLU(), "conv2d+silu"),
    (nn.GELU(), "conv2d+gelu"), (nn.Hardswish(), "conv2d+hardswish"),
])
def test_conv_activation_is_one_group(act, pattern):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act).eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["fuse_activation"])
    groups = list(fusion_groups(gm).values())
    assert len(groups) == 1 and len(groups[0]) == 2
    assert report.row("fuse_activation").stats == {pattern: 1}
    assert error_vs_eager(gm, model, flat).max_rel == 0


def test_residual_add_relu_and_linear_gelu():
    model, example = ZOO["convbnrelu"]()
    gm, report, _ = apply(model, example, ["fuse"])
    stats = report.row("fuse_activation").stats
    assert stats == {"conv2d+relu": 1, "conv2d+add+relu": 1}
    mlp, ex = ZOO["mlp"]()
    gm, report, flat = apply(mlp, ex, ["fuse"])
    assert report.row("fuse_activation").stats == {"linear+gelu": 1}
    assert error_vs_eager(gm, mlp, flat).max_rel < 1e-5


def test_producer_with_other_users_is_not_fused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y

    gm, report, _ = apply(Branchy().eval(), (torch.randn(2, 3, 8, 8),), ["fuse_activation"])
    assert not fusion_groups(gm) and report.row("fuse_activation").stats == {"skipped.producer_has_other_users": 1}


def test_resnet18_groups():
    model, example = ZOO["resnet18"]()
    gm, report, flat = apply(model, example, ["fuse"])
    stats = report.row("fuse_activation").stats
    assert stats["conv2d+relu"] == 9 and stats["conv2d+add+relu"] == 8
    assert error_vs_eager(gm, model, flat).max_rel < 1e-4


@pytest.mark.parametrize("act, name", [(torch.nn.functional.relu6, "relu6"), (nn.ReLU6(), "hardtanh")],
                         ids=["F.relu6", "nn.ReLU6"])
def test_before_expected_both_relu6_forms(act, name):
    """F.relu6 traces to aten.relu6, nn.ReLU6 to aten.hardtanh(x, 0, 6): both fuse with the conv."""
    from fxforge.compiler.graph import FUSION_KEY
    from fxforge.compiler.pass_manager import PassContext
    from fxforge.passes.fuse_activation import FuseActivation
    from graphs import assert_same_graph, traced

    class Before(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return act(self.conv(x))

    x = torch.randn(2, 3, 8, 8)
    gm, expected = traced(Before(), x), traced(Before(), x)
    conv, relu6 = [n for n in expected.graph.nodes if n.op == "call_function"]
    for n in (conv, relu6):
        n.meta[FUSION_KEY] = {"group": "g", "pattern": f"conv2d+{name}"}
    assert FuseActivation().run(gm, PassContext((x,))).stats == {f"conv2d+{name}": 1}
    assert_same_graph(gm, expected, meta_key=FUSION_KEY)


def test_before_expected_residual_takes_the_earlier_producer():
    """relu(conv_a(x) + conv_b(x)): one group, with the producer computed first."""
    from fxforge.compiler.graph import FUSION_KEY
    from fxforge.compiler.pass_manager import PassContext
    from fxforge.passes.fuse_activation import FuseActivation
    from graphs import assert_same_graph, traced

    class Before(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            a = self.a(x)
            return torch.relu(self.b(x) + a)

    x = torch.randn(2, 3, 8, 8)
    gm, expected = traced(Before(), x), traced(Before(), x)
    conv_a, _, add, relu = [n for n in expected.graph.nodes if n.op == "call_function"]
    for n in (conv_a, add, relu):
        n.meta[FUSION_KEY] = {"group": "g", "pattern": "conv2d+add+relu"}
    assert FuseActivation().run(gm, PassContext((x,))).stats == {"conv2d+add+relu": 1}
    assert_same_graph(gm, expected, meta_key=FUSION_KEY)
