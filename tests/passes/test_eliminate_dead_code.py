"""eliminate_dead_code: nodes nothing reads and the parameters no node reads are removed; no value changes."""
import pytest
import torch
from torch import nn

from graphs import assert_same_graph, traced
from models import ZOO, zoo_params
from pipeline import apply, count, error_vs_eager

from fxforge.compiler.graph import aten
from fxforge.compiler.pass_manager import PassContext, PassManager


class DeadBranch(nn.Module):
    """A linear and a parameter nothing reads."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.unused = nn.Parameter(torch.randn(100))

    def forward(self, x):
        return x @ self.w.t()


class Live(nn.Module):
    """DeadBranch without its dead code: what the pass should leave."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return x @ self.w.t()


def test_before_expected():
    """Capture drops dead ops itself, so the dead branch (sin of the input, read by nothing) is added by hand, as a
    rewrite leaves one behind; the unread parameter comes from capture."""
    x = torch.randn(3, 6)
    before = traced(DeadBranch(), x)
    placeholder = next(n for n in before.graph.nodes if n.op == "placeholder")
    with before.graph.inserting_after(placeholder):
        before.graph.call_function(aten.sin.default, (placeholder,))
    before.recompile()
    assert count(before, "sin") == 1 and "unused" in dict(before.named_parameters())
    gm, report = PassManager(["eliminate_dead_code"], measure_latency=False).run(before, PassContext((x,)))
    assert_same_graph(gm, traced(Live(), x))
    assert "unused" not in dict(gm.named_parameters()) and "unused" not in dict(gm.named_buffers())
    # the sin and the get_attr of the unread parameter (capture reads every parameter once)
    assert report.row("eliminate_dead_code").stats == {"nodes_removed": 2, "tensors_removed": 1}


def test_a_graph_without_dead_code_is_left_alone():
    model = Live().eval()
    gm, report, flat = apply(model, (torch.randn(3, 6),), ["eliminate_dead_code"])
    assert_same_graph(gm, traced(Live(), torch.randn(3, 6)))
    assert report.row("eliminate_dead_code").stats == {"nodes_removed": 0, "tensors_removed": 0}
    assert error_vs_eager(gm, model, flat).max_rel == 0


@pytest.mark.parametrize("name", zoo_params())
def test_zoo_outputs_are_unchanged(name):
    model, example = ZOO[name]()
    gm, report, flat = apply(model, example, ["eliminate_dead_code"])
    assert error_vs_eager(gm, model, flat).max_rel == 0


class TiedTwice(nn.Module):
    """Two linears sharing one weight (b.weight = a.weight), then a head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_a_tied_tensor_is_sized_once_and_a_dead_alias_is_removed():
    """Export keeps both names of a tied weight: the report counted it twice, and after a pass rewrote its readers the
    alias named_parameters() leaves out stayed in the module (the int8 artifact carried the float weight)."""
    from fxforge.compiler.graph import remove_unused_tensors
    model = TiedTwice().eval()
    gm, report, _ = apply(model, (torch.randn(2, 8),), [])
    assert report.row("input").params == sum(p.numel() for p in model.parameters())  # distinct: 64 + 8 + 8 + 18
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and "weight" in n.target and "head" not in n.target]:
        with gm.graph.inserting_before(n):
            n.replace_all_uses_with(gm.graph.get_attr("head.weight"))  # nothing reads the tied weight any more
        gm.graph.erase_node(n)
    remove_unused_tensors(gm)
    assert {name for name, _ in gm.named_parameters(remove_duplicate=False)} == \
        {"a.bias", "b.bias", "head.weight", "head.bias"}
