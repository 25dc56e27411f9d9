"""insert_qdq: where Q/DQ pairs go (inputs, weights, biases, outputs, shared groups) and what stays float."""
import copy

import pytest
import torch
from torch import nn

import fxforge
from fxforge.compiler import target as target_module
from fxforge.compiler.errors import PassError
from fxforge.compiler.graph import FUSION_KEY, get_tensor
from fxforge.compiler.target import get_target
from fxforge.compiler.verify import CHECK_SEED
from fxforge.passes.lib.qdq import QDQ_KEY, is_q, role
from models import ZOO
from pipeline import apply, count, error_vs_eager

Q, DQ = "quantize_per_tensor", "dequantize_per_tensor"
QC, DQC = "quantize_per_channel", "dequantize_per_channel"


def ops(gm):
    return [getattr(n.target, "overloadpacket", n.target).__name__ for n in gm.graph.nodes if n.op == "call_function"]


def activation_qs(gm):
    return [n for n in gm.graph.nodes if is_q(n) and role(n) == "activation"]


def test_conv_relu_before_expected():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    gm, report, _ = apply(model, (torch.rand(2, 4, 8, 8),), ["insert_qdq"], target=get_target("x86-avx2"))
    assert ops(gm) == [Q, DQ, QC, DQC, QC, DQC, "conv2d", "relu", Q, DQ]
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    x_dq, w_dq, b_dq = conv.args[:3]
    assert x_dq.args[1:] == (pytest.approx(1 / 255, rel=0.01), 0, 0, 255, torch.uint8)  # example input in [0, 1)
    assert w_dq.args[3:] == (0, -64, 63, torch.int8)  # per output channel, 7-bit on AVX2 without VNNI
    assert b_dq.args[3:] == (0, -2 ** 31, 2 ** 31 - 1, torch.int32)
    assert report.row("insert_qdq").stats == {"quantized.conv2d": 1, "activations": 2, "weights": 1, "weight_bits": 7}


@pytest.mark.parametrize("target, features, bits", [
    ("x86-avx2", None, 7), ("x86-avx512", None, 7), ("x86-avx512-vnni", None, 8), ("x86-amx", None, 8),
    ("arm64", None, 8), ("arm64-dotprod", None, 8),
    ("x86", {"x86_64", "avx2"}, 7), ("x86", {"x86_64", "avx2", "avx512", "vnni"}, 8),  # this machine's features
])
def test_target_features_decide_reduce_range(target, features, bits, monkeypatch):
    tgt = get_target(target)
    if features is not None:
        monkeypatch.setattr(target_module, "host_features", lambda: frozenset(features))
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    gm, report, _ = apply(model, (torch.randn(2, 8),), ["insert_qdq"], target=tgt)
    weight_q = next(n for n in gm.graph.nodes if is_q(n) and role(n) == "weight")
    assert report.row("insert_qdq").stats["weight_bits"] == bits
    assert weight_q.args[5:7] == ((63 if bits == 7 else 127), torch.int8)


def test_options_per_tensor_weights_full_range_int8_activations():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    gm, _, _ = apply(model, (torch.randn(2, 8),),
                     ["insert_qdq{per_channel=False,reduce_range=False,activation_dtype='int8'}"])
    assert ops(gm) == [Q, DQ, Q, DQ, QC, DQC, "linear", Q, DQ]
    weight_q = next(n for n in gm.graph.nodes if is_q(n) and role(n) == "weight")
    assert weight_q.args[3:] == (-128, 127, torch.int8)
    assert all(q.args[5] == torch.int8 for q in activation_qs(gm))


