"""calibrate: range methods on known distributions, the scales they set, and refusals of bad data."""
import pytest
import torch
from torch import nn

import fxforge
from fxforge.compiler.errors import CalibrationError, InputError, PassError
from fxforge.compiler.graph import graph_tensors
from fxforge.compiler.pass_manager import PassContext
from fxforge.passes.calibrate import Calibrate
from fxforge.passes.lib.observers import HistogramObserver
from fxforge.passes.lib.qdq import is_q, role
from fxforge.compiler.verify import CHECK_SEED
from pipeline import apply, error_vs_eager


def observed(*tensors):
    obs = HistogramObserver()
    for t in tensors:
        obs.update(t)
    return obs


def gaussian_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500_000, generator=g)
    x[:3] = torch.tensor([40.0, -35.0, 50.0])
    return x


def test_minmax_keeps_outliers_that_the_other_methods_clip():
    obs = observed(gaussian_with_outliers())
    assert obs.range("minmax", 256) == (-35.0, 50.0)
    for method in ("percentile", "entropy"):
        lo, hi = obs.range(method, 256)
        assert -12 < lo < -2 and 2 < hi < 12, (method, lo, hi)
    lo, hi = obs.range("mse", 256)  # trades rounding error against clipping: clips, less than the others
    assert -30 < lo < -12 and 12 < hi < 40
    lo, hi = obs.range("percentile", 256, percentile=99.0)
    assert hi == pytest.approx(2.576, abs=0.1) and lo == pytest.approx(-2.576, abs=0.1)  # the 0.5 % tails


def test_nonnegative_data_keeps_zero_as_the_lower_bound():
    obs = observed(torch.rand(50_000) * 3)
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = obs.range(method, 256)
        assert lo == 0.0 and 2.5 < hi <= 3.0, (method, hi)


def test_entropy_is_not_pulled_in_by_a_relus_zeros():
    """Before: the exact zeros of a ReLU's output (half its values), one spike in the first bin, made the KL search
    clip a half-normal at half its maximum (2.06 of 4.12); zeros cost no error on any grid, as 0 is on every one."""
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    relu, magnitude = observed(torch.relu(x), torch.relu(-x) * 0), observed(x[x > 0])
    assert relu.range("entropy", 256)[1] == pytest.approx(magnitude.range("entropy", 256)[1], rel=0.02)
    assert relu.range("entropy", 256)[1] > 0.7 * relu.hi  # before: 0.5
    assert observed(torch.zeros(100)).range("entropy", 256) == (0.0, 0.0)


def test_histogram_rebins_when_the_range_grows():
    obs = observed(torch.rand(10_000), torch.rand(10_000) * 100)
    assert obs.hist.sum() == pytest.approx(20_000)
    assert obs.range("minmax", 256)[1] == pytest.approx(100, rel=1e-3)
    assert obs.range("percentile", 256, percentile=50.0)[1] == pytest.approx(50, rel=0.05)  # 75th pct of the mix


class ConvRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _calibrated(data, passes=("insert_qdq", "calibrate")):
    torch.manual_seed(0)
    model = ConvRelu().eval()
    return model, *apply(model, (torch.randn(2, 4, 8, 8),), list(passes), calibration=data)


def test_scales_follow_the_calibration_data_not_the_example():
    data = [(torch.rand(2, 4, 8, 8) * 2,) for _ in range(3)]
    model, gm, report, _ = _calibrated(data)
    x_q, out_q = [n for n in gm.graph.nodes if is_q(n) and role(n) == "activation"]
    assert x_q.args[2] == 0 and x_q.args[1] == pytest.approx(2 / 255, rel=0.01)  # [0, 2): zero point 0
    with torch.no_grad():
        peak = max(float(model(*b).max()) for b in data)
    assert out_q.args[1:3] == (pytest.approx(peak / 255), 0)  # relu output: [0, max]
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    w_scale = gm.get_parameter(conv.args[1].args[1].target)
    b_scale = gm.get_parameter(conv.args[2].args[1].target)
    torch.testing.assert_close(b_scale, x_q.args[1] * w_scale)  # bias scale = s_x · s_w
    assert report.row("calibrate").stats == {"activation_groups": 2, "batches": 3}


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_every_method_calibrates_a_model(method):
    data = [(torch.randn(2, 4, 8, 8),) for _ in range(2)]
    model, gm, report, flat = _calibrated(data, ("insert_qdq", f"calibrate{{method={method!r}}}"))
    sample = error_vs_eager(gm, model, flat, seed=CHECK_SEED)  # the numeric check's first batch
    assert sample.cosine > 0.98  # measured: 0.984 (entropy) to 0.998
    assert report.row("calibrate").cosine <= sample.cosine  # the row states a bound over 8 batches


