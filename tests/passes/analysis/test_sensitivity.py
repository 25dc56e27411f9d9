"""Per-layer sensitivity: rankings on hand-built layers, refusals, and agreement with the passes' own rewrites."""
import copy
from collections import Counter

import pytest
import torch
from torch import nn

import fxforge
from fxforge.compiler.pass_manager import PassContext, PassManager
from fxforge.passes.analysis.channel_groups import ChannelGroups
from fxforge.passes.analysis.channel_importance import ChannelImportance
from fxforge.passes.analysis import sensitivity
from fxforge.passes.analysis.sensitivity import Effect, Sensitivity, agreement, give_back, layer_sensitivity, plan
from fxforge.passes.lib.channel_surgery import zero_groups
from fxforge.passes.prune_channels import PruneChannels

X86 = fxforge.get_target("x86")


def _graph(model: nn.Module, x: torch.Tensor):
    return fxforge.trace(model, (x,))[0]


def _batches(*shape: int, n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_int8_ranks_the_layer_with_outlier_weights_first():
    torch.manual_seed(0)
    model = TwoLinear()
    with torch.no_grad():  # a huge weight per row on an input that is always 0: the int8 grid is too coarse for the rest
        model.a.weight[:, 0] = 200.0
    batches = [(x.index_fill(1, torch.tensor([0]), 0.0),) for (x,) in _batches(64, 16)]
    sens = layer_sensitivity(_graph(model, torch.randn(2, 16)), batches, ["int8"], X86)
    a, b = sens.effects["int8"]["linear"], sens.effects["int8"]["linear_1"]
    assert sens.changed("int8") == ["linear", "linear_1"]
    assert a.rel_error > 5 * b.rel_error, (a, b)


def test_low_rank_is_harmless_on_an_exactly_low_rank_layer_and_refused_where_it_saves_nothing():
    torch.manual_seed(0)
    model = TwoLinear()
    with torch.no_grad():
        model.a.weight.copy_(torch.randn(32, 2) @ torch.randn(2, 16))  # rank 2
        model.b.weight.copy_(torch.randn(8, 32))  # full rank: a split costs more than it saves
    sens = layer_sensitivity(_graph(model, torch.randn(2, 16)), _batches(64, 16), ["low_rank{energy=0.95}"], X86)
    effects = sens.effects["low_rank{energy=0.95}"]
    assert effects["linear"].rel_error < 1e-5 and effects["linear"].drop == 0.0
    assert effects["linear_1"] == "rank_too_high"
    assert sens.changed("low_rank{energy=0.95}") == ["linear"]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3, self.c1 = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.c1(torch.relu(self.c3(x))).mean((2, 3)))


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _node_runs(monkeypatch, gm, batches, setting, only):
    """The effects of ``setting`` on the layers ``only`` names, and how often each node ran to measure them."""
    ran: Counter = Counter()
    run_node = sensitivity._Run.run_node
    monkeypatch.setattr(sensitivity._Run, "run_node", lambda run, n: ran.update([n.name]) or run_node(run, n))
    effects = layer_sensitivity(gm, batches, [setting], X86, only={setting: only}).to_dict()
    monkeypatch.setattr(sensitivity._Run, "run_node", run_node)
    return effects, ran


