"""The presets: what each expands to, and the full pipeline ("all") end to end."""
import torch
from torch import nn

import fxforge
from fxforge.compiler.pass_manager import resolve
from fxforge.compiler.verify import compare


def _names(spec):
    return [p.name for p in resolve(spec)]


def test_presets_expand_to_their_documented_pipelines():
    fuse = ["fold_constants", "addmm_to_linear", "fuse_batchnorm", "eliminate_dead_code", "fuse_activation"]
    assert _names("fuse") == fuse
    assert _names("compress") == fuse + ["dead_channels", "low_rank"]
    quantize = ["equalize", "insert_qdq", "calibrate", "bias_correction", "fold_qdq"]
    assert _names("int8") == fuse + quantize
    assert _names("all") == fuse + ["dead_channels", "low_rank"] + quantize
    assert _names("int8_dynamic") == fuse + ["smooth_quant", "insert_qdq"]
    assert str(resolve("compress")[-1]) == "low_rank{budget='latency',max_error=0.02}"
    assert resolve("int8_dynamic")[-1].activations == "dynamic"


def test_all_removes_dead_channels_quantizes_and_stays_close_to_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()
    with torch.no_grad():
        model[1].weight[:4] = 0.0  # gamma 0: four channels carry only their (ReLU-killed) beta
        model[1].bias[:4] = -1.0
    calibration = [(torch.randn(8, 4, 12, 12),) for _ in range(4)]
    cm = fxforge.compile(model, torch.randn(2, 4, 12, 12), passes=["all"], calibration=calibration,
                         measure_latency=False)
    report = cm.report
    assert report.row("dead_channels").params < report.row("fuse_activation").params
    assert report.row("insert_qdq").stats["quantized.conv2d"] == 2
    x = torch.randn(4, 4, 12, 12)
    with torch.no_grad():
        err = compare([cm(x)], [model(x)])
    assert err.cosine > 0.99, err
