"""fxforge.autotune: the digits CNN search against the plain int8 preset, the record, re-application, errors."""
import json

import pytest
import torch
from torch import nn

import fxforge
from fxforge.compiler.errors import CalibrationError, InputError, TuningError
from fxforge.compiler.graph import graph_tensors
from fxforge.compiler.pass_manager import resolve
from fxforge.passes import QUANTIZE
from fxforge.autotune import (AutotuneResult, Candidate, SearchSpace, Setting, latency_score_front, load_passes,
                              pareto_front, pick, plot_pareto)
from fxforge.passes.analysis.sensitivity import Sensitivity
from models import accuracy, digits_cnn

BACKEND = "onnx"  # int8 runs as int8 kernels only there


def _digits():
    model, (x_train, _, x_test, y_test) = digits_cnn()
    calibration = [(x_train[i:i + 64],) for i in range(0, 256, 64)]
    return model, x_train[:32], calibration, lambda m: accuracy(m, x_test, y_test), (x_test, y_test)


def _same_graph(a, b):
    ta, tb = graph_tensors(a), graph_tensors(b)
    return a.code == b.code and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _check_search(result, model, example, calibration, evaluate, test_data, tmp_path):
    """What every digits search must give: a feasible best at least as fast as int8, a plot, a re-appliable record."""
    assert result.best is not None and result.best.feasible
    assert result.best.score >= result.baseline.score - 0.01
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(result.record_path.read_text())
    assert record["passes"] == result.best.passes and record["candidates"][record["best"]]["passes"] == result.best.passes
    # sensitivity pruned channel pruning (≥25 % of channels destroys this un-finetuned CNN) without measuring it
    assert any(p["passes"][1].startswith("prune_channels") and "predicted drop" in p["reason"] for p in result.pruned)

    again = fxforge.compile(model, example, passes=load_passes(result.record_path), backend=BACKEND,
                            calibration=calibration, measure_latency=False)
    assert _same_graph(again.graph_module, result.compiled.graph_module)
    # the pick is at least as fast as the int8 preset in the search's own interleaved re-timing: a check of the
    # selection (a stale or unfeasible pick fails it); benchmarks/autotune_table.py measures the speed itself
    assert result.best in result.pareto
    # only re-timed latencies are compared: the front and the pick are re-timed, the rest is marked stale
    assert all(c.retimed for c in result.pareto) and result.baseline.retimed and result.reference.retimed
    assert [record["candidates"][i]["retimed"] for i in record["pareto"]] == [True] * len(result.pareto)
    assert record["stale"] == [i for i, c in enumerate(result.candidates) if c.error is None and not c.retimed]
    assert result.reference.passes == ["fuse", *QUANTIZE] and result.reference.feasible
    assert result.best.latency_ms <= result.reference.latency_ms
    fp32 = accuracy(model, *test_data)
    assert evaluate(again) >= fp32 - 0.01, (evaluate(again), fp32)


def test_digits_search_finds_a_pipeline_as_fast_as_int8_within_the_budget(tmp_path):
    model, example, calibration, evaluate, test_data = _digits()
    space = SearchSpace(prune_ratios=(0.25,), low_rank_energies=(), depthwise_energies=())
    result = fxforge.autotune(model, example, backend=BACKEND, evaluate=evaluate, max_accuracy_drop=0.01,
                              budget=3, calibration=calibration, output_dir=tmp_path, space=space)
    assert len(result.candidates) <= 3
    assert [c.passes for c in result.candidates[:2]] == [["fuse"], ["fuse", *QUANTIZE]]
    _check_search(result, model, example, calibration, evaluate, test_data, tmp_path)


@pytest.mark.slow
def test_digits_full_search(tmp_path):
    model, example, calibration, evaluate, test_data = _digits()
    result = fxforge.autotune(model, example, backend=BACKEND, evaluate=evaluate, budget=12,
                              calibration=calibration, output_dir=tmp_path)
    _check_search(result, model, example, calibration, evaluate, test_data, tmp_path)
    assert any("at least as aggressive" in p["reason"] or "changes no layer" in p["reason"] for p in result.pruned)


# ------------------------------------------------------------------------------------------ the pieces

