"""compare(): relative max error and cosine over all floating outputs; check_artifact against the model."""
import pytest
import torch

from fxforge.compiler.errors import VerificationError
from fxforge.compiler.verify import ModelRuns, check_artifact, compare


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


class AgreesOnTheExampleOnly(torch.nn.Module):
    """Computes ``fc(x)`` on one input and ``2·fc(x)`` on any other: a capture at that input is right there only."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.fc, self.example = torch.nn.Linear(4, 3), example

    def forward(self, x):
        return self.fc(x) if torch.equal(x, self.example) else 2 * self.fc(x)


class Captured(torch.nn.Module):
    def __init__(self, fc: torch.nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return (self.fc(x),)  # flat outputs, as a captured graph returns them


def test_the_artifact_is_checked_against_the_model_on_fresh_inputs_too():
    """An artifact true to its graph, from a capture that matches the model on the example only: an exact pipeline
    is a VerificationError naming the model, since fresh inputs of the example's shapes show the difference."""
    x = torch.randn(2, 4)
    model = AgreesOnTheExampleOnly(x).eval()
    graph = torch.fx.symbolic_trace(Captured(model.fc))  # what a capture at x would have taken
    artifact = type("Faithful", (), {"backend": "eager", "__call__": lambda self, *a: graph(*a)})()
    with pytest.raises(VerificationError, match=r"the eager artifact of an exact pipeline differs from the model "
                                                r"by 0\.5 relative \(cosine 1\.0000; bound"):
        check_artifact(artifact, ModelRuns(model), graph, (x,), exact=True)
    assert check_artifact(artifact, ModelRuns(model), graph, (x,), exact=False).max_rel >= 0.5  # stated, not hidden