class Residual(nn.Module):
    """conv → relu feeds a conv and a residual add; maxpool and cat follow."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = torch.relu(self.b(y) + y)
        return torch.cat([nn.functional.max_pool2d(z, 2), nn.functional.avg_pool2d(y, 2)], 1)


def test_residual_add_maxpool_and_cat_share_groups():
    model = Residual().eval()
    gm, report, flat = apply(model, (torch.randn(2, 4, 8, 8),), ["insert_qdq"])
    groups = {}
    for q in activation_qs(gm):
        groups.setdefault(q.meta[QDQ_KEY]["group"], []).append(q.args[0].name)
    by_tensor = {t: g for g, ts in groups.items() for t in ts}
    # relu output: one pair for both readers (conv b and the add); add → relu output quantized after the relu
    assert count(gm, Q) == len(by_tensor) == 7
    assert by_tensor["max_pool2d"] == by_tensor["cat"] == by_tensor["avg_pool2d"]  # cat: one scale
    assert by_tensor["relu"] != by_tensor["relu_1"]
    qs = {q.args[0].name: q for q in activation_qs(gm)}
    assert qs["max_pool2d"].args[1:3] == qs["cat"].args[1:3]
    assert error_vs_eager(gm, model, flat).cosine > 0.99


def test_narrow_input_conv_stays_float():
    """A 3×3 stem on RGB (an input window of 27 values) stays float; the conv after it reads the stem's output on an int8 grid."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["insert_qdq"])
    assert ops(gm) == ["conv2d", "relu", Q, DQ, QC, DQC, QC, DQC, "conv2d", Q, DQ]
    stats = report.row("insert_qdq").stats
    assert stats["quantized.conv2d"] == stats["skipped.narrow_input"] == stats["weights"] == 1
    assert error_vs_eager(gm, model, flat).cosine > 0.99
    gm, report, _ = apply(model, (torch.randn(2, 3, 8, 8),), ["insert_qdq{min_input_window=0}"])
    assert report.row("insert_qdq").stats["quantized.conv2d"] == 2


def test_narrow_stem_with_a_large_output_is_quantized():
    """The same stem, its output at the example batch (2 × 8 × 6 × 6 = 576 values) over ``max_stem_output``: int8."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 8, 8),), ["insert_qdq{max_stem_output=575}"])
    assert ops(gm) == [Q, DQ, QC, DQC, QC, DQC, "conv2d", "relu", Q, DQ, QC, DQC, QC, DQC, "conv2d", Q, DQ]
    stats = report.row("insert_qdq").stats
    assert stats["quantized.conv2d"] == 2 and "skipped.narrow_input" not in stats
    assert error_vs_eager(gm, model, flat).cosine > 0.99
    _, report, _ = apply(model, (torch.randn(2, 3, 8, 8),), ["insert_qdq{max_stem_output=576}"])
    assert report.row("insert_qdq").stats["skipped.narrow_input"] == 1


def test_depthwise_conv_reading_a_float_stem_stays_float():
    """MobileNet's first block: stem → ReLU6 → depthwise → ReLU6 → 1×1. The depthwise conv reads the float stem, so it
    stays float too; the 1×1 conv reads its output on an int8 grid. A depthwise conv reading an int8 layer is
    quantized, and so is this one with ``float_stem_depthwise=False``."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, groups=4)).eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 10, 10),), ["insert_qdq"])
    assert ops(gm) == ["conv2d", "hardtanh", "conv2d", "hardtanh", Q, DQ, QC, DQC, QC, DQC, "conv2d", Q, DQ,
                       QC, DQC, QC, DQC, "conv2d", Q, DQ]
    stats = report.row("insert_qdq").stats
    assert stats["skipped.narrow_input"] == stats["skipped.after_float_stem"] == 1 and stats["weights"] == 2
    assert error_vs_eager(gm, model, flat).cosine > 0.99
    _, report, _ = apply(model, (torch.randn(2, 3, 10, 10),), ["insert_qdq{float_stem_depthwise=False}"])
    assert "skipped.after_float_stem" not in report.row("insert_qdq").stats
    assert report.row("insert_qdq").stats["weights"] == 3
    calibration = [(torch.randn(2, 3, 10, 10),)]
    gm, report, _ = apply(model, (torch.randn(2, 3, 10, 10),), ["equalize_activations", "insert_qdq"],
                          calibration=calibration)
    assert report.row("equalize_activations").stats["clips_rescaled"] == 1  # the stem's relu6: a per-channel clamp
    assert report.row("insert_qdq").stats["skipped.after_float_stem"] == 1


class Unquantizable(nn.Module):
    """A conv whose weight is an input (not a constant) and an integer-only matmul."""

    def forward(self, x, w, idx):
        return nn.functional.conv2d(x, w), (idx @ idx).sum()