@pytest.mark.parametrize("data, message", [
    (None, "needs calibration data"),
    ([], "empty calibration"),
    (5, "must be an iterable"),
    ([(torch.randn(2, 4, 8, 8), torch.randn(2))], "batch 0 must be a tuple of 1 tensor"),
    ([(torch.randn(2, 4, 8, 8),), (torch.randn(2, 5, 8, 8),)], "batch 1, input 0"),
    ([(torch.full((2, 4, 8, 8), float("nan")),)], "NaN"),
])
def test_bad_calibration_data_is_refused(data, message):
    with pytest.raises(CalibrationError, match=message):
        _calibrated(data)


def test_bad_method_and_order_are_refused():
    with pytest.raises(PassError, match="option 'method' of pass 'calibrate'"):
        fxforge.PassManager(["insert_qdq", "calibrate{method='max'}"])
    with pytest.raises(PassError, match="option 'method' of pass 'calibrate' must be one of 'minmax', "
                                        "'percentile', 'entropy', 'mse', 'auto', got 'max'"):
        Calibrate(method="max")
    with pytest.raises(PassError, match="must come after 'insert_qdq'"):
        fxforge.PassManager(["calibrate"])


def test_compile_without_calibration_data_names_the_fix():
    with pytest.raises(CalibrationError, match="calibration="):
        fxforge.compile(ConvRelu().eval(), torch.randn(2, 4, 8, 8), passes=["int8"])


def test_labelled_batches_are_named_and_calibration_fn_picks_the_inputs():
    pairs = [(torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2,))) for _ in range(2)]  # a DataLoader's (x, y)
    with pytest.raises(CalibrationError, match=r"batch 0 must be a tuple of 1 tensor\(s\) like the example inputs, "
                                               r"got 2: float32 \[2, 4, 8, 8\], int64 \[2\] \(a DataLoader of "
                                               r"\(input, label\) pairs\? give input_key=0, or "
                                               r"calibration_fn="):
        fxforge.compile(ConvRelu().eval(), torch.randn(2, 4, 8, 8), passes=["int8"], calibration=pairs)
    cm = fxforge.compile(ConvRelu().eval(), torch.randn(2, 4, 8, 8), passes=["int8"], calibration=pairs,
                         calibration_fn=lambda batch: batch[:1])
    assert cm.report.row("calibrate").stats["batches"] == 2
    with pytest.raises(CalibrationError, match=r"calibration_fn failed on batch 0: KeyError: 'image'"):
        fxforge.compile(ConvRelu().eval(), torch.randn(2, 4, 8, 8), passes=["int8"], calibration=pairs,
                        calibration_fn=lambda batch: batch["image"] if isinstance(batch, dict) else {}["image"])


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x, y):
        return torch.relu(self.a(x) + self.b(y))


def _same_graph(a, b):
    ta, tb = graph_tensors(a.graph_module), graph_tensors(b.graph_module)
    return (a.graph_module.code == b.graph_module.code and ta.keys() == tb.keys()
            and all(torch.equal(ta[k], tb[k]) for k in ta))


def test_input_key_picks_the_inputs_out_of_labelled_and_dict_batches():
    """``input_key=0`` on a DataLoader's (x, y) batches, and a tuple of dict keys for a two-input model, calibrate
    exactly as the plain input tuples do (same scales, same graph constants)."""
    conv, xs = ConvRelu().eval(), [torch.randn(2, 4, 8, 8) for _ in range(2)]
    plain = fxforge.compile(conv, xs[0], passes=["int8"], calibration=[(x,) for x in xs])
    picked = fxforge.compile(conv, xs[0], passes=["int8"], input_key=0,
                             calibration=[(x, torch.randint(0, 10, (2,))) for x in xs])
    torch.manual_seed(0)
    model = TwoInputs().eval()
    pairs = [(torch.randn(2, 4), torch.randn(2, 6)) for _ in range(3)]
    dicts = [{"label": torch.zeros(2), "y": y, "x": x} for x, y in pairs]
    plain2 = fxforge.compile(model, pairs[0], passes=["int8"], calibration=pairs)
    picked2 = fxforge.compile(model, pairs[0], passes=["int8"], calibration=dicts, input_key=("x", "y"))
    for a, b in ((plain, picked), (plain2, picked2)):
        assert b.report.row("calibrate").stats["batches"] == a.report.row("calibrate").stats["batches"]
        assert _same_graph(a, b)
    with pytest.raises(CalibrationError, match=r"calibration batch 0: input 0 has shape \[2, 6\], compiled for "
                                                 r"\[None, 4\]"):
        fxforge.compile(model, pairs[0], passes=["int8"], calibration=dicts, input_key=("y", "x"))  # order counts


