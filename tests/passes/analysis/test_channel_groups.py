"""channel_groups: which channels are coupled (residual add, concat, split, shuffle, grouped convs,
flatten → linear) and where the analysis stops honestly."""
import pytest
import torch
from torch import nn

from fxforge.compiler.graph import aten, call_nodes
from fxforge.compiler.pass_manager import PassContext
from fxforge.compiler.trace import trace
from fxforge.passes.analysis.channel_groups import ChannelGroups
from models import ZOO, zoo_params


def analyse(model, *example):
    gm, sig = trace(model.eval(), example)
    ctx = PassContext(tuple(sig.flatten(example)))
    return gm, ctx.analysis(ChannelGroups, gm)


def convs(gm):
    return list(call_nodes(gm, aten.conv2d))


def group_ids(cg, node):
    """The group index of every channel position of ``node``'s output."""
    return [cg.group_of[i] for i in cg.map(node).ids.flatten().tolist()]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.head(torch.relu(self.b(y) + y))


def test_residual_add_couples_both_producers():
    gm, cg = analyse(Residual(), torch.randn(2, 3, 8, 8))
    a, b, head = convs(gm)
    assert group_ids(cg, a) == group_ids(cg, b)               # channel k of a and of b go together
    assert len(set(group_ids(cg, a))) == 4
    assert {cg.groups[g].reason for g in group_ids(cg, head)} == {"model_output"}
    assert cg.stats == {"groups": 6, "prunable": 4, "unprunable.model_output": 2}


class Dense(nn.Module):
    """DenseNet style: each layer reads the concat of everything before it."""

    def __init__(self):
        super().__init__()
        self.stem, self.l1, self.l2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(7, 2, 1)
        self.head = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.l1(x))], 1)
        x = torch.cat([x, torch.relu(self.l2(x))], 1)
        return self.head(x)


def test_concat_places_each_input_at_its_offset():
    gm, cg = analyse(Dense(), torch.randn(2, 3, 8, 8))
    stem, l1, l2, head = convs(gm)
    cat2 = list(call_nodes(gm, aten.cat))[1]
    assert cg.map(cat2).ids.tolist() == [*cg.map(stem).ids.tolist(), *cg.map(l1).ids.tolist(), *cg.map(l2).ids.tolist()]
    assert len(cg.prunable()) == 9  # nothing couples across the concat: every channel is its own group


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.dw = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 3, groups=2), nn.Conv2d(4, 4, 3, groups=4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.dw(self.g(self.a(x))))


def test_grouped_conv_couples_the_same_channel_of_every_group_and_depthwise_couples_in_with_out():
    gm, cg = analyse(Grouped(), torch.randn(2, 3, 9, 9))
    a, g, dw, _ = convs(gm)
    ga, gg, gdw = group_ids(cg, a), group_ids(cg, g), group_ids(cg, dw)
    assert ga[:4] == ga[4:] and len(set(ga)) == 4            # input channel i of group 0 ~ of group 1
    assert gg[:2] == gg[2:] and len(set(gg)) == 2            # output channel o of group 0 ~ of group 1
    assert gdw == gg                                         # depthwise: output j goes with input j


class Shuffle(nn.Module):
    """ShuffleNet V2 unit: split, a branch, concat, channel shuffle (view-transpose-view)."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([a, torch.relu(self.branch(b))], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(y)


def test_split_and_channel_shuffle_are_followed():
    gm, cg = analyse(Shuffle(), torch.randn(2, 3, 8, 8))
    stem, branch, head = convs(gm)
    stem_ids, branch_ids = cg.map(stem).ids.tolist(), cg.map(branch).ids.tolist()
    shuffled = cg.map(head.args[0]).ids.tolist()
    assert shuffled == [i for pair in zip(stem_ids[:4], branch_ids) for i in pair]  # interleaved
    # the shuffle stays rectangular only if channel i of both halves goes together
    assert [cg.group_of[i] for i in stem_ids[:4]] == [cg.group_of[i] for i in branch_ids]
    assert len(cg.prunable()) == 4 + 4  # 4 shuffle pairs, and the 4 channels the branch reads


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_flatten_into_linear_maps_channel_times_spatial_blocks():
    gm, cg = analyse(FlattenLinear(), torch.randn(2, 3, 4, 4))
    conv = convs(gm)[0]
    fc = next(iter(call_nodes(gm, aten.linear)))
    ids = cg.map(conv).ids.tolist()
    assert cg.map(fc.args[0]).ids.tolist() == [i for i in ids for _ in range(4)]
    assert len(cg.prunable()) == 4


class Stops(nn.Module):
    """Channels that feed attention, a cumulative sum over channels, or the output are unprunable."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.qkv = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(4, 12)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        q, k, v = self.qkv(self.ln(self.a(x).flatten(2).transpose(1, 2))).chunk(3, -1)
        att = nn.functional.scaled_dot_product_attention(q, k, v)
        return att, self.b(x).cumsum(1)


def test_unknown_ops_attention_and_outputs_stop_and_are_counted():
    gm, cg = analyse(Stops(), torch.randn(2, 3, 4, 4))
    assert cg.stats["prunable"] == 4                      # a's channels: through flatten, transpose, layer norm
    assert cg.stats["unprunable.attention"] == 12
    assert cg.stats["unprunable.op.cumsum"] == 4


class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.w = nn.Conv2d(3, 4, 1), nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        return nn.functional.linear(self.conv(x).mean((2, 3)), self.w * 2)


def test_a_weight_computed_in_the_graph_stops_its_input_channels():
    gm, cg = analyse(ComputedWeight(), torch.randn(2, 3, 4, 4))
    assert cg.stats == {"groups": 4, "prunable": 0, "unprunable.dynamic_weight": 4}


def test_pooling_interpolate_and_spatial_mean_keep_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Upsample(scale_factor=2), nn.AvgPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    gm, cg = analyse(model, torch.randn(2, 3, 9, 9))
    assert cg.stats == {"groups": 6, "prunable": 4, "unprunable.model_output": 2}


@pytest.mark.parametrize("name", [p if p.values[0] in ("convbnrelu", "mlp", "bert") else
                                  pytest.param(*p.values, marks=pytest.mark.slow) for p in zoo_params()])
def test_every_zoo_model_is_analysed(name):  # the CNNs of the fast subset are analysed by the pass tests
    model, example = ZOO[name]()
    gm, cg = analyse(model, *example)
    assert cg.stats["groups"] == len(cg.groups) == cg.stats["prunable"] + sum(
        v for k, v in cg.stats.items() if k.startswith("unprunable."))
    assert all(cg.map(n) is not None for n in convs(gm))