@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_target_that_does_not_run_here_is_refused_before_any_work(tmp_path, backend):
    """For arm64 the eager search "succeeded", its latencies timed on this x86 CPU recorded under target arm64; the
    onnx one compiled candidates and then failed mid-search."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with pytest.raises(TuningError, match=r"autotune times its candidates on this machine, which target 'arm64' is "
                                          r"not: run it on such a machine, or autotune for this one \(target 'x86'\)"):
        fxforge.autotune(model, (torch.randn(2, 8),), target="arm64", backend=backend,
                         calibration=[(torch.randn(4, 8),)], output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_setting_is_a_valid_pipeline_and_reads_as_its_option_values():
    s = Setting(prune=0.25, low_rank=0.95, depthwise=0.99, quantize=True, skip=("conv2d", "linear"))
    passes = resolve(s.passes())
    names = [p.name for p in passes]
    assert names == [p.name for p in resolve("fuse")] + ["prune_channels", "low_rank", "depthwise_separable",
                                                         "equalize", "insert_qdq", "calibrate", "bias_correction",
                                                         "fold_qdq"]
    opts = {p.name: p for p in passes}
    assert opts["prune_channels"].ratio == 0.25 and opts["low_rank"].energy == 0.95
    assert opts["depthwise_separable"].energy == 0.99 and opts["insert_qdq"].skip == ("conv2d", "linear")
    assert Setting(quantize=False).passes() == ["fuse"]
    built = resolve(s.pipeline())  # Pass instances, and the strings of the record, give the same pipeline
    assert [(type(p), vars(p)) for p in built] == [(type(p), vars(p)) for p in passes]
    assert [p.name for p in resolve(Setting().passes())] == [p.name for p in resolve(["int8"])]


def test_covers_orders_settings_by_aggressiveness():
    base = Setting(prune=0.1, low_rank=0.95, skip=("a", "b"))
    assert Setting(prune=0.25, low_rank=0.95, skip=("a",)).covers(base)
    assert Setting(prune=0.1, low_rank=0.9, depthwise=0.95, skip=("a", "b")).covers(base)
    assert not Setting(prune=0.1, low_rank=0.99, skip=()).covers(base)  # less low-rank error
    assert not Setting(prune=0.1, low_rank=0.95, quantize=False).covers(base)  # float is less aggressive
    assert not Setting(prune=0.0, low_rank=0.5, skip=()).covers(base)


def test_pareto_front_keeps_only_undominated_candidates():
    def cand(ms, size, score, error=None):
        return Candidate(Setting(), latency_ms=ms, size_bytes=size, score=score, error=error)
    a, b, c, d = cand(1.0, 100, 0.9), cand(2.0, 50, 0.9), cand(2.0, 100, 0.8), cand(0.5, 10, 1.0, error="x")
    e = cand(0.9, 200, 0.95)
    assert pareto_front([a, b, c, d, e]) == [e, a, b]  # c is beaten by a; d failed to compile


def test_the_pick_among_candidates_as_fast_goes_by_score():
    """The fastest feasible candidate won: identical runs chose int8 with or without one float layer (scores 0.999970
    and 0.999983) as their re-timed latencies crossed within noise."""
    def cand(ms, score, size=100):
        return Candidate(Setting(), latency_ms=ms, size_bytes=size, score=score, feasible=True)
    plain, one_float, slow = cand(0.30, 0.999970), cand(0.32, 0.999983), cand(0.40, 1.0)
    assert pick([plain, one_float, slow]) is one_float and pick([one_float, plain]) is one_float
    assert pick([plain, cand(0.31, 0.999970, size=50)]).size_bytes == 50 and pick([]) is None


def test_the_plotted_front_is_a_front_of_latency_and_score():
    """The 3-D front [e, a, b] above zig-zags in 2-D (b: slower than a, same score); the plotted front keeps the
    candidates that outscore every faster one, and nothing plotted lies above or left of its steps."""
    def cand(ms, size, score, error=None):
        return Candidate(Setting(), latency_ms=ms, size_bytes=size, score=score, error=error)
    a, b, c, d = cand(1.0, 100, 0.9), cand(2.0, 50, 0.9), cand(2.0, 100, 0.8), cand(0.5, 10, 1.0, error="x")
    e, f = cand(0.9, 200, 0.85), cand(3.0, 300, 0.95)
    front = latency_score_front([a, b, c, d, e, f])
    assert front == [e, a, f]
    for x in (a, b, c, e, f):  # every candidate is matched by the front's step at or before its latency
        assert max(s.score for s in front if s.latency_ms <= x.latency_ms) >= x.score


def test_stale_candidates_are_marked_in_the_record_and_the_plot(tmp_path, monkeypatch):
    """A candidate timed only during the search (under another load) is listed as stale, drawn apart (hollow grey,
    labelled), and left out of the plotted front, even where its stale time puts it left of the front."""
    from matplotlib.figure import Figure

    def cand(ms, score, retimed=True, error=None):
        return Candidate(Setting(), latency_ms=ms, size_bytes=100, score=score, retimed=retimed, error=error)
    base, ref, fast = cand(2.0, 1.0), cand(1.0, 0.99), cand(1.5, 0.995)
    stale, failed = cand(0.5, 0.98, retimed=False), cand(None, None, retimed=False, error="BackendError: x")
    result = AutotuneResult(base, ref, [base, ref, fast, stale, failed], [ref, fast, base], ref, [],
                            Sensitivity(layers=[]), meta={"threshold": 0.98, "backend": "onnx"})
    assert result.stale == [stale]
    record = result.to_dict()
    assert record["stale"] == [3] and [c["retimed"] for c in record["candidates"]] == [True] * 3 + [False] * 2
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    plot_pareto(result, tmp_path / "pareto.png")
    ax = figures[0].axes[0]
    marked = [c for c in ax.collections if c.get_label().startswith("stale")]
    assert len(marked) == 1 and marked[0].get_offsets().tolist() == [[0.5, 0.98]]
    assert "another load" in marked[0].get_label() and figures[0].legends  # the legend, under the plot
    front = next(line for line in ax.lines if line.get_label().startswith("front"))
    assert list(front.get_xdata()) == [1.0, 1.5, 2.0]  # the re-timed front; the stale point is not on it
    assert [0.5, 0.98] not in ax.collections[0].get_offsets().tolist()  # nor among the coloured points


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"budget": 1}, InputError, "budget"),
    ({"max_accuracy_drop": -0.1}, InputError, "max_accuracy_drop"),
    ({"calibration": None}, CalibrationError, "calibration"),
    ({"calibration": []}, CalibrationError, "empty"),
    ({"calibration": [(torch.randn(2, 5),)]}, CalibrationError, r"calibration batch 0: input 0 has shape \[2, 5\]"),
    ({"evaluate": lambda m: 1 / 0}, TuningError, "ZeroDivisionError"),
    ({"evaluate": lambda m: float("nan")}, TuningError, "finite number"),
    ({"space": SearchSpace(sensitivity_batches=0)}, InputError, "sensitivity_batches must be an integer >= 1"),
    ({"space": None}, InputError, "space must be a fxforge.autotune.SearchSpace, got NoneType"),
    ({"space": SearchSpace(prune_ratios=0.1)}, InputError, "prune_ratios must be a tuple of numbers"),
    ({"space": SearchSpace(quantize="no")}, InputError, "quantize must be True or False, got 'no'"),
    ({"budget": 3.0}, InputError, "budget must be an integer"),
])
def test_bad_arguments_get_clear_errors(kwargs, error, message, tmp_path):
    args = {"backend": "eager", "calibration": [(torch.randn(4, 4),)], "output_dir": tmp_path, **kwargs}
    with pytest.raises(error, match=message):
        fxforge.autotune(Tiny(), torch.randn(2, 4), **args)


def test_an_example_that_is_no_tensor_is_a_named_error(tmp_path):
    """``autotune(model, None, ...)`` raised a raw AttributeError deep in the quantization passes."""
    with pytest.raises(InputError, match="example_inputs must be a tensor or a tuple of tensors"):
        fxforge.autotune(Tiny(), None, backend="eager", calibration=[(torch.randn(4, 4),)], output_dir=tmp_path)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_dir_that_cannot_be_written_is_refused_before_the_search():
    """The search ran to its end and then lost its result to a raw FileNotFoundError."""
    with pytest.raises(InputError, match="output_dir /proc/fxforge_out cannot be written"):
        fxforge.autotune(Tiny(), torch.randn(2, 4), backend="eager", calibration=[(torch.randn(4, 4),)],
                         output_dir="/proc/fxforge_out")


def test_numpy_scores_are_numbers():
    """An evaluate returning ``np.float32`` was refused as "not a finite number"."""
    import numpy as np
    from fxforge.autotune import _score
    assert _score(lambda c: np.float32(0.5), None, []) == 0.5
    assert _score(lambda c: np.array(0.25), None, []) == 0.25


def test_a_search_without_int8_measures_the_structural_settings(tmp_path):
    """``SearchSpace(quantize=False)`` raised a raw KeyError once a structural setting survived: its FLOPs, which
    predict every candidate's latency, were computed only where int8 was searched too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    result = fxforge.autotune(model, torch.randn(8, 16), backend="eager", calibration=[(torch.randn(8, 16),)] * 4,
                              budget=6, max_accuracy_drop=1.0, output_dir=tmp_path,
                              space=SearchSpace(quantize=False))
    searched = result.candidates[2:]  # after the float and int8 references
    assert searched and not any(any(p.startswith("insert_qdq") for p in c.passes) for c in searched)