@pytest.mark.parametrize("kwargs, error, message", [
    ({"input_key": "image"}, CalibrationError,
     r"calibration batch 0: input_key 'image' is not in it \(a tuple of 2\)"),
    ({"input_key": 0, "calibration": [{"pixels": torch.randn(2, 4, 8, 8)}]}, CalibrationError,
     r"calibration batch 0: input_key 0 is not in it \(a dict with keys \['pixels'\]\)"),
    ({"input_key": 0, "calibration": [torch.randn(2, 4, 8, 8)]}, CalibrationError, "the batch is a tensor"),
    ({"input_key": 1.5}, InputError, r"input_key must be an index, a dict key or a tuple of them .* got 1.5"),
    ({"input_key": ()}, InputError, "input_key must be"),
    ({"input_key": 0, "calibration_fn": lambda b: b[:1]}, InputError, "calibration_fn or input_key, not both"),
    ({"calibration": [{"pixels": torch.randn(2, 4, 8, 8)}]}, CalibrationError,
     r"got dict with keys \['pixels'\] \(give input_key="),
])
def test_input_key_misuse_is_named(kwargs, error, message):
    args = {"calibration": [(torch.randn(2, 4, 8, 8), torch.zeros(2))], **kwargs}
    with pytest.raises(error, match=message):
        fxforge.compile(ConvRelu().eval(), torch.randn(2, 4, 8, 8), passes=["int8"], **args)


def test_auto_chooses_per_tensor_by_the_error_of_the_ops_reading_it():
    """Inputs with rare outliers: ``auto`` takes, for each tensor, one of the three methods' grids, the one whose
    quantization moves the reading op's output least (Σ‖op(x̂) − op(x)‖² on the first 16 calibration samples):
    checked on the input, which the first conv reads. That is a per-tensor choice, not a promise about the whole
    graph (docs/quantization.md measures it end to end)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()  # 4 channels: not a float stem
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        x = torch.randn(4, 4, 8, 8, generator=g)
        x.view(-1)[torch.randint(0, x.numel(), (3,), generator=g)] *= 12  # a long tail
        data.append((x,))
    methods = ("percentile", "mse", "minmax")
    graphs = {m: apply(model, (torch.randn(2, 4, 8, 8),), ["insert_qdq", f"calibrate{{method={m!r}}}"],
                       calibration=data)[:2] for m in ("auto", *methods)}
    grids = {m: [tuple(q.args[1:5]) for q in gm.graph.nodes if is_q(q) and role(q) == "activation"]
             for m, (gm, _) in graphs.items()}
    assert all(any(grids[m][i] == choice for m in methods) for i, choice in enumerate(grids["auto"]))
    stats = graphs["auto"][1].row("calibrate").stats
    assert stats["chosen.percentile"] + stats["chosen.mse"] + stats["chosen.minmax"] == stats["activation_groups"] == 3
    x = torch.cat([b[0] for b in data])[:16]
    with torch.no_grad():
        def moved(grid):
            scale, zero_point, q_min, q_max = grid
            return float((model[0](torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), q_min,
                                                                         q_max)) - model[0](x)).square().sum())
        errors = {m: moved(grids[m][0]) for m in ("auto", *methods)}
    assert len({grids[m][0] for m in methods}) > 1, "the methods must disagree on the input for the test to bite"
    assert errors["auto"] == min(errors[m] for m in methods), errors


def test_calibrating_keeps_the_shapes_so_the_report_propagates_none_anew(monkeypatch):
    """calibrate changes scales and zero points only: it preserves the Shapes analysis (the report's FLOPs need no
    new shape propagation, a whole run of the 224² graph in a large compile), and the kept shapes are right."""
    from torch.fx.passes.shape_prop import ShapeProp

    from fxforge.compiler.analysis import Shapes
    from fxforge.compiler.pass_manager import PassContext
    from fxforge.passes.insert_qdq import InsertQdq
    torch.manual_seed(0)
    gm, sig = fxforge.compiler.trace.trace(ConvRelu().eval(), (torch.randn(2, 4, 8, 8),))
    ctx = PassContext((torch.randn(2, 4, 8, 8),), calibration=[(torch.randn(2, 4, 8, 8),)])
    ctx._gm = gm
    InsertQdq().run(gm, ctx)
    gm.recompile()
    ctx.invalidate("none")
    kept = ctx.analysis(Shapes, gm)
    runs = []
    monkeypatch.setattr(ShapeProp, "propagate", lambda self, *a: runs.append(1))
    result = Calibrate().run(gm, ctx)
    assert result.changed and Shapes in result.preserves
    ctx.invalidate(result.preserves)
    assert ctx.analysis(Shapes, gm) is kept and not runs
    monkeypatch.undo()
    ctx.invalidate("none")
    assert ctx.analysis(Shapes, gm) == kept  # propagated anew: the same shapes


class Windows(nn.Module):
    """A conv, then 4 windows per sample stacked sample after sample in dimension 0 (as swin does), a linear on them."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(128, 16)

    def forward(self, x):
        y = self.conv(x).relu()
        windows = y.view(-1, 8, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, 128)
        return self.fc(windows).relu()


