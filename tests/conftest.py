import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))  # `from models import ZOO`

# Property tests (tests/properties): "ci" is small and reproducible; FXFORGE_HYPOTHESIS=thorough runs thousands.
_QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=9, derandomize=True, database=None, deadline=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("thorough", max_examples=150, deadline=None, suppress_health_check=_QUIET,
                          print_blob=True)
settings.load_profile(os.environ.get("FXFORGE_HYPOTHESIS", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def unscriptable(monkeypatch):
    """A graph TorchScript cannot script, so that the torchscript backend traces it (a float computed from the batch
    size was such a graph until sym_float was written as Python's float; no other is known)."""
    def refuse(*args, **kwargs):
        raise RuntimeError("Unknown builtin op: aten::an_op_torchscript_lacks")
    monkeypatch.setattr(torch.jit, "script", refuse)
