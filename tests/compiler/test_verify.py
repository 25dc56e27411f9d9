"""compare(): relative max error and cosine over all floating outputs; check_artifact against the model; ModelRuns:
the user's model run from its original state."""
import collections
import types

import numpy as np
import pytest
import torch
from torch import nn

from fxforge.compiler.errors import VerificationError
import fxforge
from fxforge.backends.eager import EagerArtifact
from fxforge.compiler.verify import ModelRuns, check_artifact, compare, discrete_mismatch


def test_cosine_of_tiny_outputs_is_their_true_cosine():
    ref = torch.tensor([3e-10, 4e-10])
    err = compare([ref * 2], [ref])  # same direction: cosine 1 whatever the scale
    assert err.cosine == pytest.approx(1.0) and err.max_rel == pytest.approx(1.0)
    assert compare([torch.tensor([4e-10, -3e-10])], [ref]).cosine == pytest.approx(0.0, abs=1e-12)


def test_all_outputs_count_and_non_finite_values_are_infinitely_wrong():
    a, b = torch.ones(3), torch.full((2,), 2.0)
    err = compare([a, b + 0.2], [a, b])
    assert err.max_rel == pytest.approx(0.1)
    assert compare([torch.tensor([float("nan")])], [torch.ones(1)]).max_rel == float("inf")
    assert compare([torch.zeros(2)], [torch.zeros(2)]).cosine == 1.0


def test_each_output_is_measured_against_its_own_scale():
    """Over all outputs at once, a small output wrong entirely was 1e-5 relative beside a large one (an exact pass
    that folded the example's batch size into one output passed every check). Its own scale has a floor, a
    hundredth of the largest output's: an output that is zero up to rounding (``y − y.mean()`` reduced) would
    otherwise make float noise a huge error."""
    big, small = torch.full((4,), 50.0), torch.ones(3)
    err = compare([big, -small], [big, small])
    assert err.max_rel == pytest.approx(2.0)  # against its own scale, 1 (the floor is 0.5)
    assert compare([big, small * 1.5], [big, small]).max_rel == pytest.approx(0.5)
    huge = torch.full((4,), 1e5)
    assert compare([huge, -small], [huge, small]).max_rel == pytest.approx(2 / 1e3)  # the floor: 1e-2 × 1e5
    noise = torch.tensor([3e-9, -1e-9])
    assert compare([big, noise], [big, torch.zeros(2)]).max_rel == pytest.approx(3e-9 / 0.5)  # not 3e-9 / 1e-12


def test_non_finite_values_where_the_reference_has_the_same_ones_are_exact():
    nan, inf = float("nan"), float("inf")
    ref = torch.tensor([nan, inf, -inf, 2.0, 4.0])
    err = compare([torch.tensor([nan, inf, -inf, 2.0, 4.4])], [ref])  # measured on the finite rest
    assert err.max_rel == pytest.approx(0.1) and 0.99 < err.cosine < 1
    for other in ([2.0, inf, -inf, 2.0, 4.0], [nan, -inf, -inf, 2.0, 4.0], [nan, inf, nan, 2.0, 4.0],
                  [nan, inf, -inf, nan, 4.0]):
        assert compare([torch.tensor(other)], [ref]).max_rel == float("inf"), other
    assert compare([torch.full((3,), nan)], [torch.full((3,), nan)]) == compare([torch.ones(1)], [torch.ones(1)])