def test_an_evaluate_failing_on_one_candidate_is_recorded_and_the_search_goes_on(tmp_path):
    """An evaluate raising on one searched candidate (here: every low-rank one) ended the whole search with a
    TuningError, the finished candidates lost. Expected: that candidate recorded with its error, a warning
    counting such failures, the others measured and the pick made among them; on a reference it still raises."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():  # rank 4: both energies split it
        model[2].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8)

    def evaluate(compiled):
        if any(row.stage.startswith("low_rank") for row in compiled.report.rows):
            raise ValueError("no labels for this one")
        return 1.0

    args = {"backend": "eager", "calibration": [(torch.randn(8, 16),)] * 4, "max_accuracy_drop": 1.0,
            "space": SearchSpace(quantize=False, prune_ratios=(), depthwise_energies=())}
    with pytest.warns(UserWarning, match=r"evaluate failed on 2 of 3 measured candidates, each recorded with its "
                                         r"error \(first: TuningError: evaluate failed on the pipeline \['fuse', "
                                         r".low_rank\{energy=0\.99,.*ValueError: no labels for this one\)"):
        result = fxforge.autotune(model, torch.randn(8, 16), budget=6, output_dir=tmp_path, evaluate=evaluate, **args)
    failed = [c for c in result.candidates if c.error]
    assert [c.passes[1].split(",")[0] for c in failed] == ["low_rank{energy=0.99", "low_rank{energy=0.95"]
    record = json.loads(result.record_path.read_text())
    assert [c["error"] is not None for c in record["candidates"]] == [c in failed for c in result.candidates]
    assert result.best is not None and result.best not in failed
    with pytest.raises(TuningError, match=r"evaluate failed on the pipeline \['fuse'\]: ValueError: always"):
        fxforge.autotune(model, torch.randn(8, 16), budget=6, output_dir=tmp_path / "b",
                         evaluate=lambda c: (_ for _ in ()).throw(ValueError("always")), **args)


def test_a_numpy_budget_is_a_budget_and_a_directory_named_like_the_plot_is_refused_before_the_search(tmp_path):
    """``budget=np.int64(3)`` was refused as "must be >= 2, got 3"; a directory ``pareto.png`` in output_dir
    surfaced as a raw IsADirectoryError after the whole search, its result lost."""
    import numpy as np
    args = {"backend": "eager", "calibration": [(torch.randn(4, 4),)] * 2, "max_accuracy_drop": 1.0}
    result = fxforge.autotune(Tiny(), torch.randn(2, 4), budget=np.int64(3), output_dir=tmp_path / "a", **args)
    assert result.meta["budget_candidates"] == 3 and json.loads((tmp_path / "a" / "autotune.json").read_text())
    (tmp_path / "b" / "pareto.png").mkdir(parents=True)
    with pytest.raises(InputError, match="pareto.png is a directory"):
        fxforge.autotune(Tiny(), torch.randn(2, 4), output_dir=tmp_path / "b", **args)


class Heads(nn.Module):
    def __init__(self, nested: bool) -> None:
        super().__init__()
        self.fc, self.nested = nn.Linear(4, 3), nested

    def forward(self, x):
        y = self.fc(x)
        return (y, (y.softmax(-1),)) if self.nested else {"logits": y, "probs": y.softmax(-1)}


@pytest.mark.parametrize("nested", [False, True])
def test_the_default_evaluate_reads_dict_and_nested_outputs(nested, tmp_path):
    """It failed on them ("evaluate failed on the pipeline ['fuse']", an evaluate the user never gave)."""
    torch.manual_seed(0)
    result = fxforge.autotune(Heads(nested).eval(), torch.randn(2, 4), backend="eager", budget=2,
                              calibration=[(torch.randn(8, 4),)] * 2, output_dir=tmp_path)
    assert result.candidates[0].score == 1.0 and result.candidates[0].error is None


class Interval(nn.Module):
    """A regression: (low, high) around 100, or one value per sample."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.fc, self.outputs = nn.Linear(4, 2), outputs
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([99.0, 101.0]))

    def forward(self, x):
        return self.fc(x)[:, :self.outputs]


