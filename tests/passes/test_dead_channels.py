"""dead_channels: exact removal of constant and unread channel groups, the padding border, and the zoo."""
import pytest
import torch
from torch import nn

import fxforge
from channels import zero_random_groups
from models import ZOO, _randomize_bn, zoo_params
from pipeline import apply, error_vs_eager

from fxforge.compiler.graph import aten, call_nodes, get_tensor


def conv_shapes(gm):
    return [tuple(get_tensor(gm, n.args[1]).shape) for n in call_nodes(gm, aten.conv2d)]


class TwoConvs(nn.Module):
    def __init__(self, pad=1, relu=True, k=3):
        super().__init__()
        self.c1, self.c2, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, k, padding=pad), relu

    def forward(self, x):
        y = self.c1(x)
        return self.c2(torch.relu(y) if self.relu else y)


def two_convs(bias, **kw):
    """TwoConvs whose c1 channel 2 is the constant ``bias`` (zero weight row)."""
    model = TwoConvs(**kw).eval()
    with torch.no_grad():
        model.c1.weight[2] = 0
        model.c1.bias[2] = bias
    return model


def test_constant_channel_is_removed_and_folded_into_the_consumer_bias():
    model = two_convs(2.0, pad=0, relu=False, k=1)
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    assert conv_shapes(gm) == [(7, 3, 3, 3), (6, 7, 1, 1)]
    expected_bias = model.c2.bias + 2.0 * model.c2.weight[:, 2, 0, 0]
    c2 = list(call_nodes(gm, aten.conv2d))[1]
    torch.testing.assert_close(get_tensor(gm, c2.args[2]), expected_bias)
    assert report.row("dead_channels").stats["channels_removed"] == 1
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


@pytest.mark.parametrize("bias, relu, removed", [(-1.0, True, True),    # ReLU makes it 0: no border effect
                                                 (2.0, True, False),    # constant 2 under zero padding
                                                 (2.0, False, False)])
def test_padding_border_constant_is_skipped_unless_zero(bias, relu, removed):
    model = two_convs(bias, pad=1, relu=relu)
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    stats = report.row("dead_channels").stats
    assert conv_shapes(gm)[0][0] == (7 if removed else 8)
    assert ("skipped.padding_border" in stats) == (not removed)
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


class BnChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_batchnorm_with_zero_gamma_gives_its_beta():
    model = BnChain().eval()
    _randomize_bn(model)
    with torch.no_grad():
        model.bn.weight[[1, 4]] = 0
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    assert conv_shapes(gm) == [(4, 3, 3, 3), (4, 4, 1, 1)]
    bn = next(iter(call_nodes(gm, aten._native_batch_norm_legit_no_training)))
    assert get_tensor(gm, bn.args[1]).shape == (4,)
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_channel_no_consumer_reads_is_removed():
    model = TwoConvs().eval()
    with torch.no_grad():
        model.c2.weight[:, 5] = 0  # c1's channel 5 varies, but c2 ignores it
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    assert conv_shapes(gm) == [(7, 3, 3, 3), (6, 7, 3, 3)]
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_live_channels_and_model_outputs_are_left_alone():
    model = TwoConvs().eval()
    with torch.no_grad():
        model.c2.weight[3] = 0  # an output channel: constant, but the model's output keeps its shape
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    row = report.row("dead_channels")
    assert conv_shapes(gm) == [(8, 3, 3, 3), (6, 8, 3, 3)]
    assert row.stats == {"skipped.unprunable.model_output": 6} and row.params == report.row("input").params


