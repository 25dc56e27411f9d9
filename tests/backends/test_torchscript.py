"""TorchScript backend: every zoo model after `fuse` matches eager; artifacts save, load and take other batches."""
import json

import pytest
import torch
from torch import nn

import fxforge
from fxforge.compiler.verify import compare, fresh_inputs
from models import ZOO, zoo_params


@pytest.mark.parametrize("name", zoo_params())
def test_zoo_after_fuse_matches_eager(name):
    model, example = ZOO[name]()
    cm = fxforge.compile(model, example, passes=["fuse"], backend="torchscript", measure_latency=False)
    inputs = fresh_inputs(example, seed=11)
    with torch.no_grad():
        assert compare([cm(*inputs)], [model(*inputs)]).max_rel < 1e-4
    assert cm.report.final.stage == "backend:torchscript"
    assert cm.artifact.info["torchscript_mode"] in ("script", "trace")


def test_artifact_reloads_with_dynamic_batch(tmp_path):
    model, (x,) = ZOO["mobilenet_v2"]()
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="torchscript", measure_latency=False)
    path = cm.save(tmp_path / "mnv2")
    meta = json.loads((path / "fxforge.json").read_text())
    assert meta["backend"] == "torchscript" and "model.pt" in meta["files"]
    loaded = fxforge.load(path)
    for batch in (1, 4):
        xb = torch.randn(batch, *x.shape[1:])
        torch.testing.assert_close(loaded(xb), model(xb), rtol=1e-4, atol=1e-4)


def test_tampered_artifact_is_refused(tmp_path):
    model, example = ZOO["convbnrelu"]()
    path = fxforge.compile(model, example, backend="torchscript", measure_latency=False).save(tmp_path / "a")
    with open(path / "model.pt", "ab") as f:
        f.write(b"junk")
    with pytest.raises(fxforge.ArtifactError, match="model.pt"):
        fxforge.load(path)
    with pytest.raises(fxforge.ArtifactError):
        fxforge.load(tmp_path / "nothing-here")


def test_a_gpu_target_is_refused_not_silently_built_for_the_cpu():
    model, example = ZOO["mlp"]()
    with pytest.raises(fxforge.TargetError, match="backend 'torchscript' builds CPU programs; target 'cuda' runs "
                                                  "on cuda"):
        fxforge.compile(model, example, backend="torchscript", target="cuda")


class ScaledByBatch(torch.nn.Module):
    """A float computed from the batch size: a trace holds the example's value."""

    def forward(self, x):
        return x.view(x.shape[0], -1) * (x.shape[0] * 2.0)


def test_a_traced_graph_takes_only_the_example_batch(tmp_path, unscriptable):
    """The trace fallback kept the dynamic batch: at batch 3 the artifact returned shape [2, 6] and the example's
    factor, silently; its signature is now the example's shapes."""
    model = ScaledByBatch()
    cm = fxforge.compile(model, (torch.randn(2, 2, 2),), backend="torchscript", measure_latency=False)
    assert cm.artifact.info["torchscript_mode"] == "trace (static shapes)" and not cm.signature.dynamic_batch
    x = torch.randn(2, 2, 2)
    torch.testing.assert_close(cm(x), model(x))
    for artifact in (cm, fxforge.load(cm.save(tmp_path / "a"))):
        with pytest.raises(fxforge.InputError, match=r"input 0 has shape \[3, 2, 2\], compiled for \[2, 2, 2\]"):
            artifact(torch.randn(3, 2, 2))


class BranchesOnItsBatch(nn.Linear):
    def forward(self, x):
        y = super().forward(x)
        return y * 3 if x.shape[0] > 2 else y


class ScalesByItsBatch(nn.Linear):
    def forward(self, x):  # a float of the batch size: the traced graph holds the example's
        return super().forward(x) * (x.shape[0] / 2.0)


@pytest.mark.parametrize("make, traced", [(BranchesOnItsBatch, False), (ScalesByItsBatch, True)])
def test_a_static_batch_model_pt_refuses_other_shapes_without_fxforge(tmp_path, make, traced, request):
    """fxforge's artifact refused other batch sizes, but the saved model.pt, run by torch.jit.load as a deployment
    does, took them and computed with the example's batch (0.6-0.67 relative off), silently."""
    if traced:
        request.getfixturevalue("unscriptable")
    model = make(4, 4).eval()
    cm = fxforge.compile(model, (torch.randn(2, 4),), backend="torchscript", measure_latency=False)
    assert not cm.signature.dynamic_batch
    plain = torch.jit.load(str(cm.save(tmp_path / "a") / "model.pt"))
    x = torch.randn(2, 4)
    torch.testing.assert_close(plain(x)[0], model(x))  # the graph's flat outputs
    with pytest.raises(torch.jit.Error, match=r"compiled for input shape \[2, 4\] only, got \[5, 4\]"):
        plain(torch.randn(5, 4))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.m = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, b):
        return self.m(self.l(x).relu()) + b


def test_an_int8_model_of_several_inputs_compiles_with_a_static_batch():
    """The shape checks went in after the last input, and an int8 graph's quantizer between two inputs read the
    first check before it was defined: every such compile failed."""
    example = (torch.randn(2, 8), torch.randn(2, 4))
    cm = fxforge.compile(TwoInputs().eval(), example, backend="torchscript", passes=["int8"], static_batch=True,
                         calibration=[(torch.randn(2, 8), torch.randn(2, 4)) for _ in range(4)],
                         max_drop=float("inf"), measure_latency=False)
    assert cm(*example).shape == (2, 4)