def test_the_default_evaluate_judges_as_the_budget_refusing_one_value_and_warning_of_a_constant_argmax(tmp_path):
    """Scored by the argmax of (low, high) or by the cosine of one value, candidates off by more than the outputs'
    whole spread scored 1.0, and the search picked a pruned pipeline over the float one. One value per sample is
    refused; columns whose argmax never changes (a regression, or a classifier on data of one class) are held to the
    min cosine, as the budget holds them, and warned of."""
    args = {"backend": "eager", "budget": 2, "calibration": [(torch.randn(16, 4),) for _ in range(2)],
            "output_dir": tmp_path}
    with pytest.raises(TuningError, match=r"the default evaluate cannot judge this model: the output holds one value "
                                          r"per sample \(or per batch\), whose cosine is only its sign; pass "
                                          r"evaluate="):
        fxforge.autotune(Interval(1).eval(), torch.randn(2, 4), **args)
    with pytest.warns(UserWarning, match="judges this model by min_cosine: the first output's largest column is the "
                                         "same on every"):
        result = fxforge.autotune(Interval(2).eval(), torch.randn(2, 4), **args)
    assert result.candidates[0].score == 1.0


class DictIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(2, 8), nn.Linear(8, 3)

    def forward(self, d):
        return self.head(torch.relu(self.a(d["x"]) + self.b(d["z"])))


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 4, 3)

    def forward(self, x):
        return self.fc(x.reshape(4, -1))  # the batch of 4 is part of the graph


