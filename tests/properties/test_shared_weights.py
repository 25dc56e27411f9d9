"""A layer called more than once (its weights read by several calls) is never rewritten for one call only: every
pass that writes a weight, a bias or a norm's parameters leaves such a layer alone and counts
``skipped.shared_weight`` (or, for the channel passes, ``unprunable.shared_weight``), and exact passes stay exact."""
import pytest
import torch
from torch import nn

from fxforge.compiler.pass_manager import PassContext, PassManager
from fxforge.compiler.trace import trace
from pipeline import error_vs_eager


class ConvBnTwice(nn.Module):
    """One conv (and the BN after it) called twice: folding the BN into the conv would change the other call."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.bn(self.c(torch.relu(self.bn(self.c(torch.relu(self.a(x)))))))


class NormLinearTwice(nn.Module):
    """A LayerNorm read by a linear that also reads the raw input."""

    def __init__(self):
        super().__init__()
        self.ln, self.l, self.o = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.o(self.l(self.ln(x))) + self.l(x)


class DeadChannelTwice(nn.Module):
    """A conv with a dead output channel (zero row and bias), called twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.a.weight[1], self.a.bias[1] = 0, 0

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.b(torch.relu(self.a(-x)))


def _run(model, passes, example, **ctx):
    torch.manual_seed(0)
    gm, sig = trace(model.eval(), example)
    flat = tuple(sig.flatten(example))
    gm, report = PassManager(passes, measure_latency=False).run(gm, PassContext(flat, **ctx))
    return gm, report, flat


def _calibration(example):
    return [tuple(torch.randn_like(x) for x in example) for _ in range(4)]


@pytest.mark.parametrize("model, passes, row, stat", [
    (ConvBnTwice, ["fuse_batchnorm"], "fuse_batchnorm", "skipped.shared_weight"),
    (ConvBnTwice, ["equalize"], "equalize", "skipped.shared_weight"),
    (DeadChannelTwice, ["dead_channels"], "dead_channels", "skipped.unprunable.shared_weight"),
    (NormLinearTwice, ["smooth_quant"], "smooth_quant", "skipped.shared_weight"),
], ids=["fuse_batchnorm", "equalize", "dead_channels", "smooth_quant"])
def test_exact_passes_leave_a_shared_layer_alone_and_stay_exact(model, passes, row, stat):
    torch.manual_seed(0)
    m = model().eval()
    example = (torch.randn(2, 4, 8, 8),) if model is not NormLinearTwice else (torch.randn(2, 5, 8),)
    gm, report, flat = _run(m, passes, example, calibration=_calibration(example))
    assert report.row(row).stats.get(stat, 0) >= 1, report.row(row).stats
    assert error_vs_eager(gm, m, flat).max_rel < 1e-5


@pytest.mark.parametrize("correction", ["bias_correction", "adaround"])
def test_corrections_skip_a_shared_layer(correction):
    torch.manual_seed(0)
    m = ConvBnTwice().eval()
    example = (torch.randn(2, 4, 8, 8),)
    gm, report, _ = _run(m, ["fuse_batchnorm", "insert_qdq", "calibrate", correction], example,
                         calibration=_calibration(example))
    assert report.row(correction).stats["skipped.shared_weight"] == 2  # the 1×1 conv's two calls


def test_the_channel_analysis_stops_at_a_shared_constant():
    from fxforge.passes.analysis import ChannelGroups
    torch.manual_seed(0)
    example = (torch.randn(2, 4, 8, 8),)
    gm, _ = trace(DeadChannelTwice().eval(), example)
    stats = PassContext(example).analysis(ChannelGroups, gm).stats
    assert stats.get("unprunable.shared_weight", 0) >= 1, stats