def test_a_layers_runs_compute_only_what_its_change_reaches(monkeypatch):
    """Every layer's run computed the whole graph again: on r3d_18 the convs upstream of the changed one were most
    of `compress`'s 173 s (nothing split). The runs now start from the reference run's values where the change does
    not reach them, with the same effects; past ``REUSE_BYTES`` of kept values they compute every node again."""
    gm, batches, setting = _graph(Chain(), torch.randn(2, 16)), _batches(4, 16), "low_rank{rank_ratio=0.25}"
    _, reference = _node_runs(monkeypatch, gm, batches, setting, set())
    reused, ran = _node_runs(monkeypatch, gm, batches, setting, {"linear_2"})
    assert isinstance(reused[setting]["linear_2"], dict)
    assert ran["linear"] == reference["linear"] and ran["linear_1"] == reference["linear_1"]
    assert ran["linear_2"] == reference["linear_2"] + len(batches)
    monkeypatch.setattr(sensitivity, "REUSE_BYTES", 0)
    again, ran = _node_runs(monkeypatch, gm, batches, setting, {"linear_2"})
    assert ran["linear"] == reference["linear"] + len(batches) and again == reused
    # what keeping costs is the storages the calls make: the weights (held anyway) were counted once per batch
    weights = sum(p.numel() * p.element_size() for p in gm.parameters())
    monkeypatch.setattr(sensitivity, "REUSE_BYTES", weights)
    _, ran = _node_runs(monkeypatch, gm, batches, setting, {"linear_2"})
    assert ran["linear"] == reference["linear"]


def _effect_and_rewrite(gm, x, batches, setting, layer):
    """The sensitivity analysis's effect of ``setting`` on ``layer``, and the graph's outputs on ``batches`` before
    and after the pass's own rewrite (of a one-layer model: the same change)."""
    effect = layer_sensitivity(gm, batches, [setting], X86).effects[setting][layer]
    rewritten, _ = PassManager([setting], verify="off", measure_latency=False).run(
        copy.deepcopy(gm), PassContext(example_inputs=(x,)))
    with torch.no_grad():
        return effect, torch.cat([gm(*b)[0] for b in batches]), torch.cat([rewritten(*b)[0] for b in batches])

@pytest.mark.parametrize("setting", ["low_rank{energy=0.7}", "depthwise_separable{energy=0.7}"])
def test_factorized_layer_effect_equals_the_pass_rewrite_on_a_one_layer_model(setting):
    torch.manual_seed(0)
    model = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    effect, ref, out = _effect_and_rewrite(_graph(model, x), x, _batches(4, 8, 6, 6), setting, "conv2d")
    assert isinstance(effect, Effect) and effect.rel_error > 1e-3  # a real approximation, not a no-op
    assert effect.rel_error == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-4)


def test_dynamic_int8_layer_effect_equals_the_pass_rewrite_and_leaves_convs_float():
    """insert_qdq{activations='dynamic'} answers per layer with the dynamic_linear it writes (per-row activations,
    no calibration range): one linear's effect is exactly the rewrite of a one-linear model; a conv stays float."""
    setting = "insert_qdq{activations='dynamic'}"
    torch.manual_seed(0)
    model, x = nn.Linear(16, 8), torch.randn(2, 5, 16)
    gm, batches = _graph(model, x), _batches(4, 5, 16)
    effect = layer_sensitivity(gm, batches, [setting], X86).effects[setting]["linear"]
    rewritten, _ = PassManager([setting], verify="off", measure_latency=False).run(
        copy.deepcopy(gm), PassContext(example_inputs=(x,)))
    with torch.no_grad():
        ref = torch.cat([gm(*b)[0] for b in batches])
        out = torch.cat([rewritten(*b)[0] for b in batches])
    assert isinstance(effect, Effect) and effect.rel_error > 1e-4
    assert effect.rel_error == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-6)
    convs = layer_sensitivity(_graph(ConvNet(), torch.randn(2, 4, 6, 6)), _batches(2, 4, 6, 6), [setting], X86)
    assert convs.effects[setting]["conv2d"] == "dynamic_float" and isinstance(convs.effects[setting]["linear"], Effect)


