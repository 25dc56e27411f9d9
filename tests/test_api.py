"""fxforge.compile end to end: the public surface, the untouched user model, and clear errors."""
import copy
import json

import pytest
import torch
from torch import nn

import fxforge
from models import ZOO


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
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="torchscript")
    text = str(cm.report)
    for column in ("stage", "params", "FLOPs", "latency", "max err"):
        assert column in text
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