def test_what_cannot_be_lowered_stays_float_and_is_counted():
    example = (torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randint(0, 3, (2, 2)))
    gm, report, _ = apply(Unquantizable(), example, ["insert_qdq"])
    assert count(gm, Q, QC) == 0
    assert report.row("insert_qdq").stats == {"skipped.non_constant_weight": 1, "skipped.not_float32": 1,
                                              "activations": 0, "weights": 0}


class TiedHead(nn.Module):
    """A layer's weight read again by a matmul: a tied embedding/decoder (``h @ enc.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 16)

    def forward(self, x):
        return torch.relu(self.enc(x)) @ self.enc.weight


def test_a_weight_also_read_as_an_activation_keeps_its_weight_quantizer():
    """The matmul's pair on the shared constant took over the linear's weight argument too, and quantize_weight
    then found no constant behind it (a raw AttributeError wrapped as a PassError, for every tied-head model)."""
    model = TiedHead().eval()
    calibration = [(torch.randn(16, 8),) for _ in range(8)]
    gm, report, flat = apply(model, (torch.randn(2, 8),), ["insert_qdq", "calibrate"], calibration=calibration)
    stats = report.row("insert_qdq").stats
    assert stats["quantized.linear"] == 1 and stats["quantized.matmul"] == 1 and stats["weights"] == 1
    linear = next(n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    assert "dequantize_per_channel" in str(linear.args[1].target)  # its own per-channel weight grid
    assert error_vs_eager(gm, model, flat).max_rel < 0.05


def test_a_float16_model_is_left_float16_and_counted():
    """A dequantize returns float32, so pairs in a float16 graph changed its output dtype (a VerificationError)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).half()
    gm, report, flat = apply(model, (torch.randn(2, 4, dtype=torch.float16),), ["insert_qdq"])
    assert count(gm, Q, QC) == 0 and report.row("insert_qdq").stats["skipped.not_float32"] == 2
    assert gm(*flat)[0].dtype == torch.float16


def test_fusion_groups_cut_by_a_qdq_pair_lose_their_tags():
    model, example = ZOO["convbnrelu"]()
    gm, report, _ = apply(model, example, ["fuse", "insert_qdq"])
    assert report.row("insert_qdq").stats["fusion_groups_split"] == 1  # conv → Q → DQ → add + relu
    assert [g["pattern"] for g in {id(n.meta[FUSION_KEY]): n.meta[FUSION_KEY] for n in gm.graph.nodes
                                   if FUSION_KEY in n.meta}.values()] == ["conv2d+relu"]


def test_skip_keeps_named_layers_float():
    model, example = ZOO["convbnrelu"]()
    gm, report, _ = apply(model, example, ["fuse", "insert_qdq{skip=('conv1', 'fc')}"])
    stats = report.row("insert_qdq").stats
    assert stats["skipped.by_name"] == 2 and stats["quantized.conv2d"] == 1 and stats["weights"] == 1


def test_with_float_is_the_skip_pipeline_without_rerunning_it():
    """with_float(quantized, before, layers) gives the graph insert_qdq{skip=layers} → calibrate makes: the same Q/DQ
    pairs (the first layer's input pair goes; its output stays on its grid, which the int8 second layer reads) and
    the same numbers on fresh inputs."""
    from fxforge.compiler.pass_manager import PassContext, PassManager
    from fxforge.compiler.trace import trace
    from fxforge.passes import InsertQdq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    before, _ = trace(model, (torch.randn(2, 8),))
    calibration = [(torch.randn(32, 8),) for _ in range(3)]
    first = next(n.name for n in before.graph.nodes if n.op == "call_function" and "linear" in str(n.target))

    def quantize(skip):
        ctx = PassContext((torch.randn(2, 8),), calibration=calibration)
        spec = [InsertQdq(skip=skip), "calibrate"]
        return PassManager(spec, verify="off", measure_latency=False).run(copy.deepcopy(before), ctx)[0], ctx

    quantized, ctx = quantize(())
    rerun, _ = quantize((first,))
    view = InsertQdq().with_float(quantized, before, (first,), ctx)
    assert ops(view) == ops(rerun) and len(activation_qs(view)) == len(activation_qs(quantized)) - 1
    assert [q.args[0].name for q in activation_qs(view)] == [q.args[0].name for q in activation_qs(rerun)]
    x = torch.randn(64, 8)
    with torch.no_grad():
        assert torch.allclose(view(x)[0], rerun(x)[0], rtol=0, atol=1e-6)
        assert not torch.allclose(view(x)[0], quantized(x)[0], rtol=0, atol=1e-6)
    assert len(activation_qs(quantized)) == 4  # the input of every linear and the output: with_float copied


