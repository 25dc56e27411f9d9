"""fxforge.compile end to end: the public surface, the untouched user model, and clear errors."""
import copy
import math
import json
import types
import warnings

import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends import base
from fxforge.compiler.verify import BOUND_BATCHES
from models import ZOO
from pipeline import altered_backend


@pytest.fixture(scope="module")
def resnet():
    return ZOO["resnet18"]()


def test_compile_fuse_removes_every_batchnorm_and_matches_eager(resnet):
    model, (x,) = resnet
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="eager")
    targets = {str(n.target) for n in cm.graph_module.graph.nodes}
    assert not any("batch_norm" in t for t in targets)
    x2 = torch.randn(3, *x.shape[1:])
    torch.testing.assert_close(cm(x2), model(x2), rtol=1e-4, atol=1e-4)


def test_user_model_is_never_mutated(resnet):
    model, (x,) = resnet
    state = copy.deepcopy(model.state_dict())
    tree = repr(model)
    fxforge.compile(model, (x,), passes=["fuse"], backend="torchscript", measure_latency=False)
    assert repr(model) == tree and not model.training
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_report_is_a_table_and_json(resnet):
    model, (x,) = resnet
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="torchscript", measure_latency=True)
    text = str(cm.report)
    for column in ("stage", "params", "FLOPs", "latency", "max err"):
        assert column in text
    assert "the backend row times the compiled artifact" in text
    assert "latency: each stage" not in str(fxforge.compile(model, (x,), passes=["fuse"]).report)  # off by default
    d = json.loads(json.dumps(cm.report.to_dict()))
    stages = [r["stage"] for r in d["rows"]]
    assert stages[0] == "input" and stages[-1] == "backend:torchscript" and "fuse_batchnorm" in stages
    assert d["meta"]["backend"] == "torchscript" and d["meta"]["target"] == "x86"
    assert cm.report.final.max_rel_err < 1e-4 and cm.report.speedup() > 0


def test_save_and_load_give_back_the_same_function(tmp_path, resnet):
    model, (x,) = resnet
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="torchscript", measure_latency=False)
    path = cm.save(tmp_path / "art")
    assert (path / "model.pt").exists() and (path / "fxforge.json").exists() and (path / "report.json").exists()
    loaded = fxforge.load(path)
    x2 = torch.randn(2, *x.shape[1:])
    torch.testing.assert_close(loaded(x2), cm(x2), rtol=1e-5, atol=1e-6)


def test_structured_inputs_and_outputs_round_trip():
    class Dicty(nn.Module):
        def forward(self, inputs):
            return {"sum": inputs["a"] + inputs["b"], "both": (inputs["a"] * 2, inputs["b"].relu())}

    ex = ({"a": torch.randn(2, 3), "b": torch.randn(2, 3)},)
    cm = fxforge.compile(Dicty(), ex, backend="torchscript")
    out = cm(*ex)
    assert set(out) == {"sum", "both"}
    torch.testing.assert_close(out["both"][1], ex[0]["b"].relu())


