"""compare(): relative max error and cosine over all floating outputs."""
import pytest
import torch

from fxforge.compiler.verify import compare


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