class SqueezeExcite(nn.Module):
    """EfficientNet's block in miniature: conv → SiLU, then a squeeze-excitation gate (mean → conv → SiLU → conv →
    sigmoid) multiplying the features, then a conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.out = (nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1),
                                                   nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1))

    def forward(self, x):
        y = nn.functional.silu(self.conv(x))
        gate = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * gate)


def test_silu_and_gates_get_grids_of_their_own():
    """Each SiLU reading a pair becomes x · sigmoid(x); every sigmoid and mul of planned tensors gets a pair, and so
    does the pooled mean of the gated features: nothing between two convs is left on float."""
    model = SqueezeExcite().eval()
    gm, report, flat = apply(model, (torch.randn(2, 8, 8, 8),), ["fuse", "insert_qdq"])
    assert "silu" not in ops(gm)
    quantized = {q.args[0].name for q in activation_qs(gm)}
    assert quantized == {"x", "conv2d", "silu_sigmoid", "silu_mul", "mean", "conv2d_1", "silu_1_sigmoid",
                         "silu_1_mul", "conv2d_2", "sigmoid", "mul", "conv2d_3"}
    mul = next(n for n in gm.graph.nodes if n.name == "silu_mul")
    assert [a.args[0].args[0].name for a in mul.args] == ["conv2d", "silu_sigmoid"]  # x · sigmoid(x), both on grids
    assert report.row("insert_qdq").stats["silu_split"] == 2
    assert error_vs_eager(gm, model, flat).cosine > 0.99


def test_a_silu_on_a_float_tensor_stays_whole():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU()).eval()  # a narrow stem: float, so its SiLU too
    gm, report, _ = apply(model, (torch.randn(2, 3, 8, 8),), ["insert_qdq"])
    assert ops(gm) == ["conv2d", "silu"] and "silu_split" not in report.row("insert_qdq").stats


@pytest.mark.slow  # test_fold_qdq covers resnet18 through the whole preset
def test_resnet18_counts_and_numerics():
    model, example = ZOO["resnet18"]()
    gm, report, flat = apply(model, example, ["fuse", "insert_qdq"])
    stats = report.row("insert_qdq").stats
    assert stats["quantized.conv2d"] == 20 and stats["quantized.linear"] == 1 and stats["weights"] == 21
    assert count(gm, QC) == count(gm, DQC) == 42  # weight and bias of every conv/linear (the 7×7 stem too)
    assert error_vs_eager(gm, model, flat).cosine > 0.99


@pytest.mark.parametrize("name", ["convbnrelu", "mlp", pytest.param("bert", marks=pytest.mark.slow),
                                  pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_zoo_runs_and_stays_close(name):
    model, example = ZOO[name]()
    gm, report, flat = apply(model, example, ["fuse", "insert_qdq"])
    assert report.row("insert_qdq").stats["weights"] > 0
    sample = error_vs_eager(gm, model, flat, seed=CHECK_SEED)  # ranges from the example inputs, checked on fresh ones
    assert sample.cosine > 0.99 and report.final.cosine <= sample.cosine  # the row states a bound over 8 batches


def test_a_second_run_is_refused_by_name():
    """Before: a second insert_qdq skipped what the first quantized (``skipped.already_quantized``) but quantized
    what the first kept float, which the accuracy budget had recorded as float (``["int8", "int8_dynamic"]``)."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    with pytest.raises(PassError, match=r"^pass 'insert_qdq' runs once in a pipeline \(got: insert_qdq → insert_qdq\)"):
        apply(model, (torch.rand(2, 4, 8, 8),), ["insert_qdq", "insert_qdq"])


def test_layers_dead_channels_emptied_stay_float():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 4, bias=False)).eval()
    nn.init.zeros_(model[0].weight)  # every channel constant: dead_channels removes them all
    gm, report, flat = apply(model, (torch.randn(2, 3),), ["dead_channels", "insert_qdq"])
    assert report.row("insert_qdq").stats == {"skipped.empty_weight": 2, "activations": 0, "weights": 0}
    assert error_vs_eager(gm, model, flat).max_rel == 0


