"""The local rewrites give the graph export's decomposition gives, and refuse what only the decomposition handles."""
import collections

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxforge.compiler import trace as trace_module
from fxforge.compiler.functionalize import functional_graph
from fxforge.compiler.trace import _export, trace
from fxforge.compiler.verify import compare, fresh_inputs
from models import ZOO

aten = torch.ops.aten


class EveryRewrite(nn.Module):
    """In-place activations and a residual add_, eval batch norm, both dropouts, a pool and a flatten."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.drop = nn.Linear(4 * 2 * 2, 5), nn.Dropout(0.3)

    def forward(self, x):
        y = self.conv(x)
        skip = y
        y = F.relu(self.bn(y), inplace=True)
        y = y.add_(skip)                     # writes into an intermediate that `skip` still reads below
        z = F.hardtanh(skip, 0.0, 6.0, inplace=True) + y
        z = F.silu(self.drop(z), inplace=True)
        z = F.dropout(F.max_pool2d(z, 2), 0.5, training=False, inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 2), 1))


def _ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target is not aten.sym_size.int]


@pytest.mark.parametrize("dynamic", [True, False])
def test_before_expected_every_rewrite_gives_the_decomposed_graph(dynamic):
    model = EveryRewrite().eval()
    ep = _export(model, (torch.randn(2, 3, 8, 8),), dynamic=dynamic)
    before = ep.module()
    assert {aten.relu_.default, aten.add_.Tensor, aten.batch_norm.default, aten.dropout_.default,
            aten.flatten.using_ints} <= {n.target for n in before.graph.nodes}
    got, expected = functional_graph(before), ep.run_decompositions({}).module()
    assert _ops(got) == _ops(expected)
    assert collections.Counter(_ops(got))["aten._native_batch_norm_legit_no_training.default"] == 1
    got.graph.lint()
    for b in (1, 3) if dynamic else (2,):
        x = torch.randn(b, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(got(x), expected(x)) and compare([got(x)], [model(x)]).max_rel < 1e-6
    assert all("val" in n.meta for n in got.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", ["convbnrelu", "mlp", "resnet18"])
def test_zoo_rewritten_as_decomposed(name):
    model, example = ZOO[name]()
    ep = _export(model.eval(), example, dynamic=True)
    got = functional_graph(ep.module())
    assert got is not None and _ops(got) == _ops(ep.run_decompositions({}).module())


class WritesInput(nn.Module):
    def forward(self, x):
        return x.mul_(2) + 1


class WritesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(1)
        return x + self.seen


class WritesThroughView(nn.Module):
    def forward(self, x):
        y = x + 1
        flat = torch.flatten(y, 1)
        y.relu_()                             # shows through `flat`
        return flat * 2


class Transposes(nn.Module):
    def forward(self, x):
        return (x + 1).transpose(0, 1).relu()


@pytest.mark.parametrize("model", [WritesInput(), WritesBuffer(), WritesThroughView(), Transposes()],
                         ids=lambda m: type(m).__name__)
def test_left_to_the_decomposition(model):
    """Writes into inputs, state or a viewed tensor, and ops outside the rewrites: None, never a guess."""
    ep = _export(model.eval(), (torch.randn(2, 3, 4),), dynamic=True)
    assert functional_graph(ep.module()) is None


def test_a_rewritten_graph_that_misses_the_model_is_decomposed_anew(monkeypatch):
    """trace does not trust the rewrites: a wrong graph from them costs time, never a wrong or static capture."""

    class Wrong(nn.Module):
        def forward(self, x):
            return (x * 3,)

    monkeypatch.setattr(trace_module, "functional_graph", lambda gm: fx.symbolic_trace(Wrong()))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    gm, sig = trace(model, (torch.randn(2, 4),))
    assert sig.dynamic_batch and not sig.note
    (x,) = fresh_inputs([torch.randn(5, 4)])
    with torch.no_grad():
        assert compare(list(gm(x)), [model(x)]).max_rel < 1e-6
