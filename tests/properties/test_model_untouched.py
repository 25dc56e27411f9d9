"""compile() never mutates the user's model or example inputs, whatever the pipeline and the model's mode."""
import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxforge
from fxforge.compiler.pass_manager import train_readers
from random_models import build, calibration, models, pipelines

PIPELINES = pipelines()


def snapshot(model: torch.nn.Module) -> tuple:
    """Structure (module tree, modes, hooks), parameter identities and values, buffers."""
    return (repr(model), [(n, type(m), m.training) for n, m in model.named_modules()],
            [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
            {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()})


def same(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


@settings(max_examples=settings().max_examples)
@given(spec=models(), name=st.sampled_from(sorted(PIPELINES)), training=st.booleans())
def test_compile_leaves_the_model_and_inputs_alone(spec, name, training):
    model, example = build(spec)
    model.train(training)
    before, inputs = snapshot(model), copy.deepcopy(example)
    passes = list(PIPELINES[name])
    fxforge.compile(model, example, passes=passes, calibration=calibration(spec), measure_latency=False,
                    train=calibration(spec) if train_readers(passes) else None)
    assert same(snapshot(model), before), f"{name} mutated the model"
    assert all(torch.equal(a, b) for a, b in zip(example, inputs)), f"{name} mutated the example inputs"
