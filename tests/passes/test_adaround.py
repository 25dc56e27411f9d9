"""adaround: each weight rounded up or down to minimise the layer's output error on calibration data; it lowers
that error against nearest rounding on fresh data, and leaves the graph's nodes as they were."""
import pytest
import torch
from torch import nn

from fxforge.compiler.errors import CalibrationError, PassError
from fxforge.compiler.graph import get_tensor
from fxforge.compiler.pass_manager import PassContext
from fxforge.compiler.ops import aten, is_op, q_params, weight_of
from fxforge.passes import AdaRound
from pipeline import apply

QUANTIZE = ["insert_qdq{reduce_range=False}", "calibrate"]


def ops(gm):
    return [getattr(n.target, "overloadpacket", n.target).__name__ for n in gm.graph.nodes if n.op == "call_function"]


def layers(gm):
    return [n for n in gm.graph.nodes if is_op(n, aten.conv2d, aten.linear)]


def codes(gm, op):
    """The float weight behind ``op``'s weight quantizer divided by its scales (integers when on the grid)."""
    q = weight_of(op).args[0]
    scale = get_tensor(gm, q_params(q).scale)
    w = get_tensor(gm, q.args[0])
    return w / scale.reshape(-1, *[1] * (w.dim() - 1))


def correlated(n, seed):
    """Inputs whose 8 channels mix 3 smooth sources: the correlations a rounding choice can exploit."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[1.0, 0.5, -0.3], [0.2, 1.0, 0.4], [-0.6, 0.3, 1.0], [0.9, -0.2, 0.1],
                        [0.3, 0.8, -0.5], [-0.4, -0.7, 0.6], [0.5, 0.5, 0.5], [1.2, -0.4, 0.2]])
    z = nn.functional.avg_pool2d(torch.randn(n, 3, 14, 14, generator=g), 3, 1)
    return torch.einsum("cs,nshw->nchw", mix, z) + 0.05 * torch.randn(n, 8, 12, 12, generator=g)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 144, 10)).eval()


def compiled(m, passes, seed=1):
    calibration = [(correlated(16, seed + i),) for i in range(4)]
    return apply(m, (correlated(2, 0),), passes, calibration=calibration, verify="off")


@pytest.fixture(scope="module")
def graphs():
    """The model, its calibrated int8 graph (nearest rounding) and the same after adaround, with its report."""
    m = model()
    nearest, _, _ = compiled(m, QUANTIZE)
    rounded, report, _ = compiled(m, [*QUANTIZE, "adaround{iterations=200}"])
    return m, nearest, rounded, report


def test_rounding_before_expected(graphs):
    """Before: the calibrated int8 graph (nearest rounding). Expected: the same nodes, every weight still on its
    grid (s · integer), some of them on the other integer than the nearest; the linear, with fewer calibration
    samples (64) than inputs (2304), keeps its float weight (the quantizer rounds it to nearest)."""
    _, before, after, report = graphs
    assert ops(after) == ops(before)
    flipped = 0
    for old, new in zip(layers(before)[:2], layers(after)[:2]):
        k = codes(after, new)
        torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)
        flipped += int((k.round() - codes(before, old).round()).ne(0).sum())
        assert (k.round() - codes(before, old).round()).abs().max() <= 1  # up or down, never further
    stats = report.row("adaround").stats
    assert stats["rounded"] == 2 and stats["skipped.few_samples"] == 1 and stats["samples"] == 64
    assert stats["flipped"] == flipped > 0
    torch.testing.assert_close(codes(after, layers(after)[2]), codes(before, layers(before)[2]))
    assert stats["error_ratio"] < 1


def test_lowers_each_layers_output_error_on_fresh_data(graphs):
    """Each layer with the learned rounding against nearest rounding, same input: ‖Ŵx − Wx‖² on inputs the pass
    never saw (measured: ratios 0.47 and 0.72 for the conv and the depthwise)."""
    m, nearest, rounded, _ = graphs
    x = correlated(64, 99)
    inputs = [x, torch.relu(m[0](x))]
    ratios = []
    with torch.no_grad():
        for layer, a, b, xi in zip((m[0], m[2]), layers(nearest), layers(rounded), inputs):
            def error(gm, op):
                w = codes(gm, op).round() * get_tensor(gm, q_params(weight_of(op).args[0]).scale).reshape(
                    -1, *[1] * (layer.weight.dim() - 1))
                def f(t, w_):
                    return nn.functional.conv2d(t, w_, padding=1, groups=layer.groups)
                return float((f(xi, w) - f(xi, layer.weight)).square().sum())
            ratios.append(error(rounded, b) / error(nearest, a))
    assert all(r < 0.95 for r in ratios), ratios


def test_lowers_the_models_output_error_on_fresh_data(graphs):
    m, nearest, rounded, _ = graphs
    x = correlated(64, 99)
    with torch.no_grad():
        ref = m(x)
        err = {name: float((gm(x)[0] - ref).square().sum()) for name, gm in (("nearest", nearest), ("ada", rounded))}
    assert err["ada"] < 0.9 * err["nearest"], err


def test_after_fold_qdq_it_is_refused(graphs):
    """Before: after ``fold_qdq`` the pass ran and counted every layer ``skipped.weight_folded`` (a rounding it
    could no longer move). Expected: the pipeline is refused, and a folded graph given to the pass by name."""
    m = graphs[0]
    with pytest.raises(PassError, match="^pass 'adaround' must come before 'fold_qdq' in the pipeline"):
        compiled(m, [*QUANTIZE, "fold_qdq", "adaround{iterations=10}"])
    folded, _, flat = compiled(m, [*QUANTIZE, "fold_qdq"])
    with pytest.raises(PassError, match="^adaround must run before fold_qdq: this graph's quantization is already"):
        AdaRound(iterations=10).run(folded, PassContext(flat, calibration=[(correlated(16, 1),)]))


def test_leaves_skipped_layers_alone(graphs):
    m, before, _, _ = graphs
    gm, report, _ = compiled(m, [*QUANTIZE, "adaround{iterations=10,skip=('conv2d',)}"])
    assert report.row("adaround").stats["skipped.by_name"] == 1
    torch.testing.assert_close(codes(gm, layers(gm)[0]), codes(before, layers(before)[0]))


def test_skip_takes_weight_prefixes_and_refuses_a_name_of_no_layer(graphs):
    """Before: a skip entry naming no layer, or a weight prefix ("0", as insert_qdq's skip takes it), was ignored
    without a word, and the layer it meant was rounded."""
    m, before, _, _ = graphs
    gm, report, _ = compiled(m, [*QUANTIZE, "adaround{iterations=10,skip=('0',)}"])
    assert report.row("adaround").stats["skipped.by_name"] == 1
    torch.testing.assert_close(codes(gm, layers(gm)[0]), codes(before, layers(before)[0]))
    with pytest.raises(PassError, match=r"^adaround: skip 'conv_2d' names no layer \(node names such as 'conv2d', "):
        compiled(m, [*QUANTIZE, "adaround{iterations=10,skip=('conv_2d',)}"])


def test_needs_calibration_and_sane_options():
    with pytest.raises(PassError, match="iterations"):
        AdaRound(iterations=0)
    for bad in ({"lr": 0.0}, {"lr": float("nan")}, {"reg": -1.0}):
        with pytest.raises(PassError, match="lr must be > 0 and reg >= 0"):
            AdaRound(**bad)
    with pytest.raises(PassError, match="must come after 'insert_qdq'"):
        apply(model(), (correlated(2, 0),), ["adaround"])
    gm, _, flat = compiled(model(), QUANTIZE)
    with pytest.raises(CalibrationError, match="pass 'adaround' needs calibration data"):
        AdaRound().run(gm, PassContext(flat))