class LogOfInput(nn.Module):
    """NaN wherever an input is negative, which fresh normal inputs always hit."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.log(self.fc(x)) + torch.sqrt(x)


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_a_model_whose_outputs_hold_nan_compiles_and_keeps_them_where_eager_has_them(backend):
    model, x = LogOfInput().eval(), torch.randn(2, 4)
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend=backend)
    y, want = cm(x), model(x)
    assert torch.equal(y.isnan(), want.isnan()) and want.isnan().any()
    torch.testing.assert_close(y, want, equal_nan=True)


def test_what_compare_leaves_out_dtypes_shapes_and_integer_values_is_checked_apart():
    logits, ids = torch.randn(2, 3), torch.tensor([[1, 2], [3, 4]])
    assert discrete_mismatch([logits, ids], [logits + 1, ids]) == ""  # float values are compare's business
    assert discrete_mismatch([logits, ids + 1], [logits, ids]) == "torch.int64-valued output 1 differs in 4 of 4 elements"
    assert discrete_mismatch([logits, ids + 1], [logits, ids], values=False) == ""
    assert discrete_mismatch([logits.double()], [logits]) == "output 0 is float64 where eager's is float32"
    assert discrete_mismatch([logits[:1]], [logits]) == "output 0 has shape [1, 3] where eager's has [2, 3]"


class LogitsAndClass(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y, y.argmax(1)


def test_a_wrong_integer_output_beside_a_right_float_one_is_an_error(monkeypatch):
    """compare's error is over floating outputs only; an artifact whose class ids were wrong (TVM's reading of
    ``i[:, -1]``, found so) passed the check while its logits were right."""
    run = EagerArtifact.run
    monkeypatch.setattr(EagerArtifact, "run", lambda self, inputs: (run(self, inputs)[0], run(self, inputs)[1] + 1))
    with pytest.raises(VerificationError, match=r"the eager artifact differs from the graph it compiled on the "
                                                r"example: torch\.int64-valued output 1 differs in 2 of 2 elements"):
        fxforge.compile(LogitsAndClass().eval(), (torch.randn(2, 4),), measure_latency=False)


class AgreesOnTheExampleOnly(torch.nn.Module):
    """Computes ``fc(x)`` on one input and ``2·fc(x)`` on any other: a capture at that input is right there only."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.fc, self.example = torch.nn.Linear(4, 3), example

    def forward(self, x):
        return self.fc(x) if torch.equal(x, self.example) else 2 * self.fc(x)


class Captured(torch.nn.Module):
    def __init__(self, fc: torch.nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return (self.fc(x),)  # flat outputs, as a captured graph returns them


def test_the_artifact_is_checked_against_the_model_on_fresh_inputs_too():
    """An artifact true to its graph, from a capture that matches the model on the example only: an exact pipeline
    is a VerificationError naming the model, since fresh inputs of the example's shapes show the difference."""
    x = torch.randn(2, 4)
    model = AgreesOnTheExampleOnly(x).eval()
    graph = torch.fx.symbolic_trace(Captured(model.fc))  # what a capture at x would have taken
    artifact = type("Faithful", (), {"backend": "eager", "__call__": lambda self, *a: graph(*a)[0]})()
    with pytest.raises(VerificationError, match=r"the eager artifact of an exact pipeline differs from the model "
                                                r"by 0\.5 relative \(cosine 1\.0000; bound .*\), and so does the "
                                                r"graph it compiled \(0\.5\): a pass or the capture"):
        check_artifact(artifact, ModelRuns(model), graph, (x,), exact=True)
    assert check_artifact(artifact, ModelRuns(model), graph, (x,), exact=False).max_rel >= 0.5  # stated, not hidden


def test_a_dynamic_batch_artifact_is_checked_at_another_batch_size_too():
    """TVM lowered ``x.squeeze(0)`` compiled from a batch of 1 for that batch alone, and every check ran at the
    example's shapes; an artifact right at the example's batch and wrong at another is now a VerificationError."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    cm = fxforge.compile(model, (torch.randn(1, 4),), backend="eager", measure_latency=False)

    class OnlyAtOne(EagerArtifact):
        def run(self, inputs):
            out = super().run(inputs)
            return out if inputs[0].shape[0] == 1 else [o * 0 for o in out]

    artifact = OnlyAtOne(cm.artifact.gm, cm.signature, cm.artifact.target, cm.artifact.info)
    x = torch.randn(1, 4)
    with pytest.raises(VerificationError, match="differs from the graph it compiled by 1 relative"):
        check_artifact(artifact, ModelRuns(model), cm.artifact.gm, (x,), exact=True)
    static = OnlyAtOne(cm.artifact.gm, cm.signature.with_static_batch((x,), "static"), cm.artifact.target, {})
    check_artifact(static, ModelRuns(model), cm.artifact.gm, (x,), exact=True)  # one batch size: nothing else


def test_an_artifact_returning_its_outputs_in_other_containers_is_refused():
    """compile compared the artifact's outputs leaf by leaf only: an artifact returning a namedtuple of another field
    order (two classes of one name in a process) put the probabilities in ``out.logits``, and every check passed."""
    Out = collections.namedtuple("Out", ["logits", "probs"])
    Swapped = collections.namedtuple("Out", ["probs", "logits"])
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    cm = fxforge.compile(model, (torch.randn(2, 4),), backend="eager", measure_latency=False)

    class Wrapped(nn.Module):
        def forward(self, x):
            y = model(x)
            return Out(y, y.softmax(-1))

    artifact = type("Reordered", (), {"backend": "eager", "__call__": lambda self, x: Swapped(*Wrapped()(x))})()
    with pytest.raises(VerificationError, match=r"the eager artifact returns Out\(probs=\*, logits=\*\) where your "
                                                r"model returns Out\(logits=\*, probs=\*\)"):
        check_artifact(artifact, ModelRuns(Wrapped()), cm.artifact.gm, (torch.randn(2, 4),), exact=False)


class ReturnsShape(nn.Linear):
    def forward(self, x):
        y = super().forward(x)
        return y, y.shape


def test_a_returned_shape_compiles_as_the_tuple_export_records():
    """The nesting check refused ``return y, y.shape``: export records the torch.Size as a tuple."""
    model, x = ReturnsShape(4, 3).eval(), torch.randn(5, 4)
    y, shape = fxforge.compile(model, (torch.randn(2, 4),), backend="onnx", measure_latency=False)(x)
    assert tuple(shape) == (5, 3)


class SqueezedHead(nn.Module):
    """The common head ``fc(pool(y).squeeze())``: at batch 1 eager squeezes the batch away too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(self.conv(x), 1).squeeze())


