"""fuse_batchnorm: exact folding of inference BN into conv1d/2d/3d and linear, and its refusals."""
import pytest
import torch
from torch import nn

from models import ZOO, zoo_params
from pipeline import apply, count, error_vs_eager

BN_OPS = ("batch_norm", "_native_batch_norm_legit_no_training")


def _randomized(model):
    from models import _randomize_bn
    _randomize_bn(model)
    return model.eval()


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 8, 3, padding=1),
    nn.Conv2d(4, 8, 3, padding=1, bias=False),
    nn.Conv2d(8, 8, 3, padding=1, groups=8),          # depthwise
    nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False),  # grouped
    nn.Conv2d(4, 8, 1, dilation=2),
], ids=["bias", "nobias", "depthwise", "grouped", "pointwise"])
def test_conv2d_bn_folds_exactly(conv):
    model = _randomized(nn.Sequential(conv, nn.BatchNorm2d(8)))
    x = torch.randn(2, conv.in_channels, 9, 9)
    gm, report, flat = apply(model, (x,), ["fuse_batchnorm"])
    assert count(gm, *BN_OPS) == 0 and report.row("fuse_batchnorm").stats == {"folded": 1}
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


@pytest.mark.parametrize("model, shape", [
    (nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 10)),
    (nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    (nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5)),
], ids=["conv1d", "conv3d", "linear"])
def test_other_producers_fold_exactly(model, shape):
    model = _randomized(model)
    gm, _, flat = apply(model, (torch.randn(*shape),), ["fuse_batchnorm"])
    assert count(gm, *BN_OPS) == 0
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


class SharedConvOutput(nn.Module):
    """The conv's output feeds the BN and a second branch: folding would change the branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class PreActivation(nn.Module):
    """BN first (DenseNet style): no conv produces its input."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


@pytest.mark.parametrize("cls, reason", [(SharedConvOutput, "skipped.input_has_other_users"),
                                         (PreActivation, "skipped.no_conv_producer")])
def test_unfoldable_batchnorm_is_left_and_counted(cls, reason):
    model = _randomized(cls())
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["fuse_batchnorm"])
    assert count(gm, *BN_OPS) == 1 and report.row("fuse_batchnorm").stats == {reason: 1}
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_resnet18_has_no_batchnorm_left():
    model, example = ZOO["resnet18"]()
    gm, report, flat = apply(model, example, ["fuse"])
    assert count(gm, *BN_OPS) == 0 and report.row("fuse_batchnorm").stats["folded"] == 20
    assert count(gm, "conv2d") == 20
    assert report.row("fuse_batchnorm").params < report.row("input").params


@pytest.mark.parametrize("name", zoo_params())
def test_fuse_preset_on_the_zoo_is_exact(name):
    model, example = ZOO[name]()
    gm, report, flat = apply(model, example, ["fuse"])
    assert all(r.max_rel_err < 1e-4 for r in report.rows)
    inputs_err = error_vs_eager(gm, model, flat) if len(example) == 1 else None
    assert inputs_err is None or inputs_err.max_rel < 1e-4


def test_before_expected():
    """conv2d(x, W) → BN  ≡  conv2d(x, s·W, s·(0 − μ) + β), s = γ/√(σ²+ε)."""
    from torch.nn import functional as F

    from fxforge.compiler.graph import get_tensor
    from fxforge.compiler.pass_manager import PassContext
    from fxforge.passes.fuse_batchnorm import FuseBatchNorm
    from graphs import assert_same_graph, traced

    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    before = _randomized(nn.Sequential(conv, bn))
    x = torch.randn(2, 3, 8, 8)
    gm = traced(before, x)
    assert FuseBatchNorm().run(gm, PassContext((x,))).stats == {"folded": 1}
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    w, b = conv.weight.detach() * s.reshape(-1, 1, 1, 1), (bn.bias - bn.running_mean * s).detach()

    class Expected(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(w), nn.Parameter(b)

        def forward(self, x):
            return F.conv2d(x, self.w, self.b)

    assert_same_graph(gm, traced(Expected(), x))
    conv_node = next(n for n in gm.graph.nodes if n.op == "call_function")
    folded_w, folded_b = (get_tensor(gm, a) for a in conv_node.args[1:])
    assert torch.allclose(folded_w, w, rtol=1e-6) and torch.allclose(folded_b, b, rtol=1e-6, atol=1e-7)