def test_bad_inputs_at_call_time_name_the_input(resnet):
    model, (x,) = resnet
    cm = fxforge.compile(model, (x,), backend="eager", measure_latency=False)
    with pytest.raises(fxforge.InputError, match="shape"):
        cm(torch.randn(1, 3, 32, 32))
    with pytest.raises(fxforge.InputError):
        cm(x, x)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"backend": "tflite"}, fxforge.BackendError, "tflite.*torchscript"),
    ({"target": "riscv"}, fxforge.TargetError, "riscv.*x86"),
    ({"passes": ["fuse", "quantise"]}, fxforge.PassError, "quantise"),
    ({"verify": "maybe"}, fxforge.PassError, "verify"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    model = nn.Linear(4, 2).eval()
    with pytest.raises(error, match=match):
        fxforge.compile(model, (torch.randn(2, 4),), **kwargs)


def test_nan_weights_are_refused():
    model = nn.Linear(4, 2).eval()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(fxforge.InputError, match="weight.*NaN"):
        fxforge.compile(model, (torch.randn(2, 4),))


def test_custom_pass_instance_runs_in_the_pipeline():
    class Noop(fxforge.Pass):
        """Does nothing (a pass instance need not be registered)."""
        name = "noop"

        def run(self, gm, ctx):
            return fxforge.PassResult(changed=False, preserves="all", stats={"looked": 1})

    cm = fxforge.compile(nn.Linear(4, 2).eval(), (torch.randn(2, 4),), passes=["fuse", Noop()])
    assert cm.report.row("noop").stats == {"looked": 1}


@pytest.fixture
def negating_backend(monkeypatch):
    """A broken backend: its artifact returns the negated outputs."""
    negating = altered_backend("negating", lambda gm, outs: tuple(-o for o in outs))
    monkeypatch.setitem(base._BACKENDS, "negating", negating)


@pytest.mark.parametrize("measure_latency", [True, False])
@pytest.mark.parametrize("passes", ["fuse", "low_rank{energy=0.5}"])  # exact, and approximate with a stated bound
def test_a_backend_with_wrong_outputs_is_an_error_not_a_report_line(negating_backend, measure_latency, passes):
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(2, 8)
    with pytest.raises(fxforge.VerificationError, match=r"negating artifact differs from the graph it compiled by 2 "
                                                          r"relative \(bound 0\.0001\)"):
        fxforge.compile(model, (x,), passes=[passes], backend="negating", measure_latency=measure_latency)
    cm = fxforge.compile(model, (x,), passes=[passes], backend="negating", verify="off")
    assert cm.report.final.max_rel_err is None  # verify="off" is the only way out, and then nothing is claimed


@pytest.mark.parametrize("passes", ["int8", "insert_qdq{activations='dynamic'}"])  # Q/DQ, dynamic int8 linears
def test_a_quantized_graph_is_held_to_the_int8_kernel_bound(negating_backend, passes):
    model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(2, 16)
    with pytest.raises(fxforge.VerificationError, match=r"negating artifact of a quantized graph is 2(\.0\d*)? relative from "
                                                          r"the model, the graph itself 0\.\d+ \(bound .*: the int8 "
                                                          r"kernels compute something else\)"):
        fxforge.compile(model, (x,), passes=[passes], backend="negating", calibration=[(torch.randn(8, 16),)])


def test_an_artifact_that_misses_the_budget_its_graph_holds_is_named(negating_backend):
    """The budget is checked on the artifact too, whatever ``verify`` says: with the numeric checks reduced to lint,
    a backend whose outputs leave the budget is a warning, and under ``strict`` a BudgetError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = {"calibration": [(torch.randn(8, 16),) for _ in range(2)], "validation": [(torch.randn(8, 16),)],
            "metric": "cosine", "max_drop": 0.5, "verify": "lint"}
    missed = (r"the negating artifact misses the accuracy budget that its graph holds: cosine drop 1\.9\d* > "
              r"max_drop 0\.5")
    with pytest.warns(UserWarning, match=missed):
        cm = fxforge.compile(model, torch.randn(8, 16), passes=["int8"], backend="negating", **data)
    assert cm.report.meta["budget"]["artifact"]["held"] is False
    with pytest.raises(fxforge.BudgetError, match=missed):
        fxforge.compile(model, torch.randn(8, 16), passes=["int8"], backend="negating", strict=True, **data)


@pytest.mark.parametrize("target", ["arm64", "cuda", "board"])
def test_a_portable_artifact_for_another_target_is_checked_here(negating_backend, target):
    """Artifacts that run wherever their runtime does (eager, TorchScript, ONNX) were not checked when built for
    another target, though ``cm(x)`` runs them here: wrong outputs passed silently. Now checked here, and the
    report says it ran on this machine; latency is not timed (not the target's CPU; a user's AArch64 "board",
    whose features LLVM tells, was timed here)."""
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(2, 8)
    if target == "board":
        pytest.importorskip("tvm")
        target = fxforge.Target("board", "a user's", {"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    if target == "arm64":  # an eager artifact (cuda: refused, eager builds CPU programs)
        with pytest.raises(fxforge.VerificationError, match="negating artifact differs from the graph it compiled"):
            fxforge.compile(model, (x,), backend="negating", target=target)
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="onnx", target=target, measure_latency=True,
                         validation=[(torch.randn(4, 8),)])
    assert cm.report.final.max_rel_err < 1e-5 and cm.report.final.cosine_mean > 0.99999
    assert cm.report.final.latency_ms is None
    name = getattr(target, "name", target)
    assert cm.report.meta["checked"].endswith(f"run on this machine, not on target {name}'s, whose runtime may "
                                              "round otherwise")


def test_the_backend_row_is_measured_against_the_model_even_without_latency(resnet):
    model, (x,) = resnet
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="eager", measure_latency=False)
    row = cm.report.final
    assert row.stage == "backend:eager" and row.latency_ms is None
    assert row.max_rel_err is not None and row.max_rel_err < 1e-4 and row.cosine > 0.99999


@pytest.mark.parametrize("backend, file", [("onnx", "model.onnx"), ("torchscript", "model.pt"), ("tvm", "model.so")])
def test_the_backend_row_states_the_artifacts_stored_size(tmp_path, backend, file):
    """Before: the row stated the graph's constant bytes: an int8 ONNX model (zero points int8 where the graph holds
    int64) was smaller than its row, a TVM library (its kernels, and the weights as TVM computes with them) 6×
    larger."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 14 * 14, 10)).eval()
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    cm = fxforge.compile(model, calibration[0], passes=["int8"], backend=backend, calibration=calibration,
                         max_drop=math.inf, measure_latency=False)
    stored = (cm.save(tmp_path / "out") / file).stat().st_size
    assert cm.report.final.bytes == pytest.approx(stored, rel=1e-3)  # TorchScript names its archive by the file
    assert cm.report.final.bytes != cm.report.rows[-2].bytes


class WritesIntoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2)
        return self.fc(x)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_model_writing_into_its_input_leaves_the_callers_tensors_alone(backend):
    model, x = WritesIntoInput().eval(), torch.randn(2, 4)
    calibration = [(torch.randn(2, 4),) for _ in range(2)]
    kept = x.clone(), [c[0].clone() for c in calibration]
    cm = fxforge.compile(model, (x,), passes=["int8"], backend=backend, calibration=calibration)
    assert torch.equal(x, kept[0]) and all(torch.equal(c[0], k) for c, k in zip(calibration, kept[1]))
    y = torch.randn(3, 4)
    y_kept, expected = y.clone(), model(y.clone())
    got = cm(y)
    assert torch.equal(y, y_kept) and torch.nn.functional.cosine_similarity(got, expected, 0).min() > 0.99
    assert "writes into input(s) x" in cm.report.meta["input_writes_dropped"]