def test_a_shape_the_artifact_gets_wrong_below_the_examples_batch_is_an_error():
    """Exported at batch 2, the squeeze's axes are fixed: ONNX returned [1, 5] at batch 1 where eager returns [5],
    and the check ran at the example's batch and one more only. It now runs at the smallest batch too."""
    with pytest.raises(VerificationError, match=r"the onnx artifact differs from the graph it compiled at batch 1: "
                                                r"output 0 has shape \[1, 5\] where eager's has \[5\]"):
        fxforge.compile(SqueezedHead().eval(), (torch.randn(2, 3, 8, 8),), backend="onnx", measure_latency=False)
    cm = fxforge.compile(SqueezedHead().eval(), (torch.randn(2, 3, 8, 8),), backend="onnx", static_batch=True,
                         measure_latency=False)
    assert cm(torch.randn(2, 3, 8, 8)).shape == (2, 5)


class CountsInBuffer(nn.Module):
    """Adds how often it ran, kept in a buffer written in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x + self.calls


class CountsInAttribute(nn.Module):
    """Adds how often it ran, kept in a plain Python attribute of a submodule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.inner.calls = 1000.5  # a float: rebinding frees the old object, whose address a new one may take

    def forward(self, x):
        self.inner.calls += 1.0
        return x + self.inner.calls


class CountsInList(nn.Module):
    """Adds how often it ran, kept as the length of a list it appends to (the same list object every run)."""

    def __init__(self):
        super().__init__()
        self.history = []

    def forward(self, x):
        self.history.append(len(self.history))
        return x + len(self.history)


