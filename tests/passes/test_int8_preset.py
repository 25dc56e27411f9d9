"""The "int8" preset end to end: accuracy on a trained CNN and a transformer, through the eager backend."""
import pytest
import torch

import fxforge
from fxforge.compiler.verify import compare, fresh_inputs
from models import ZOO, accuracy, digits_cnn


def test_digits_cnn_int8_top1_within_0_3_point_of_fp32():
    model, (x_train, _, x_test, y_test) = digits_cnn()
    calibration = [(x_train[i:i + 64],) for i in range(0, 512, 64)]
    compiled = fxforge.compile(model, x_train[:2], passes=["int8"], calibration=calibration, measure_latency=False)
    fp32, int8 = accuracy(model, x_test, y_test), accuracy(compiled, x_test, y_test)
    assert fp32 > 0.95 and int8 >= fp32 - 0.003, (fp32, int8)  # measured: 0.9950 → 0.9924 (one of 397 images)
    row = compiled.report.row("fold_qdq")
    assert row.bytes < compiled.report.row("fuse_activation").bytes / 3.5


def test_bert_int8_output_cosine_at_least_0_99():
    model, example = ZOO["bert"]()
    g = torch.Generator().manual_seed(5)
    batch = lambda: (torch.randint(0, 1000, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.long))
    compiled = fxforge.compile(model, example, passes=["int8"], calibration=[batch() for _ in range(4)],
                               measure_latency=False, verify="off")
    stats = compiled.report.row("insert_qdq").stats
    assert stats["quantized.linear"] == 12
    test = batch()
    with torch.no_grad():
        err = compare([compiled(*test)], [model(*test)])
    assert err.cosine >= 0.99, err  # measured: 0.9998


def test_digits_int8_through_onnx_runs_on_ort_int8_kernels():
    model, (x_train, _, x_test, y_test) = digits_cnn()
    calibration = [(x_train[i:i + 64],) for i in range(0, 512, 64)]
    compiled = fxforge.compile(model, x_train[:2], passes=["int8"], backend="onnx", calibration=calibration,
                               measure_latency=False)
    kernels = compiled.artifact.info["ort_int8_ops"]
    assert kernels.get("QLinearConv") == 3 and kernels.get("QLinearAdd") == 1 and kernels.get("QGemm") == 1, kernels
    assert compiled.artifact.info["ort_float_ops"] == {"Conv": 1}  # the 3×3 stem on one grey channel
    assert accuracy(compiled, x_test, y_test) >= accuracy(model, x_test, y_test) - 0.01


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ("convbnrelu", "mlp") else pytest.mark.slow)
                                  for n in ZOO])
def test_int8_on_the_zoo_stays_within_cosine_0_99(name):
    model, example = ZOO[name]()
    compiled = fxforge.compile(model, example, passes=["int8"], calibration=[fresh_inputs(example, s) for s in (3, 4)],
                               measure_latency=False)
    assert compiled.report.row("fold_qdq").stats["constants_folded"] > 0
    test = fresh_inputs(example, 9)
    with torch.no_grad():
        err = compare([compiled(*test)], [model(*test)])
    assert err.cosine >= 0.99, err  # measured: 0.9986 (vit_tiny) to 0.99997
