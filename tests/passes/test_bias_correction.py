"""bias_correction: b' = b − E[ε x̂] from the calibration data; it lowers the measured output shift."""
import pytest
import torch
from torch import nn

from fxforge.compiler.errors import CalibrationError, PassError
from fxforge.compiler.graph import get_tensor
from fxforge.compiler.pass_manager import PassContext
from fxforge.compiler.verify import compare, fresh_inputs
from fxforge.passes import BiasCorrection
from models import ZOO
from pipeline import apply

QUANTIZE = ["insert_qdq", "calibrate"]


def ops(gm):
    return [getattr(n.target, "overloadpacket", n.target).__name__ for n in gm.graph.nodes if n.op == "call_function"]


def conv_node(gm):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default)


def test_bias_before_expected():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1)).eval()
    calibration = [(torch.randn(4, 4, 8, 8),)]
    before, _, _ = apply(model, (torch.randn(2, 4, 8, 8),), QUANTIZE, calibration=calibration)
    gm, report, _ = apply(model, (torch.randn(2, 4, 8, 8),), [*QUANTIZE, "bias_correction"], calibration=calibration)
    assert ops(gm) == ops(before)  # only the float bias behind its Q node changes
    conv = conv_node(before)
    x_dq, w_dq, b_dq = conv.args[:3]
    x = torch.relu(calibration[0][0])
    x_hat = x_dq.target(x_dq.args[0].target(x, *x_dq.args[0].args[1:]), *x_dq.args[1:])
    w = model[1].weight.detach()
    w_q = torch.ops.quantized_decomposed.dequantize_per_channel(
        torch.ops.quantized_decomposed.quantize_per_channel(w, *(get_tensor(before, a) if hasattr(a, "op") else a
                                                                 for a in w_dq.args[0].args[1:])),
        *(get_tensor(before, a) if hasattr(a, "op") else a for a in w_dq.args[1:]))
    shift = nn.functional.conv2d(x_hat, w_q - w, padding=1).mean((0, 2, 3))
    new_bias = get_tensor(gm, conv_node(gm).args[2].args[0].args[0])
    torch.testing.assert_close(new_bias, model[1].bias.detach() - shift, rtol=1e-5, atol=1e-7)
    stats = report.row("bias_correction").stats
    assert stats["corrected"] == 1 and stats["samples"] == 4
    assert stats["max_abs_shift"] == pytest.approx(float(shift.abs().max()), rel=1e-4)


class Depthwise(nn.Module):
    """relu (inputs ≥ 0, so E[x] ≠ 0) → depthwise 3×3 whose channels each hold one large weight: 7-bit grids
    round the eight small ones coarsely and in the same direction for every position."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        with torch.no_grad():
            self.dw.weight.uniform_(0.05, 0.3)
            self.dw.weight[:, 0, 1, 1] = 6.0

    def forward(self, x):
        return self.dw(torch.relu(x))


def _output_shift(gm, model, seed):
    x = fresh_inputs((torch.randn(8, 16, 12, 12),), seed)
    with torch.no_grad():
        return (gm(*x)[0] - model(*x)).mean((0, 2, 3)).norm().item()


@pytest.mark.parametrize("shift", ["weights", "output"])
def test_correction_lowers_the_measured_output_shift(shift):
    model = Depthwise().eval()
    g = torch.Generator().manual_seed(3)
    calibration = [(torch.randn(8, 16, 12, 12, generator=g),) for _ in range(4)]
    quantize = ["insert_qdq{reduce_range=True}", "calibrate"]
    plain, _, _ = apply(model, calibration[0], quantize, calibration=calibration)
    corrected, report, _ = apply(model, calibration[0], [*quantize, f"bias_correction{{shift='{shift}'}}"],
                                 calibration=calibration)
    before, after = (_output_shift(gm, model, 11) for gm in (plain, corrected))
    assert after < 0.3 * before, (before, after)  # measured on fresh inputs: 0.104 → 0.0059
    assert report.row("bias_correction").stats["corrected"] == 1


def test_layers_it_cannot_correct_are_left_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 3)).eval()
    calibration = [(torch.randn(2, 4, 6, 6),)]
    gm, report, _ = apply(model, calibration[0], ["insert_qdq{skip=('conv2d',)}", "calibrate", "bias_correction"],
                          calibration=calibration)
    assert report.row("bias_correction").stats == {"corrected": 0}  # before: {}


def test_after_fold_qdq_it_is_refused():
    """Before: after ``fold_qdq`` the pass ran and counted every layer ``skipped.weight_folded`` (its rounding
    stored as integers, nothing to correct). Expected: the pipeline is refused, and a folded graph given to the
    pass by name."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3)).eval()
    calibration = [(torch.randn(2, 4, 6, 6),)]
    with pytest.raises(PassError, match="^pass 'bias_correction' must come before 'fold_qdq' in the pipeline"):
        apply(model, calibration[0], [*QUANTIZE, "fold_qdq", "bias_correction"], calibration=calibration)
    folded, _, flat = apply(model, calibration[0], [*QUANTIZE, "fold_qdq"], calibration=calibration)
    with pytest.raises(PassError, match="^bias_correction must run before fold_qdq: this graph's quantization is"):
        BiasCorrection().run(folded, PassContext(flat, calibration=calibration))


