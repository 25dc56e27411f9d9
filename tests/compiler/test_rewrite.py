"""compiler/rewrite.py: patterns over op families, refusals counted, misses not, operands tried in graph order."""
import torch
from torch import nn
from torch.nn import functional as F

from fxforge.compiler.ops import CLAMP, WEIGHTED, aten
from fxforge.compiler.rewrite import Rule, apply_rules, match, op
from graphs import traced


class LinearAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), act

    def forward(self, x):
        return self.act(self.fc(x))


def _roots(gm, *ops):
    from fxforge.compiler.ops import is_op
    return [n for n in gm.graph.nodes if is_op(n, *ops)]


def test_one_pattern_matches_every_aten_form_of_an_op():
    pattern = op(*CLAMP, op(*WEIGHTED, name="layer"), name="act")
    for act in (F.relu6, nn.ReLU6(), torch.relu):
        gm = traced(LinearAct(act), torch.randn(2, 4))
        (root,) = _roots(gm, *CLAMP)
        m = match(pattern, root)
        assert m == {"layer": root.args[0], "act": root}


def test_refusals_are_counted_misses_are_not():
    x = torch.randn(2, 4)
    seen = []
    rule = Rule("rewritten", op(*CLAMP, op(*WEIGHTED, refusal="no_layer", sole_user="shared")),
                replace=lambda gm, m: seen.append(m), check=lambda gm, m: None)
    assert apply_rules(traced(LinearAct(torch.relu), x), [rule]) == {"rewritten": 1}

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) + y

    assert apply_rules(traced(Shared(), x), [rule]) == {"skipped.shared": 1}
    assert apply_rules(traced(LinearAct(nn.Identity()), x), [rule]) == {}  # no clamp: not this rule's business
    assert apply_rules(traced(nn.ReLU(), x), [rule]) == {"skipped.no_layer": 1}
    refusing = Rule("rewritten", rule.pattern, replace=rule.replace, check=lambda gm, m: "by_check")
    assert apply_rules(traced(LinearAct(torch.relu), x), [refusing]) == {"skipped.by_check": 1}
    assert len(seen) == 1


def test_either_operand_takes_the_first_computed():
    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            a = self.a(x)
            return self.b(x) + a

    gm = traced(TwoLayers(), torch.randn(2, 4))
    (add,) = _roots(gm, aten.add)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    m = match(op(aten.add, op(*WEIGHTED, name="layer"), either_operand=True), add, order)
    assert m["layer"].args[1].target == "a.weight"