class CountsInPlainTensor(nn.Module):
    """Adds how often it ran, kept in a tensor attribute that is not a registered buffer, written in place."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(counts={"calls": torch.zeros(())})

    def forward(self, x):
        self.config.counts["calls"] += 1
        return x + self.config.counts["calls"]


class CountsInArray(nn.Module):
    """Adds how often it ran, kept in a numpy array written in place."""

    def __init__(self):
        super().__init__()
        self.calls = np.zeros(1)

    def forward(self, x):
        self.calls += 1
        return x + float(self.calls[0])


def test_model_runs_reuse_a_copy_only_while_runs_leave_the_model_as_they_found_it():
    """A run that changes nothing hands its copy of the model to the next run (copying a large model costs more than
    running it); a run that writes into a buffer, rebinds an attribute, appends to a list, or writes into a tensor or
    array held in a plain attribute (however deep) does not, so every run starts from the original state."""
    x = torch.randn(2, 3)
    plain = ModelRuns(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval())
    outs = [plain.run((x,)) for _ in range(3)]
    assert plain.copies == 1 and all(torch.equal(o, outs[0]) for o in outs)
    for stateful in (CountsInBuffer(), CountsInAttribute(), CountsInList(), CountsInPlainTensor(), CountsInArray()):
        runs = ModelRuns(stateful.eval())
        outs = [runs.run((x,)) for _ in range(3)]
        assert runs.copies == 3, type(stateful).__name__
        assert all(torch.equal(o, outs[0]) for o in outs)  # each from the original state
        assert torch.equal(outs[0], stateful(x))  # the state the user's model was in


def test_model_runs_record_a_reused_copys_state_once(monkeypatch):
    """The state recorded after a run that left the copy unchanged is the state before the next run (nothing touches
    the copy in between): recording it costs as much as a run of a large model (efficientnet_v2_s ~0.1 s of CPU), so
    three runs on one copy record it 4 times, not 6, and a changing model is still copied for every run."""
    from fxforge.compiler import verify
    recorded = []
    state = verify._state
    monkeypatch.setattr(verify, "_state", lambda m: recorded.append(1) or state(m))
    x = torch.randn(2, 3)
    plain = ModelRuns(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval())
    outs = [plain.run((x,)) for _ in range(3)]
    assert len(recorded) == 4 and plain.copies == 1 and all(torch.equal(o, outs[0]) for o in outs)
    stateful = ModelRuns(CountsInBuffer().eval())
    outs = [stateful.run((x,)) for _ in range(3)]
    assert stateful.copies == 3 and all(torch.equal(o, outs[0]) for o in outs)


def test_model_runs_under_inference_mode_tell_a_changing_model_from_an_unchanged_one():
    """Inference tensors keep no version: under an ambient inference_mode every run looked like a state change (a
    warning on every compile, a fresh copy for every run). The runs now step out of it."""
    x = torch.randn(2, 3)
    with torch.inference_mode():
        stateful, plain = ModelRuns(CountsInBuffer().eval()), ModelRuns(nn.Sequential(nn.Linear(3, 3)).eval())
        outs = [stateful.run((x,)) for _ in range(3)]
        plain_outs = [plain.run((x,)) for _ in range(3)]
    assert stateful.copies == 3 and all(torch.equal(o, outs[0]) for o in outs) and stateful.state_changes
    assert plain.copies == 1 and not plain.state_changes and all(torch.equal(o, plain_outs[0]) for o in plain_outs)


def test_the_artifact_check_reuses_the_bound_outputs_only_of_the_graph_that_computed_them():
    """An approximate pipeline's numeric check leaves the last graph's outputs on its other bound batches in
    gm.meta; the artifact check compares on those batches without running the graph again (4 graph runs: the example,
    the batch no pass saw and two of other batch sizes, one more and the smallest, instead of 11), and runs it on
    batches of its own once the graph's code changed."""
    from fxforge.backends.base import get_backend
    from fxforge.compiler.pass_manager import PassContext, PassManager
    from fxforge.compiler.target import get_target
    from fxforge.compiler.trace import trace
    from fxforge.compiler.verify import BOUND_BATCHES, BOUND_OUTPUTS, check_artifact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 16)
    runs = ModelRuns(model)
    gm, sig = trace(model, (x,), runs=runs)
    gm, _ = PassManager(["insert_qdq", "calibrate"], measure_latency=False).run(
        gm, PassContext((x,), calibration=[(torch.randn(8, 16),)]))
    code, known = gm.meta[BOUND_OUTPUTS]
    assert code == gm.code and len(known) == BOUND_BATCHES - 1
    with torch.no_grad():
        assert all(torch.equal(gm(*inputs)[0], out[0]) for inputs, out in known)  # what a new run gives
    artifact = get_backend("eager").lower(gm, (x,), sig, get_target("x86"))
    calls = []
    forward = gm.forward
    gm.forward = lambda *a: calls.append(1) or forward(*a)
    reused = check_artifact(artifact, runs, gm, (x,), exact=False)
    assert len(calls) == 4 and BOUND_OUTPUTS not in gm.meta  # read once, then dropped
    assert 0 < reused.max_rel < float("inf") and reused.cosine > 0
    gm.meta[BOUND_OUTPUTS] = (code, known)
    gm.graph.call_function(torch.ops.aten.relu.default, (next(iter(gm.graph.nodes)),))  # unused: same outputs,
    gm.recompile()                                                                       # other code
    gm.forward = lambda *a: calls.append(1) or forward(*a)
    calls.clear()
    check_artifact(artifact, runs, gm, (x,), exact=False)
    assert len(calls) == 3 + BOUND_BATCHES  # stale outputs are not read: the graph runs on its own batches


