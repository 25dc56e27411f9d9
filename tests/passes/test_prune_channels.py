"""prune_channels: which groups go (L1/L2/BN γ, per layer or global, rounded), the result against the
zeroed model, accuracy on digits at 50 % FLOPs removed, and the zoo."""
import math
from collections import Counter

import pytest
import torch
from torch import nn

from fxforge.compiler.errors import CalibrationError, PassError
from fxforge.compiler.analysis import Flops
from fxforge.compiler.graph import aten, call_nodes, get_tensor
from fxforge.compiler.pass_manager import PassContext, resolve
from fxforge.compiler.trace import trace
from fxforge.passes import DeadChannels, PruneChannels
from fxforge.passes.analysis.channel_groups import ChannelGroups
from fxforge.passes.analysis.channel_importance import ChannelImportance
from fxforge.passes.lib.channel_surgery import zero_groups
from fxforge.passes.lib import goals, pruning
from fxforge.passes.lib.pruning import flops_left
from models import ZOO, _randomize_bn, accuracy, digits_cnn, zoo_params
from pipeline import apply, error_vs_eager


def weights(gm, op=aten.conv2d):
    return [get_tensor(gm, n.args[1]) for n in call_nodes(gm, op)]


class TwoConvs(nn.Module):
    def __init__(self, bn=False):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.Conv2d(16, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(16) if bn else nn.Identity()

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_lowest_l1_rows_go_and_the_rest_is_the_zeroed_model():
    model = TwoConvs().eval()
    with torch.no_grad():  # rows of L1 norm 3, 9, 1, ...
        w = model.c1.weight
        w.div_(w.abs().sum((1, 2, 3), keepdim=True))
        w.mul_(torch.tensor([3, 9, 1, 12, 5, 16, 2, 8, 4, 15, 6, 11, 7, 13, 10, 14.0]).view(-1, 1, 1, 1))
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), [PruneChannels(ratio=0.5, round_to=8)])
    kept = [1, 3, 5, 9, 11, 13, 14, 15]  # the 8 largest scales
    w1, w2 = weights(gm)
    torch.testing.assert_close(w1, model.c1.weight[kept])
    torch.testing.assert_close(w2, model.c2.weight[:, kept])
    stats = report.row("prune_channels").stats
    assert stats["groups_pruned"] == stats["channels_removed"] == 8
    assert stats["flops_after"] < 0.55 * stats["flops_before"] and stats["params_after"] < stats["params_before"]
    with torch.no_grad():  # pruning = zeroing those channels in the eager model, then removing them exactly
        model.c1.weight[[i for i in range(16) if i not in kept]] = 0
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_bn_importance_ranks_by_gamma():
    model = TwoConvs(bn=True).eval()
    _randomize_bn(model)
    with torch.no_grad():
        model.bn.weight[[2, 7, 11, 12]] = 0.01
    gm, report, _ = apply(model, (torch.randn(2, 3, 8, 8),), [PruneChannels(ratio=0.25, importance="bn", round_to=4)])
    w1 = weights(gm)[0]
    assert w1.shape[0] == 12
    assert all(not any(torch.equal(w, model.c1.weight[i]) for w in w1) for i in (2, 7, 11, 12))


def test_layer_scope_prunes_each_layer_and_keeps_multiples_of_eight():
    model, example = ZOO["resnet18"]()
    gm, report, flat = apply(model, example, ["fuse_batchnorm", PruneChannels(ratio=0.3, scope="layer")])
    original = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]  # graph order
    for before, w in zip(original, weights(gm)):
        assert w.shape[0] % 8 == 0 and w.shape[0] == 8 * round(before * 0.7 / 8)
    stats = report.row("prune_channels").stats
    assert stats["params_after"] < 0.6 * stats["params_before"]
    assert report.final.max_rel_err is not None and math.isfinite(report.final.max_rel_err)


def test_ratio_zero_changes_nothing():
    model = TwoConvs().eval()
    gm, report, _ = apply(model, (torch.randn(2, 3, 8, 8),), [PruneChannels(ratio=0.0)])
    assert [w.shape for w in weights(gm)] == [(16, 3, 3, 3), (4, 16, 3, 3)]
    assert report.row("prune_channels").params == report.row("input").params


@pytest.mark.parametrize("spec", ["prune_channels{ratio=1.5}", "prune_channels{importance='l3'}",
                                  "prune_channels{round_to=0}", "prune_channels{flops=0.0}",
                                  "prune_channels{flops=1.5}"])
