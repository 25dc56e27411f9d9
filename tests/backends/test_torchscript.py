"""TorchScript backend: every zoo model after `fuse` matches eager; artifacts save, load and take other batches."""
import json

import pytest
import torch

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
    """A float computed from the batch size: TorchScript cannot script it, and a trace holds the example's value."""

    def forward(self, x):
        return x.view(x.shape[0], -1) * (x.shape[0] * 2.0)


def test_a_traced_graph_takes_only_the_example_batch(tmp_path):
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
