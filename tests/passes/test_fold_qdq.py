"""fold_qdq: int8 constants, relu/relu6 folded into output ranges, DQ→Q round trips removed; all exact."""
import copy

import pytest
import torch
from torch import nn

from fxforge.compiler.pass_manager import PassContext
from fxforge.compiler.report import model_size
from fxforge.passes.fold_qdq import FoldQdq
from fxforge.passes.lib.qdq import qd
from models import ZOO
from pipeline import apply, count
from test_insert_qdq import DQ, DQC, Q, QC, ops

UNFOLDED = ["fuse", "insert_qdq", "calibrate"]


def _both(model, example, calibration, insert="insert_qdq"):
    """The calibrated graph before and after fold_qdq, and fold_qdq's stats."""
    before, report, flat = apply(model, example, ["fuse", insert, "calibrate"], calibration=calibration)
    after = copy.deepcopy(before)
    result = FoldQdq().run(after, PassContext(flat))
    after.recompile()
    return before, after, result.stats, flat


def _same_integers(before, after, flat, seeds=(1, 2)):
    from fxforge.compiler.verify import fresh_inputs
    for seed in seeds:
        inputs = fresh_inputs(flat, seed)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(after(*inputs), before(*inputs)))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6()], ids=["relu", "relu6"])
def test_conv_activation_before_expected(act):
    model = nn.Sequential(nn.Conv2d(4, 8, 3), act).eval()
    cal = [(torch.randn(2, 4, 8, 8) * 3,) for _ in range(2)]
    before, after, stats, flat = _both(model, (torch.randn(2, 4, 8, 8),), cal)
    assert ops(before) == [Q, DQ, QC, DQC, QC, DQC, "conv2d", "hardtanh" if isinstance(act, nn.ReLU6) else "relu",
                           Q, DQ]
    assert ops(after) == [Q, DQ, DQC, DQC, "conv2d", Q, DQ]
    conv = next(n for n in after.graph.nodes if n.name == "conv2d")
    weight, bias = (getattr(after, dq.args[0].target) for dq in conv.args[1:3])
    assert weight.dtype == torch.int8 and weight.abs().max() <= 127 and bias.dtype == torch.int32
    assert stats == {"constants_folded": 2, "activations_folded": 1, "requantizations_removed": 0,
                     "requantizations_merged": 0}
    _same_integers(before, after, flat)


def test_relu_stays_when_the_zero_point_is_not_the_minimum():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Hardtanh(-1.0, 1.0)).eval()
    cal = [(torch.randn(2, 3, 8, 8),)]
    before, after, stats, flat = _both(model, (torch.randn(2, 3, 8, 8),), cal, "insert_qdq{symmetric_activations=True}")
    assert count(after, "relu") == 1 and count(after, "hardtanh") == 1  # zero point 128: relu is not the clamp
    assert stats["activations_folded"] == 0
    _same_integers(before, after, flat)


class RoundTrips(nn.Module):
    """Q→DQ→Q with the same parameters (a no-op) and then with new ones (a real requantization)."""

    def forward(self, x):
        args = (0, 255, torch.uint8)
        y = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, 0.1, 3, *args), 0.1, 3, *args)
        y = qd.dequantize_per_tensor(qd.quantize_per_tensor(y, 0.1, 3, *args), 0.1, 3, *args)
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(y, 0.2, 3, *args), 0.2, 3, *args)


def test_round_trip_is_removed_and_requantization_merged_into_one_lookup():
    model = RoundTrips()
    x = torch.randn(2, 1000) * 20
    gm, report, flat = apply(model, (x,), ["insert_qdq", "calibrate", "fold_qdq"], calibration=[(x,)])
    assert ops(gm) == [Q, "_to_copy", "index", DQ]  # Q(0.1) → lookup into grid 0.2 → DQ(0.2)
    stats = report.row("fold_qdq").stats
    assert (stats["requantizations_removed"], stats["requantizations_merged"]) == (1, 1)
    with torch.no_grad():
        assert torch.equal(gm(x)[0], model(x))


def _chain(first: tuple, second: tuple):
    """x → Q₁ → DQ₁ → Q₂ → DQ₂, each grid given as (scale, zero point, quant_min, quant_max, dtype)."""

    class Chain(nn.Module):
        def forward(self, x):
            y = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *first), *first)
            return qd.dequantize_per_tensor(qd.quantize_per_tensor(y, *second), *second)

    return Chain()