def test_model_runs_copy_anew_when_an_attribute_cannot_be_recorded():
    """An attribute whose state cannot be read (an object with slots, here) is never taken for unchanged."""
    class Slotted:
        __slots__ = ("calls",)

    model = nn.Sequential(nn.Linear(3, 3)).eval()
    model.counter = Slotted()
    runs = ModelRuns(model)
    x = torch.randn(2, 3)
    runs.run((x,)), runs.run((x,))
    assert runs.copies == 2


def test_the_numeric_check_hands_its_run_to_the_shapes_analysis():
    """Each checked stage's run is on inputs shaped like the example: the Shapes analysis (the report's FLOPs) gets
    every node's shape from it, the same as its own propagation gives, instead of running the graph again."""
    from fxforge.compiler.analysis import Flops, Shapes
    from fxforge.compiler.pass_manager import PassContext, PassManager
    from fxforge.compiler.trace import trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4))
    x = torch.randn(2, 3, 16, 16)
    gm, _ = trace(model.eval(), (x,))
    runs = []
    original = Shapes.run
    Shapes.run = lambda self, g, c: runs.append(g) or original(self, g, c)
    try:
        ctx = PassContext(example_inputs=(x,))
        gm, report = PassManager("fuse", verify="numerics", measure_latency=False).run(gm, ctx)
        assert not runs  # every stage's FLOPs came from the check's runs
        handed = ctx.analysis(Shapes, gm)
        assert handed == original(Shapes(), gm, ctx)  # the same facts a propagation gives
        kinds = {n.op for n in gm.graph.nodes if n.name in handed}
        assert kinds == {"placeholder", "get_attr", "call_function"}  # inputs, constants and ops
        assert report.final.flops == sum(Flops().run(gm, PassContext(example_inputs=(x,))).values()) > 0
        PassManager("fuse", verify="lint", measure_latency=False).run(trace(model.eval(), (x,))[0],
                                                                      PassContext(example_inputs=(x,)))
        assert runs  # without the numeric check, the analysis propagates itself
    finally:
        Shapes.run = original


def test_the_sampled_check_leaves_out_only_a_stage_that_the_next_approximate_stage_reads():
    """verify="numerics" does not run calibrate before bias_correction (approximate, keeps every shape: its run would
    give nothing but a sample of its own error); it runs calibrate before fold_qdq, an exact pass checked against
    calibrate's outputs, and insert_qdq, whose run gives the report its new nodes' shapes. verify="full" runs all."""
    from fxforge.compiler.pass_manager import SAMPLED_OUT, PassContext, PassManager
    from fxforge.compiler.trace import trace
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 16)
    calibration = [(torch.randn(8, 16),)]

    def rows(passes, verify):
        gm, _ = trace(model, (x,))
        _, report = PassManager(passes, verify=verify, measure_latency=False).run(
            gm, PassContext((x,), calibration=calibration))
        return {r.stage: r.max_rel_err for r in report.rows}, report.meta.get(SAMPLED_OUT)

    errors, skipped = rows(["insert_qdq", "calibrate", "bias_correction", "fold_qdq"], "numerics")
    assert skipped == ["calibrate"] and errors["calibrate"] is None
    assert all(e is not None for stage, e in errors.items() if stage != "calibrate")
    full, skipped = rows(["insert_qdq", "calibrate", "bias_correction", "fold_qdq"], "full")
    assert skipped is None and all(e is not None for e in full.values())
    assert {s: e for s, e in full.items() if s != "calibrate"} == {s: e for s, e in errors.items() if s != "calibrate"}
    errors, skipped = rows(["insert_qdq", "calibrate", "fold_qdq"], "numerics")
    assert skipped is None and all(e is not None for e in errors.values())