def test_minus_inf_in_a_mask_buffer_is_legitimate():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), diagonal=1))

        def forward(self, x):
            return torch.softmax(self.fc(x) + self.mask, dim=-1)

    model, x = Masked().eval(), torch.randn(2, 4, 4)
    for backend in ("eager", "onnx"):
        cm = fxforge.compile(model, (x,), passes=["fuse"], backend=backend)
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-6)


def test_calibration_is_checked_before_any_work(monkeypatch):
    import fxforge.api as api
    model, x = nn.Sequential(nn.Linear(4, 3)).eval(), torch.randn(2, 4)
    with monkeypatch.context() as m:
        m.setattr(api, "trace", lambda *a, **k: pytest.fail("traced before calibration was checked"))
        with pytest.raises(fxforge.CalibrationError, match=r"^pass 'calibrate' needs calibration data"):
            fxforge.compile(model, (x,), passes=["insert_qdq", "calibrate"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so that a second warning from the same line would be seen
        fxforge.compile(model, (x,), passes=["fuse"], calibration=[(x,)], measure_latency=False)
    assert [str(w.message) for w in caught if "calibration" in str(w.message)] == [
        "calibration data given, but no pass of this pipeline reads it (fold_constants, addmm_to_linear, "
        "fuse_batchnorm, eliminate_dead_code, fuse_activation); it is ignored"]  # once


def test_backend_options_are_checked_before_tracing(monkeypatch):
    import fxforge.api as api

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before the options were checked")

    monkeypatch.setattr(api, "trace", no_tracing)
    with pytest.raises(fxforge.BackendError, match="unknown onnx backend option"):
        fxforge.compile(nn.Linear(4, 3), (torch.randn(2, 4),), backend="onnx", threads=2)
    with pytest.raises(fxforge.TuningError, match="tune option trials must be an integer of at least 0, got -1"):
        fxforge.compile(nn.Linear(4, 3), (torch.randn(2, 4),), backend="tvm", tune={"trials": -1})


def test_every_parameter_of_compile_is_documented():
    import inspect
    doc = fxforge.compile.__doc__
    for name in inspect.signature(fxforge.compile).parameters:
        assert f"\n        {name}:" in doc or f"**{name}:" in doc, name


def test_a_static_batch_artifact_reads_data_in_its_own_batch_size():
    """static_batch fixes the graph's batch (here flatten's view holds it): calibration and validation batches of
    a multiple of it are split, so calibration, the budget and bias correction run on them; a batch that does not
    divide is named."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    data = [(torch.randn(6, 4, 8, 8),) for _ in range(4)]
    cm = fxforge.compile(model, (torch.randn(1, 4, 8, 8),), passes=["int8"], static_batch=True, calibration=data,
                         validation=[(torch.randn(3, 4, 8, 8),)])
    assert cm.report.meta["dynamic_batch"] is False
    assert cm.report.row("bias_correction").stats["samples"] == 24
    fresh = torch.randn(1, 4, 8, 8)
    assert torch.nn.functional.cosine_similarity(cm(fresh), model(fresh)).item() > 0.99
    with pytest.raises(fxforge.CalibrationError, match="calibration batch 0 holds 5 samples, which the compiled "
                                                       "batch of 2 does not divide"):
        fxforge.compile(model, (torch.randn(2, 4, 8, 8),), passes=["int8"], static_batch=True,
                        calibration=[(torch.randn(5, 4, 8, 8),)] * 4)


def test_compile_does_each_piece_of_work_once(monkeypatch):
    """Compile's structure, not its speed: one export (no decomposition retrace where the local rewrites apply),
    the model run once per input set (the capture check and the artifact check share them: the example and one
    fresh batch for an exact pipeline, the example and BOUND_BATCHES fresh ones for an approximate one; and one
    batch of another size for the artifact check of a dynamic batch), one
    pipeline run when the accuracy budget holds (no per-layer sensitivity, no second run), no numeric-check
    run for a pass that changed nothing, and no shape propagation for the report's FLOPs (the check's runs give
    every node's shape)."""
    import math
    from collections import Counter

    from fxforge.compiler import verify
    from fxforge.compiler.analysis import Shapes
    from fxforge.compiler.pass_manager import PassManager

    counts = Counter()

    def count(owner, attr, label):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            counts[label] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, attr, counted)

    for owner, attr, label in [(torch.export, "export", "export"),
                               (torch.export.ExportedProgram, "run_decompositions", "decompose"),
                               (verify.ModelRuns, "run", "model"), (PassManager, "run", "pipeline"),
                               (verify, "run_recording", "stage_runs"), (Shapes, "run", "shape_runs")]:
        count(owner, attr, label)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    cm = fxforge.compile(model, (x,), passes="fuse")
    changed = [r.stage for r in cm.report.rows[1:-1] if r.stats.get("folded") or r.stats.get("conv2d+relu")]
    assert changed == ["fuse_batchnorm", "fuse_activation"]  # fold_constants, eliminate_dead_code: no change
    assert counts == {"export": 1, "model": 3, "pipeline": 1, "stage_runs": 1 + len(changed)}  # no shape_runs: the
    # report's FLOPs read each stage's shapes from its numeric-check run
    counts.clear()
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    cm = fxforge.compile(model, (x,), passes="int8", calibration=calibration, max_drop=math.inf)
    assert cm.report.meta["budget"]["outcome"] == "held"
    assert counts["export"] == 1 and counts["decompose"] == 0 and counts["pipeline"] == 1
    assert counts["model"] == 2 + verify.BOUND_BATCHES and counts["shape_runs"] == 0


def test_the_report_says_what_was_checked():
    """report.meta["checked"] names what the compile compared and the bounds that would have raised: the exact
    passes per stage, an approximate pipeline's bound batches, and the artifact against graph and model; under
    verify="lint" or "off", that nothing was compared."""
    import math

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    checked = {v: fxforge.compile(model, (x,), passes="fuse", verify=v).report.meta["checked"]
               for v in ("numerics", "lint", "off")}
    assert "exact passes within 0.0001" in checked["numerics"]
    assert "eager artifact against the graph and your model on the example inputs and 1 fresh batch, and one fresh " \
        "batch each of the example's batch size + 1 and of the smallest" in checked["numerics"] \
        and "of your model" in checked["numerics"]
    assert "no output compared" in checked["lint"] and checked["off"].startswith("nothing (verify='off')")
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    cm = fxforge.compile(model, (x,), passes="int8", calibration=calibration, max_drop=math.inf)
    text = cm.report.meta["checked"]
    assert f"a bound over {BOUND_BATCHES} fresh batches" in text and f"and {BOUND_BATCHES} fresh batches" in text
    assert "within 2x the graph's own error + 0.05" in text
    assert "except the approximate calibrate{method='percentile'}" in text and "verify='full' runs it" in text


def test_with_validation_data_the_default_check_leaves_no_stage_out():
    """The report row of every stage runs on validation data anyway: the numeric check then runs calibrate too, so a
    graph that fails to run is named by its pass, not raised raw by the row's measurement."""
    import math

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    validation = [(torch.randn(2, 3, 16, 16),) for _ in range(2)]
    report = fxforge.compile(model, (x,), passes="int8", calibration=calibration, validation=validation,
                             max_drop=math.inf).report
    assert "not_run_alone" not in report.meta and "except" not in report.meta["checked"]
    assert all(r.max_rel_err is not None for r in report.rows)


def test_verify_full_checks_every_stage_that_the_default_samples(monkeypatch):
    """verify="full" (opt-in) runs every changed stage, calibrate included, and says so; the default leaves calibrate's
    row without an error and states every other number as full does, the artifact check included."""
    import math

    from fxforge.compiler import verify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    reports, runs = {}, {}
    for v in ("numerics", "full"):
        with monkeypatch.context() as m:
            calls = []
            run_recording = verify.run_recording
            m.setattr(verify, "run_recording", lambda *a, **k: calls.append(1) or run_recording(*a, **k))
            reports[v] = fxforge.compile(model, (x,), passes="int8", calibration=calibration, max_drop=math.inf,
                                         verify=v).report
            runs[v] = len(calls)
    full, sampled = reports["full"], reports["numerics"]
    assert runs["full"] == runs["numerics"] + 1  # calibrate's run, which the default leaves out
    assert sampled.meta["not_run_alone"] == ["calibrate{method='percentile'}"]
    assert all(r.max_rel_err is not None for r in full.rows) and "not_run_alone" not in full.meta
    assert "except" not in full.meta["checked"] and "the onnx" not in full.meta["checked"]
    assert "eager artifact against the graph and your model" in full.meta["checked"]
    for a, b in zip(full.rows, sampled.rows):
        assert (b.max_rel_err is None) == (b.stage == "calibrate{method='percentile'}")
        assert b.max_rel_err is None or b.max_rel_err == a.max_rel_err, b.stage


class DictInput(nn.Module):
    """A model taking a dict, as many transformers wrappers do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, d):
        return self.fc(d["x"]) + d["bias"]


@pytest.mark.parametrize("form", ["tuple", "bare"])
def test_a_dict_input_model_calibrates_on_batches_given_like_its_example(form):
    """calibration=[(dict,), ...] (the form of the example inputs, and of validation=) or bare dicts: each item is
    flattened with the model's signature (it was refused: 'must be a tuple of 2 tensors, got 1: dict')."""
    torch.manual_seed(0)
    model = DictInput().eval()
    batch = lambda: {"x": torch.randn(4, 8), "bias": torch.randn(4, 4)}  # noqa: E731
    calibration = [(batch(),) if form == "tuple" else batch() for _ in range(4)]
    cm = fxforge.compile(model, (batch(),), passes=["int8"], calibration=calibration, max_drop=math.inf)
    assert cm.report.row("insert_qdq").stats["weights"] == 1
    d = batch()
    assert torch.nn.functional.cosine_similarity(cm(d).flatten(), model(d).flatten(), 0) > 0.99


def test_input_key_fills_a_dict_input_by_name_in_any_order():
    """input_key=("bias", "x") took the picked values as the model's flat inputs in that order: the "x" entry was
    calibrated on the "bias" data (and the budget's held-out batches swapped alike, so it held)."""
    torch.manual_seed(0)
    model = DictInput().eval()
    batch = lambda: {"x": torch.randn(4, 8) * 10, "bias": torch.randn(4, 4) * 0.1, "label": torch.zeros(4)}  # noqa
    calibration, d = [batch() for _ in range(4)], batch()
    outputs = [fxforge.compile(model, ({"x": d["x"], "bias": d["bias"]},), passes=["int8"], calibration=calibration,
                               input_key=key, max_drop=math.inf)({"x": d["x"], "bias": d["bias"]})
               for key in (("x", "bias"), ("bias", "x"))]
    assert torch.equal(outputs[0], outputs[1])


def test_a_model_with_hooks_is_warned_that_the_compiled_model_does_not_call_them():
    """Capture runs the model (its hooks with it) on the example, random batches and export's fake tensors; the
    compiled graph holds what a hook computes but never calls it, so an activation log silently stopped filling."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    log = []
    model[2].register_forward_pre_hook(lambda module, args: log.append(args[0].shape))
    with pytest.warns(UserWarning, match=r"the model has hooks \(2: forward pre-hook\).*does not call them"):
        cm = fxforge.compile(model, (torch.randn(2, 4),), backend="eager", measure_latency=False)
    log.clear()
    cm(torch.randn(2, 4))
    assert log == []


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.calls = nn.Linear(4, 3), 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_a_forward_that_changes_the_models_state_is_warned_of():
    """``self.calls += 1`` in forward: the compiled model computes from the state at compile time and counts
    nothing, which nothing said."""
    model = CountsCalls().eval()
    with pytest.warns(UserWarning, match=r"forward changes the model's own state \(calls\)"):
        cm = fxforge.compile(model, (torch.randn(2, 4),), backend="eager", measure_latency=False)
    cm(torch.randn(2, 4))
    assert model.calls == 0  # the user's model is never run


class KeepsScratch(nn.Module):
    """Stores a value in a new attribute and reads it back in the same call (RAFT's correlation pyramid)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.pyramid = [self.fc(x), self.fc(x) * 2]
        return self.pyramid[0] + self.pyramid[1]


def test_the_state_warning_names_the_attribute_forward_adds():
    """Before: the states were matched by position, so the attribute forward adds shifted every later one and the
    warning named training, _non_persistent_buffers_set, _backward_pre_hooks "and 22 more", not pyramid."""
    model = KeepsScratch().eval()
    with pytest.warns(UserWarning, match=r"forward changes the model's own state \(pyramid\); .*a value forward "
                                         r"writes and then reads in one call is computed as before"):
        cm = fxforge.compile(model, (torch.randn(2, 4),), backend="eager", measure_latency=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(cm(x), KeepsScratch.forward(copy.deepcopy(model), x))


class CountsInBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def _wrapped(model: nn.Module) -> nn.Module:
    """``model.forward`` replaced by a closure over the bound forward (post-processing, as users wrap outputs)."""
    forward = model.forward
    model.forward = lambda x: forward(x) + 1
    return model


_unwrapped = None  # the global a script's wrapper reads, as in ``orig = m.forward; m.forward = lambda x: orig(x)``
_handle = None  # a one-shot hook's handle, global as in a script


def _global_wrapper(x):
    return _unwrapped(x) + 1


def _once(module, inputs):
    _handle.remove()
    return (inputs[0] * 2,)


def test_a_forward_or_hook_that_reaches_the_model_itself_runs_on_the_copy():
    """Found by a differential run: deepcopy shares functions, so a copy whose forward wraps the original's bound
    forward (through a closure or a global) ran the user's model: its counter went 0 → 2 (batch-norm statistics
    in training mode alike); a one-shot pre-hook removed itself from the user's model through its global handle."""
    global _unwrapped, _handle
    x = torch.randn(3, 8)
    for model in (_wrapped(CountsInBuffer().eval()), CountsInBuffer().eval()):
        if not isinstance(model.__dict__.get("forward"), types.FunctionType):
            _unwrapped, model.forward = model.forward, _global_wrapper
        with pytest.warns(UserWarning, match="forward changes the model's own state"):
            cm = fxforge.compile(model, (torch.randn(2, 8),), backend="eager", measure_latency=False)
        assert model.calls.item() == 0
        torch.testing.assert_close(cm(x), model.fc(x) + 1)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    _handle = model.register_forward_pre_hook(_once)
    with pytest.warns(UserWarning, match="the model has hooks"):
        cm = fxforge.compile(model, (torch.randn(2, 8),), backend="eager", measure_latency=False)
    assert len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model[0](2 * x))


_reached = None  # the model a forward reaches through a module-level global, not through self


class CountsThroughAGlobal(CountsInBuffer):
    def forward(self, x):
        _reached.calls += 1
        return self.fc(x)


class CopiesAsItself(nn.Sequential):
    def __deepcopy__(self, memo):
        return self  # deepcopy gives the model itself: every run and eval() of "the copy" is the user's


def test_a_model_that_compile_would_change_through_a_reference_its_copy_shares_is_named_or_restored():
    """Found by a differential run: references deepcopy keeps (a global the forward reads, a weakref, a closure over
    a container, ``__deepcopy__`` returning self) let compile run and change the user's model: a counter went
    0 → 2, batch-norm statistics moved, a model in training mode came back in eval mode. A changed tensor is a named
    error; modes and hooks are put back."""
    global _reached
    _reached = model = CountsThroughAGlobal().eval()
    with pytest.raises(fxforge.InputError, match=r"compiling changed your model \(calls\): code the model holds "
                                                 r"reaches the model itself"):
        fxforge.compile(model, (torch.randn(2, 8),), backend="eager", measure_latency=False)
    model = CopiesAsItself(nn.Linear(8, 4), nn.Dropout(0.0))  # in training mode, as built
    fxforge.compile(model, (torch.randn(2, 8),), backend="eager", measure_latency=False)
    assert all(m.training for m in model.modules())


class TagsThroughAGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        _reached.last_batch = x.shape[0]  # adds an attribute to the model the global holds
        return self.fc(x)


def test_the_guard_names_an_attribute_compile_added_to_the_users_model():
    """The guard matched the states before and after by position: an added attribute shifted every later one, and
    the error named others (``training`` first). They are matched by name, as the state warning matches them."""
    global _reached
    _reached = model = TagsThroughAGlobal().eval()
    with pytest.raises(fxforge.InputError, match=r"^compiling changed your model \(last_batch\): "):
        fxforge.compile(model, (torch.randn(2, 8),), backend="eager", measure_latency=False)


def _shared_state_hooks(model: nn.Module) -> nn.Module:
    """A pre-hook and a hook sharing state through ``nonlocal``: the hook scales by what the pre-hook saw."""
    seen = None

    def remember(module, inputs):
        nonlocal seen
        seen = inputs[0].abs().mean()

    def scale(module, inputs, output):
        return output * seen

    model.register_forward_pre_hook(remember)
    model.register_forward_hook(scale)
    return model


def test_functions_sharing_a_closure_cell_share_it_in_the_copy():
    """(found by a review) rebinding gave every rebuilt function cells of its own, so a pre-hook and a hook sharing
    state through ``nonlocal`` stopped sharing it in the copy, and the compile was 0.29-0.75 off, unnoticed."""
    model = _shared_state_hooks(nn.Linear(8, 4).eval())
    with pytest.warns(UserWarning, match="the model has hooks"):
        cm = fxforge.compile(model, (torch.randn(2, 8),), backend="eager", measure_latency=False)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))


