"""compare(): relative max error and cosine over all floating outputs; ModelRuns: the user's model run from its
original state."""
import pytest
import torch

from torch import nn

from fxforge.compiler.verify import ModelRuns, compare


def test_cosine_of_tiny_outputs_is_their_true_cosine():
    ref = torch.tensor([3e-10, 4e-10])
    err = compare([ref * 2], [ref])  # same direction: cosine 1 whatever the scale
    assert err.cosine == pytest.approx(1.0) and err.max_rel == pytest.approx(1.0)
    assert compare([torch.tensor([4e-10, -3e-10])], [ref]).cosine == pytest.approx(0.0, abs=1e-12)


def test_all_outputs_count_and_non_finite_values_are_infinitely_wrong():
    a, b = torch.ones(3), torch.full((2,), 2.0)
    err = compare([a, b + 0.2], [a, b])
    assert err.max_rel == pytest.approx(0.1)
    assert compare([torch.tensor([float("nan")])], [torch.ones(1)]).max_rel == float("inf")
    assert compare([torch.zeros(2)], [torch.zeros(2)]).cosine == 1.0


class CountsInBuffer(nn.Module):
    """Adds how often it ran, kept in a buffer written in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x + self.calls


class CountsInAttribute(nn.Module):
    """Adds how often it ran, kept in a plain Python attribute of a submodule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.inner.calls = 1000.5  # a float: rebinding frees the old object, whose address a new one may take

    def forward(self, x):
        self.inner.calls += 1.0
        return x + self.inner.calls


def test_model_runs_reuse_a_copy_only_while_runs_leave_the_model_as_they_found_it():
    """A run that changes nothing hands its copy of the model to the next run (copying a large model costs more than
    running it); a run that writes into a buffer or rebinds an attribute does not, so every run starts from the
    original state."""
    x = torch.randn(2, 3)
    plain = ModelRuns(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval())
    outs = [plain.run((x,)) for _ in range(3)]
    assert plain.copies == 1 and all(torch.equal(o, outs[0]) for o in outs)
    for stateful in (CountsInBuffer(), CountsInAttribute()):
        runs = ModelRuns(stateful.eval())
        outs = [runs.run((x,)) for _ in range(3)]
        assert runs.copies == 3, type(stateful).__name__
        assert all(torch.equal(o, outs[0]) for o in outs)  # each from the original state
        assert torch.equal(outs[0], stateful(x))  # the state the user's model was in
