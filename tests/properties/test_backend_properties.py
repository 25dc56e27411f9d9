"""Every backend's artifact, saved and loaded again, computes what the in-memory one does on generated models.

The in-memory artifact of an exact pipeline also matches eager within 1e-4 relative. Inputs are fresh and,
where the batch is dynamic, of another batch size than the example.
"""
import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import fxforge
from fxforge.compiler.verify import EXACT_TOLERANCE, compare, random_like
from random_models import build, models

HAS_TVM = importlib.util.find_spec("fxforge.backends.tvm") is not None
PIPELINES = {"": True, "fuse": True, "fuse+dead_channels+low_rank": False}  # passes ("+"-joined) → exact
SAVE_TOLERANCE = 1e-6  # a loaded artifact runs the same program; only kernel choice may differ


def _inputs(cm, example, seed: int):
    g = torch.Generator().manual_seed(seed)
    batch = 4 if cm.signature.dynamic_batch else example[0].shape[0]
    return tuple(random_like(torch.empty(batch, *t.shape[1:], dtype=t.dtype), g) for t in example)


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnx"])
@settings(max_examples=max(2, settings().max_examples // 2))
@given(spec=models(), passes=st.sampled_from(sorted(PIPELINES)))
def test_saved_artifact_matches_in_memory(backend, spec, passes):
    check_round_trip(backend, spec, passes)


@pytest.mark.skipif(not HAS_TVM, reason="fxforge/backends/tvm/ is not there")
@settings(max_examples=max(2, settings().max_examples // 4))  # a TVM build takes seconds
@given(spec=models(), passes=st.sampled_from(sorted(PIPELINES)))
def test_saved_tvm_artifact_matches_in_memory(spec, passes):
    check_round_trip("tvm", spec, passes)


def check_round_trip(backend: str, spec, passes: str) -> None:
    model, example = build(spec)
    cm = fxforge.compile(model, example, passes=passes.split("+") if passes else None, backend=backend, measure_latency=False)
    inputs = _inputs(cm, example, spec.seed)
    with torch.no_grad():
        in_memory, eager = pytree.tree_leaves(cm(*inputs)), pytree.tree_leaves(model(*inputs))
    if PIPELINES[passes]:
        assert compare(in_memory, eager).max_rel <= EXACT_TOLERANCE
    with tempfile.TemporaryDirectory() as tmp:  # the artifact may read its files while it runs (TVM's .so)
        loaded = fxforge.load(cm.save(Path(tmp) / "artifact"))
        assert type(loaded) is type(cm.artifact)
        err = compare(pytree.tree_leaves(loaded(*inputs)), in_memory)
    assert err.max_rel <= SAVE_TOLERANCE, f"{backend}: loaded artifact differs by {err.max_rel:.3g} relative"