def test_the_bound_batches_are_compared_with_the_model_when_compile_gives_its_runs():
    """With ``PassContext.model_outputs`` (compile passes its ModelRuns) the bound batches' references are the
    model's outputs under the keys the artifact check reads, ("bound", k), not 7 runs of the traced graph; the stated
    bound is the one the traced graph gives, within the capture's tolerance."""
    from fxforge.compiler.pass_manager import PassContext, PassManager
    from fxforge.compiler.trace import trace
    from fxforge.compiler.verify import BOUND_BATCHES
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 16)
    runs = ModelRuns(model)
    keys = []

    def model_outputs(key, inputs):
        keys.append(key)
        return runs.outputs(key, inputs)

    stated, calibration = [], [(torch.randn(8, 16),)]
    for given in (None, model_outputs):
        gm, _ = trace(model, (x,))
        calls, forward = [], gm.forward
        gm.forward = lambda *a: calls.append(1) or forward(*a)
        gm, report = PassManager(["insert_qdq", "calibrate"], measure_latency=False).run(
            gm, PassContext((x,), calibration=calibration, model_outputs=given))
        stated.append(report.final.max_rel_err)
        # the last stage runs on the 7 bound batches either way; the traced graph only without the model's runs
        assert len(calls) == (BOUND_BATCHES - 1) * (2 if given is None else 1)
    assert keys == [("bound", k) for k in range(BOUND_BATCHES - 1)] and runs.count == BOUND_BATCHES - 1
    assert stated[1] == pytest.approx(stated[0], rel=1e-3)


class CentredToo(nn.Module):
    """A second output that is zero up to rounding: the mean of ``y − y.mean()``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y, (y - y.mean((2, 3), keepdim=True)).mean((1, 2, 3))


@pytest.mark.parametrize("passes, backend", [("fuse_batchnorm", "eager"), (None, "onnx")])
def test_an_output_zero_up_to_rounding_is_no_verification_error(passes, backend):
    """Against its own scale alone, that output's float noise was 0.4 relative (fuse_batchnorm) and 33 (onnx, no
    passes): valid compiles failed."""
    fxforge.compile(CentredToo().eval(), (torch.randn(2, 3, 16, 16),), passes=passes, backend=backend,
                    measure_latency=False)


class SideInput(nn.Module):
    """A float32 model with a bfloat16 side input it casts to float32 at once."""

    def forward(self, x, mask):
        return x * mask.float() + 1


def test_the_exact_tolerance_follows_what_the_graph_computes_not_the_inputs_dtypes():
    """One bfloat16 side input widened a float32 model's exact tolerance to 6.25 % (an exact pass 5 % wrong went
    through); a graph computing in float16 still gets the wider one."""
    from fxforge.compiler.trace import trace
    from fxforge.compiler.verify import EXACT_TOLERANCE, exact_tolerance
    gm, _ = trace(SideInput(), (torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bfloat16)))
    assert exact_tolerance(gm) == EXACT_TOLERANCE
    half = nn.Linear(4, 4).half()
    gm, _ = trace(half, (torch.randn(2, 4, dtype=torch.float16),))
    assert exact_tolerance(gm) == 8 * torch.finfo(torch.float16).eps


class WithHalfSide(nn.Module):
    """A float32 linear beside a small bfloat16 side output."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.l(x), x[:, :1].to(torch.bfloat16) * 2


@fxforge.register_pass
class ScalesWeights(fxforge.Pass):
    """Scale every linear's weight by 1.04: a deliberately wrong pass that claims to be exact."""

    name = "test_scales_weights"

    def run(self, gm, ctx):
        from fxforge.compiler.graph import add_tensor, finalize, get_tensor
        from fxforge.compiler.ops import LINEAR, is_op, set_argument, weight_of
        for node in [n for n in gm.graph.nodes if is_op(n, *LINEAR)]:
            set_argument(node, "weight", add_tensor(gm, node, "scaled", get_tensor(gm, weight_of(node)) * 1.04))
        finalize(gm)
        return fxforge.PassResult(changed=True)


def test_each_output_is_held_to_the_tolerance_of_what_computes_it():
    """One bfloat16 side output widened every output's exact tolerance to 6.25 %: an exact pass 4 % wrong on the
    float32 output went through. Each output now gets its own, from the ops it is computed by."""
    from fxforge.compiler.trace import trace
    from fxforge.compiler.verify import EXACT_TOLERANCE, exact_tolerances
    gm, _ = trace(WithHalfSide(), (torch.randn(4, 16),))
    assert exact_tolerances(gm) == (EXACT_TOLERANCE, 8 * torch.finfo(torch.bfloat16).eps)
    with pytest.raises(fxforge.VerificationError, match=r"test_scales_weights' changed the outputs by 0.04 relative "
                                                        r"\(tolerance 0.0001\)"):
        fxforge.compile(WithHalfSide().eval(), (torch.randn(4, 16),), passes=["test_scales_weights"],
                        backend="eager", measure_latency=False)


