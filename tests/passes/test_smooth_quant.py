"""smooth_quant: exact migration of LayerNorm-output outliers into the linears reading it."""
import pytest
import torch
from torch import nn

from fxforge.compiler.graph import get_tensor
from models import ZOO
from pipeline import apply, count, error_vs_eager


class NormLinears(nn.Module):
    """A LayerNorm read by two linears only (a pre-norm block's query/key), one input channel an outlier."""

    def __init__(self):
        super().__init__()
        self.norm, self.q, self.k = nn.LayerNorm(6), nn.Linear(6, 4), nn.Linear(6, 5)
        with torch.no_grad():
            self.norm.weight.copy_(torch.tensor([1.0, 1.0, 30.0, 1.0, 1.0, 1.0]))
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x):
        y = self.norm(x)
        return self.q(y), self.k(y)


class PostNorm(NormLinears):
    """The LayerNorm's output is also the residual stream (BERT's post-norm blocks)."""

    def forward(self, x):
        y = self.norm(x)
        return self.q(y) + y[..., :4], self.k(y)


def tensors(gm, op):
    return [[get_tensor(gm, a) for a in n.args if get_tensor(gm, a) is not None]
            for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__.startswith(op)]


def test_layernorm_two_linears_before_expected():
    model = NormLinears().eval()
    x = torch.randn(2, 3, 6)
    calibration = [(torch.randn(2, 3, 6),) for _ in range(3)]
    a = torch.stack([model.norm(b[0]).abs().flatten(0, 1).amax(0) for b in calibration]).amax(0).double()
    w = torch.maximum(model.q.weight.abs().amax(0), model.k.weight.abs().amax(0)).double()
    s = a.sqrt() / w.sqrt()  # expected: γ/s, β/s, W·diag(s) with α = 0.5
    gm, report, flat = apply(model, (x,), ["smooth_quant"], calibration=calibration)
    assert count(gm, "layer_norm") == 1 and count(gm, "linear") == 2
    (gamma, beta), = tensors(gm, "layer_norm")
    (wq, _), (wk, _) = tensors(gm, "linear")
    torch.testing.assert_close(gamma.double(), model.norm.weight.double() / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(beta.double(), model.norm.bias.double() / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(wq.double(), model.q.weight.double() * s, rtol=1e-6, atol=0)
    torch.testing.assert_close(wk.double(), model.k.weight.double() * s, rtol=1e-6, atol=0)
    assert report.row("smooth_quant").stats == {"layernorms": 1, "linears": 2, "rescaled": 0}
    # the outlier channel's activation range is now that of its weights: max|y_j / s_j| = sqrt(a_j · w_j)
    smoothed = (a / s)
    assert smoothed.max() / smoothed.min() < a.max() / a.min() / 4
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_alpha_sets_the_share_moved_into_the_weights(alpha):
    model = NormLinears().eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 6),), [f"smooth_quant{{alpha={alpha}}}"])
    (gamma, _), = tensors(gm, "layer_norm")
    a = model.norm(flat[0]).abs().flatten(0, 1).amax(0).double()
    w = torch.maximum(model.q.weight.abs().amax(0), model.k.weight.abs().amax(0)).double()
    torch.testing.assert_close(gamma.double(), model.norm.weight.double() * w.pow(1 - alpha) / a.pow(alpha),
                               rtol=1e-6, atol=0)
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_a_layernorm_also_read_by_the_residual_is_smoothed_in_place_before_expected():
    """Before: y = norm(x) → q(y) + y[..., :4], k(y).  Expected: y' = norm'(x) (γ/s, β/s) → q'(y'), k'(y'),
    and the residual reads mul(y', s): still one LayerNorm, whose input add stays fusable by ONNX Runtime."""
    model = PostNorm().eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 6),), ["smooth_quant"])
    assert report.row("smooth_quant").stats == {"layernorms": 1, "linears": 2, "rescaled": 1}
    assert count(gm, "layer_norm") == 1 and count(gm, "mul") == 1
    norm, = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__.startswith("layer_norm")]
    mul, = [u for u in norm.users if u.target.__name__.startswith("mul")]
    assert sorted(u.target.__name__.split(".")[0] for u in norm.users) == ["linear", "linear", "mul"]
    assert [u.target.__name__.split(".")[0] for u in mul.users] == ["slice"]
    (gamma, _), = tensors(gm, "layer_norm")
    s = get_tensor(gm, mul.args[1])
    torch.testing.assert_close(gamma * s, model.norm.weight.detach(), rtol=1e-6, atol=0)
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5
    assert torch.equal(model.norm.weight[2], torch.tensor(30.0))  # the user's model is not mutated


@pytest.mark.parametrize("model, stats", [
    (nn.Sequential(nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)), {"skipped.no_linear_reader": 1}),
    (nn.Sequential(nn.LayerNorm(6, elementwise_affine=False), nn.Linear(6, 3)), {"skipped.no_affine": 1}),
    (nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), {}),
], ids=["gelu-between", "no-affine", "no-layernorm"])
def test_must_not_fire(model, stats):
    model = model.eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 6),), ["smooth_quant"])
    assert report.row("smooth_quant").stats == stats
    assert all(torch.equal(a, b) for a, b in zip([t for ts in tensors(gm, "linear") for t in ts],
                                                [p for m in model if isinstance(m, nn.Linear) for p in m.parameters()]))


def test_bert_is_exact_on_fresh_inputs():
    model, example = ZOO["bert"]()
    gm, report, flat = apply(model, example, ["fuse", "smooth_quant"])
    stats = report.row("smooth_quant").stats
    layers = len(model.bert.encoder.layer)
    # each block: the embedding/previous LayerNorm feeds query, key, value; the attention LayerNorm the FFN input
    assert stats["layernorms"] == 2 * layers and stats["linears"] == 4 * layers
    assert stats["rescaled"] == 2 * layers  # post-norm: every LayerNorm also carries the residual
    assert count(gm, "layer_norm") == 2 * layers + 1  # smoothed in place, none duplicated
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


@pytest.mark.parametrize("model_class", [NormLinears, PostNorm])
def test_a_float64_model_stays_float64_and_exact(model_class):
    """The smoothed LayerNorm and linear weights were written back as float32 whatever the model's dtype, and a
    float64 model failed inside the pass ("mixed dtype")."""
    model = model_class().double().eval()
    gm, report, flat = apply(model, (torch.randn(2, 3, 6, dtype=torch.float64),), ["smooth_quant"])
    assert report.row("smooth_quant").stats["layernorms"] == 1
    assert {t.dtype for ts in tensors(gm, "layer_norm") + tensors(gm, "linear") + tensors(gm, "mul") for t in ts} \
        == {torch.float64}
    assert error_vs_eager(gm, model, flat).max_rel < 1e-12