def test_int8_effect_of_a_layer_rounds_its_input_for_the_float_layer_beside_it():
    """insert_qdq gives a tensor one pair for all its readers: quantizing the regression head alone rounds the
    classifier's input too, though the classifier stays float. The layer effect rounded it for the head alone, and
    predicted 1e-6 where the pipeline dropped 0.012 of the classifier's agreement (a two-head digits CNN)."""
    from fxforge.compiler.pass_manager import LayerContext
    from fxforge.passes.insert_qdq import InsertQdq

    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(64, 32)  # (below) logits and a second head on the same features
    gm = _graph(model, x)
    reg = next(n for n in gm.graph.nodes if n.name == "linear_2")
    with torch.no_grad():
        y = torch.relu(model.body(x))
    rewritten, _ = PassManager(["insert_qdq{skip=('linear', 'linear_1')}"], verify="off", measure_latency=False).run(
        copy.deepcopy(gm), PassContext(example_inputs=(x,)))
    effect = InsertQdq().layer_effect(reg, LayerContext(model.head2.weight.detach(), (0.0, float(y.max())), X86))
    assert set(effect) == {"linear_1", "linear_2"}
    with torch.no_grad():
        cls, _ = rewritten(x)
        assert torch.equal(effect["linear_1"]([y, model.head1.weight, model.head1.bias], {}), cls)
        assert not torch.equal(cls, model(x)[0])


def test_refusals_name_the_reason():
    sens = layer_sensitivity(_graph(ConvNet(), torch.randn(2, 4, 6, 6)), _batches(2, 4, 6, 6),
                             ["depthwise_separable{energy=0.95}", "prune_channels{ratio=0.1}"], X86)
    dws = sens.effects["depthwise_separable{energy=0.95}"]
    assert dws["conv2d_1"] == "pointwise" and dws["linear"] == "not_a_regular_conv2d"
    prune = sens.effects["prune_channels{ratio=0.1}"]
    assert prune["linear"] == "no_prunable_channels"  # its outputs are the model's
    assert prune["conv2d"] == "too_few_channels"  # 10 % of 16 is 1, and a layer keeps a multiple of 8


def test_prune_removes_the_smallest_rows_first():
    model = ConvNet()
    with torch.no_grad():
        model.c3.weight[:4] = 0.0  # the four lowest-L1 channels carry nothing
        model.c3.bias[:4] = 0.0
    sens = layer_sensitivity(_graph(model, torch.randn(2, 4, 6, 6)), _batches(2, 4, 6, 6),
                             ["prune_channels{ratio=0.25,round_to=4}", "prune_channels{ratio=0.5,round_to=4}"], X86)
    assert sens.effects["prune_channels{ratio=0.25,round_to=4}"]["conv2d"].rel_error == 0.0
    assert sens.effects["prune_channels{ratio=0.5,round_to=4}"]["conv2d"].rel_error > 1e-3


def test_predicted_drop_sums_layer_drops():
    sens = layer_sensitivity(_graph(ConvNet(), torch.randn(2, 4, 6, 6)), _batches(8, 4, 6, 6),
                             ["prune_channels{ratio=0.5,round_to=4}"], X86)
    per = sens.effects["prune_channels{ratio=0.5,round_to=4}"]
    drops = [e.drop for e in per.values() if isinstance(e, Effect)]
    assert len(drops) == 2  # conv2d and conv2d_1
    assert sens.predicted_drop("prune_channels{ratio=0.5,round_to=4}") == pytest.approx(sum(drops))
    assert sens.predicted_drop("prune_channels{ratio=0.5,round_to=4}", ["conv2d"]) == pytest.approx(per["conv2d"].drop)


def test_agreement_is_top1_for_logits_and_the_samples_mean_cosine_otherwise():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert agreement(torch.tensor([[0.0, 1.0]]).repeat(4, 1), ref, logits=True) == 0.5
    out = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    assert agreement(out, ref, logits=False) == pytest.approx((0.5 ** 0.5 + 1 + 1 + 0) / 4)
    assert agreement(torch.zeros(2, 3), torch.zeros(2, 3), logits=False) == 1.0  # zero in both: agreeing
    assert agreement(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), logits=False) == pytest.approx(1.0)
    assert agreement(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), logits=False) == pytest.approx(0.0)