def test_a_torch_compiled_model_is_not_warned_of_as_changing_its_state():
    """``torch.compile(model)`` wraps it in an ``OptimizedModule`` whose own attributes are dynamo's (a context that
    every call changes): a stateless model was warned of as changing "its own state (dynamo_ctx)"."""
    model = torch.compile(nn.Sequential(nn.Linear(8, 4)).eval(), backend="eager")
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = fxforge.compile(model, (torch.randn(2, 8),), backend="eager", measure_latency=False)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))


def test_a_model_left_in_training_mode_is_compiled_as_eval_and_warned_of():
    """Dropout and batch norm compute otherwise in training mode; compile captures the eval copy, and says so where
    the difference exists (an MLP with a dropout of p = 0 computes the same in training mode and gets no warning)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.warns(UserWarning, match=r"the model is in training mode \(1: BatchNorm2d\)"):
        fxforge.compile(model, (torch.randn(2, 3, 8, 8),), backend="eager", measure_latency=False)
    assert model.training  # the user's module is left as it was
    normed = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)))  # power iteration in training mode only
    with pytest.warns(UserWarning, match=r"the model is in training mode \(0: spectral_norm\)"):
        fxforge.compile(normed, (torch.randn(2, 4),), backend="eager", measure_latency=False)
    gru = nn.GRU(4, 4, num_layers=2, dropout=0.5, batch_first=True)
    with pytest.warns(UserWarning, match=r"the model is in training mode \(the model: GRU\(dropout=0\.5\)\)"):
        fxforge.compile(gru, (torch.randn(2, 3, 4),), backend="eager", measure_latency=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxforge.compile(model.eval(), (torch.randn(2, 3, 8, 8),), backend="eager", measure_latency=False)
        fxforge.compile(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0)), (torch.randn(2, 4),), backend="eager",
                        measure_latency=False)


class TwoInputs(nn.Module):
    """A float image (through a float stem at batch 1 in int8) and integer class ids."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.embed, self.fc = nn.Conv2d(3, 8, 3), nn.Embedding(4, 8), nn.Linear(8, 5)

    def forward(self, x, ids):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)) + self.embed(ids))