def test_a_tensor_already_on_a_grid_is_not_quantized_again():
    from test_fold_qdq import RequantizedBlock
    gm, report, _ = apply(RequantizedBlock().eval(), (torch.randn(2, 3, 8, 8),), ["insert_qdq"])
    assert report.row("insert_qdq").stats["reused_grids"] == 1
    conv_b = [n for n in gm.graph.nodes if n.name == "conv2d_1"][0]
    assert conv_b.args[0].args[1:3] == (0.05, 3)  # conv b reads the model's own grid 2


class LinearMatmul(nn.Module):
    """A linear (quantized dynamically) and a matmul of two activations (left float under dynamic)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.fc(x)
        return y @ y.transpose(-1, -2)


def test_dynamic_linear_before_expected():
    model = LinearMatmul().eval()
    x = torch.randn(2, 3, 6)
    x[0, 0] *= 50  # one outlier token: per-row scales keep it from coarsening the others
    gm, report, flat = apply(model, (x,), ["insert_qdq{activations='dynamic',reduce_range=False}"])
    assert [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"] == \
        ["dynamic_linear.default", "transpose.int", "matmul.default"]
    assert report.row("insert_qdq").stats == \
        {"dynamic_linears": 1, "weight_bits": 8, "skipped.dynamic_float": 1}
    assert "fc.weight" not in dict(gm.named_parameters())  # the float weight goes with its linear (3x the bytes)
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    s_w = w.abs().amax(1) / 127  # expected: int8 weights per output channel, activations per row
    s_r = x.abs().amax(-1, keepdim=True) / 127
    expected = (torch.round(x / s_r) @ torch.round(w / s_w[:, None]).T) * s_r * s_w + b
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(get_tensor(gm, node.args[1]), torch.round(w / s_w[:, None]).to(torch.int8))
    torch.testing.assert_close(get_tensor(gm, node.args[2]), s_w)
    out, = gm(x)
    torch.testing.assert_close(out, expected @ expected.transpose(-1, -2), rtol=1e-4, atol=1e-3)
    reference = model.fc(x)
    per_row = (expected - reference).abs().amax(-1) / reference.abs().amax(-1)
    assert per_row.max() < 0.02  # the outlier token does not spoil the other rows


def test_dynamic_leaves_non_constant_weights_float():
    class Shared(nn.Module):
        def forward(self, x, w):
            return torch.nn.functional.linear(x, w)
    gm, report, flat = apply(Shared(), (torch.randn(2, 3), torch.randn(4, 3)), ["insert_qdq{activations='dynamic'}"])
    assert report.row("insert_qdq").stats == {"skipped.non_constant_weight": 1,
                                                                     "dynamic_linears": 0}
    assert count(gm, "linear") == 1


def test_dynamic_bert_numerics():
    model, example = ZOO["bert"]()
    gm, report, flat = apply(model, example, ["fuse", "smooth_quant", "insert_qdq{activations='dynamic'}"])
    assert report.row("insert_qdq").stats["dynamic_linears"] == \
        6 * len(model.bert.encoder.layer)
    assert count(gm, "linear") == 0
    err = error_vs_eager(gm, model, flat)
    assert err.max_rel < 5e-3 and err.cosine > 0.9999


def test_dynamic_option_is_checked():
    with pytest.raises(PassError, match="option 'activations' of pass 'insert_qdq'"):
        apply(LinearMatmul(), (torch.randn(2, 3, 6),), ["insert_qdq{activations='per_row'}"])


def test_dynamic_with_float_keeps_the_named_layers_float():
    """with_float on a dynamic graph is insert_qdq{activations='dynamic', skip=layers} on ``before``: the named linear
    float again, the other dynamic (it used to return the quantized graph unchanged, so the budget's estimates did
    not move with the number of float layers)."""
    from fxforge.compiler.pass_manager import PassContext
    from fxforge.compiler.trace import trace
    from fxforge.passes import InsertQdq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    before, _ = trace(model, (torch.randn(2, 8),))
    first = next(n.name for n in before.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    ctx = PassContext((torch.randn(2, 8),))
    quantized = copy.deepcopy(before)
    InsertQdq(activations="dynamic", reduce_range=False).run(quantized, ctx)
    view = InsertQdq(activations="dynamic", reduce_range=False).with_float(quantized, before, (first,), ctx)
    assert ops(quantized) == ["dynamic_linear", "relu", "dynamic_linear"]
    assert ops(view) == ["linear", "relu", "dynamic_linear"]
    w = model[2].weight.detach()
    s_w = w.abs().amax(1) / 127
    x = torch.randn(64, 8)
    with torch.no_grad():
        expected = torch.ops.fxforge.dynamic_linear(model[1](model[0](x)), torch.round(w / s_w[:, None]).to(torch.int8),
                                                    s_w, model[2].bias, 0.0)  # it reads a relu: x ≥ 0
        torch.testing.assert_close(view(x)[0], expected)
        assert not torch.allclose(quantized(x)[0], expected)


class Ffn(nn.Module):
    """A transformer's feed-forward block: up-projection, GELU, down-projection."""

    def __init__(self, d: int = 32, hidden: int = 128):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_dynamic_input_after_gelu_is_quantized_shifted_on_the_unsigned_grid():
    """Before: linear(gelu(linear(x))). Expected: the down-projection's dynamic_linear carries GELU's lower bound
    −0.17 and computes x − m on [0, 255] per row plus m · Σ W_q · s_w; the up-projection (reading the input)
    stays symmetric."""
    torch.manual_seed(0)
    model = Ffn().eval()
    x = torch.randn(2, 5, 32)
    gm, report, flat = apply(model, (x,), ["insert_qdq{activations='dynamic',reduce_range=False}"])
    assert report.row("insert_qdq").stats == {"dynamic_linears": 2, "dynamic_shifted": 1, "weight_bits": 8}
    up, down = [n for n in gm.graph.nodes if n.op == "call_function" and "dynamic_linear" in str(n.target)]
    assert len(up.args) == 5 and up.args[4] is None and down.args[4] == -0.17
    h = torch.nn.functional.gelu(model.up(x)).detach()  # (the up-projection's own rounding aside)
    w, b = model.down.weight.detach(), model.down.bias.detach()
    s_w = w.abs().amax(1) / 127
    w_q = torch.round(w / s_w[:, None])
    s_r = (h + 0.17).amax(-1, keepdim=True) / 255
    expected = (torch.round((h + 0.17) / s_r) @ w_q.T) * s_r * s_w - 0.17 * w_q.sum(1) * s_w + b
    got = torch.ops.fxforge.dynamic_linear(h, w_q.to(torch.int8), s_w, b, -0.17)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class TanhFfn(Ffn):
    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh"))