class TimeMajor(nn.Module):
    """A linear on a [T, B, C] tensor: the batch is not in dimension 0 of what its output quantizer observes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc(x.flatten(2).transpose(0, 1)).relu()


@pytest.mark.parametrize("make, joined", [(Windows, True), (TimeMajor, False)])
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibration_batches_run_joined_with_the_same_ranges(make, joined, method, monkeypatch):
    """With a dynamic batch, calibration batches run through the graph concatenated (one run for 7 batches here) while
    each observer sees them one at a time in order: every scale and zero point equals the batch-by-batch result (the
    batches grow in range, so histograms re-bin along the way, and one histogram of all of them would give other
    percentile and entropy ranges). Where an observed tensor does not hold the batch in
    dimension 0 (TimeMajor), the batches run one by one."""
    import copy
    from fxforge.compiler.ops import q_params
    from fxforge.passes.lib import qdq
    torch.manual_seed(0)
    model = make().eval()
    gm, _, _ = apply(model, (torch.randn(2, 3, 8, 8),), ["insert_qdq"])
    batches = [(torch.randn(1 + i % 2, 3, 8, 8) * (1 + 0.37 * i),) for i in range(7)]  # re-binned at each batch
    runs = []
    run = qdq._FloatRun.run
    monkeypatch.setattr(qdq._FloatRun, "run", lambda self, *a: runs.append(len(a[0])) or run(self, *a))

    def fitted(graph):
        qdq.fit_activations(graph, batches, method, percentile=90.0)  # a range read from the histogram
        return [(float(q_params(q).scale), int(q_params(q).zero_point)) for q in graph.graph.nodes
                if is_q(q) and role(q) == "activation"]

    together = fitted(copy.deepcopy(gm))
    assert runs == ([sum(len(b[0]) for b in batches)] if joined else [len(b[0]) for b in batches])
    runs.clear()
    monkeypatch.setattr(qdq, "batch_symbol", lambda graph: None)  # batch by batch
    one_by_one = fitted(copy.deepcopy(gm))
    assert runs == [len(b[0]) for b in batches]
    assert len(together) == len(one_by_one) >= 2
    for (s1, z1), (s2, z2) in zip(together, one_by_one):
        assert s1 == pytest.approx(s2, rel=1e-6) and z1 == z2


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_bias_past_the_int32_range_widens_its_weight_scale_instead_of_saturating(backend):
    """Tiny activations (s_x ≈ 1e-8) ahead of a bias of a few units: b / (s_x · s_w) would pass 2^31 and saturate,
    the layer's output collapsing to a constant; the weight scale is widened and the output follows the bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-6)
        model[0].bias.zero_()
        model[2].bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    cm = fxforge.compile(model, (torch.randn(2, 8),), passes=["insert_qdq", "calibrate", "fold_qdq"], backend=backend,
                         calibration=[(torch.randn(2, 8),) for _ in range(3)])
    assert cm.report.row("calibrate").stats["weight_scales_widened"] == 4
    x = torch.randn(5, 8)
    torch.testing.assert_close(cm(x), model(x), atol=0.02, rtol=0.02)