def test_calls_from_several_threads_leave_the_warning_filters_alone():
    """run() swapped the process's warning filters (warnings.catch_warnings, which is not thread-safe): after calls
    from 4 threads an "ignore" filter stayed installed and every later warning of the process was lost."""
    import threading
    import warnings
    cm = fxforge.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(4, 8),),
                         backend="torchscript", measure_latency=False)
    x, before = torch.randn(4, 8), list(warnings.filters)
    threads = [threading.Thread(target=lambda: [cm(x) for _ in range(300)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(warnings.filters) == before
    with pytest.warns(UserWarning, match="still shown"):
        warnings.warn("still shown", UserWarning)


def test_the_optimize_option_fixes_the_timed_choice_and_bad_values_are_refused():
    """optimize_for_inference was chosen by timing alone: identical compiles differed (2 of 6 in one process, outputs
    up to 3e-6 apart). ``optimize=False``/``True`` fixes it; False builds repeat bit for bit."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    builds = [fxforge.compile(model, (x,), backend="torchscript", optimize=False, measure_latency=False)
              for _ in range(2)]
    assert [b.artifact.info["optimize_for_inference"] for b in builds] == [False, False]
    assert torch.equal(builds[0](x), builds[1](x))
    forced = fxforge.compile(model, (x,), backend="torchscript", optimize=True, measure_latency=False)
    assert forced.artifact.info["optimize_for_inference"] is True
    with pytest.raises(fxforge.BackendError, match="torchscript option optimize must be None, True or False, got 1"):
        fxforge.compile(model, (x,), backend="torchscript", optimize=1)
    with pytest.raises(fxforge.BackendError, match="the torchscript backend takes only the option optimize, got opset"):
        fxforge.compile(model, (x,), backend="torchscript", opset=17)
    arm = fxforge.compile(model, (x,), backend="torchscript", target="arm64", measure_latency=False)
    assert arm.artifact.info["optimize_for_inference"] is False  # not timed here for another CPU



def test_oneDNN_kernels_that_answer_nan_with_numbers_refuse_nan_inputs(tmp_path):
    """Before: with ``optimize_for_inference`` (chosen by timing) a conv → relu model answered a NaN pixel with
    ordinary outputs where the graph and eager PyTorch give NaN, silently; which build did so depended on timing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    bad = x.clone()
    bad[0, 1, 2, 3] = float("nan")
    assert torch.isnan(model(bad)).any()
    plain = fxforge.compile(model, (x,), backend="torchscript", optimize=False, measure_latency=False)
    assert plain.signature.finite_inputs == () and torch.isnan(plain(bad)).any()
    fast = fxforge.compile(model, (x,), backend="torchscript", optimize=True, measure_latency=False)
    assert fast.artifact.info["optimize_for_inference"] and fast.signature.finite_inputs == (0,)
    for compiled in (fast, fxforge.load(fast.save(tmp_path / "fast"))):
        with pytest.raises(fxforge.InputError, match="^input 0 holds NaN or Inf: the compiled model would turn them "
                                                     "into finite numbers"):
            compiled(bad)
        torch.testing.assert_close(compiled(x), model(x))


def test_freezing_beside_an_onnx_export_leaves_the_warnings_filters_as_they_were():
    """Freezing ignores torch's warnings inside ``warnings.catch_warnings``, which swaps the process's filters; an
    ONNX export in another thread did the same, the two save-and-restore pairs interleaved, and "ignore" stayed
    installed: every later warning of the process was lost (two threads compiling to TorchScript and ONNX, 3 of 3
    runs). Here the two sections themselves run in two threads, many times."""
    import threading
    import time
    import warnings

    from fxforge.backends.onnx import _quiet
    from fxforge.backends.torchscript import _frozen
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval())
    with warnings.catch_warnings():
        before = list(warnings.filters)

        def freeze():
            for _ in range(100):
                _frozen(scripted, optimize=False)

        def export():
            for _ in range(100):
                with _quiet():
                    time.sleep(0.001)

        threads = [threading.Thread(target=freeze), threading.Thread(target=export)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert warnings.filters == before


class SizeNumbers(nn.Module):
    """Returns Python numbers computed from its batch size beside a tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        n = x.shape[0]
        return self.lin(x), n * 0.5, n / 4, n + 1


def test_numbers_computed_from_the_batch_size_are_scripted(tmp_path):
    """Before: "TorchScript can neither script (Unknown builtin op: aten::sym_float.) nor trace (Only tensors ... can
    be output from traced functions)": torch's sym_float is now Python's float, and the artifact keeps its dynamic
    batch."""
    model = SizeNumbers().eval()
    cm = fxforge.compile(model, (torch.randn(2, 8),), backend="torchscript", measure_latency=False)
    assert cm.artifact.info["torchscript_mode"] == "script"
    cm.save(tmp_path / "a")
    for artifact in (cm, fxforge.load(tmp_path / "a")):
        for batch in (1, 2, 5):
            x = torch.randn(batch, 8)
            got, want = artifact(x), model(x)
            torch.testing.assert_close(got[0], want[0])
            assert list(got[1:]) == list(want[1:]) and [type(v) for v in got[1:]] == [type(v) for v in want[1:]]
