"""fold_constants: constant subgraphs computed once at compile time (eliminate_dead_code then drops what they
left unread; its own tests are in test_eliminate_dead_code.py)."""
import torch
from torch import nn

from pipeline import apply, count, error_vs_eager


class ConstantWork(nn.Module):
    """A weight transformed at every call (transpose·scale) and a branch whose result is unused."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.unused = nn.Parameter(torch.randn(100))

    def forward(self, x):
        _ = torch.sin(x)  # dead
        return x @ (self.w.t() * 0.5 + 1.0)


def test_constant_subgraph_is_folded_once():
    model = ConstantWork().eval()
    gm, report, flat = apply(model, (torch.randn(3, 6),), ["fold_constants", "eliminate_dead_code"])
    assert count(gm, "t", "mul", "add") == 0 and count(gm, "matmul", "mm") == 1
    assert report.row("fold_constants").stats["folded"] >= 1
    assert error_vs_eager(gm, model, flat).max_rel < 1e-6


def test_folding_never_grows_the_model():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(1, 1))

        def forward(self, x):
            return x + self.b.expand(512, 512)

    model = Expand().eval()
    gm, report, flat = apply(model, (torch.randn(512, 512),), ["fold_constants"])
    assert report.row("fold_constants").params <= report.row("input").params
    assert error_vs_eager(gm, model, flat).max_rel == 0


class TiedHead(nn.Module):
    """An embedding tied to the output projection, written ``h @ E.t()``: E is read by the lookup too."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(500, 16), nn.LayerNorm(16)

    def forward(self, ids):
        return self.ln(self.emb(ids)) @ self.emb.weight.t()


def test_a_weight_other_ops_still_read_is_not_counted_as_consumed_by_a_fold():
    """Folding E.t() added a transposed copy while the lookup kept E: the model doubled, though folds that grow it
    are skipped."""
    model = TiedHead().eval()
    gm, report, flat = apply(model, (torch.randint(0, 500, (2, 8)),), ["fold_constants", "eliminate_dead_code"])
    assert report.row("fold_constants").stats == {"folded": 0, "skipped.would_grow_model": 1}
    assert report.row("eliminate_dead_code").params == report.row("input").params == 500 * 16 + 32


def test_a_preset_after_int8_keeps_its_weights_int8():
    """Before: any fold_constants after quantization (``passes=["int8", "fuse"]``; every preset starts with it)
    folded each weight's dequantize into a float32 constant: the model 3.4x larger, while the report's quantization
    rows still read int8. Expected: quantize and dequantize nodes are never folded."""
    import fxforge
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x, calibration = torch.randn(4, 64), [(torch.randn(8, 64),) for _ in range(6)]
    sizes = {}
    for passes in (["int8"], ["int8", "fuse"]):
        cm = fxforge.compile(model, (x,), passes=passes, calibration=calibration, backend="eager",
                             measure_latency=False)
        int8 = [t for t in cm.graph_module.state_dict().values() if t.dtype == torch.int8]
        assert len(int8) == 2, passes
        sizes[len(passes)] = cm.report.final.bytes
    assert sizes[2] == sizes[1]