@pytest.mark.parametrize("first, second, removed", [
    ((0.2, 0, 0, 127, torch.uint8), (0.1, 0, 0, 255, torch.uint8), True),  # a finer grid holding every value
    ((0.1, 0, -128, 127, torch.int8), (0.1, 128, 0, 255, torch.uint8), True),  # int8 → uint8, same values
    ((0.1, 0, 0, 255, torch.uint8), (0.1, 100, 0, 255, torch.uint8), False),  # shifted: top values clamp
    ((0.1, 3, 0, 255, torch.uint8), (0.3, 7, 0, 255, torch.uint8), False),  # coarser: values round
    ((0.05, -5, -128, 127, torch.int8), (0.07, 130, 0, 255, torch.uint8), False),  # int8 in, uint8 out
], ids=["finer", "int8-to-uint8", "shifted", "coarser", "int8-in"])
def test_requantization_chains_give_the_same_integers(first, second, removed):
    model = _chain(first, second)
    x = torch.linspace(-40, 40, 20001)  # every code of both grids, ties included
    gm, report, _ = apply(model, (x,), ["insert_qdq", "calibrate", "fold_qdq"], calibration=[(x,)])
    stats = report.row("fold_qdq").stats
    assert (stats["requantizations_removed"], stats["requantizations_merged"]) == (int(removed), int(not removed))
    assert count(gm, Q) == 1 and count(gm, DQ) == 1
    with torch.no_grad():
        assert torch.equal(gm(x)[0], model(x))


def test_a_chain_whose_dequantize_has_an_out_dtype_is_left_alone():
    first, second = (0.1, 3, 0, 255, torch.uint8), (0.3, 7, 0, 255, torch.uint8)

    class Bf16(nn.Module):
        def forward(self, x):
            q = qd.quantize_per_tensor(x, *first)
            y = qd.dequantize_per_tensor(q, *first, out_dtype=torch.bfloat16)
            return qd.dequantize_per_tensor(qd.quantize_per_tensor(y, *second), *second)

    x = torch.linspace(-40, 40, 2001)
    gm, report, _ = apply(Bf16(), (x,), ["insert_qdq", "calibrate", "fold_qdq"], calibration=[(x,)])
    assert count(gm, Q) == 2 and report.row("fold_qdq").stats["requantizations_merged"] == 0
    with torch.no_grad():
        assert torch.equal(gm(x)[0], Bf16()(x))