def test_a_model_made_under_inference_mode_compiles():
    """Serving code builds models under torch.inference_mode(): the weight check's isinf raised a raw RuntimeError
    (autograd on an inference parameter that requires grad)."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    cm = fxforge.compile(model, (x,), measure_latency=False)
    with torch.no_grad():
        assert torch.allclose(cm(x), model(x), atol=1e-6)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # it warned that forward changes the model's own state (inference tensors)
        fxforge.compile(model, (x,), measure_latency=False)


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnx"])
def test_an_int8_model_refuses_nan_and_inf_where_its_quantizers_would_hide_them(backend, tmp_path):
    """A static quantizer rounds NaN and Inf to finite integers: the int8 model answered a NaN pixel with ordinary
    logits where the fp32 model gives NaN. The float input reaching a quantizer (through the float stem too) is
    checked on every call, after save and load as well; an integer input is not, nor is any input of a float model."""
    torch.manual_seed(0)
    model = TwoInputs().eval()
    example = (torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    calibration = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 3])) for _ in range(4)]
    cm = fxforge.compile(model, example, passes="int8", backend=backend, calibration=calibration,
                         max_drop=math.inf, measure_latency=False)
    assert cm.signature.finite_inputs == (0,)
    bad = example[0].clone()
    bad[0, 1, 2, 3] = float("nan")
    for compiled in (cm, fxforge.load(cm.save(tmp_path / "a"))):
        with pytest.raises(fxforge.InputError, match="input 0 holds NaN or Inf: the compiled model would turn "):
            compiled(bad, example[1])
        torch.testing.assert_close(compiled(*example), cm(*example))
    float_model = fxforge.compile(model, example, backend=backend, measure_latency=False)
    if float_model.signature.finite_inputs:  # TorchScript's oneDNN kernels, chosen by timing: NaN refused
        assert backend == "torchscript" and float_model.artifact.info["optimize_for_inference"]
        with pytest.raises(fxforge.InputError, match="input 0 holds NaN or Inf"):
            float_model(bad, example[1])
    else:
        assert torch.isnan(float_model(bad, example[1])).any()


class Masked(nn.Module):
    """Attention-like scores plus an additive mask (-inf on hidden keys) through softmax, then a linear; and an input
    whose missing values the model itself replaces (nan_to_num) before its first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.fc = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, mask, tabular):
        scores = self.q(x) @ x.transpose(1, 2) + mask
        return self.fc(scores.softmax(-1) @ x) + self.fc(torch.nan_to_num(tabular)).unsqueeze(1)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_an_int8_model_takes_non_finite_values_that_the_model_itself_makes_finite(backend):
    """The finite-input check first refused every input with any path to a quantizer: a -inf causal mask (softmax
    makes it finite) and a model cleaning missing values with nan_to_num, which the int8 model computes as fp32."""
    torch.manual_seed(0)
    causal = torch.full((3, 3), float("-inf")).triu(1).expand(2, 3, 3)
    finite = torch.full((3, 3), torch.finfo(torch.float32).min).triu(1).expand(2, 3, 3)
    calibration = [(torch.randn(2, 3, 4), finite, torch.randn(2, 4)) for _ in range(4)]
    model = Masked().eval()
    cm = fxforge.compile(model, calibration[0], passes="int8", backend=backend, calibration=calibration,
                         max_drop=math.inf, measure_latency=False)
    assert cm.signature.finite_inputs == (0,)  # x reaches the quantized linears through ops that carry NaN
    x, tabular = torch.randn(2, 3, 4), torch.randn(2, 4)
    tabular[0, 1] = float("nan")
    out = cm(x, causal, tabular)
    with torch.no_grad():
        assert torch.isfinite(out).all() and (out - model(x, causal, tabular)).abs().max() < 0.1


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "eager"])
def test_compile_inside_autocast_compiles_the_model_in_its_own_dtypes(backend):
    """Called inside torch.autocast, the TorchScript artifact kept autocast's bfloat16 and returned it outside
    autocast (the model returns float32), while every check, made under the same autocast, stated an error of 0; the
    ONNX export failed on a bfloat16 op and int8 quantized nothing. compile now switches autocast off and says so,
    and a compiled model called under autocast computes what was compiled."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="inside torch.autocast"):
        cm = fxforge.compile(model, (torch.randn(2, 3, 8, 8),), passes=["fuse"], backend=backend,
                             measure_latency=False)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = cm(x)
    for got in (cm(x), under):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class ScalesByItsBatch(nn.Linear):
    """TorchScript cannot script a float of the batch size: the backend traces it, at the example's batch alone."""

    def forward(self, x):
        return super().forward(x) * (x.shape[0] / 2.0)


