"""equalize_activations: the channels between a layer and the depthwise conv reading it get one range (exact);
the per-tensor grid between them then loses less."""
import pytest
import torch
from torch import nn

from fxforge.compiler.errors import CalibrationError
from fxforge.compiler.graph import get_tensor
from fxforge.compiler.ops import aten, is_op
from pipeline import apply, error_vs_eager


def ops(gm):
    return [getattr(n.target, "overloadpacket", n.target).__name__ for n in gm.graph.nodes if n.op == "call_function"]


def convs(gm):
    return [n for n in gm.graph.nodes if is_op(n, aten.conv2d)]


def model(depthwise=True):
    """conv 1×1 → relu6 → depthwise 3×3 (or a dense 1×1), the 8 channels between them 100× apart in range and
    the depthwise weights as far apart the other way (MobileNetV2's first block: every output channel matters)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU6(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8) if depthwise else nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():
        spread = torch.logspace(-2, 0, 8).reshape(-1, 1, 1, 1)
        m[0].weight.mul_(spread)
        m[2].weight.div_(spread if depthwise else spread.reshape(1, -1, 1, 1))
        m[0].bias.fill_(0.1)
    return m


def data(seed, n=4):
    return [(torch.randn(8, 4, 10, 10, generator=torch.Generator().manual_seed(seed + i)),) for i in range(n)]


def test_before_expected():
    """Before: conv → hardtanh(0, 6) → depthwise. Expected: W_A[i]/s_i, b_A[i]/s_i → clamp(·, 0, 6/s_i) →
    s_i·W_B[i], with s_i = m_i / max m (m_i channel i's largest value after relu6 on the calibration data)."""
    m, calibration = model(), data(1)
    gm, report, _ = apply(m, (torch.randn(2, 4, 10, 10),), ["equalize_activations"], calibration=calibration)
    assert ops(gm) == ["conv2d", "clamp", "conv2d"]
    with torch.no_grad():
        peak = torch.stack([m[1](m[0](x)).amax((0, 2, 3)) for (x,) in calibration]).amax(0)
    s = peak / peak.max()
    a, b = convs(gm)
    torch.testing.assert_close(get_tensor(gm, a.args[1]), m[0].weight / s.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(get_tensor(gm, a.args[2]), m[0].bias / s)
    torch.testing.assert_close(get_tensor(gm, b.args[1]), m[2].weight * s.reshape(-1, 1, 1, 1))
    clamp = next(n for n in gm.graph.nodes if is_op(n, aten.clamp))
    torch.testing.assert_close(get_tensor(gm, clamp.args[2]).flatten(), 6 / s)
    stats = report.row("equalize_activations").stats
    assert stats["pairs"] == 1 and stats["clips_rescaled"] == 1
    assert stats["max_scale"] == pytest.approx(float(1 / s.min()), rel=1e-5) and stats["max_scale"] > 10


def test_exact_on_fresh_inputs():
    m = model()
    gm, _, flat = apply(m, (torch.randn(2, 4, 10, 10),), ["equalize_activations"], calibration=data(1))
    assert error_vs_eager(gm, m, flat).max_rel < 1e-5


def test_a_dense_reader_or_a_shared_tensor_is_left_alone():
    gm, report, _ = apply(model(depthwise=False), (torch.randn(2, 4, 10, 10),), ["equalize_activations"],
                          calibration=data(1))
    assert report.row("equalize_activations").stats == {"skipped.not_depthwise": 1}
    assert ops(gm) == ["conv2d", "hardtanh", "conv2d"]

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model()

        def forward(self, x):
            y = self.m[0](x)
            return self.m[2](self.m[1](y)) + y

    gm, report, _ = apply(Shared().eval(), (torch.randn(2, 4, 10, 10),), ["equalize_activations"], calibration=data(1))
    assert report.row("equalize_activations").stats == {}


def test_the_int8_graph_loses_less():
    """The same int8 pipeline with and without the pass, against eager on inputs it was not calibrated on
    (measured: max relative error 0.035 without, 0.0066 with)."""
    m = model()
    quantize = ["insert_qdq{reduce_range=False}", "calibrate", "fold_qdq"]
    errors = {}
    for name, passes in (("plain", quantize), ("equalized", ["equalize_activations", *quantize])):
        gm, report, flat = apply(m, (torch.randn(2, 4, 10, 10),), passes, calibration=data(1), verify="off")
        errors[name] = error_vs_eager(gm, m, flat).max_rel
        if name == "equalized":
            assert ops(gm).count("clamp") == 0  # every rescaled ceiling folded into the quantizer
    assert errors["equalized"] < 0.5 * errors["plain"], errors


def test_needs_calibration():
    with pytest.raises(CalibrationError, match="pass 'equalize_activations' needs calibration data"):
        apply(model(), (torch.randn(2, 4, 10, 10),), ["equalize_activations"])


def test_a_pair_kept_float_gets_one_clip_back():
    """When mixed precision keeps both layers of a pair float (``insert_qdq{skip=...}``), no grid sits between
    them and ``insert_qdq`` gives the relu6 its single ceiling back, which backends fuse into the conv; the graph
    stays exact."""
    m = model()
    passes = ["equalize_activations", "insert_qdq{skip=('conv2d','conv2d_1')}", "calibrate", "fold_qdq"]
    gm, report, flat = apply(m, (torch.randn(2, 4, 10, 10),), passes, calibration=data(1))
    assert report.row("equalize_activations").stats["clips_rescaled"] == 1
    assert report.row("insert_qdq").stats["clips_restored"] == 1
    assert ops(gm) == ["conv2d", "hardtanh", "conv2d"]
    clip = next(n for n in gm.graph.nodes if is_op(n, aten.hardtanh))
    assert clip.args[1:] == (0.0, 6.0)  # the widest channel kept its scale: the model's own relu6
    assert error_vs_eager(gm, m, flat).max_rel < 1e-5


def test_a_pair_kept_float_runs_as_fused_float_convs_on_onnx_runtime():
    """The same pair through the onnx backend: ORT fuses the clip into the first conv, as for the model without
    the pass (a per-channel clamp would run as float Max and Min over the tensor)."""
    import fxforge

    m = model()
    passes = ["fuse", "equalize_activations", "insert_qdq{skip=('conv2d','conv2d_1')}", "calibrate", "fold_qdq"]
    cm = fxforge.compile(m, (torch.randn(2, 4, 10, 10),), passes=passes, backend="onnx", calibration=data(1),
                         measure_latency=False)
    assert cm.artifact.info["ort_float_ops"] == {"Conv": 2} and cm.artifact.info["ort_fused_kernels"] == 1
