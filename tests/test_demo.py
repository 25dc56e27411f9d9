"""The demo (`make demo`) compiles the trained MobileNetV2 through fusion, int8 and ONNX Runtime on real photos,
reports top-1 agreement on held-out views beside the speed-up, and saves a loadable artifact."""
import pytest
import torch

import fxforge
from fxforge import demo


@pytest.mark.slow
def test_demo_reports_quality_on_held_out_photos_and_saves_a_loadable_artifact(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "mobilenet_v2"), "--calibration", "8", "--held-out", "16"]) == 0
    out = capsys.readouterr().out
    for stage in ("fuse_batchnorm", "insert_qdq", "calibrate", "fold_qdq", "backend:onnx"):
        assert stage in out
    assert "speedup" in out and "top-1 agreement with fp32" in out and "QLinearConv" in out
    assert "measured on validation data (16 samples in 2 batches)" in out
    artifact = fxforge.load(tmp_path / "mobilenet_v2")
    assert artifact(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
