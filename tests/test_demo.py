"""The demo (`make demo`) compiles ResNet-18 through compression, int8 and ONNX Runtime and saves a loadable artifact."""
import pytest
import torch

import fxforge
from fxforge import demo


@pytest.mark.slow
def test_demo_runs_the_full_pipeline_and_saves_a_loadable_artifact(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "resnet18"), "--calibration-batches", "2"]) == 0
    out = capsys.readouterr().out
    for stage in ("fuse_batchnorm", "dead_channels", "low_rank", "insert_qdq", "calibrate", "fold_qdq", "backend:onnx"):
        assert stage in out
    assert "speedup" in out and "QLinearConv" in out
    artifact = fxforge.load(tmp_path / "resnet18")
    assert artifact(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
