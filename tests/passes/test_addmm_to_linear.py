"""addmm_to_linear: addmm/mm with a constant weight matrix become aten.linear with the matrix transposed (exact)."""
import pytest
import torch
from torch import nn

from graphs import assert_same_graph, traced
from models import ZOO, zoo_params
from pipeline import apply, count, error_vs_eager


class Conv1D(nn.Module):
    """GPT-2's Conv1D: y = b + x·W with W stored [in, out], through a 2-D view."""

    def __init__(self, nx: int = 6, nf: int = 4, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf)) if bias else None

    def forward(self, x):
        flat = x.view(-1, x.shape[-1])
        y = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else torch.mm(flat, self.weight)
        return y.view(*x.shape[:-1], -1)


class AsLinear(nn.Module):
    """What addmm_to_linear should leave: nn.functional.linear on the transposed weight."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))
        self.bias = nn.Parameter(torch.randn(4)) if bias else None

    def forward(self, x):
        flat = x.view(-1, x.shape[-1])
        return nn.functional.linear(flat, self.weight, self.bias).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("bias", [True, False], ids=["addmm", "mm"])
def test_before_expected(bias):
    x = torch.randn(2, 3, 6)
    gm, report, flat = apply(Conv1D(bias=bias).eval(), (x,), ["addmm_to_linear"])
    assert_same_graph(gm, traced(AsLinear(bias=bias), x))
    assert report.row("addmm_to_linear").stats == {"rewritten": 1}


def test_numerics_on_fresh_inputs():
    model = Conv1D().eval()
    gm, _, flat = apply(model, (torch.randn(2, 3, 6),), ["addmm_to_linear"])
    assert error_vs_eager(gm, model, flat).max_rel < 1e-6


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight, beta=0.5)


class Activations(nn.Module):
    """A product of two activations: no constant weight, nothing to rewrite."""

    def forward(self, x, y):
        return torch.mm(x, y)


class Tied(nn.Module):
    """One matrix read by two products: storing it transposed for one would store it twice."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return torch.mm(torch.mm(x, self.weight), self.weight)


@pytest.mark.parametrize("model, example, stats", [
    (Scaled(), (torch.randn(3, 6),), {"skipped.scaled": 1}),
    (Activations(), (torch.randn(3, 6), torch.randn(6, 4)), {"skipped.non_constant_weight": 1}),
    (Tied(), (torch.randn(3, 6),), {"skipped.shared_weight": 2}),
], ids=["scaled", "activations", "tied"])
def test_must_not_fire(model, example, stats):
    gm, report, flat = apply(model.eval(), example, ["addmm_to_linear"])
    assert report.row("addmm_to_linear").stats == stats
    assert count(gm, "linear") == 0 and count(gm, "addmm", "mm") >= 1
    assert error_vs_eager(gm, model, flat).max_rel == 0


@pytest.mark.parametrize("name", zoo_params())
def test_zoo_is_unchanged(name):
    model, example = ZOO[name]()
    gm, _, flat = apply(model, example, ["addmm_to_linear"])
    assert error_vs_eager(gm, model, flat).max_rel < 1e-5


def test_gpt2_int8_quantizes_its_conv1d_layers():
    """GPT-2's Conv1D layers were addmm, which insert_qdq did not see: int8 and int8_dynamic quantized nothing."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=4, bos_token_id=0,
                                  eos_token_id=0)
    gpt = transformers.GPT2Model(cfg).eval()

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, ids):
            return self.gpt(ids, use_cache=False).last_hidden_state

    ids = torch.randint(0, 100, (2, 8))
    for passes, stat in ((["int8"], "weights"), (["int8_dynamic"], "dynamic_linears")):
        gm, report, _ = apply(Hidden().eval(), (ids,), passes, calibration=[(torch.randint(0, 100, (2, 8)),)] * 4)
        assert report.row("addmm_to_linear").stats == {"rewritten": 4}  # c_attn, c_proj, c_fc, mlp c_proj
        assert report.row("insert_qdq").stats[stat] == 4