def test_layer_without_bias_is_counted():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, bias=False)).eval()
    calibration = [(torch.randn(2, 4, 6, 6),)]
    gm, report, _ = apply(model, calibration[0], [*QUANTIZE, "bias_correction"], calibration=calibration)
    assert report.row("bias_correction").stats == {"corrected": 0, "skipped.no_bias": 1}


def test_needs_calibration_data_and_a_quantized_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    calibration = [(torch.randn(2, 3, 6, 6),)]
    gm, _, flat = apply(model, calibration[0], QUANTIZE, calibration=calibration)
    with pytest.raises(CalibrationError, match="bias_correction"):
        BiasCorrection().run(gm, PassContext(flat))
    with pytest.raises(PassError, match="must come after"):
        apply(model, (torch.randn(2, 3, 6, 6),), ["bias_correction"], calibration=[(torch.randn(2, 3, 6, 6),)])


@pytest.mark.parametrize("name", ["convbnrelu", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_zoo_int8_with_correction_stays_close_to_eager(name):
    model, example = ZOO[name]()
    calibration = [fresh_inputs(example, s) for s in (3, 4)]
    gm, report, flat = apply(model, example, ["fuse", *QUANTIZE, "bias_correction", "fold_qdq"],
                             calibration=calibration)
    assert report.row("bias_correction").stats["corrected"] > 0
    test = fresh_inputs(example, 9)
    with torch.no_grad():
        assert compare(list(gm(*test)), [model(*test)]).cosine > 0.99


def test_max_samples_limits_what_is_measured():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    calibration = [(torch.randn(4, 4, 6, 6),) for _ in range(3)]
    gm, report, _ = apply(model, calibration[0], [*QUANTIZE, "bias_correction{max_samples=6}"],
                          calibration=calibration)
    assert report.row("bias_correction").stats["samples"] == 6
    with pytest.raises(PassError, match="max_samples must be at least 1"):
        apply(model, calibration[0], [*QUANTIZE, "bias_correction{max_samples=0}"], calibration=calibration)


@pytest.mark.parametrize("shift", ["weights", "output"])
def test_joined_batches_give_the_batch_by_batch_biases(shift, monkeypatch):
    """With a dynamic batch the calibration batches run concatenated (5 batches of 1–3 samples: 2 runs of at most
    16 samples instead of 5); the shifts are means over the same samples, so every corrected bias equals the
    batch-by-batch one (up to summation order)."""
    import copy
    from fxforge.passes import bias_correction
    model = nn.Sequential(nn.Conv2d(3, 16, 3), Depthwise(), nn.Conv2d(16, 4, 1)).eval()
    g = torch.Generator().manual_seed(5)
    calibration = [(torch.randn(1 + i % 3, 3, 14, 14, generator=g),) for i in range(5)] + \
        [(torch.randn(7, 3, 14, 14, generator=g),)] * 2
    quantize, _, flat = apply(model, calibration[0], QUANTIZE, calibration=calibration)
    runs = []
    run = bias_correction._PairRun.run
    monkeypatch.setattr(bias_correction._PairRun, "run", lambda self, *a: runs.append(len(a[0])) or run(self, *a))

    def corrected():
        gm = copy.deepcopy(quantize)
        BiasCorrection(shift=shift).run(gm, PassContext(flat, calibration=calibration))
        return [get_tensor(gm, n).clone() for n in gm.graph.nodes if n.op == "get_attr" and "bias" in n.target
                and get_tensor(gm, n).is_floating_point() and get_tensor(gm, n).dim() == 1]

    joined = corrected()
    assert runs == [2]  # two joined chunks: 1+2+3+1+2+7 = 16 samples, then 7
    runs.clear()
    monkeypatch.setattr(bias_correction, "batch_symbol", lambda gm: None)
    one_by_one = corrected()
    assert runs == [7]
    assert len(joined) == len(one_by_one) >= 3
    for a, b in zip(joined, one_by_one):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_unbatched_linear_is_corrected_per_output_channel():
    """A rank-1 input: the linear's output is its channel dimension alone (the sum over the other dims, none, once
    reduced it to one scalar and the pass failed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU()).eval()
    gm, report, _ = apply(model, (torch.randn(6),), ["insert_qdq", "calibrate", "bias_correction"],
                          calibration=[(torch.randn(6),) for _ in range(4)])
    assert report.row("bias_correction").stats["corrected"] == 1
    linear = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)
    assert get_tensor(gm, linear.args[2].args[0].args[0]).shape == (3,)  # bias DQ ← Q ← the corrected constant


class SharedMatrix(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 5)

    def forward(self, mat, x):
        return self.b(torch.relu(self.a(x @ mat)))


def test_an_input_without_the_batch_is_not_cut_at_the_sample_cap():
    """At its sample cap, bias_correction cut the last batch's every input, a [6, 6] matrix shared by all samples
    too: an internal shape error from int8 on a valid model."""
    import fxforge
    mat = torch.eye(6) + 0.1 * torch.randn(6, 6)
    calibration = [(mat, torch.randn(4, 6)) for _ in range(60)]
    cm = fxforge.compile(SharedMatrix().eval(), (mat, torch.randn(4, 6)), passes=["int8"], calibration=calibration,
                         max_drop=float("inf"), measure_latency=False)
    assert cm.report.row("bias_correction").stats["corrected"] == 2
