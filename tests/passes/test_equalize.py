"""equalize: exact cross-layer equalization of conv/linear pairs, chains, and the pairs it must leave alone."""
import pytest
import torch
from torch import nn

from fxforge.compiler.graph import get_tensor
from models import ZOO
from pipeline import apply, count, error_vs_eager


def _spread(model):
    """Give each layer's output channels very different ranges (what BN folding does to trained weights)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.logspace(-2, 1, m.weight.shape[0]).reshape(-1, *[1] * (m.weight.dim() - 1)))
    return model.eval()


def weights(gm):
    return [get_tensor(gm, n.args[1]) for n in gm.graph.nodes if n.op == "call_function" and len(n.args) > 1
            and get_tensor(gm, n.args[1]) is not None]


def test_conv_relu_conv_before_expected():
    model = _spread(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)))
    w_a, b_a, w_b = (t.detach().double() for t in (model[0].weight, model[0].bias, model[2].weight))
    r_a, r_b = w_a.abs().flatten(1).amax(1), w_b.abs().transpose(0, 1).flatten(1).amax(1)
    s = (r_a / r_b).sqrt()  # expected: W_A[i] / s_i, b_A[i] / s_i, W_B[:, i] · s_i
    gm, report, flat = apply(model, (torch.randn(2, 3, 9, 9),), ["equalize"])
    assert [n.target.overloadpacket.__name__ for n in gm.graph.nodes if n.op == "call_function"] == \
        ["conv2d", "relu", "conv2d"]
    new_a, new_b = weights(gm)
    new_bias = [get_tensor(gm, n.args[2]) for n in gm.graph.nodes if n.name == "conv2d"][0]
    torch.testing.assert_close(new_a.double(), w_a / s.reshape(-1, 1, 1, 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(new_bias.double(), b_a / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(new_b.double(), w_b * s.reshape(1, -1, 1, 1), rtol=1e-6, atol=0)
    balanced = (r_a * r_b).sqrt()  # both layers' channel ranges become sqrt(r_A · r_B)
    torch.testing.assert_close(new_a.abs().flatten(1).amax(1).double(), balanced, rtol=1e-6, atol=0)
    torch.testing.assert_close(new_b.abs().transpose(0, 1).flatten(1).amax(1).double(), balanced, rtol=1e-6, atol=0)
    assert report.row("equalize").stats == {"pairs": 1, "sweeps": 2, "depthwise_pairs": 0}
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 6, 1)),  # depthwise → pointwise
    nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, padding=1, groups=8)),  # pointwise → depthwise (×2)
    nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2)),  # grouped second layer
], ids=["dw-pw", "pw-dw", "grouped"])
def test_depthwise_and_grouped_pairs_are_balanced_and_exact(model):
    model = _spread(model)
    x = torch.randn(2, model[0].in_channels, 9, 9)
    gm, report, flat = apply(model, (x,), ["equalize"])
    stats = report.row("equalize").stats
    assert stats["pairs"] == 1 and stats["depthwise_pairs"] == int(model[-1].groups > 1 or model[0].groups > 1)
    a, b = weights(gm)
    g = model[-1].groups
    r_a = a.abs().flatten(1).amax(1)
    r_b = b.reshape(g, b.shape[0] // g, *b.shape[1:]).abs().transpose(1, 2).flatten(2).amax(2).flatten()
    torch.testing.assert_close(r_a, r_b, rtol=1e-5, atol=0)
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_chain_sweeps_until_ranges_settle():
    model = _spread(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.ReLU(), nn.Conv2d(8, 6, 1)))
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["equalize"])
    stats = report.row("equalize").stats
    assert stats["pairs"] == 2 and 2 < stats["sweeps"] < 50  # the middle layer is rescaled by both pairs
    first, middle, last = weights(gm)
    ranges = [first.abs().flatten(1).amax(1), middle.abs().flatten(1).amax(1), last.abs().amax(0).flatten()]
    torch.testing.assert_close(ranges[0], ranges[1], rtol=2e-3, atol=0)
    torch.testing.assert_close(ranges[1], ranges[2], rtol=2e-3, atol=0)
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_linear_pair_on_a_sequence_input():
    model = _spread(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    gm, report, flat = apply(model, (torch.randn(2, 5, 6),), ["equalize"])
    assert report.row("equalize").stats["pairs"] == 1
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


class Branch(nn.Module):
    """The first conv's output feeds the second conv and a residual add: scaling it would change the add."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) + y