def test_the_tanh_gelu_bound_is_at_or_below_its_minimum():
    """tanh GELU dips to −0.170041, below erf GELU's −0.169971: the down-projection after it gets −0.1701, and no
    value of its input lies under the bound (none is clamped on the shifted grid)."""
    torch.manual_seed(0)
    gm, _, _ = apply(TanhFfn().eval(), (torch.randn(2, 5, 32),), ["insert_qdq{activations='dynamic'}"])
    down = [n for n in gm.graph.nodes if n.op == "call_function" and "dynamic_linear" in str(n.target)][-1]
    assert down.args[4] == -0.1701
    grid = torch.linspace(-4, 4, 800001)
    assert torch.nn.functional.gelu(grid, approximate="tanh").min() >= -0.1701
    assert torch.nn.functional.gelu(grid).min() >= -0.17


def test_shifted_inputs_can_be_turned_off():
    gm, report, _ = apply(Ffn().eval(), (torch.randn(2, 5, 32),),
                          ["insert_qdq{activations='dynamic',shifted_inputs=False}"])
    assert "dynamic_shifted" not in report.row("insert_qdq").stats
    assert all(n.args[4] is None for n in gm.graph.nodes if "dynamic_linear" in str(n.target))


def test_shifted_grid_halves_the_error_of_a_linear_reading_gelu():
    """The unsigned grid spends its 256 levels on [−0.17, max] where the symmetric one wastes half on
    [−max, −0.17]: on GELU outputs the mean squared output error of the linear reading them falls to about a
    quarter (0.27×)."""
    torch.manual_seed(1)
    h = torch.nn.functional.gelu(torch.randn(256, 512) * 2)
    w = torch.randn(64, 512) / 512 ** 0.5
    s_w = w.abs().amax(1) / 127
    w_q = torch.round(w / s_w[:, None]).to(torch.int8)
    exact = h @ (w_q.float() * s_w[:, None]).T  # the weight rounding alone, the same in both
    err = {m: (torch.ops.fxforge.dynamic_linear(h, w_q, s_w, None, m) - exact).pow(2).mean() for m in (None, -0.17)}
    assert err[-0.17] < 0.6 * err[None]