class Embedder(nn.Module):
    """Unit vectors, as a sentence encoder returns them: their argmax is no class."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 64)

    def forward(self, x):
        return torch.nn.functional.normalize(self.fc(x), dim=-1)


def test_the_drop_of_an_embedding_model_is_its_cosine_not_an_argmax_over_its_dimensions():
    """Before: the drop was 1 − agreement of the argmax over the embedding's 64 dimensions (MiniLM: 384), a flip of
    a meaningless maximum that ranked the budget's layers and was recorded as their cost. Expected: 1 − the mean
    cosine of the samples, as the budget measures such outputs."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    effect, ref, out = _effect_and_rewrite(_graph(Embedder().eval(), x), x, _batches(16, 8),
                                           "low_rank{rank_ratio=0.125}", "linear")
    cosine = float(torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=1).mean())
    argmax = float((out.argmax(1) == ref.argmax(1)).double().mean())
    assert abs((1 - cosine) - (1 - argmax)) > 0.05  # the two measures tell these layers apart
    assert effect.drop == pytest.approx(1 - cosine, abs=1e-6)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head1, self.head2 = nn.Linear(32, 64), nn.Linear(64, 10), nn.Linear(64, 64)

    def forward(self, x):
        f = torch.relu(self.body(x))
        return self.head1(f), self.head2(f)


def test_a_layer_feeding_only_a_second_output_is_measured_on_it():
    """Before: only the first float output was compared, so a layer feeding the second head alone was "free" and
    low_rank{max_error=0.02} split it to 0.6 relative error of that head, stated nowhere."""
    torch.manual_seed(0)
    x, batches = torch.randn(8, 32), _batches(8, 32)
    gm = _graph(TwoHeads().eval(), x)
    sens = layer_sensitivity(gm, batches, ["low_rank{rank_ratio=0.25}"], fxforge.get_target("x86"))
    effects = sens.effects["low_rank{rank_ratio=0.25}"]
    head2 = next(n for n in sens.layers if effects[n].rel_error > 0.1)
    assert effects[head2].drop > 0.01  # 1 − the second head's mean cosine
    cm = fxforge.compile(TwoHeads().eval(), (x,), passes=["low_rank{max_error=0.02}"], backend="eager",
                         calibration=batches, measure_latency=False)
    assert "split" not in cm.report.row("low_rank").stats


def test_plan_takes_the_cheapest_in_accuracy_per_flop_first():
    sens = Sensitivity(["a", "b", "c"], {
        "half": {"a": Effect(0.0, 0.10), "b": Effect(0.0, 0.01), "c": Effect(0.2, 0.0)},
        "quarter": {"a": Effect(0.0, 0.30), "b": Effect(0.0, 0.02), "c": "rank_too_high"}})
    saved = {("half", "a"): 50, ("half", "b"): 50, ("half", "c"): 50, ("quarter", "a"): 75, ("quarter", "b"): 75}
    assert plan(sens, saved, 40) == {"b": "half"}  # least error per FLOP saved
    assert plan(sens, saved, 75) == {"b": "quarter"}  # b deeper before touching a (0.02/75 < 0.10/50)
    assert plan(sens, saved, 120) == {"b": "quarter", "a": "half"}  # c costs agreement: last
    assert plan(sens, saved, 150) == {"b": "quarter", "a": "quarter"}
    assert plan(sens, saved, 151) == {"b": "quarter", "a": "quarter", "c": "half"}
    assert plan(sens, saved, 201) is None  # 75 + 75 + 50 is all there is