def test_calibration_is_read_as_compile_reads_it_for_dict_inputs_and_a_static_batch(tmp_path):
    """Batches like a dict-input model's example were refused ("must be a tuple of 1 tensor(s) ..., got 1: dict"),
    and batches of 8 for a graph whose batch is 4 ran into a raw RuntimeError in torch.fx; compile takes both."""
    torch.manual_seed(0)
    args = {"backend": "eager", "budget": 2, "output_dir": tmp_path}
    calibration = [({"x": torch.randn(4, 4), "z": torch.randn(4, 2)},) for _ in range(2)]
    result = fxforge.autotune(DictIn().eval(), calibration[0], calibration=calibration, **args)
    assert [c.score for c in result.candidates[:1]] == [1.0]
    example = torch.randn(4, 4, 4)
    result = fxforge.autotune(FixedBatch().eval(), example, calibration=[(torch.randn(8, 4, 4),)] * 2, **args)
    assert result.candidates[0].score == 1.0 and result.candidates[0].error is None


def test_an_output_dir_that_is_a_file_is_refused_before_the_search(tmp_path):
    (tmp_path / "results.txt").write_text("mine")
    with pytest.raises(InputError, match="results.txt is a file"):
        fxforge.autotune(Tiny(), torch.randn(2, 4), backend="eager", calibration=[(torch.randn(4, 4),)],
                         output_dir=tmp_path / "results.txt" / "run1")
    assert (tmp_path / "results.txt").read_text() == "mine"


def test_labelled_batches_are_refused_with_the_input_key_hint_and_taken_with_it(tmp_path):
    torch.manual_seed(0)
    labelled = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(4)]
    args = {"backend": "eager", "output_dir": tmp_path, "budget": 2, "calibration": labelled}
    with pytest.raises(CalibrationError, match="input_key=0"):
        fxforge.autotune(Tiny(), torch.randn(2, 4), **args)
    with pytest.raises(InputError, match="not both"):
        fxforge.autotune(Tiny(), torch.randn(2, 4), input_key=0, calibration_fn=lambda b: b[:1], **args)
    result = fxforge.autotune(Tiny(), torch.randn(2, 4), input_key=0, **args)
    assert result.candidates and (tmp_path / "autotune.json").exists()


def test_record_without_a_feasible_candidate_is_refused(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text(json.dumps({"passes": None}))
    with pytest.raises(TuningError, match="no candidate"):
        load_passes(path)
    path.write_text("{")
    with pytest.raises(TuningError, match="not an autotune record"):
        load_passes(path)
    path.write_text(json.dumps({"passes": {"fuse": 1}}))
    with pytest.raises(TuningError, match=r"not an autotune record: 'passes' must be a list of pass strings, got "
                                          r"\{'fuse': 1\}"):
        load_passes(path)