class _EqualizedPair(nn.Module):
    """conv → clamp(·, 0, h_c) → depthwise conv: a relu6 that equalize_activations rescaled per channel."""

    def __init__(self, ceilings):
        super().__init__()
        torch.manual_seed(0)
        c = len(ceilings)
        self.a, self.b = nn.Conv2d(3, c, 1), nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.register_buffer("floor", torch.zeros(c, 1, 1))
        self.register_buffer("ceiling", torch.tensor(ceilings).reshape(-1, 1, 1))

    def forward(self, x):
        return self.b(torch.clamp(self.a(x), self.floor, self.ceiling))


class _Relu6Pair(nn.Module):
    """What insert_qdq makes of ``_EqualizedPair`` with both layers float: A's channel c scaled by
    t_c = min h / h_c, hardtanh(·, 0, min h), B's input channel c scaled by 1 / t_c."""

    def __init__(self, pair, ceilings):
        super().__init__()
        self.a, self.b = copy.deepcopy(pair.a), copy.deepcopy(pair.b)
        t = min(ceilings) / torch.tensor(ceilings)
        with torch.no_grad():
            self.a.weight.mul_(t.reshape(-1, 1, 1, 1))
            self.a.bias.mul_(t)
            self.b.weight.div_(t.reshape(-1, 1, 1, 1))
        self.top = min(ceilings)

    def forward(self, x):
        return self.b(nn.functional.hardtanh(self.a(x), 0.0, self.top))