def test_a_weight_scale_widened_on_the_example_inputs_narrows_back_on_the_calibration_data():
    """insert_qdq's first grids come from the example inputs; tiny ones widen the weight scale, and calibration on
    ordinary data gives the weight its own scale, max|W_c| / 127, back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].bias.fill_(3.0)
    cm = fxforge.compile(model, (torch.randn(2, 8) * 1e-9,), passes=["insert_qdq", "calibrate"], backend="eager",
                         calibration=[(torch.randn(2, 8),) for _ in range(3)], verify="off")
    rows = {r.stage: r.stats for r in cm.report.rows}
    assert rows["insert_qdq"]["weight_scales_widened"] == 4 and "weight_scales_widened" not in rows["calibrate"]
    scales = [t for name, t in graph_tensors(cm.graph_module).items() if name.endswith("weight_scale")]
    qmax = 63 if rows["insert_qdq"]["weight_bits"] == 7 else 127  # 7 bits where this CPU's u8s8 product saturates
    torch.testing.assert_close(scales[0], model[0].weight.abs().amax(1) / qmax)


def test_calibrate_after_dynamic_quantization_is_refused_by_name():
    """Before: ``calibrate`` after ``insert_qdq{activations='dynamic'}`` observed nothing, changed nothing and said
    nothing of why: dynamic linears quantize their input at run time, so there is no grid to calibrate. The refusal
    also names the passes that need calibrate: ``int8_dynamic → fold_qdq`` is refused for lacking calibrate, and
    told only to drop calibrate, a user went in a circle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.raises(PassError, match="^calibrate has no activation grid to calibrate: "
                                        r"insert_qdq\{activations='dynamic'\} quantizes each linear's input per row"
                                        r".*drop calibrate and the passes that must come after it \(fold_qdq, "):
        fxforge.compile(model, (torch.randn(4, 16),), passes=["insert_qdq{activations='dynamic'}", "calibrate"],
                        calibration=[(torch.randn(8, 16),) for _ in range(2)], backend="eager",
                        measure_latency=False)


def test_calibrate_after_fold_qdq_is_refused_by_name():
    """Before: ``calibrate`` after ``fold_qdq`` (``passes=["int8", "int8"]``) ran its observers over the folded
    graph's integer ops and failed with torch's "self and mat2 must have the same dtype, but got Int and Char".
    Expected: the pipeline is refused before any pass runs, and a folded graph given to the pass by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    calibration = [(torch.randn(8, 16),) for _ in range(6)]
    with pytest.raises(PassError, match="^pass 'calibrate' must come before 'fold_qdq' in the pipeline"):
        fxforge.compile(model, (torch.randn(4, 16),), passes=["insert_qdq", "calibrate", "fold_qdq", "calibrate"],
                        calibration=calibration, backend="eager", measure_latency=False, max_drop=float("inf"))
    folded, _, flat = apply(model, (torch.randn(4, 16),), ["insert_qdq", "calibrate", "fold_qdq"],
                            calibration=calibration)
    with pytest.raises(PassError, match="^calibrate must run before fold_qdq: this graph's quantization is already "
                                        "folded"):
        Calibrate().run(folded, PassContext(flat, calibration=calibration))


class Keyed(nn.Module):
    """Takes a dict: a batch ``x`` and a side table ``w`` without the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, d):
        return self.fc(d["x"]) + d["w"].sum(0)


def test_dict_calibration_in_any_key_order_is_cut_for_a_static_batch():
    """A static batch cuts each calibration item of a dict-input model into the compiled batch: items with the keys
    in another order, or in a mapping that is no dict (a tokenizer's BatchEncoding), were cut as given, before being
    put in the compiled order, and refused ("holds 3 samples, which the compiled batch of 2 does not divide"); they
    calibrate exactly as the same items in the example's order."""
    from collections import UserDict
    torch.manual_seed(0)
    model = Keyed().eval()
    example = ({"x": torch.randn(2, 4), "w": torch.randn(3, 4)},)
    items = [{"x": torch.randn(6, 4), "w": torch.randn(3, 4)} for _ in range(3)]
    kw = dict(passes=["insert_qdq", "calibrate"], static_batch=True, measure_latency=False)
    plain = fxforge.compile(model, example, calibration=[(d,) for d in items], **kw)
    for given in ([({"w": d["w"], "x": d["x"]},) for d in items], [(UserDict(d),) for d in items]):
        other = fxforge.compile(model, example, calibration=given, **kw)
        assert other.report.row("calibrate").stats["batches"] == plain.report.row("calibrate").stats["batches"] == 9
        assert _same_graph(plain, other)