def test_fresh_float_inputs_keep_the_sign_every_value_of_the_example_has():
    """A model taking the log of a positive input gave NaN on half of every N(0, 1) batch, where NaN matches NaN:
    the checks compared nothing there."""
    from fxforge.compiler.verify import fresh_inputs
    positive, negative, mixed = torch.rand(4, 8), -torch.rand(4, 8), torch.randn(4, 8)
    p, n, m = fresh_inputs([positive, negative, mixed])
    assert (p >= 0).all() and (n <= 0).all() and (m < 0).any() and (m > 0).any()


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x):
        return self.l(x) + torch.randn_like(x)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_model_that_samples_is_named_not_its_backend(backend):
    """A forward drawing noise made the artifact check blame the backend and offer verify='off'."""
    with pytest.raises(fxforge.VerificationError, match="your model gives other outputs on a second run"):
        fxforge.compile(Noisy().eval(), (torch.randn(2, 8),), backend=backend, measure_latency=False)



class NoisyBatchNorm(nn.Module):
    """Conv → batch norm, plus noise: ``fuse_batchnorm`` changes the graph, and the sample differs anyway."""

    def __init__(self, dropout: bool):
        super().__init__()
        self.conv, self.bn, self.dropout = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), dropout

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return nn.functional.dropout(y, 0.1, training=True) if self.dropout else y + 0.01 * torch.randn_like(y)


@pytest.mark.parametrize("dropout", [False, True])
def test_a_model_that_samples_is_named_not_the_first_exact_pass_that_changes_its_graph(dropout):
    """The numeric check compared each exact stage with the one before it on the same inputs: a forward drawing
    noise (or dropout with training=True) differed anyway, and the first exact pass that changed the graph was blamed
    ("exact pass 'fuse_batchnorm' changed the outputs by 0.817 relative")."""
    with pytest.raises(fxforge.VerificationError, match="your model gives other outputs on a second run"):
        fxforge.compile(NoisyBatchNorm(dropout).eval(), (torch.randn(2, 3, 8, 8),), passes="fuse", backend="eager",
                        measure_latency=False)


def test_a_pass_that_makes_a_deterministic_graph_random_is_named_not_the_model():
    """(found by a review) the check for a sampling model reran the graph after the pass: a pass adding noise to a
    model that draws no random number was reported as the model's fault, with verify='off' as the remedy."""
    from fxforge.compiler.graph import aten

    class AddsNoise(fxforge.Pass):
        """Claims to be exact but adds noise (a deliberately wrong pass)."""

        name = "test_adds_noise"

        def run(self, gm, ctx):
            out = gm.graph.output_node()
            first = out.args[0][0]
            with gm.graph.inserting_before(out):
                noisy = gm.graph.call_function(aten.add.Tensor, (first, gm.graph.call_function(
                    aten.rand_like.default, (first,))))
            out.args = ((noisy, *out.args[0][1:]),)
            gm.recompile()
            return fxforge.PassResult(changed=True)

    with pytest.raises(fxforge.VerificationError, match="exact pass 'test_adds_noise' changed the outputs"):
        fxforge.compile(nn.Linear(8, 4).eval(), (torch.randn(2, 8),), passes=[AddsNoise()], backend="eager",
                        measure_latency=False)

class Cancels(nn.Module):
    """(x·10³ + 0.3) − x·10³: about 0.3, with float32 rounding noise of a few 10⁻⁴."""

    def forward(self, x):
        return (x * 1e3 + 0.3) - x * 1e3


def test_a_float32_rounding_difference_is_told_from_a_wrong_rewrite_by_a_float64_run():
    """Two float32 evaluations of a deep network differ by its rounding noise, which can exceed the exact tolerance
    (fusing inception_v3's batch norms: 1.15e-4, each evaluation 9e-5 from float64): the exact check refused a valid
    model. A difference within twice the graph's own distance from its float64 run passes; a larger one does not."""
    from fxforge.compiler.trace import trace
    from fxforge.compiler.verify import within_rounding_noise
    x = torch.randn(64)
    gm, _ = trace(Cancels(), (x,))
    out = gm(x)
    noise = (out[0].double() - Cancels()(x.double())).abs().max()
    assert 1e-4 < noise / 0.3 < 1e-3
    assert within_rounding_noise(gm, (x,), out, [out[0] + noise])
    assert not within_rounding_noise(gm, (x,), out, [out[0] + 3 * noise + 1e-4])
    linear, y = nn.Linear(8, 8).eval(), torch.randn(4, 8)
    gm, _ = trace(linear, (y,))
    out = gm(y)
    assert not within_rounding_noise(gm, (y,), out, [out[0] * 1.001])  # a 0.1 % scale is no rounding