@pytest.mark.parametrize("model, stats", [
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1)), {"skipped.clipping_activation": 1}),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardtanh(-1.0, 1.0), nn.Conv2d(4, 4, 1)), {"skipped.clipping_activation": 1}),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1)), {}),
    (Branch(), {}),
], ids=["relu6", "hardtanh", "silu", "branch"])
def test_pairs_that_scaling_would_change_are_left_alone(model, stats):
    model = _spread(model)
    gm, report, flat = apply(model, (torch.randn(2, 3 if not isinstance(model, Branch) else 4, 6, 6),), ["equalize"])
    assert report.row("equalize").stats == stats
    before = [p for p in model.parameters() if p.dim() > 1]
    assert all(torch.equal(a, b) for a, b in zip(weights(gm), before))


@pytest.mark.parametrize("name", ["convbnrelu", pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                                  pytest.param("resnet18", marks=pytest.mark.slow)])
def test_zoo_after_fuse_is_exact(name):
    model, example = ZOO[name]()
    gm, report, flat = apply(model, example, ["fuse", "equalize"])
    assert count(gm, "conv2d") == count(apply(model, example, ["fuse"])[0], "conv2d")
    assert report.row("equalize").max_rel_err < 1e-4
    assert error_vs_eager(gm, model, flat).max_rel < 1e-4


def test_relu6_pair_with_rescaled_clip_before_expected():
    """clip="rescale": hardtanh(y, 0, 6) between the layers becomes clamp(y', 0, 6/s) per channel: exact."""
    model = _spread(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 5, 3)))
    w_a, w_b = model[0].weight.detach().double(), model[2].weight.detach().double()
    s = (w_a.abs().flatten(1).amax(1) / w_b.abs().transpose(0, 1).flatten(1).amax(1)).sqrt()
    x = 4 * torch.randn(2, 3, 9, 9)  # large enough that the clip at 6 is hit
    gm, report, flat = apply(model, (x,), ["equalize{clip='rescale'}"])
    assert [n.target.overloadpacket.__name__ for n in gm.graph.nodes if n.op == "call_function"] == \
        ["conv2d", "clamp", "conv2d"]
    clamp = next(n for n in gm.graph.nodes if n.op == "call_function" and "clamp" in str(n.target))
    floor, ceiling = get_tensor(gm, clamp.args[1]), get_tensor(gm, clamp.args[2])
    torch.testing.assert_close(ceiling.double().flatten(), 6 / s, rtol=1e-6, atol=0)
    assert ceiling.shape == (4, 1, 1) and not floor.any()
    assert report.row("equalize").stats == {"clips_rescaled": 1, "pairs": 1, "sweeps": 2, "depthwise_pairs": 0}
    assert (model[1](model[0](x)) == 6).any()
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5
    for seed in range(3):
        fresh = 4 * torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(seed))
        out = gm(fresh)
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, model(fresh), rtol=1e-5, atol=1e-5)


def test_relu6_chain_with_rescaled_clips_is_exact():
    """A MobileNetV2 block (expand → relu6 → depthwise → relu6 → project): both clips carry the product of their
    channels' scales over the sweeps."""
    model = _spread(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.ReLU6(), nn.Conv2d(8, 6, 1)))
    gm, report, flat = apply(model, (4 * torch.randn(2, 3, 8, 8),), ["equalize{clip='rescale'}"])
    stats = report.row("equalize").stats
    assert stats["pairs"] == 2 and stats["clips_rescaled"] == 2
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_insert_qdq_quantizes_the_rescaled_clip_output():
    """The tensor an int8 kernel emits is the per-channel clamp's output: its Q/DQ pair goes after the clamp."""
    model = _spread(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1)))
    gm, _, _ = apply(model, (torch.randn(2, 3, 6, 6),), ["equalize{clip='rescale'}", "insert_qdq"])
    clamp = next(n for n in gm.graph.nodes if n.op == "call_function" and "clamp" in str(n.target))
    assert [u.target.__name__ for u in clamp.users] == ["quantize_per_tensor.default"]
    assert "quantize_per_tensor" not in str(clamp.args[0].target)