class LinearOverWidth(nn.Module):
    """A linear applied over the width of a conv output: it reads no channels, so the analysis stops there."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv(x))


def test_channels_read_in_a_layout_the_analysis_does_not_map_are_kept():
    model = LinearOverWidth().eval()
    with torch.no_grad():
        model.conv.weight[1] = 0
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    assert report.row("dead_channels").stats == {"skipped.unprunable.linear_input_layout": 4,
                                                 "skipped.unprunable.model_output": 2}
    assert conv_shapes(gm) == [(4, 3, 1, 1)]


class DenseBlock(nn.Module):
    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(8 + i * growth), nn.ReLU(), nn.Conv2d(8 + i * growth, growth, 3, padding=1))
            for i in range(3))
        self.head = nn.Sequential(nn.BatchNorm2d(8 + 3 * growth), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8 + 3 * growth, 5))

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.head(x)


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.g = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.dw(self.g(self.a(x))))


@pytest.mark.parametrize("cls", [DenseBlock, GroupedNet], ids=["densenet_concat", "grouped_convs"])
def test_zeroed_groups_through_concat_and_grouped_convs_are_removed_exactly(cls):
    model = cls().eval()
    _randomize_bn(model)
    example = (torch.randn(2, 3, 8, 8),)
    zeroed = zero_random_groups(model, example, 0.4)
    gm, report, flat = apply(model, example, ["dead_channels"])
    assert report.row("dead_channels").stats["channels_removed"] == zeroed > 0
    assert report.row("dead_channels").params < report.row("input").params
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_grouped_conv_keeps_equal_groups():
    model = GroupedNet().eval()
    with torch.no_grad():  # channel 1 of every group of the grouped conv's input, and its depthwise output 5
        for c in (1, 5, 9, 13):
            model.a[0].weight[c] = 0
            model.a[0].bias[c] = 0
            model.a[1].weight[c] = model.a[1].bias[c] = 0
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    assert conv_shapes(gm) == [(12, 3, 1, 1), (16, 3, 3, 3), (16, 1, 3, 3), (4, 16, 1, 1)]
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


@pytest.mark.parametrize("name", zoo_params())
def test_zoo_model_with_30_percent_of_groups_zeroed_shrinks_exactly(name):
    model, example = ZOO[name]()
    zeroed = zero_random_groups(model, example, 0.3)
    compiled = fxforge.compile(model, example, passes=["fuse", "dead_channels"], measure_latency=False)
    before, after = compiled.report.row("fuse_batchnorm"), compiled.report.row("dead_channels")
    assert after.stats.get("channels_removed", 0) == zeroed
    if name in ("resnet18", "mobilenet_v2"):
        # 30 % of the channels leave each conv's outputs and its consumers' inputs: ≈ 1 − 0.7² of the weights
        assert 0.4 < 1 - after.params / before.params < 0.6 and after.flops < 0.6 * before.flops
    assert error_vs_eager(compiled.graph_module, model, example).max_rel < 1e-5


def test_a_conv_keeps_one_channel_when_all_of_its_channels_are_dead():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 2)).eval()
    nn.init.zeros_(model[0].weight)  # every channel of both convs is constant (the second's: its bias);
    gm, report, flat = apply(model, (torch.randn(2, 1, 4, 4),), ["dead_channels"])  # a conv needs one
    assert report.row("dead_channels").stats["skipped.last_conv_channel"] == 2
    assert all(shape[0] >= 1 for shape in conv_shapes(gm)) and error_vs_eager(gm, model, flat).max_rel <= 1e-6


class ClampedByInput(nn.Module):
    """A constant channel (zero weight row, bias 5) clamped by a bound computed from the input."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.c1.weight[0], self.c1.bias[0] = 0.0, 5.0

    def forward(self, x):
        return self.c2(torch.clamp(self.c1(x), max=x.abs().amax(dim=(1, 2, 3), keepdim=True) * 100))


class PowOfChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (2 ** self.c1(x)).sum(1)


class TimesBatchSize(ClampedByInput):
    def forward(self, x):
        return self.c2(self.c1(x) * x.shape[0])


@pytest.mark.parametrize("cls", [ClampedByInput, PowOfChannels])
def test_an_op_reading_a_second_tensor_keeps_the_channels_it_reads(cls):
    """Mapped by its first argument alone, a clamp bounded by another tensor passed the constant 5 through (folded,
    wrong wherever the bound is below 5), and ``2 ** y`` left y's channels unread (all but one removed)."""
    model = cls().eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    assert report.row("dead_channels").stats["skipped.unprunable.reads_second_tensor"] == 4
    for x in (torch.zeros(2, 3, 8, 8), torch.randn(3, 3, 8, 8) * 0.01):
        with torch.no_grad():
            torch.testing.assert_close(gm(x)[0], model(x))


def test_a_channel_times_the_batch_size_is_not_a_constant():
    """The example's batch size was folded into the next conv's bias: other batch sizes were 0.2–0.66 off."""
    model = TimesBatchSize().eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["dead_channels"])
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(gm(x)[0], model(x))