def test_plan_under_an_error_cap_takes_moves_while_their_summed_damage_fits():
    sens = Sensitivity(["a", "b", "c"], {
        "half": {"a": Effect(0.0, 0.010), "b": Effect(0.0, 0.004), "c": Effect(0.25, 0.001)},
        "quarter": {"a": Effect(0.0, 0.030), "b": Effect(0.0, 0.008), "c": "rank_too_high"}})
    saved = {("half", "a"): 50, ("half", "b"): 50, ("half", "c"): 50, ("quarter", "a"): 75, ("quarter", "b"): 75}
    assert plan(sens, saved, None, max_error=0.005) == {"b": "half"}  # b deeper would cost 0.008
    assert plan(sens, saved, None, max_error=0.02) == {"b": "quarter", "a": "half"}  # 0.008 + 0.010
    assert plan(sens, saved, None, max_error=0.1) == {"b": "quarter", "a": "quarter"}  # c flips a top-1: 0.25
    assert plan(sens, saved, None, max_error=0.001) == {}  # nothing fits
    assert plan(sens, saved, 100, max_error=0.005) is None  # the goal needs more than the cap allows
    assert plan(sens, saved, 40, max_error=0.02) == {"b": "half"}  # a goal still stops the planning


def test_give_back_keeps_only_the_damage_the_goal_asks_for():
    """Need 60 FLOPs. The plan takes a's half (10), then b's quarter (190, cheapest per FLOP after a): 200, far past
    the goal. Expected: b back to its half (100 still meets 60 with a), then a given back (b's half alone meets it);
    an exact move (damage within the exactness tolerance) is never given back, since keeping it costs nothing."""
    sens = Sensitivity(["a", "b"], {"half": {"a": Effect(0.0, 0.001), "b": Effect(0.0, 0.02)},
                                     "quarter": {"b": Effect(0.0, 0.021)}})
    saved = {("half", "a"): 10, ("half", "b"): 100, ("quarter", "b"): 190}
    total = lambda choice: sum(saved[(s, n)] for n, s in choice.items())
    chosen = plan(sens, saved, 60)
    assert chosen == {"a": "half", "b": "quarter"}
    assert give_back(sens, saved, chosen, lambda trial: total(trial) >= 60) == {"b": "half"}
    assert give_back(sens, saved, chosen, lambda trial: total(trial) >= 195) == chosen  # nothing to spare
    exact = Sensitivity(["a", "b"], {**sens.effects, "half": {"a": Effect(0.0, 1e-7), "b": Effect(0.0, 0.02)}})
    assert give_back(exact, saved, chosen, lambda trial: total(trial) >= 60) == {"a": "half", "b": "half"}
    # a layer's effect is not monotone in its setting: a lighter one measured more damaging is no give-back
    rough = Sensitivity(["a", "b"], {**sens.effects, "half": {"a": Effect(0.0, 0.001), "b": Effect(0.1, 0.02)}})
    assert give_back(rough, saved, chosen, lambda trial: total(trial) >= 60) == {"b": "quarter"}


class Residual(nn.Module):
    """stem → (body1 → relu → body2) + stem → relu → head: the stem's and body2's channels are coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.body2, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        return self.head(torch.relu(self.body2(torch.relu(self.body1(s))) + s))


def test_prune_effect_is_the_pruned_model_coupled_channels_included():
    """Pruning the stem's layer zeroes the coupled channels in body2 as well: the measured effect is exactly that of
    the pass's own zeroing (which dead_channels then removes exactly)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    gm, batches, rule = _graph(Residual(), x), _batches(4, 3, 6, 6), PruneChannels(ratio=0.5, round_to=4)
    sens = layer_sensitivity(gm, batches, [rule], X86)
    per = sens.effects[str(rule)]
    assert per["conv2d_2"] == "no_prunable_channels"  # body2: its channels are the stem's layer, asked at the stem
    ctx = PassContext(example_inputs=(x,))
    cg = ctx.analysis(ChannelGroups, gm)
    groups = rule.layer_groups("conv2d", ctx.analysis(ChannelImportance, gm))
    assert len(groups) == 8
    zeroed = copy.deepcopy(gm)
    zero_groups(zeroed, cg, [cg.groups[g] for g in groups])
    with torch.no_grad():
        ref = torch.cat([gm(*b)[0] for b in batches])
        out = torch.cat([zeroed(*b)[0] for b in batches])
    assert per["conv2d"].rel_error == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-5)
    assert per["conv2d"].rel_error > 1e-2