def test_bad_options_are_refused(spec):
    with pytest.raises(PassError, match="prune_channels"):
        resolve(spec)
    with pytest.raises(PassError, match="prune_channels"):
        PruneChannels(scope="everywhere")


class Chain(nn.Module):
    """a (4 → 16) → relu → b (16 → 16) → relu → c (16 → 4), 3×3 convs: FLOPs per pixel 576, 2304, 576."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def chain_with_faint_channels():
    """A Chain whose a-channels 8…15 are faint (rows × 1e-3): a's layer can lose half its channels unnoticed."""
    torch.manual_seed(0)
    model = Chain().eval()
    with torch.no_grad():
        model.a.weight[8:] *= 1e-3
        model.a.bias[8:] *= 1e-3
    return model


def calibration(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, 8, 8, generator=g),) for _ in range(n)]


def test_flops_goal_prunes_the_layer_cheapest_in_accuracy():
    """Before: Chain with faint a-channels. Goal 0.6 of 3456 FLOPs/pixel: halving a saves (576 + 2304)/2 = 1440.
    Expected: a keeps its 8 strong channels, b and c keep theirs; the result is the model with the faint channels
    zeroed, exactly."""
    model = chain_with_faint_channels()
    gm, report, flat = apply(model, (torch.randn(2, 4, 8, 8),), [PruneChannels(flops=0.6, round_to=4)],
                             calibration=calibration())
    stats = report.row("prune_channels").stats
    assert [k for k in stats if k.startswith("ratio.")] == ["ratio.conv2d"]  # 0.375 rounds to 8 of 16 as 0.5 does
    assert [tuple(w.shape) for w in weights(gm)] == [(8, 4, 3, 3), (16, 8, 3, 3), (4, 16, 3, 3)]
    torch.testing.assert_close(weights(gm)[0], model.a.weight[:8])
    assert stats["flops_after"] <= 0.6 * stats["flops_before"]
    with torch.no_grad():
        model.a.weight[8:] = 0
        model.a.bias[8:] = 0
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_flops_goal_is_reproducible_and_never_prunes_more_than_the_goal_needs():
    model = Chain().eval()
    runs = [apply(model, (torch.randn(2, 4, 8, 8),), [PruneChannels(flops=0.7, round_to=4)],
                  calibration=calibration())[:2] for _ in range(2)]
    (gm1, r1), (gm2, r2) = runs
    assert r1.row("prune_channels").stats == r2.row("prune_channels").stats
    assert all(torch.equal(a, b) for a, b in zip(weights(gm1), weights(gm2)))
    stats = r1.row("prune_channels").stats
    assert 0.5 * stats["flops_before"] < stats["flops_after"] <= 0.7 * stats["flops_before"]


def test_predicted_flops_are_the_pruned_graphs():
    """flops_left (k_out · k_in per conv, k_out for a depthwise conv) against the Flops of the pruned graph, on a
    net with residual coupling and depthwise convs."""
    model, example = ZOO["mobilenet_v2"]()
    for pick in (lambda key: len(key) == 2, lambda key: len(key) >= 3):  # expand + depthwise; a residual stage
        gm, _ = trace(model, example)
        ctx = PassContext(example_inputs=example)
        cg, imp = ctx.analysis(ChannelGroups, gm), ctx.analysis(ChannelImportance, gm)
        layer = next(key for key in imp.layers(imp.scores("l1")[0]) if pick(key))[0]
        groups = PruneChannels(ratio=0.5).layer_groups(layer, imp)
        assert isinstance(groups, list) and groups
        ids = torch.tensor([i for g in groups for i in cg.groups[g].ids])
        predicted = flops_left(gm, cg, ctx.analysis(Flops, gm), ids)
        zero_groups(gm, cg, [cg.groups[g] for g in groups])
        ctx.invalidate("none")
        DeadChannels().run(gm, ctx)
        ctx.invalidate("none")
        assert predicted == pytest.approx(sum(ctx.analysis(Flops, gm).values()), rel=1e-9)


def test_a_flops_goal_that_cannot_be_met_changes_nothing_and_says_so():
    model = Chain().eval()
    gm, report, _ = apply(model, (torch.randn(2, 4, 8, 8),), [PruneChannels(flops=0.05)], calibration=calibration())
    stats = report.row("prune_channels").stats
    assert stats["skipped.flops_goal_unreachable"] == 1 and 0.05 < stats["flops_reachable"] < 1.0
    assert [tuple(w.shape) for w in weights(gm)] == [(16, 4, 3, 3), (16, 16, 3, 3), (4, 16, 3, 3)]
    assert report.row("prune_channels").params == report.row("input").params