def test_before_expected_a_per_channel_clip_between_float_layers_gets_one_ceiling():
    """Both layers of a rescaled pair float (``skip``): no grid between them, so the clip's channel scaling is
    undone, clamp(A(x), 0, h_c) → hardtanh(A'(x), 0, min h); exact on fresh inputs; stat ``clips_restored``."""
    from graphs import assert_same_graph, traced

    ceilings = [6.0, 7.5, 60.0, 12.0]
    x = torch.randn(2, 3, 6, 6)
    pair = _EqualizedPair(ceilings).eval()
    gm, report, flat = apply(pair, (x,), ["insert_qdq{skip=('conv2d','conv2d_1')}"])
    assert report.row("insert_qdq").stats["clips_restored"] == 1
    expected = _Relu6Pair(pair, ceilings).eval()
    assert_same_graph(gm, traced(expected, x))
    a, b = (get_tensor(gm, n.args[1]) for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    torch.testing.assert_close(a, expected.a.weight)
    torch.testing.assert_close(b, expected.b.weight)
    assert error_vs_eager(gm, pair, flat).max_rel < 1e-5


def test_a_per_channel_clip_with_a_grid_or_two_readers_keeps_its_ceilings():
    """A clip whose tensor gets a grid (here both layers int8) keeps its channels' ceilings, which the scaling was
    for (``fold_qdq`` folds them into the grid); one read twice cannot be undone in a single reader."""
    from graphs import assert_same_graph, traced

    ceilings = [6.0, 3.0, 9.0, 12.0]
    x = torch.randn(2, 3, 6, 6)
    gm, report, _ = apply(_EqualizedPair(ceilings).eval(), (x,), ["insert_qdq{min_input_window=0}"])
    assert "clips_restored" not in report.row("insert_qdq").stats and count(gm, "clamp") == 1

    class Twice(_EqualizedPair):
        def forward(self, x):
            y = torch.clamp(self.a(x), self.floor, self.ceiling)
            return self.b(y) + y

    gm, report, _ = apply(Twice(ceilings).eval(), (x,), ["insert_qdq{skip=('conv2d','conv2d_1')}"])
    assert "clips_restored" not in report.row("insert_qdq").stats
    assert_same_graph(gm, traced(Twice(ceilings).eval(), x))


def test_with_float_restores_the_clip_as_the_skip_pipeline_does():
    """The budget's estimate (with_float) of a rescaled pair kept float has the same one-ceiling clip as the
    rerun with ``skip``, not the per-channel clamp the int8 graph folded into its grid."""
    from fxforge.compiler.pass_manager import PassContext, PassManager
    from fxforge.compiler.trace import trace
    from fxforge.passes import InsertQdq

    x = torch.randn(2, 3, 6, 6)
    before, _ = trace(_EqualizedPair([6.0, 7.5, 60.0, 12.0]).eval(), (x,))
    calibration = [(torch.randn(4, 3, 6, 6),) for _ in range(2)]
    layers = ("conv2d", "conv2d_1")

    def quantize(skip):
        ctx = PassContext((x,), calibration=calibration)
        spec = [InsertQdq(skip=skip, min_input_window=0), "calibrate"]
        return PassManager(spec, verify="off", measure_latency=False).run(copy.deepcopy(before), ctx)[0], ctx

    quantized, ctx = quantize(())
    rerun, _ = quantize(layers)
    view = InsertQdq(min_input_window=0).with_float(quantized, before, layers, ctx)
    assert count(quantized, "clamp") == 1 and ops(view) == ops(rerun) == ["conv2d", "hardtanh", "conv2d"]
    fresh = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(view(fresh)[0], rerun(fresh)[0], rtol=1e-5, atol=1e-5)


def test_a_skip_name_that_matches_no_layer_is_refused():
    """A misspelt name left the layer it meant quantized, without a word."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with pytest.raises(PassError, match=r"insert_qdq: skip 'linaer' names no layer \(node names such as 'linear', "
                                        r"'linear_1', or weight prefixes such as '0', '2'\)"):
        apply(model, (torch.randn(2, 4),), ["insert_qdq{skip=('linaer',)}"])
    gm, report, _ = apply(model, (torch.randn(2, 4),), ["insert_qdq{skip=('linear', '2')}"])
    assert report.row("insert_qdq").stats["skipped.by_name"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_model_of_another_dtype_than_float32_is_warned_of_not_quantized_silently(dtype):
    """int8 quantizes float32 layers only: a float16 or float64 model came out of `int8` unquantized, the budget
    "held" with no layer float, and only a count in the report's stats said why."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype).eval()
    calibration = [(torch.randn(16, 8, dtype=dtype),) for _ in range(4)]
    with pytest.warns(UserWarning, match="int8 quantized no layer: 2 compute in another dtype than float32"):
        cm = fxforge.compile(model, (torch.randn(2, 8, dtype=dtype),), passes=["int8"], backend="eager",
                             calibration=calibration, measure_latency=False)
    assert cm.report.row("insert_qdq").stats["skipped.not_float32"] == 2


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.up = nn.Conv2d(16, 16, 3, padding=1), nn.ConvTranspose2d(16, 4, 2, stride=2)

    def forward(self, x):
        return self.up(torch.relu(self.conv(x)))


def test_layers_left_float_for_want_of_an_int8_kernel_are_counted():
    """A decoder's stats said quantized.conv2d=1 and nothing of its transposed convs, which stayed float."""
    import fxforge
    cm = fxforge.compile(Decoder().eval(), (torch.randn(2, 16, 8, 8),), passes=["int8"], max_drop=float("inf"),
                         calibration=[(torch.randn(2, 16, 8, 8),) for _ in range(4)], measure_latency=False)
    stats = cm.report.row("insert_qdq").stats
    assert stats["quantized.conv2d"] == 1 and stats["skipped.no_int8_kernel.conv_transpose2d"] == 1


def test_dynamic_quantization_of_a_model_without_linears_changes_nothing():
    """Before: with no linear to replace, the dynamic rewrite still cleaned the graph (an unfused BatchNorm's unused
    outputs went), so the pass manager refused it: "changed the graph ... but returned changed=False"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    cm = fxforge.compile(model, (torch.randn(2, 3, 16, 16),), passes=["insert_qdq{activations='dynamic'}"],
                         backend="eager", measure_latency=False)
    assert cm.report.row("insert_qdq").stats == {"skipped.narrow_input": 1, "skipped.dynamic_float": 1,
                                                 "dynamic_linears": 0}