class RequantizedBlock(nn.Module):
    """conv → relu → a requantization from int8 grid 1 to a coarser uint8 grid 2 (as a model quantized elsewhere
    brings it) → conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        for grid in ((0.02, 0, -128, 127, torch.int8), (0.05, 3, 0, 255, torch.uint8)):  # int8: the lookup subtracts -128
            y = qd.dequantize_per_tensor(qd.quantize_per_tensor(y, *grid), *grid)
        return self.b(y)


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "tvm"])
def test_merged_requantization_lowers_on_every_backend(backend):
    import fxforge
    pytest.importorskip({"torchscript": "torch", "onnx": "onnxruntime", "tvm": "tvm"}[backend])
    torch.manual_seed(0)
    model, x = RequantizedBlock().eval(), torch.randn(2, 3, 8, 8)
    cm = fxforge.compile(model, (x,), passes=["int8"], backend=backend, calibration=[(torch.randn(2, 3, 8, 8),)])
    assert cm.report.row("fold_qdq").stats["requantizations_merged"] == 1
    assert count(cm.graph_module, "index") == 1
    fresh = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = cm.graph_module(fresh)[0]
    step = 0.05 * 0.02  # a few output quantization steps: ORT's int8 kernels round their accumulators
    torch.testing.assert_close(cm(fresh), reference, rtol=0, atol=max(step, 3 * reference.abs().max().item() / 255))


def test_resnet18_weights_shrink_four_times_and_integers_match():
    model, example = ZOO["resnet18"]()
    cal = [(torch.randn_like(example[0]),) for _ in range(2)]
    before, after, stats, flat = _both(model, example, cal)
    assert stats == {"constants_folded": 42, "activations_folded": 17, "requantizations_removed": 0,
                     "requantizations_merged": 0}
    assert count(after, QC) == 0 and count(after, "relu") == 0
    assert model_size(before)[1] / model_size(after)[1] > 3.8
    _same_integers(before, after, flat)


@pytest.mark.parametrize("name", ["convbnrelu", "mlp", pytest.param("bert", marks=pytest.mark.slow),
                                  pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_folding_is_exact_on_the_zoo(name):
    model, example = ZOO[name]()
    from fxforge.compiler.verify import fresh_inputs
    cal = [fresh_inputs(example, seed) for seed in (3, 4)]
    before, after, stats, flat = _both(model, example, cal)
    assert stats["constants_folded"] > 0
    _same_integers(before, after, flat)


U8 = (0, 255, torch.uint8)


class _ClampThenQdq(nn.Module):
    """clamp(x) → Q → DQ on a uint8 grid of the given scale and zero point."""

    def __init__(self, clamp, scale, zero_point):
        super().__init__()
        self.clamp, self.grid = clamp, (scale, zero_point, *U8)

    def forward(self, x):
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(self.clamp(x), *self.grid), *self.grid)


@pytest.mark.parametrize("clamp", [torch.relu, torch.nn.functional.relu6, nn.ReLU6()],
                         ids=["relu", "F.relu6", "nn.ReLU6"])
def test_before_expected_clamp_folds_into_the_grid(clamp):
    """Q(relu(y)) and Q(relu6(y)) in both ATen forms (relu6, hardtanh(0, 6)) → Q(y) when z = q_min, Q(6) = q_max."""
    from graphs import assert_same_graph, traced

    x = torch.randn(2, 16) * 4
    gm = traced(_ClampThenQdq(clamp, 6 / 255, 0), x)
    stats = FoldQdq().run(gm, PassContext((x,))).stats
    assert stats["activations_folded"] == 1
    assert_same_graph(gm, traced(_ClampThenQdq(nn.Identity(), 6 / 255, 0), x))
    assert torch.equal(gm(x)[0], _ClampThenQdq(clamp, 6 / 255, 0)(x))


def test_clamp_stays_when_the_zero_point_is_not_the_minimum():
    from graphs import assert_same_graph, traced

    x = torch.randn(2, 16)
    gm = traced(_ClampThenQdq(torch.relu, 0.05, 10), x)
    assert FoldQdq().run(gm, PassContext((x,))).stats["activations_folded"] == 0
    assert_same_graph(gm, traced(_ClampThenQdq(torch.relu, 0.05, 10), x))


class _ChannelCeiling(nn.Module):
    """clamp(x, 0, h_c) with a per-channel ceiling (what equalize{clip='rescale'} makes of a relu6)."""

    def __init__(self, ceilings):
        super().__init__()
        self.register_buffer("floor", torch.zeros(len(ceilings)))
        self.register_buffer("ceiling", torch.tensor(ceilings))

    def forward(self, x):
        return torch.clamp(x, self.floor, self.ceiling)


@pytest.mark.parametrize("ceilings, folds", [([6.0, 7.5, 9.0, 12.0], True), ([6.0, 3.0, 9.0, 12.0], False)],
                         ids=["all-above-the-grid", "one-below"])
def test_per_channel_ceiling_folds_only_when_every_channel_is_above_the_grid(ceilings, folds):
    """Q(clamp(y, 0, h_c)) → Q(y) when z = q_min and Q(min_c h_c) = q_max (grid top 6 here); a channel whose
    ceiling lies inside the grid keeps the clamp."""
    from graphs import assert_same_graph, traced

    x = torch.randn(3, 4) * 8
    make = lambda: _ClampThenQdq(_ChannelCeiling(ceilings), 6 / 255, 0)
    gm = traced(make(), x)
    assert FoldQdq().run(gm, PassContext((x,))).stats["activations_folded"] == int(folds)
    assert_same_graph(gm, traced(_ClampThenQdq(nn.Identity(), 6 / 255, 0), x) if folds else traced(make(), x))
    for seed in range(3):
        fresh = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)) * 8
        assert torch.equal(gm(fresh)[0], make()(fresh))


class Siamese(nn.Module):
    """One encoder applied to the input and to its mirror image."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        return self.head(torch.cat([self.enc(x), self.enc(x.flip(1))], 1))


def test_a_layer_applied_twice_keeps_one_int8_weight():
    """Each call site's weight quantizer became its own int8 constant: the encoder's int8 weights were stored twice
    and the int8 model had more parameters than the float one (5764 → 12052)."""
    import fxforge
    model = Siamese().eval()
    cm = fxforge.compile(model, (torch.randn(8, 16),), passes=["int8"], backend="eager", max_drop=float("inf"),
                         calibration=[(torch.randn(8, 16),) for _ in range(4)], measure_latency=False)
    int8 = sorted(name for name, t in cm.graph_module.named_buffers() if t.dtype == torch.int8)
    assert int8 == ["enc_0_weight_int8", "enc_2_weight_int8", "head_weight_int8"]
    assert cm.report.row("fold_qdq").params < cm.report.rows[0].params * 1.25  # the int32 biases and scales per site


def test_a_layer_applied_twice_keeps_one_int8_weight_when_quantized_dynamically():
    """int8_dynamic stored the shared encoder's int8 weights and scales once per call site (1221 → 2314 params, more
    than the float model) until its rewrite shared them as the static path does."""
    import fxforge
    model, x = Siamese().eval(), torch.randn(8, 16)
    cm = fxforge.compile(model, (x,), passes=["int8_dynamic"], calibration=[(x,)], measure_latency=False)
    int8 = sorted(name for name, t in cm.graph_module.named_buffers() if t.dtype == torch.int8)
    assert int8 == ["enc_0_weight_int8", "enc_2_weight_int8", "head_weight_int8"]
    float_row, final = cm.report.rows[0], cm.report.final
    assert final.params < float_row.params * 1.05 and final.bytes < float_row.bytes / 3  # plus a scale per channel