def test_a_latency_goal_prunes_by_the_time_the_thinned_layers_save(monkeypatch):
    """Before: Chain with faint a-channels; made-up timings: each conv 1 ms, a thinned one the share of its weight
    kept, the graph 4 ms, 0.72 of it once pruned. Goal 0.75 of the latency (1 ms to save): halving a thins a (0.5 ms)
    and b's input (0.5 ms). Expected: as the flops goal, a keeps its 8 strong channels; the plan's 0.75 and the
    measured 0.72 in the stats."""
    monkeypatch.setattr(pruning, "graph_ms", lambda gm, inputs: 4.0)
    monkeypatch.setattr(pruning, "_layer_ms", lambda node, *a: 1.0)
    monkeypatch.setattr(pruning, "thinned_ratio",
                        lambda node, full, thin, target: math.prod(thin[2]) / math.prod(full[2]))
    monkeypatch.setattr(goals, "measured_fraction", lambda before, after, inputs: 0.72)
    model = chain_with_faint_channels()
    gm, report, flat = apply(model, (torch.randn(2, 4, 8, 8),), [PruneChannels(latency=0.75, round_to=4)],
                             calibration=calibration())
    stats = report.row("prune_channels").stats
    assert [tuple(w.shape) for w in weights(gm)] == [(8, 4, 3, 3), (16, 8, 3, 3), (4, 16, 3, 3)]
    assert stats["latency.planned"] == 0.75 and stats["latency.model"] == 0.72
    _, report, _ = apply(model, (torch.randn(2, 4, 8, 8),), [PruneChannels(latency=0.1, round_to=4)],
                         calibration=calibration())
    stats = report.row("prune_channels").stats
    assert stats["skipped.latency_goal_unreachable"] == 1 and 0.1 < stats["latency_reachable"] < 1.0


def test_a_latency_goal_reads_each_thinned_layers_time_once(monkeypatch):
    """Before: the plan asked the timing cache (a file read and parsed whole) for every thinned layer of every
    choice it weighed, over and over: 18 357 reads in ResNet-50's pass, 34 s of its 194 s. Expected: one ask per
    layer and thinned shape."""
    asked = Counter()

    def ratio(node, full, thin, target):
        asked[(node.name, repr(thin))] += 1
        return math.prod(thin[2]) / math.prod(full[2])
    monkeypatch.setattr(pruning, "graph_ms", lambda gm, inputs: 4.0)
    monkeypatch.setattr(pruning, "_layer_ms", lambda node, *a: 1.0)
    monkeypatch.setattr(pruning, "thinned_ratio", ratio)
    monkeypatch.setattr(goals, "measured_fraction", lambda before, after, inputs: 0.72)
    apply(chain_with_faint_channels(), (torch.randn(2, 4, 8, 8),), [PruneChannels(latency=0.75, round_to=4)],
          calibration=calibration())
    assert asked and set(asked.values()) == {1}


def thinned_and_pruned(model: nn.Module, example: tuple, layer, **options) -> tuple[dict, dict, dict]:
    """Each conv's shapes in the graph, as the latency goal times them once ``PruneChannels(**options)`` prunes the
    layer ``layer`` names (or picks from the importances), and in the graph that pruning and dead_channels leave."""
    gm, _ = trace(model, example)
    ctx = PassContext(example_inputs=example)
    cg, imp = ctx.analysis(ChannelGroups, gm), ctx.analysis(ChannelImportance, gm)
    groups = PruneChannels(**options).layer_groups(layer if isinstance(layer, str) else layer(imp), imp)
    ids = torch.tensor([i for g in groups for i in cg.groups[g].ids])
    before = {n.name: pruning._shapes(n, cg, None, None) for n in call_nodes(gm, aten.conv2d)}
    thin = {n.name: pruning._shapes(n, cg, *pruning._kept(n, cg, ids)) for n in call_nodes(gm, aten.conv2d)}
    zero_groups(gm, cg, [cg.groups[g] for g in groups])
    ctx.invalidate("none")
    DeadChannels().run(gm, ctx)
    ctx.invalidate("none")
    cg = ctx.analysis(ChannelGroups, gm)
    return before, thin, {n.name: pruning._shapes(n, cg, None, None) for n in call_nodes(gm, aten.conv2d)}