def test_an_artifact_fixed_to_the_example_batch_is_not_measured_on_batches_it_cannot_take(unscriptable):
    """Validation batches of 4 ran through a TorchScript trace made at batch 2, past its signature: it computed
    with the traced batch, and the report stated an error of 0.5 for an exact pipeline (a false BudgetError under
    strict; TVM raised a raw RuntimeError). Now the artifact's columns and budget say why they were not measured."""
    model = ScalesByItsBatch(6, 5).eval()
    validation = [(torch.randn(4, 6),) for _ in range(3)]
    with pytest.warns(UserWarning, match=r"not measured: the torchscript artifact takes shape \[2, 6\] only"):
        cm = fxforge.compile(model, (torch.randn(2, 6),), passes=["fuse"], backend="torchscript",
                             validation=validation, max_drop=0.01, strict=True, measure_latency=False)
    assert cm.report.final.cosine_mean is None and cm.report.meta["artifact_quality"].startswith("not measured")
    assert cm.report.meta["budget"]["artifact"].startswith("not measured: the torchscript artifact takes")


@pytest.mark.parametrize("passes", ["int8_dynamic", "compress", "prune_channels{flops=0.5}",
                                    "depthwise_separable{flops=0.5}"])
def test_empty_calibration_data_is_named_for_every_pass_that_reads_it(passes):
    """Only calibrate and a few others checked: the rest failed inside with a raw KeyError, IndexError or
    ValueError."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    with pytest.raises(fxforge.CalibrationError, match="got an empty calibration iterable"):
        fxforge.compile(model, (torch.randn(2, 3, 6, 6),), passes=[passes], calibration=[])


@pytest.mark.parametrize("verify", ["off", "lint"])
def test_the_report_does_not_claim_errors_measured_where_none_were(verify):
    cm = fxforge.compile(nn.Linear(4, 3).eval(), (torch.randn(2, 4),), passes=["fuse"], verify=verify)
    assert cm.report.meta["errors"].startswith(f"not measured (verify={verify!r})")
    assert all(r.max_rel_err is None for r in cm.report.rows)


class WithTable(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.l = nn.Linear(rows, 5)

    def forward(self, x, table):
        return self.l(x @ table.T)


def test_static_batch_splits_batches_along_the_first_input_not_a_smaller_side_input():
    """The batch was taken as the smallest leading size among the inputs: a side table of 2 rows beside a batch of 4
    was taken for it, no batch was split, and valid validation batches were refused."""
    table = torch.randn(2, 6)
    cm = fxforge.compile(WithTable(2).eval(), (torch.randn(4, 6), table), passes=["int8"], static_batch=True,
                         calibration=[(torch.randn(8, 6), table) for _ in range(8)],
                         validation=[(torch.randn(8, 6), table) for _ in range(3)], measure_latency=False)
    assert cm.report.meta["errors"].startswith("measured on validation data (24 samples in 6 batches)")


def test_static_batch_cuts_labels_picked_around_inputs_but_not_a_side_input_of_as_many_rows():
    """With input_key, every tensor of an item with the batch's leading size was cut, a side table of as many rows
    as the batch holds samples too: valid (input, table, label) items were refused."""
    table = torch.randn(6, 6)
    items = [(torch.randn(6, 6), table, torch.zeros(6)) for _ in range(3)]
    cm = fxforge.compile(WithTable(6).eval(), (torch.randn(2, 6), table), static_batch=True, validation=items,
                         input_key=(0, 1))
    assert cm.report.meta["errors"].startswith("measured on validation data (18 samples in 9 batches)")


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.randn(4, 8),) for _ in range(4)])


def test_calibration_from_a_dataloader_over_an_iterable_dataset():
    """The empty-data check asked its len(), which such a DataLoader has not: a raw TypeError."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    cm = fxforge.compile(model, (torch.randn(2, 8),), passes=["int8"], calibration=loader, max_drop=math.inf,
                         measure_latency=False)
    assert cm.report.row("calibrate").stats["batches"] == 3  # every fourth is held out for the budget