class CancelsInHalf(nn.Module):
    """(x·10 + 0.3) − x·10 in float16: about 0.3, with rounding noise of a few percent."""

    def forward(self, x):
        return (x * 10 + 0.3) - x * 10


def test_a_half_precision_rounding_difference_is_told_from_a_wrong_rewrite_by_a_float64_run():
    """The float64 reference holds for float16 graphs too, each output against its own noise and tolerance: fusing
    a float16 regnet_x_400mf's batch norms moved its outputs by 4.8 % (the float16 model itself is 5.6 % from
    float32), past float16's exact tolerance of 0.8 %, and the exact check refused the valid model."""
    from fxforge.compiler.trace import trace
    from fxforge.compiler.verify import exact_tolerances, within_rounding_noise
    x = torch.randn(64).half()
    gm, _ = trace(CancelsInHalf(), (x,))
    out = gm(x)
    noise = float((out[0].double() - CancelsInHalf()(x.double())).abs().max()) / 0.3
    (tolerance,) = exact_tolerances(gm)
    assert tolerance < noise < 0.1
    assert within_rounding_noise(gm, (x,), out, [out[0] * (1 + noise)])
    assert not within_rounding_noise(gm, (x,), out, [out[0] * (1 + 3 * noise + tolerance)])
    # each output against its own noise: the noisy one's does not widen the margin of one computed more exactly
    gm, _ = trace(TwoOutputs(), (x,))
    out = gm(x)
    assert within_rounding_noise(gm, (x,), out, [out[0], out[1] * (1 + noise)])
    assert not within_rounding_noise(gm, (x,), out, [out[0] * (1 + noise), out[1]])


class TwoOutputs(nn.Module):
    def forward(self, x):
        return x * 3 + 1, CancelsInHalf()(x)


def deep_half_conv_bn(depth: int = 32, seed: int = 0) -> nn.Module:
    """A float16 stack of conv → batch norm → relu with batch statistics of its own data: deep enough that fusing
    the batch norms moves its outputs past float16's exact tolerance, by float16 rounding alone."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=None), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).train()
    with torch.no_grad():
        model(torch.randn(16, 3, 16, 16))
    return model.eval().half()


def test_fusing_a_deep_float16_network_is_within_its_rounding_noise():
    model, x = deep_half_conv_bn(), torch.randn(2, 3, 16, 16).half()
    cm = fxforge.compile(model, (x,), passes=["fuse_batchnorm"], measure_latency=False)
    with torch.no_grad():
        truth = model.double()(x.double())
    assert compare([cm(x)], [truth]).max_rel < 2 * compare([model.half()(x)], [truth]).max_rel + 8e-3


@pytest.mark.slow
def test_inception_v3_compiles_exactly_though_fusing_its_batch_norms_rounds_past_the_tolerance():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    for m in model.modules():  # the batch norms' statistics estimated on data, as training leaves them
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 80, 80))
    model.eval()
    x = torch.randn(2, 3, 80, 80)
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="eager", measure_latency=False)
    with torch.no_grad():
        assert compare([cm(x)], [model(x)]).max_rel < 1e-3


def test_the_bound_of_infinite_errors_is_infinite_not_nan():
    """Integer outputs that differ are infinitely wrong in every batch; their bound, inf + (inf − inf), was NaN."""
    from fxforge.compiler.verify import Error, error_bound
    assert error_bound([Error(float("inf"), 0.0), Error(float("inf"), 1.0)]).max_rel == float("inf")


def test_the_cosine_weighs_each_output_alike():
    """Without validation data the report's cosine is compare's, over every output flattened together: a small
    output negated beside a large one left it at 0.998."""
    big, small = torch.randn(64, 100) * 100, torch.randn(64, 4)
    assert compare([big, -small], [big, small]).cosine == pytest.approx(0.0, abs=1e-6)
    assert compare([big * 2], [big]).cosine == pytest.approx(1.0)