def test_thinned_layers_are_timed_at_the_shapes_removal_leaves():
    """What the latency goal times for each conv of MobileNetV2 once a residual stage loses half its channels: the
    shapes of that conv in the pruned graph (a depthwise conv's groups with its channels)."""
    model, example = ZOO["mobilenet_v2"]()
    expand = lambda imp: next(key for key in imp.layers(imp.scores("l1")[0]) if len(key) == 2)[0]  # and depthwise
    before, thin, after = thinned_and_pruned(model, example, expand, ratio=0.5)
    assert thin == after and sum(thin[n] != before[n] for n in before) >= 3  # the expand, the depthwise, the next


class GroupedAndDepthwise(nn.Module):
    """1×1 conv → grouped 3×3 (4 groups) → 1×1 conv → depthwise 3×3 with 2 outputs per channel → 1×1 conv."""

    def __init__(self):
        super().__init__()
        self.a, self.g = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.b, self.d = nn.Conv2d(32, 16, 1), nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.c = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = torch.relu(self.g(torch.relu(self.a(x))))
        return self.c(torch.relu(self.d(torch.relu(self.b(y)))))


@pytest.mark.parametrize("layer", ["conv2d", "conv2d_1", "conv2d_2"])
def test_grouped_and_multiplied_depthwise_convs_are_timed_at_the_shapes_removal_leaves(layer):
    """Before: a grouped conv was timed whole (its removal thins every group alike, keeping the group count: the
    conv's saving went uncredited), and a depthwise conv with 2 outputs per input channel was timed with as many
    input channels and groups as outputs. Expected: each conv's thinned shapes those of the pruned graph."""
    torch.manual_seed(0)
    _, thin, after = thinned_and_pruned(GroupedAndDepthwise().eval(), (torch.randn(1, 3, 8, 8),), layer, ratio=0.5,
                                        round_to=1)
    assert thin == after


def test_a_flops_goal_of_the_whole_model_is_met_as_it_is():
    """Before: flops=1.0 on a model with nothing to prune said skipped.flops_goal_unreachable beside
    flops_reachable 1.0."""
    model = nn.Sequential(nn.Linear(8, 8)).eval()  # its output channels are the model's: nothing prunable
    _, report, _ = apply(model, (torch.randn(2, 8),), [PruneChannels(flops=1.0)], calibration=[(torch.randn(4, 8),)])
    stats = report.row("prune_channels").stats
    assert stats.get("skipped.flops_goal_met") == 1 and "skipped.flops_goal_unreachable" not in stats


class SigmoidThenPadded(nn.Module):
    """conv → sigmoid → zero-padded conv: a zeroed channel of c1 becomes the constant sigmoid(0) = 0.5, which the
    padding makes vary at the borders, so it cannot be removed; c2's channels (through relu) can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                     nn.Conv2d(16, 4, 3, padding=1))

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.sigmoid(self.c1(x)))))


def test_groups_that_zeroing_cannot_remove_are_left_alone():
    """They were zeroed and kept: the model damaged (3.4 % off) at unchanged FLOPs, and a flops goal claimed met."""
    model, example = SigmoidThenPadded().eval(), (torch.randn(2, 3, 8, 8),)
    gm, report, flat = apply(model, example, [PruneChannels(ratio=0.5, round_to=1, scope="layer")])
    stats = report.row("prune_channels").stats
    assert stats["skipped.not_removable"] == 16 and stats["groups_pruned"] == stats["groups_removed"] == 8
    assert [tuple(w.shape) for w in weights(gm)] == [(16, 3, 3, 3), (8, 16, 3, 3), (4, 8, 3, 3)]
    gm, report, _ = apply(model, example, [PruneChannels(ratio=0.25, round_to=1)])  # global: chosen elsewhere
    stats = report.row("prune_channels").stats
    assert stats["skipped.not_removable"] == 16 and stats["groups_pruned"] == stats["groups_removed"] > 0
    gm, report, _ = apply(model, example, [PruneChannels(flops=0.3)], calibration=[example] * 2)
    stats = report.row("prune_channels").stats
    assert stats["skipped.flops_goal_unreachable"] == 1 and stats["skipped.not_removable"] > 0
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_a_model_without_prunable_channels_is_left_alone():
    """Choosing again without unremovable layers read its choice before making one (a raw UnboundLocalError)."""
    _, report, _ = apply(nn.Linear(4, 3).eval(), (torch.randn(2, 4),), [PruneChannels(ratio=0.5)])
    row = report.row("prune_channels")
    assert "groups_pruned" not in row.stats and row.params == report.row("input").params


def test_a_flops_goal_needs_calibration_data():
    with pytest.raises(CalibrationError, match="prune_channels"):
        apply(Chain().eval(), (torch.randn(2, 4, 8, 8),), [PruneChannels(flops=0.5)])
    assert PruneChannels(flops=0.5).reads_calibration and not PruneChannels().reads_calibration


def _finetune(x, y, epochs=2):
    """A short fine-tune of the pruned graph's conv/linear weights (BN statistics stay frozen)."""
    def hook(gm):
        params = [get_tensor(gm, a) for n in call_nodes(gm, aten.conv2d, aten.linear) for a in n.args[1:3]
                  if get_tensor(gm, a) is not None]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                opt.zero_grad()
                nn.functional.cross_entropy(gm(x[perm[i:i + 64]])[0], y[perm[i:i + 64]]).backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)
    return hook