class LogitsAndLabels(nn.Module):
    """Logits and their argmax: an integer output computed from float ones."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64))

    def forward(self, x):
        logits = self.net(x)
        return logits, logits.argmax(1)


def test_integer_outputs_an_approximate_pipeline_changes_are_warned_of_and_recorded():
    """Before: int8 flipped argmax labels beside the logits (0.5 % of a mask's pixels, 3.8 % of sort indices in a
    differential run) while the report's errors, over the float outputs, and the budget said nothing of them.
    Expected: the share of changed elements per integer output, warned and in the report; none for exact ones."""
    torch.manual_seed(0)
    model = LogitsAndLabels().eval()
    calibration = [(torch.randn(32, 16),) for _ in range(8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = fxforge.compile(model, (torch.randn(32, 16),), passes="int8", calibration=calibration,
                             max_drop=math.inf, measure_latency=False)
    said = cm.report.meta["discrete_outputs"]
    assert said.startswith("differ from your model's (the example and fresh inputs): output 1 (int64): ") and \
        "elements (" in said, said
    assert any("integer or bool outputs differ" in str(w.message) for w in caught)
    exact = fxforge.compile(model, (torch.randn(32, 16),), measure_latency=False)
    assert "discrete_outputs" not in exact.report.meta


class Grayscale(nn.Module):
    """A uint8 image to a grey float one, as a deployed model's preprocessing."""

    def forward(self, image):
        return (image.float() / 255 * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)


def test_an_integer_example_of_one_value_is_warned_of():
    """An all-black uint8 example: fresh inputs draw integers from the example's values, so every check ran on
    black images, and a backend wrong on every other image (TVM's grayscale, stop 49) compiled unwarned."""
    black, photo = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.warns(UserWarning, match=r"the example's integer inputs \[0\] hold one value each"):
        fxforge.compile(Grayscale(), (black,), backend="eager", measure_latency=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = fxforge.compile(Grayscale(), (photo,), backend="eager", measure_latency=False)
        fxforge.compile(Grayscale(), (black,), backend="eager", measure_latency=False, verify="off")  # no checks
    assert "integers drawn from the example's values" in cm.report.meta["errors"]
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)  # a typical text example
    assert fxforge.api._constant_integer_inputs((ids, mask, torch.zeros_like(mask))) == []
    assert fxforge.api._constant_integer_inputs((torch.full((2, 8), 7), black)) == [0, 1]
