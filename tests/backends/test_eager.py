"""Eager backend: the optimized graph as a Python program, fusion groups realized as in-place epilogues."""
import pytest
import torch

import fxforge
from models import ZOO


def test_eager_artifact_realizes_fusion_and_round_trips(tmp_path):
    model, (x,) = ZOO["resnet18"]()
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="eager", measure_latency=False)
    assert cm.artifact.info["fused_groups"] == 17
    xb = torch.randn(3, *x.shape[1:])
    torch.testing.assert_close(cm(xb), model(xb), rtol=1e-4, atol=1e-4)
    loaded = fxforge.load(cm.save(tmp_path / "r18"))
    torch.testing.assert_close(loaded(xb), cm(xb), rtol=0, atol=0)


def test_a_gpu_target_is_refused_not_silently_built_for_the_cpu():
    model, example = ZOO["mlp"]()
    with pytest.raises(fxforge.TargetError, match="backend 'eager' builds CPU programs; target 'cuda' runs on cuda"):
        fxforge.compile(model, example, backend="eager", target="cuda")