@pytest.mark.slow  # trains the digits CNN (~15 s alone, minutes on a loaded machine)
def test_digits_cnn_at_half_the_flops():
    """Measured (2-core x86): the trained DigitsCnn scores 99.5 % on held-out digits. Pruning 30 % of its
    channel groups by global L1 (round_to=4) removes 53 % of the FLOPs; without fine-tuning accuracy falls to
    ≈17 % (this small net has no redundant channels), and a 2-epoch fine-tune of the pruned graph
    brings it back to ≈95 %."""
    model, (xt, yt, xs, ys) = digits_cnn()
    base = accuracy(model, xs, ys)
    pruned, report, _ = apply(model, (xs[:2],), [PruneChannels(ratio=0.3, round_to=4, finetune=_finetune(xt, yt))])
    stats = report.row("prune_channels").stats
    assert stats["flops_after"] <= 0.5 * stats["flops_before"]
    tuned = accuracy(lambda x: pruned(x)[0], xs, ys)
    assert base > 0.97 and base - tuned < 0.08


@pytest.mark.parametrize("name", zoo_params())
def test_every_zoo_model_is_pruned_or_left_alone_and_reports_its_size(name):
    model, example = ZOO[name]()
    gm, report, flat = apply(model, example, [PruneChannels(ratio=0.3)])
    row = report.row("prune_channels")
    if row.stats.get("groups_pruned"):
        assert row.stats["params_after"] == row.params < row.stats["params_before"] == report.row("input").params
        assert row.stats["flops_after"] == row.flops < row.stats["flops_before"]
    assert math.isfinite(row.max_rel_err)


def test_the_flops_goal_measures_layers_before_an_unfused_batch_norm():
    """prune_channels{flops=} measured each layer's effect by zeroing its channels at every node they reach, and a
    batch norm returning (output, mean, var) had no recorded shape: a raw KeyError unless `fuse` ran first."""
    import fxforge
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).eval()
    cm = fxforge.compile(model, (torch.randn(4, 16),), passes=["prune_channels{flops=0.5}"],
                         calibration=[(torch.randn(4, 16),)], measure_latency=False)
    assert cm.report.final.flops <= 0.5 * cm.report.rows[0].flops


@pytest.mark.slow  # the trained wide digits CNN (cached after its first training)
def test_a_goal_between_two_reachable_goals_is_reached_on_the_trained_wide_digits_cnn():
    """The plan is redone while the pruned graph keeps more than the goal (coupled layers save less than their
    sum). Asked each round for only the shortfall more, a plan that already saved that much on paper came back
    unchanged every round: on the wide digits CNN flops=0.7 was "unreachable" though 0.8 and 0.55 were met.
    Expected: 0.7 met; the benchmark's flops=0.5 choice as measured (⅛, ⅜, ¾)."""
    from fxforge.zoo import digits_data, wide_digits_cnn
    model = wide_digits_cnn()
    x_train, _, x_test, _ = digits_data()
    calibration = [(b,) for b in x_train.split(64)][:8]
    for goal, ratios in ((0.7, None), (0.5, {"ratio.conv2d": 0.125, "ratio.conv2d_1": 0.375, "ratio.conv2d_3": 0.75})):
        _, report, _ = apply(model, (x_test[:2],), ["fuse", PruneChannels(flops=goal)], calibration=calibration)
        stats = report.row("prune_channels").stats
        assert "skipped.flops_goal_unreachable" not in stats and stats["flops_after"] <= goal * stats["flops_before"]
        assert ratios is None or {k: v for k, v in stats.items() if k.startswith("ratio.")} == ratios
