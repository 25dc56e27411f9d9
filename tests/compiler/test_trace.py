"""Capture: every zoo model exports to the ATen FX graph and reproduces eager; capture failures are clear."""
import collections
import dataclasses
import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

import fxforge
from fxforge.compiler.trace import trace
from fxforge.compiler.verify import compare
from models import NAMEDTUPLE_MODEL, ZOO, zoo_params


@pytest.mark.parametrize("name", zoo_params())
def test_zoo_traces_and_matches_eager(name):
    model, example = ZOO[name]()
    gm, sig = trace(model, example)
    assert any(n.op == "call_function" and "aten" in str(n.target) for n in gm.graph.nodes)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    inputs = tuple(sig.flatten(example))
    with torch.no_grad():
        err = compare(list(gm(*inputs)), [model(*example)])
    assert err.max_rel < 1e-5


def test_dynamic_batch_runs_other_batch_sizes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(1, 3, 8, 8))
    gm, sig = trace(model.eval(), (torch.randn(1, 3, 8, 8),))  # batch 1 example: exported at batch 2
    assert sig.dynamic_batch and sig.inputs[0].shape[0] is None
    for b in (1, 3, 7):
        x = torch.randn(b, 3, 8, 8)
        assert torch.allclose(gm(x)[0], model(x), atol=1e-6)


class ScaledBy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, t, x):
        return self.fc(x) * t


def test_a_leading_0d_input_leaves_the_batch_to_the_next_input():
    """The batch size was read from the first input alone: a 0-d one made no input batched under a dynamic
    signature, and compile raised a raw StopIteration."""
    model = ScaledBy().eval()
    cm = fxforge.compile(model, (torch.tensor(2.0), torch.randn(2, 4)), passes=["fuse"], backend="eager")
    assert cm.signature.inputs[0].shape == () and cm.signature.inputs[1].shape == (None, 4)
    t, x = torch.tensor(-0.5), torch.randn(5, 4)
    with torch.no_grad():
        assert compare([cm(t, x)], [model(t, x)]).max_rel < 1e-5


class VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *rest):
        return self.fc(x) + rest[0] * rest[1]


def test_a_forward_taking_star_args_gets_a_dynamic_batch():
    """Export matches dynamic shapes per parameter, so the arguments ``*rest`` collects share one entry; a flat
    list was refused and the capture fell back to a static batch."""
    model = VarArgs().eval()
    gm, sig = trace(model, (torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)))
    assert sig.dynamic_batch and sig.note == ""
    args = [torch.randn(5, 4) for _ in range(3)]
    assert torch.allclose(gm(*args)[0], model(*args), atol=1e-6)


class WithConstants(nn.Module):
    def forward(self, x):
        return {"y": x * 2, "mask": None, "scale": 0.5}, None


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnx"])
def test_outputs_that_are_no_tensor_come_back_as_the_model_returns_them(backend, tmp_path):
    """The ONNX exporter drops a None output, and the artifact's outputs no longer matched the output structure (a
    raw ValueError from pytree); constants are now kept in the signature and the graph returns tensors alone."""
    model, x = WithConstants(), torch.randn(2, 3)
    cm = fxforge.compile(model, (x,), backend=backend, measure_latency=False)
    for run in (cm, fxforge.load(cm.save(tmp_path / "art"))):
        got = run(x)
        assert got[1] is None and got[0]["mask"] is None and got[0]["scale"] == 0.5
        torch.testing.assert_close(got[0]["y"], x * 2)


class WritesIntoItsInput(nn.Module):
    def forward(self, x, y):
        x.add_(1)
        return x * 2 + y


def test_an_input_the_model_writes_into_may_not_share_memory_with_another():
    """Eager reads the write into x through y when both are one tensor; the compiled graph does not write back, so
    such a call gave other values without an error. Separate tensors, and disjoint slices of one, are fine."""
    model = WritesIntoItsInput()
    cm = fxforge.compile(model, (torch.randn(4, 8), torch.randn(4, 8)), backend="eager", measure_latency=False)
    assert cm.artifact.signature.written_inputs == (0,)
    t = torch.zeros(4, 8)
    with pytest.raises(fxforge.InputError, match="inputs 0 and 1 share memory, and the model writes into input 0"):
        cm(t, t)
    with pytest.raises(fxforge.InputError, match="share memory"):
        cm(t, t.view(2, 16).view(4, 8))  # a view of the same memory
    big, wide = torch.zeros(8, 8), torch.zeros(4, 16)
    torch.testing.assert_close(cm(big[:4], big[4:]), model(torch.zeros(4, 8), torch.zeros(4, 8)))
    torch.testing.assert_close(cm(wide[:, :8], wide[:, 8:]), model(torch.zeros(4, 8), torch.zeros(4, 8)))  # columns
    torch.testing.assert_close(cm(t, t.clone()), model(torch.zeros(4, 8), torch.zeros(4, 8)))


class SecondRow(nn.Module):
    def forward(self, x):
        return x[1] * 2, x.narrow(0, 1, 1) + 1


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_batch_smaller_than_the_model_runs_at_is_refused(backend, tmp_path):
    """Eager raises on x[1] and x.narrow(0, 1, 1) at batch 1; the symbolic graph read past the batch (TVM) or
    returned an empty slice (every backend). The smallest batch the model runs at is probed at capture."""
    model = SecondRow()
    cm = fxforge.compile(model, (torch.randn(4, 3),), backend=backend, measure_latency=False)
    assert cm.signature.min_batch == 2
    for artifact in (cm, fxforge.load(cm.save(tmp_path / "a"))):
        with pytest.raises(fxforge.InputError, match="input 0 has batch size 1, but the model runs only from batch "
                                                     "size 2"):
            artifact(torch.randn(1, 3))
        x = torch.randn(2, 3)
        for got, want in zip(artifact(x), model(x)):
            torch.testing.assert_close(got, want)


class RowsOfTheBatch(nn.Module):
    def forward(self, x, rows):
        return x[rows] * 2


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_indices_into_the_batch_are_bounded_by_the_calls_batch(backend):
    """An index input into the dynamic batch dimension: eager accepts [-B, B) of each call's batch B; TVM read past
    the batch. The signature bounds it by the call's batch size."""
    model = RowsOfTheBatch()
    cm = fxforge.compile(model, (torch.randn(4, 3), torch.tensor([0, 3, -1])), backend=backend,
                         measure_latency=False)
    x, rows = torch.randn(5, 3), torch.tensor([4, -5, 0])
    torch.testing.assert_close(cm(x, rows), model(x, rows))
    with pytest.raises(fxforge.InputError, match=r"input 1 holds indices from 0 to 3, but it indexes dimension 0 \(the "
                                                 r"batch\) at node 'index': each must be in \[-3, 3\)"):
        cm(torch.randn(3, 3), torch.tensor([0, 3, 1]))


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)  # a VAE's sampling: no two runs agree


def test_a_model_with_random_ops_keeps_every_batch_size():
    """The smallest-batch probe compares graph and model at smaller batches; a model whose own runs differ cannot
    be compared so and is not held to the example's batch (its artifact cannot be checked either: verify="off")."""
    cm = fxforge.compile(Noisy(), (torch.randn(4, 3),), backend="eager", measure_latency=False, verify="off")
    assert cm.signature.min_batch == 1 and cm(torch.randn(1, 3)).shape == (1, 3)


def test_static_model_says_so():
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(4, -1).sum(0)  # hard-codes the batch size

    gm, sig = trace(Fixed(), (torch.randn(4, 3),))
    assert not sig.dynamic_batch and sig.note
    assert torch.equal(gm(torch.ones(4, 3))[0], torch.full((3,), 4.0))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: export cannot capture it
            return x * 2
        return x


def test_untraceable_model_raises_trace_error_with_source_and_remedies():
    with pytest.raises(fxforge.TraceError) as info:
        fxforge.compile(DataDependent(), (torch.randn(2, 3),))
    msg = str(info.value)
    assert "if x.sum() > 0" in msg  # the user's source line
    assert "torch.cond" in msg  # a remedy
    assert "Traceback" not in msg


def test_signature_rejects_wrong_inputs():
    model = nn.Linear(3, 2).eval()
    _, sig = trace(model, (torch.randn(2, 3),))
    with pytest.raises(fxforge.InputError, match="shape"):
        sig.flatten((torch.randn(2, 4),))
    with pytest.raises(fxforge.InputError, match="dtype"):
        sig.flatten((torch.randn(2, 3, dtype=torch.float64),))
    with pytest.raises(fxforge.InputError, match="1"):
        sig.flatten((torch.randn(2, 3), torch.randn(2, 3)))


def test_signature_round_trips_through_json():
    model, example = ZOO["bert"]()
    _, sig = trace(model, example)
    again = type(sig).from_dict(sig.to_dict())
    assert again == sig


class ReadsIndices(nn.Module):
    """Reads its integer inputs directly as indices: a gather, an index_select and a plain index."""

    def forward(self, x, rows, cols, picks):
        return torch.gather(x, 1, rows).sum() + x.index_select(1, cols).sum() + x[:, picks].sum()


def test_inputs_read_as_indices_are_bounded_as_eager_bounds_them():
    """gather and index_select accept [0, n), ``x[i]`` also [−n, 0); outside, eager raises where ONNX wraps around and
    TVM reads other memory, so the signature refuses such inputs for every backend, naming the node."""
    example = (torch.randn(2, 5), torch.tensor([[1], [2]]), torch.tensor([0, 4, 1]), torch.tensor([-1, 3, 0, 2]))
    _, sig = trace(ReadsIndices().eval(), example)
    assert [b[:3] for b in sig.index_bounds] == [(1, 0, 5), (2, 0, 5), (3, -5, 5)]
    sig.flatten(example)
    sig.flatten((example[0], example[1], example[2], torch.tensor([-5, -1, 4, 0])))
    with pytest.raises(fxforge.InputError, match=r"^input 1 holds indices from 1 to 5, but it indexes dimension 1 "
                                                 r"\(size 5\) at node 'gather': each must be in \[0, 5\)$"):
        sig.flatten((example[0], torch.tensor([[1], [5]]), *example[2:]))
    with pytest.raises(fxforge.InputError, match=r"input 2 holds indices from -1 to 4, .* \[0, 5\)"):
        sig.flatten((*example[:2], torch.tensor([-1, 4, 1]), example[3]))
    with pytest.raises(fxforge.InputError, match=r"input 3 holds indices from -6 to 0, .* \[-5, 5\)"):
        sig.flatten((*example[:3], torch.tensor([-6, 0, 0, 0])))
    assert type(sig).from_dict(sig.to_dict()) == sig


class TokenLoss(nn.Module):
    """A masked language model's loss as BERT's: logits and labels flattened over the tokens."""

    def __init__(self, ignore_index=-100):
        super().__init__()
        self.head, self.ignore_index = nn.Linear(8, 6), ignore_index

    def forward(self, x, labels):
        return F.cross_entropy(self.head(x).reshape(-1, 6), labels.reshape(-1), ignore_index=self.ignore_index)


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_a_losss_labels_are_bounded_by_its_classes_and_ignore_index(ignore_index):
    """Before: a label outside [0, classes) made eager raise ("Target -5 is out of bounds") while the ONNX artifact
    returned a loss (GPT-2's LM head with a label of −5). Expected: every backend's call refuses it, naming the
    node, and the loss's ignore_index stays a valid label."""
    model = TokenLoss(ignore_index).eval()
    example = (torch.randn(2, 4, 8), torch.randint(0, 6, (2, 4)))
    cm = fxforge.compile(model, example, backend="onnx", measure_latency=False)
    labels = torch.tensor([[1, 5, ignore_index, 0], [ignore_index, 2, 2, 4]])
    torch.testing.assert_close(cm(example[0], labels), model(example[0], labels))
    for bad in (-5, 6):
        with pytest.raises(IndexError, match="out of bounds"):
            model(example[0], labels.masked_fill(labels == 2, bad))
        with pytest.raises(fxforge.InputError, match=rf"^input 1 holds labels from {min(bad, 0)} to {max(bad, 5)}, "
                                                     r"but it indexes 6 classes at node 'cross_entropy_loss': each "
                                                     rf"must be in \[0, 6\) or {ignore_index} \(its ignore_index\)$"):
            cm(example[0], labels.masked_fill(labels == 2, bad))
    assert type(cm.artifact.signature).from_dict(cm.artifact.signature.to_dict()) == cm.artifact.signature


class TwoTasks(nn.Module):
    """Two classifiers whose labels come in one tensor, a column each (10 and 3 classes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 10), nn.Linear(8, 3)

    def forward(self, x, labels):
        return F.cross_entropy(self.a(x), labels[:, 0]) + F.cross_entropy(self.b(x), labels[:, 1])


def test_labels_a_loss_reads_through_a_slice_are_not_bounded_whole():
    """A review found the first version checking every column of ``labels`` against both losses' classes: label 9
    of the first task refused as past the second's 3 classes, a valid call eager computes."""
    _, sig = trace(TwoTasks().eval(), (torch.randn(2, 8), torch.tensor([[1, 2], [0, 1]])))
    assert sig.index_bounds == ()
    sig.flatten((torch.randn(2, 8), torch.tensor([[9, 2], [0, 1]])))


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_each_column_of_one_labels_tensor_is_checked_against_its_own_loss(backend):
    """Before: labels a loss reads through a slice went unchecked, so ONNX returned a loss for label −1 of the second
    task where eager raises. Expected: the artifact checks each slice as the graph computes it (``index_guards``):
    label 9 of the first task passes, label −1 of either is refused naming its loss's node (ONNX Runtime's
    GatherElements wraps −1 around; past the end it fails by itself)."""
    model, x = TwoTasks().eval(), torch.randn(2, 8)
    cm = fxforge.compile(model, (x, torch.tensor([[1, 2], [0, 1]])), backend=backend, measure_latency=False)
    assert [g[0] for g in cm.artifact.info["index_guards"]] == ["cross_entropy_loss", "cross_entropy_loss_1"]
    torch.testing.assert_close(cm(x, torch.tensor([[9, 2], [0, 1]])), model(x, torch.tensor([[9, 2], [0, 1]])))
    for bad, node in ((torch.tensor([[1, 2], [0, -1]]), "cross_entropy_loss_1"),
                      (torch.tensor([[1, 2], [-1, 1]]), "cross_entropy_loss")):
        with pytest.raises(IndexError):
            model(x, bad)
        with pytest.raises(fxforge.InputError, match=rf"^node '{node}' reads indices the model computes from its "
                                                     r"inputs, from -1 to \d, but it indexes \d+ classes"):
            cm(x, bad)


class ShiftedLabels(nn.Module):
    """A causal LM's loss: logits of positions 0..T−2 against the labels of 1..T−1 (GPT-2's), −100 ignored."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

    def forward(self, ids, labels):
        logits = self.head(self.emb(ids))[:, :-1]
        return F.cross_entropy(logits.reshape(-1, 11), labels[:, 1:].reshape(-1))


class ComputedIds(nn.Module):
    """An embedding of ids the model computes (``ids - 1``), beside position ids it computes from constants."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(10, 4), nn.Embedding(6, 4)
        self.register_buffer("positions", torch.arange(6).unsqueeze(0))

    def forward(self, ids):
        return (self.emb(ids - 1) + self.pos(self.positions[:, :ids.shape[1]]) +
                self.pos(torch.arange(ids.shape[1]))).sum(1)


def test_only_indices_computed_from_input_values_are_guarded():
    """``computed_indices``: the ids the model computes from its input (``ids - 1``, the shifted labels), not the
    input's own ids (the signature checks them) nor position ids from a buffer or an ``arange`` of a size."""
    from fxforge.compiler.trace import computed_indices
    gm, _ = trace(ComputedIds().eval(), (torch.randint(1, 10, (2, 5)),))
    assert [r.guard() for r in computed_indices(gm)] == [["embedding", 0, 10, "an embedding of 10 rows"]]
    gm, _ = trace(ShiftedLabels().eval(), (torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))))
    assert [r.guard() for r in computed_indices(gm)] == [
        ["cross_entropy_loss", 0, 11, "11 classes (or -100, its ignore_index)"]]


def test_index_guards_return_the_extremes_of_each_computed_index_after_the_outputs():
    """Before: ``emb(ids - 1)`` as its graph. Expected: one more output, [min, max] of ``ids - 1`` as int64 (an
    empty index's are ±2**62), the model's outputs unchanged."""
    from fxforge.compiler.trace import index_guards
    ids = torch.tensor([[3, 1, 9], [2, 2, 5]])
    gm, _ = trace(ComputedIds().eval(), (ids,))
    before = gm(ids)
    assert index_guards(gm) == [["embedding", 0, 10, "an embedding of 10 rows"]]
    after = gm(ids)
    assert len(after) == len(before) + 1 and torch.equal(after[0], before[0])
    assert after[-1].dtype == torch.int64 and after[-1].tolist() == [0, 8]


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_computed_ids_and_shifted_labels_outside_their_range_are_refused_as_eager_refuses(backend, tmp_path):
    """Before: ``emb(ids - 1)`` given id 0 read row −1 (ONNX's Gather wraps it around to the last row; TVM read
    memory before the table), and a causal LM's shifted label −5 gave a loss, where eager raises. Expected: an
    ``InputError`` naming the node and the range, also from the saved artifact (format 3); −100, the ignore_index,
    and valid ids give eager's numbers."""
    model, ids = ComputedIds().eval(), torch.randint(1, 10, (2, 5))
    cm = fxforge.compile(model, (ids,), backend=backend, measure_latency=False)
    torch.testing.assert_close(cm(ids), model(ids))
    path = cm.save(tmp_path / "ids")
    assert json.loads((path / "fxforge.json").read_text())["format"] == 3
    bad = ids.clone()
    bad[1, 2] = 0
    with pytest.raises(IndexError):
        model(bad)
    for compiled in (cm, fxforge.load(path)):
        with pytest.raises(fxforge.InputError, match=r"^node 'embedding' reads indices the model computes from its "
                                                     r"inputs, from -1 to \d, but it indexes an embedding of 10 rows: "
                                                     r"each must be in \[0, 10\)"):
            compiled(bad)
    lm = ShiftedLabels().eval()
    example = (torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5)))
    cm = fxforge.compile(lm, example, backend=backend, measure_latency=False)
    ignored = example[1].clone()
    ignored[0, 3] = -100
    torch.testing.assert_close(cm(example[0], ignored), lm(example[0], ignored))
    ignored[1, 1] = -5
    with pytest.raises(IndexError):
        lm(example[0], ignored)
    with pytest.raises(fxforge.InputError, match=r"from -5 to \d+, but it indexes 11 classes \(or -100, its "
                                                 r"ignore_index\): each must be in \[0, 11\)"):
        cm(example[0], ignored)


class RowsWithSpread(nn.Module):
    """Rows of ``x`` picked by ``idx`` (``computed``: by ``idx - 1``), plus the spread over the batch, which TVM cannot
    compile for a symbolic batch (it builds for the example's batch then)."""

    def __init__(self, computed: bool):
        super().__init__()
        self.computed = computed

    def forward(self, x, idx):
        return x[idx - 1 if self.computed else idx] + x.std(0)


def test_a_signature_made_static_bounds_indices_into_the_batch_by_the_examples_batch():
    """Before: ``with_static_batch`` kept an index bound of the call's batch size (``BATCH``), which a static
    signature has no batch dimension to read: every call raised ``TypeError``. Expected: the example's batch bounds
    it, [−4, 4) for ``x[idx]`` at batch 4."""
    x, idx = torch.randn(4, 3), torch.tensor([1, 2, 3, 0])
    _, sig = trace(RowsWithSpread(False).eval(), (x, idx))
    static = sig.with_static_batch((x, idx), "built for the example's batch")
    assert [tuple(b[:3]) for b in static.index_bounds] == [(1, -4, 4)]
    static.flatten((x, torch.tensor([-4, 3, 0, 1])))
    with pytest.raises(fxforge.InputError, match=r"^input 1 holds indices from 0 to 4, .* each must be in \[-4, 4\)"):
        static.flatten((x, torch.tensor([4, 3, 0, 1])))


@pytest.mark.parametrize("computed", [False, True])
def test_tvm_built_for_the_examples_batch_checks_indices_into_the_batch(computed):
    """Before: where TVM fell back to the example's batch (``x.std(0)``), an index into the batch, the input's or
    one the model computes (``x[idx - 1]``), was bounded by the call's batch size, which a static signature does not
    give: compile failed with "TypeError: bad operand type for unary -: 'NoneType'". Expected: the example's batch
    bounds it; −1 is eager's last row, −5 is refused as eager refuses it."""
    model, x = RowsWithSpread(computed).eval(), torch.randn(4, 3)
    cm = fxforge.compile(model, (x, torch.tensor([1, 2, 3, 0])), backend="tvm", measure_latency=False)
    assert not cm.artifact.signature.dynamic_batch
    valid, bad = torch.tensor([0, 1, 2, 3]), torch.tensor([-4, 1, 2, 3])
    torch.testing.assert_close(cm(x, valid), model(x, valid))
    with pytest.raises(IndexError):
        model(x, bad - (0 if computed else 1))
    with pytest.raises(fxforge.InputError, match=r"each must be in \[-4, 4\)"):
        cm(x, bad - (0 if computed else 1))


class ColumnsSet(nn.Module):
    """``y[:, idx] = 1`` on a copy of ``x`` (``computed``: ``idx + 1``), an ``index_put``."""

    def __init__(self, computed: bool):
        super().__init__()
        self.computed = computed

    def forward(self, x, idx):
        y = x.clone()
        y[:, idx + 1 if self.computed else idx] = 1.0
        return y


@pytest.mark.parametrize("computed", [False, True])
def test_an_index_put_outside_its_dimension_is_refused_as_eager_refuses(computed):
    """Before: ``y[:, idx] = 1`` (``index_put``) was no index read, of the input or computed: TVM wrote column
    40001 of a 5-column tensor past its memory and returned as if valid (the process crashed later, freeing it).
    Expected: the signature, or the artifact for ``idx + 1``, refuses it as eager does; column −1 is the last."""
    model, x = ColumnsSet(computed).eval(), torch.randn(2, 5)
    cm = fxforge.compile(model, (x, torch.tensor([0, 2])), backend="tvm", measure_latency=False)
    last = torch.tensor([-1, 0]) - (1 if computed else 0)
    torch.testing.assert_close(cm(x, last), model(x, last))
    with pytest.raises(IndexError):
        model(x, torch.tensor([40001, 0]))
    with pytest.raises(fxforge.InputError, match=r"from [01] to 40001, but it indexes dimension 1 \(size 5\)"):
        cm(x, torch.tensor([40001 - (1 if computed else 0), 0]))


class RowsScattered(nn.Module):
    """Ones scattered into rows ``idx + 1`` of ``x``: a computed index into dimension 0, the batch."""

    def forward(self, x, idx):
        return x.scatter(0, (idx + 1).unsqueeze(1).expand(-1, x.shape[1]), 1.0) * 2


class LabelsPlusOne(nn.Module):
    """A cross-entropy on labels the model computes (``labels + 1``; −101 becomes its ignore_index, −100)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x, labels):
        return nn.functional.cross_entropy(self.head(x), labels + 1)


# model, example, a valid call at another batch, the far index it then gets, what eager raises, the guard's message
WRAPPED = {
    "scatter into the batch": (
        RowsScattered, (torch.randn(4, 3), torch.tensor([0, 2, 1, -1])),
        (torch.randn(6, 3), torch.tensor([-1, 1, 0, 2, 4, 3])), torch.tensor([0, 10 ** 10, 1, 0, 1, 2]), RuntimeError,
        r"^node 'scatter' reads indices the model computes from its inputs, from 1 to 10000000001, but it indexes "
        r"dimension 0 \(the batch\): each must be in \[0, 6\)"),
    "labels": (
        LabelsPlusOne, (torch.randn(3, 4), torch.tensor([0, 1, -1])),
        (torch.randn(5, 4), torch.tensor([-101, 1, -1, 0, 1])), torch.tensor([0, 10 ** 10, 1, 0, 1]), IndexError,
        r"^node 'cross_entropy_loss' reads indices the model computes from its inputs, from 1 to 10000000001, but it "
        r"indexes 3 classes \(or -100, its ignore_index\): each must be in \[0, 3\)")}


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
@pytest.mark.parametrize("case", WRAPPED)
def test_a_computed_index_is_read_mod_its_size_before_its_guard_refuses_it(case, backend):
    """Before: an op read a computed index into a dimension of the batch's size, and a loss its computed labels, as
    they were (mod n only where n was a number and no loss read it): TVM's scatter into row 10**10 + 1 and its
    cross-entropy at class 10**10 + 1 crashed the process (segmentation fault) before the guard could refuse the
    call, and ONNX Runtime failed by itself naming a node of its own. Expected: the op reads each index mod the size
    it indexes (the call's batch), a loss's ignore_index as it is, so a valid call at another batch (an ignored label
    among them) matches eager, and the guard's ``InputError`` names the node of the far one."""
    make, example, valid, far, raised, message = WRAPPED[case]
    torch.manual_seed(0)
    model = make().eval()
    cm = fxforge.compile(model, example, backend=backend, measure_latency=False)
    assert cm.artifact.signature.dynamic_batch
    torch.testing.assert_close(cm(*valid), model(*valid))
    with pytest.raises(raised):
        model(valid[0], far)
    with pytest.raises(fxforge.InputError, match=message):
        cm(valid[0], far)


class HardNegatives(nn.Module):
    """A contrastive cross-entropy over the batch's positives and as many hard negatives: 2 × the batch classes, on
    the labels given (``computed``: ``labels - 1``)."""

    def __init__(self, computed: bool):
        super().__init__()
        self.computed = computed

    def forward(self, a, positives, negatives, labels):
        logits = a @ torch.cat([positives, negatives]).T
        return F.cross_entropy(logits, labels - 1 if self.computed else labels, reduction="none")


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
@pytest.mark.parametrize("computed", [False, True])
def test_labels_into_k_times_the_batch_classes_are_checked(backend, computed):
    """Before: a loss's labels were indices only into a number of classes or the batch's: labels into 2 × the batch
    classes went unchecked, given or computed (label 10**10 crashed TVM's process, label 12 of 12 returned a number;
    ONNX Runtime failed naming a node of its own). Expected: the signature or the guard refuses them as eager does,
    at the call's 2 × batch classes, and a valid call at another batch matches eager."""
    model, shift = HardNegatives(computed).eval(), 1 if computed else 0
    example = (torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 5, 7]) + shift)
    cm = fxforge.compile(model, example, backend=backend, measure_latency=False)
    assert cm.artifact.signature.dynamic_batch
    x = (torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3))
    valid = torch.tensor([0, 11, 3, 4, 5, 6]) + shift
    torch.testing.assert_close(cm(*x, valid), model(*x, valid))
    for far in (12, 10 ** 10):
        labels = torch.tensor([0, far, 3, 4, 5, 6]) + shift
        with pytest.raises(IndexError):
            model(*x, labels)
        with pytest.raises(fxforge.InputError, match=r"indexes the 2 × batch classes.*\[0, 12\)"):
            cm(*x, labels)


class DiagonalSet(nn.Module):
    """``y[j, j] = 5`` on a copy of ``x`` and ``j[j]``, for ``j = idx - 1``: one computed index read at two places
    of one op, into the batch and a dimension of size 3, and as data besides."""

    def forward(self, x, idx):
        y, j = x.clone(), idx - 1
        y[j, j] = 5.0
        return y, j[j]


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
def test_an_index_read_at_two_places_of_an_op_is_wrapped_at_each_by_its_own_size(backend):
    """Before: the guards replaced every use of the index in the op by the first read's wrap: ``y[j, j] = 5`` with
    j = −1 at batch 64 wrote row 63, column 63 of a 3-column tensor (TVM wrote past it and returned as if valid,
    ONNX Runtime refused a valid call by itself where the first read was the column's) and ``j[j]`` read ``j`` mod 2
    as data. Expected: each place reads the index mod its own size, the data as it is, so valid calls match eager."""
    model = DiagonalSet().eval()
    cm = fxforge.compile(model, (torch.randn(8, 3), torch.tensor([1, 2])), backend=backend, measure_latency=False)
    for x, idx in ((torch.randn(64, 3), torch.tensor([0, 1])), (torch.randn(6, 3), torch.tensor([2, 1]))):
        torch.testing.assert_close(cm(x, idx), model(x, idx))
    with pytest.raises(fxforge.InputError, match=r"from 0 to 4, but it indexes dimension 1 \(size 3\)"):
        cm(torch.randn(6, 3), torch.tensor([5, 1]))


class MaskThenIndex(nn.Module):
    """``x[mask, idx]``: a 2-D mask takes dimensions 0 and 1, ``idx`` indexes dimension 2."""

    def forward(self, x, mask, idx):
        return x[mask, idx]


def test_an_index_after_a_mask_of_several_dimensions_is_bounded_by_the_dimension_it_indexes():
    """Before: the indices of ``x[mask2d, idx]`` were numbered one dimension each, so ``idx`` was bounded by
    dimension 1 (size 3) where it indexes dimension 2 (size 6): index 5 was refused where eager reads it.
    Expected: [−6, 6)."""
    model, x = MaskThenIndex().eval(), torch.randn(2, 3, 6)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    cm = fxforge.compile(model, (x, mask, torch.tensor([2])), backend="eager", measure_latency=False)
    assert [tuple(b[1:3]) for b in cm.artifact.signature.index_bounds] == [(-6, 6)]
    torch.testing.assert_close(cm(x, mask, torch.tensor([5])), model(x, mask, torch.tensor([5])))
    with pytest.raises(fxforge.InputError, match=r"each must be in \[-6, 6\)"):
        cm(x, mask, torch.tensor([6]))


class Takes(nn.Module):
    def forward(self, x, i):
        return torch.take(x, i - 1) * 2


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
@pytest.mark.parametrize("static_batch", [True, False])
def test_take_counts_negative_indices_from_the_end_and_is_guarded_where_its_size_is_known(backend, static_batch):
    """Before: TVM's ``take`` read a negative index as memory before the tensor (0.0 where eager gives the last
    element), and an index past the elements went unchecked (a review). Expected: negative indices read from the end
    on both backends; an index outside [−n, n) is refused naming the node, n being 5 × the batch where it is dynamic
    (ONNX Runtime's GatherND refuses it by itself)."""
    x, i = torch.randn(2, 5), torch.tensor([[1, 3], [2, 10]])
    cm = fxforge.compile(Takes(), (x, i), backend=backend, static_batch=static_batch, measure_latency=False)
    for valid in (torch.tensor([[0, 3], [2, 10]]), torch.tensor([[-9, 3], [2, 10]])):  # −1 and −10: from the end
        torch.testing.assert_close(cm(x, valid), Takes()(x, valid))
    if backend == "tvm":  # (ONNX's GatherND fails by itself outside, a BackendError)
        with pytest.raises(fxforge.InputError, match=r"^node 'take' reads indices .* from -11 to 9, but it indexes "
                                                     r"the (10|5 × batch) elements: each must be in \[-10, 10\)"):
            cm(x, torch.tensor([[-10, 3], [2, 10]]))


class ReadsFlattened(nn.Module):
    def forward(self, x, i):
        return x.reshape(-1)[i] * 2


class ReadsConcatenated(nn.Module):
    def forward(self, x, i):
        return torch.cat([x, x[:1]]).reshape(-1)[i] * 2


@pytest.mark.parametrize("backend", ["onnx", "tvm"])
@pytest.mark.parametrize("model, n, words", [(ReadsFlattened(), 15, "5 × the batch"),
                                             (ReadsConcatenated(), 20, "5 × the batch \\+ 5")])
def test_an_index_into_a_dimension_of_k_batches_plus_c_is_bounded_by_the_calls_elements(backend, model, n, words):
    """Before: ``x.reshape(-1)[i]`` at a dynamic batch indexes a dimension of 5 × the batch, and
    ``cat([x, x[:1]]).reshape(-1)[i]`` one of 5 × the batch + 5, which neither a number nor the batch bounded: TVM
    returned a value for −11 of 10 elements, and the first element for index 20 of 20 (two reviews). Expected: bounded
    by k × the call's batch + c ([−15, 15) and [−20, 20) at batch 3)."""
    x, i = torch.randn(2, 5), torch.tensor([[1, 3], [2, 9]])
    cm = fxforge.compile(model, (x, i), backend=backend, measure_latency=False)
    x3, valid = torch.randn(3, 5), torch.tensor([[-n, n - 1]] * 3)
    torch.testing.assert_close(cm(x3, valid), model(x3, valid))
    with pytest.raises(fxforge.InputError, match=rf"^input 1 holds indices from 1 to {n}, but it indexes dimension 0 "
                                                 rf"\({words}\) at node 'index': each must be in \[-{n}, {n}\)$"):
        cm(x3, torch.tensor([[1, n]] * 3))


class Indexes(nn.Module):
    """Reads its integer input ``y`` as indices through one op (``use``), after ``cast``."""

    def __init__(self, use, cast=None):
        super().__init__()
        self.use, self.cast, self.head = use, cast, nn.Linear(8, 5)

    def forward(self, x, y):
        return self.use(self, x, y if self.cast is None else y.to(self.cast))


def _bag(m, x, y):
    return F.embedding_bag(y.view(-1, 1), m.head.weight) + x


def _contrastive(m, x, y):  # CLIP's: each row's class is another row of the batch
    return F.cross_entropy(m.head(x) @ m.head(x).T, y)


@pytest.mark.parametrize("use, cast, bad, what", [
    (lambda m, x, y: torch.zeros(x.shape[0], 5).scatter(1, y.unsqueeze(1), 1.0) * m.head(x), None, -2,
     r"dimension 1 \(size 5\) at node 'scatter'"),
    (lambda m, x, y: torch.zeros(5, 8).index_add(0, y, x), None, 5, r"dimension 0 \(size 5\) at node 'index_add'"),
    (_bag, None, -1, "dimension 0 \\(size 5\\) at node 'embedding_bag'"),
    (lambda m, x, y: F.one_hot(y, 5) * m.head(x), None, 5, "5 classes at node 'one_hot'"),
    (lambda m, x, y: F.multi_margin_loss(m.head(x), y), None, -1, "dimension -1 \\(size 5\\) at node"),
    (lambda m, x, y: F.embedding(y, m.head.weight) + x, torch.long, -1, "an embedding of 5 rows"),
    (lambda m, x, y: F.cross_entropy(m.head(x), y), torch.long, 5, "5 classes at node 'cross_entropy_loss'"),
    (_contrastive, None, 4, "the batch's classes at node 'cross_entropy_loss'"),
])
def test_more_ops_reading_indices_are_bounded(use, cast, bad, what):
    """Before: these inputs were never checked (a differential run of losses and index ops): ONNX wrapped index −2
    around in scatter, index_add, embedding_bag and multi_margin_loss, gave one_hot an all-zero row for label 5,
    and read int32 ids made int64 in forward (``ids.long()``) as the embedding's last row, where eager raises."""
    model = Indexes(use, cast).eval()
    y = torch.tensor([0, 1, 2, 3], dtype=torch.int32 if cast else torch.long)
    _, sig = trace(model, (torch.randn(4, 8), y))
    sig.flatten((torch.randn(4, 8), y))
    bad_y = y.clone()
    bad_y[1] = bad
    with pytest.raises(Exception):
        model(torch.randn(4, 8), bad_y)
    with pytest.raises(fxforge.InputError, match=rf"^input 1 holds (indices|labels) from .* it indexes {what}"):
        sig.flatten((torch.randn(4, 8), bad_y))


class Counts(nn.Module):
    """Counts the values given (``shift=0``) or computed (``shift``: minus it) in at least 8 bins."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        return torch.bincount(x - self.shift if self.shift else x, minlength=8)


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnx"])
@pytest.mark.parametrize("shift", [0, 1])
def test_a_negative_value_in_a_bincount_is_refused_as_eager_refuses(backend, shift, tmp_path):
    """Before: bincount's values were no index read: the ONNX artifact counted −1 in the last bin (its ScatterElements
    wraps it around) where eager raises, and ONNX Runtime failed by itself naming its own node for −1001; the signature
    left a given −1 to eager's and TorchScript's kernels (a ``BackendError``). Expected: its values are bounded by
    [0, ∞) (``NO_HIGH``), given ones by the signature on every backend, computed ones by the guard after the run (a
    kernel that refuses them, eager's or TorchScript's, raises first), also from the saved artifact; the guard reads
    them clamped at 0, not mod a size, so a valid call at another batch, past the example's largest value, matches
    eager, bins beyond the minlength included."""
    model = Counts(shift)
    cm = fxforge.compile(model, (torch.tensor([0, 1, 1, 3, 7, 2]) + shift,), passes=["fuse"], backend=backend,
                         measure_latency=False)
    assert cm.signature.dynamic_batch
    loaded = fxforge.load(cm.save(tmp_path / "counts"))
    valid = torch.tensor([1, 2, 2, 20]) + shift
    for compiled in (cm, loaded):
        assert torch.equal(compiled(valid), model(valid))
    for bad in (torch.tensor([1, -1, 2]) + shift, torch.tensor([1, -1001, 2]) + shift):
        with pytest.raises(RuntimeError, match="non-negative"):
            model(bad)
        given = rf"^input 0 holds indices from {int(bad.min())} to \d+, but it indexes the bins of a bincount at node "
        computed = rf"^node 'bincount' reads indices the model computes from its inputs, from {int(bad.min()) - 1} to "
        kernel = r"^the \w+ artifact failed on inputs that match its signature: RuntimeError: bincount only supports "
        error, message = ((fxforge.InputError, given) if not shift else
                          (fxforge.InputError, computed) if backend == "onnx" else (fxforge.BackendError, kernel))
        for compiled in (cm, loaded):
            with pytest.raises(error, match=message + (r".*each must be in \[0, ∞\)" if error is fxforge.InputError
                                                       else "")):
                compiled(bad)


class OptionalState(nn.Module):
    """A recurrent wrapper whose initial state is optional: ``forward(x, *state)``."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 12, batch_first=True)

    def forward(self, x, *state):
        return self.rnn(x, *state)[0]


def test_a_varargs_forward_called_without_them_keeps_a_dynamic_batch():
    """Before: the dynamic shapes gave the empty ``*state`` an entry of its own, export counted one input more than
    it was given ("inputs has 1 elements, but dynamic_shapes has 2 elements") and the batch became static."""
    model = OptionalState().eval()
    cm = fxforge.compile(model, (torch.randn(2, 6, 8),), measure_latency=False)
    assert cm.signature.dynamic_batch, cm.signature.note
    x = torch.randn(3, 6, 8)
    torch.testing.assert_close(cm(x), model(x))


class Ctc(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 6)

    def forward(self, x, targets, input_lengths, target_lengths):
        return F.ctc_loss(self.head(x).log_softmax(2), targets, input_lengths, target_lengths)


def test_an_op_whose_output_shape_depends_on_values_is_named_without_unrelated_remedies():
    """Before: export's DynamicOutputShapeException came with remedies about control flow and static_batch=True
    (given static_batch=True, the same advice)."""
    example = (torch.randn(10, 2, 8), torch.randint(1, 6, (2, 4)), torch.tensor([10, 9]), torch.tensor([4, 3]))
    with pytest.raises(fxforge.TraceError, match=r"^torch.export could not capture the model: aten._ctc_loss.Tensor "
                                                 r"returns a shape that depends on its inputs' values, which a "
                                                 r"captured graph cannot hold \(at .*test_trace.py:\d+ in forward: "
                                                 r".*\); compute it outside the compiled model$"):
        fxforge.compile(Ctc().eval(), example, static_batch=True, measure_latency=False)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1)

    def forward(self, tgt, memory):
        return self.decoder(tgt, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]))


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)

    def forward(self, x, padding):
        return self.encoder(x, src_key_padding_mask=padding)


class ExportsOtherwise(PaddedEncoder):
    """An encoder whose fast path does not matter (no padding mask), in a forward that computes otherwise under
    export."""

    def forward(self, x):
        y = self.encoder(x)
        return y * 2 if torch.compiler.is_exporting() else y


def test_torchs_own_transformer_paths_are_named_with_their_remedies():
    """Before: a TransformerDecoder given a causal tgt_mask got "Could not guard on data-dependent expression" with
    remedies about control flow and static_batch=True (torch compares the mask with a causal one); a TransformerEncoder
    left with its nested-tensor fast path got "forward takes another path while exported", of a forward that does
    not. Each now names torch's path and the argument that avoids it."""
    with pytest.raises(fxforge.TraceError, match=r"^torch.export could not capture the model at .*test_trace.py:\d+ in "
                                                 r"forward: .*: nn.Transformer's layers compare a given mask with a "
                                                 r"causal one .*: pass tgt_is_causal= \(is_causal=, src_is_causal=\) "
                                                 r"with the mask$"):
        fxforge.compile(Decoder().eval(), (torch.randn(2, 5, 16), torch.randn(2, 7, 16)), measure_latency=False)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[:, -2:] = True
    with pytest.raises(fxforge.TraceError, match=r"nn.TransformerEncoder 'encoder' runs a padded batch as nested "
                                                 r"tensors in eager inference .*; build it with "
                                                 r"enable_nested_tensor=False$"):
        fxforge.compile(PaddedEncoder().eval(), (torch.randn(2, 6, 16), padding), measure_latency=False)
    with pytest.raises(fxforge.TraceError, match="forward takes another path while exported"):  # not the encoder's
        fxforge.compile(ExportsOtherwise().eval(), (torch.randn(2, 6, 16),), measure_latency=False)


class SoftLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 5)

    def forward(self, x, probabilities):
        return F.cross_entropy(self.head(x), probabilities)


def test_class_probabilities_as_a_losss_target_are_no_indices():
    _, sig = trace(SoftLoss().eval(), (torch.randn(4, 8), torch.softmax(torch.randn(4, 5), 1)))
    assert sig.index_bounds == ()


class ReshapesIds(nn.Module):
    """Reshapes its token ids before the embedding, as GPT-2 and OPT do (``input_ids.view(-1, seq)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 4)

    def forward(self, ids):
        return self.embed(ids.view(-1, ids.shape[-1]).clone().unsqueeze(0).squeeze(0))


def test_indices_read_through_a_reshape_are_bounded_too():
    """Before: the ids' only direct user is a view, and no bound was found (id −1 read the table's last row on ONNX,
    TVM read past it). Expected: the embedding's bound, found through the ops that only rearrange values; eager
    raises on such ids, and so does the compiled model, in one line."""
    model = ReshapesIds().eval()
    example = (torch.tensor([[1, 2, 3], [4, 5, 6]]),)
    _, sig = trace(model, example)
    assert sig.index_bounds == ((0, 0, 50, "an embedding of 50 rows"),)
    cm = fxforge.compile(model, example, backend="onnx", measure_latency=False)
    with pytest.raises(IndexError):
        model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(fxforge.InputError, match=r"^input 0 holds indices from -1 to 3, but it indexes an embedding"):
        cm(torch.tensor([[1, -1, 3]]))


class KeepsRows(nn.Module):
    """Selects rows with a boolean mask, reshaped first."""

    def forward(self, x, keep):
        return x[keep.view(-1)].sum(0)


def test_a_boolean_mask_gets_no_index_bound():
    """A boolean mask selects; its values 0 and 1 index nothing. Bounded like indices into a dimension of size 1
    (the batch at batch size 1), a True was refused, and such a model did not compile."""
    example = (torch.randn(3, 4), torch.tensor([[True], [False], [True]]))
    _, sig = trace(KeepsRows().eval(), example)
    assert sig.index_bounds == ()
    cm = fxforge.compile(KeepsRows().eval(), example, measure_latency=False)
    one = (torch.randn(1, 4), torch.tensor([[True]]))
    assert torch.equal(cm(*one), KeepsRows()(*one))


def test_a_mapping_that_is_not_a_dict_is_taken_as_one():
    """A tokenizer's output (``BatchEncoding``, a ``UserDict``) as the model's argument: pytree knows dicts only, and
    it was refused ("must be a tuple of tensors") where eager takes it; it compiles and calls as the dict it holds."""
    import collections

    class Keys(nn.Module):
        def forward(self, batch):
            return batch["x"] * 2 + batch["y"]

    batch = collections.UserDict({"x": torch.randn(2, 3), "y": torch.randn(2, 3)})
    cm = fxforge.compile(Keys().eval(), (batch,), measure_latency=False)
    again = collections.UserDict({"x": torch.randn(3, 3), "y": torch.randn(3, 3)})
    assert torch.equal(cm(again), again["x"] * 2 + again["y"])

    class Attributes(nn.Module):  # as a model reading a BatchEncoding's enc.x would
        def forward(self, batch):
            return batch.x * 2

    batch.x = batch["x"]
    with pytest.raises(fxforge.InputError, match=r"^the model does not run on the example inputs "
                                                 r"\[\[2, 3\], \[2, 3\]\]: "
                                                 r"'dict' object has no attribute 'x' \(a mapping argument, a "
                                                 r"tokenizer's BatchEncoding too, reaches the model as a plain dict, "
                                                 r"which torch.export takes: read it by key, \['x'\]\)$"):
        fxforge.compile(Attributes().eval(), (batch,), measure_latency=False)  # before: without what to do


def test_an_artifact_saved_with_embedding_rows_only_reads_back():
    """Artifacts saved before gather and index were bounded hold (input, rows) pairs."""
    _, sig = trace(nn.Embedding(50, 4).eval(), (torch.tensor([[1, 2]]),))
    saved = {**sig.to_dict(), "index_bounds": [[0, 50]]}
    assert type(sig).from_dict(saved).index_bounds == ((0, 0, 50, "an embedding of 50 rows"),)


class BranchesOnBatch(nn.Module):
    """Computes differently at batch 1 than at any other batch (the batch-2 export would take the other branch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * 2 if x.shape[0] > 1 else self.fc(x)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_model_branching_on_its_batch_size_is_served_the_branch_of_its_example(backend):
    model, x = BranchesOnBatch().eval(), torch.randn(1, 4)
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend=backend)
    assert not cm.signature.dynamic_batch and "branches on its batch size" in cm.report.meta["note"]
    for inputs in (x, torch.randn(1, 4)):
        torch.testing.assert_close(cm(inputs), model(inputs), rtol=1e-5, atol=1e-6)


def test_a_capture_that_cannot_reproduce_the_model_is_a_trace_error():
    class ExportsDifferently(nn.Module):
        def forward(self, x):
            return x * 2 if torch.compiler.is_exporting() else x

    with pytest.raises(fxforge.TraceError, match="does not reproduce the model on the example inputs"):
        trace(ExportsDifferently(), (torch.randn(2, 3),))


Pair = collections.namedtuple("Pair", "logits features")


class NamedOut(nn.Module):
    """Takes a namedtuple and returns one."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, p):
        y = self.l(p.logits) + p.features.sum(-1, keepdim=True)
        return Pair(y, y * 2)


def test_namedtuple_inputs_and_outputs_compile_and_round_trip_through_save(tmp_path):
    model = NamedOut().eval()
    example = Pair(torch.randn(2, 4), torch.randn(2, 5))
    cm = fxforge.compile(model, (example,), passes=["fuse"])
    x = Pair(torch.randn(3, 4), torch.randn(3, 5))
    out = cm(x)
    assert isinstance(out, Pair)
    torch.testing.assert_close(out.features, model(x).features)
    cm.save(tmp_path / "a")
    again = fxforge.load(tmp_path / "a")(x)
    assert isinstance(again, Pair)
    torch.testing.assert_close(again.logits, out.logits)


def test_a_saved_namedtuple_whose_class_now_has_other_fields_is_refused_on_load(tmp_path, monkeypatch):
    """A namedtuple is saved by its import path; loaded where its fields were reordered, the outputs filled them by
    position, silently (``out.logits`` holding the features)."""
    cm = fxforge.compile(NamedOut().eval(), (Pair(torch.randn(2, 4), torch.randn(2, 5)),), backend="eager",
                         measure_latency=False)
    path = cm.save(tmp_path / "a")
    monkeypatch.setattr(sys.modules[__name__], "Pair", collections.namedtuple("Pair", list(reversed(Pair._fields))))
    with pytest.raises(fxforge.ArtifactError, match=r"has fields \['features', 'logits'\] here, but the artifact "
                                                    r"was compiled with \['logits', 'features'\]"):
        fxforge.load(path)


def returning(fields: list[str]) -> nn.Module:
    """A model whose output namedtuple is defined inside a factory, as a model zoo or a notebook cell run again does:
    each call makes another class of the same import path."""
    Out = collections.namedtuple("Out", fields)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x):
            y = self.l(x)
            return Out(logits=y, probs=y.softmax(-1))

    return Model().eval()


def test_two_namedtuple_classes_of_one_import_path_keep_their_own_fields():
    """The second class compiled in a process was read back as the first, registered under the same path: its
    outputs were filled into the first class's fields by position (``out.logits`` held the probabilities) and every
    check passed."""
    x = torch.randn(2, 4)
    fxforge.compile(returning(["logits", "probs"]), (x,), measure_latency=False)
    model = returning(["probs", "logits"])
    out = fxforge.compile(model, (x,), measure_latency=False)(x)
    assert out._fields == ("probs", "logits")
    torch.testing.assert_close(out.logits, model(x).logits)


def test_a_saved_namedtuple_that_cannot_be_imported_is_named():
    from fxforge.compiler.errors import ArtifactError
    from fxforge.compiler.trace import _loads
    text = ('[1, {"type": "collections.namedtuple", "context": "nowhere_at_all.Gone", "children_spec": '
            '[{"type": null, "context": null, "children_spec": []}]}]')
    with pytest.raises(ArtifactError, match="nowhere_at_all.Gone"):
        _loads(text)


BOX_MODULE = """
import torch.utils._pytree as pytree

class Box:
    def __init__(self, value):
        self.value = value

pytree.register_pytree_node(Box, lambda b: ([b.value], None), lambda values, _: Box(values[0]),
                            serialized_type_name="fxforge_test_box_module.Box")
"""


def test_a_container_registered_by_its_module_is_imported_when_an_artifact_needs_it(tmp_path, monkeypatch):
    """A transformers model's artifact, called in a process that had not imported transformers, failed every call
    with a raw NotImplementedError after running the model: its output class is registered with pytree by
    transformers on import. The module named by the saved type is now imported; one that is not there is named."""
    from fxforge.compiler.errors import ArtifactError
    from fxforge.compiler.trace import _loads
    text = ('[1, {"type": "fxforge_test_box_module.Box", "context": "null", "children_spec": '
            '[{"type": null, "context": null, "children_spec": []}]}]')
    with pytest.raises(ArtifactError, match="hold fxforge_test_box_module.Box, which is not registered"):
        _loads(text)
    (tmp_path / "fxforge_test_box_module.py").write_text(BOX_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    box = pytree.tree_unflatten([3], _loads(text))
    assert type(box).__name__ == "Box" and box.value == 3


class TopScores(nn.Module):
    """Returns what ``torch.topk`` returns: a ``torch.return_types`` structseq, not a namedtuple."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 6)

    def forward(self, x):
        return torch.topk(self.l(x), 3, dim=-1)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_torch_return_type_output_compiles_and_loads_in_a_fresh_process(tmp_path, backend):
    """torch registers its return types with pytree under no serialized name: every compile of a model returning
    one failed with a raw NotImplementedError from ``treespec_dumps``."""
    model = TopScores().eval()
    cm = fxforge.compile(model, (torch.randn(2, 5, 6),), backend=backend, measure_latency=False)
    x = torch.randn(3, 5, 6)
    out = cm(x)
    assert isinstance(out, torch.return_types.topk)
    torch.testing.assert_close(out.values, model(x).values)
    assert torch.equal(out.indices, model(x).indices)
    path = cm.save(tmp_path / "a")
    code = (f"import fxforge, torch; out = fxforge.load({str(path)!r})(torch.zeros(1, 5, 6)); "
            "print(type(out).__name__, list(out.values.shape))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(fxforge.__file__).parents[1])})
    assert run.stdout.split("\n")[-2:] == ["topk [1, 5, 3]", ""], run.stderr


class DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 4)

    def forward(self, d):
        return self.l(d["a"]) + d["b"].sum(-1, keepdim=True)


def test_dict_inputs_are_matched_by_key_and_a_wrong_key_is_named():
    model = DictIn().eval()
    cm = fxforge.compile(model, ({"a": torch.randn(2, 8), "b": torch.randn(2, 3)},), passes=["fuse"])
    a, b = torch.randn(3, 8), torch.randn(3, 3)
    torch.testing.assert_close(cm({"b": b, "a": a}), model({"a": a, "b": b}))  # keys in another order
    with pytest.raises(fxforge.InputError, match=r"missing \['b'\], unexpected \['c'\]"):
        cm({"a": a, "c": b})


class QuerySupport(nn.Module):
    """Two inputs whose first dimensions are independent (a query set and a support set)."""

    def forward(self, x, y):
        return x.sum(0) / x.shape[0] + y.sum(0) / y.shape[0]


def test_inputs_sharing_the_example_batch_share_one_batch_dimension_and_a_call_must_keep_it():
    """Equal example batch sizes compile into one symbolic batch: a call whose inputs disagree there is refused (it
    ran, and returned wrong values), and inputs whose example sizes differ keep their own sizes."""
    cm = fxforge.compile(QuerySupport(), (torch.randn(2, 4), torch.randn(2, 4)), passes=["fuse"])
    assert [s.shape for s in cm.signature.inputs] == [(None, 4), (None, 4)]
    assert cm(torch.randn(3, 4), torch.randn(3, 4)).shape == (4,)
    with pytest.raises(fxforge.InputError, match="inputs 0 and 1 have batch sizes 3 and 5"):
        cm(torch.randn(3, 4), torch.randn(5, 4))
    apart = fxforge.compile(QuerySupport(), (torch.randn(2, 4), torch.randn(3, 4)), passes=["fuse"])
    assert [s.shape for s in apart.signature.inputs] == [(None, 4), (3, 4)]
    with pytest.raises(fxforge.InputError, match=r"input 1 has shape \[5, 4\], compiled for \[3, 4\]"):
        apart(torch.randn(2, 4), torch.randn(5, 4))


def test_token_ids_outside_the_embedding_are_refused_by_every_backend_and_after_loading(tmp_path):
    """PyTorch raises for an index outside the table, ONNX's Gather wraps a negative one around (a silent wrong
    row): the signature checks the inputs an embedding reads, for every backend and in a loaded artifact."""
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(56, 3)).eval()
    cm = fxforge.compile(model, (torch.randint(0, 50, (2, 7)),), passes=["fuse"], backend="onnx")
    assert cm.signature.index_bounds == ((0, 0, 50, "an embedding of 50 rows"),)
    loaded = fxforge.load(cm.save(tmp_path / "a"))
    for bad in (torch.full((3, 7), -1), torch.full((3, 7), 50)):
        for artifact in (cm, loaded):
            with pytest.raises(fxforge.InputError, match=r"indexes an embedding of 50 rows"):
                artifact(bad)
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(loaded(ids), model(ids))


class BranchesOnData(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_a_failed_export_prints_nothing_and_other_threads_keep_stderr(capsys):
    """Export prints a failed graph whole to stderr; capture dropped it by swapping ``sys.stderr`` for every thread,
    so another thread's warnings and progress bars vanished meanwhile. Only the exporting thread is silenced."""
    import threading
    stop, written = threading.Event(), []

    def chatter():
        while not stop.wait(0.001):
            print("other thread", file=sys.stderr)
            written.append(1)

    other = threading.Thread(target=chatter)
    other.start()
    try:
        with pytest.raises(fxforge.TraceError):
            trace(BranchesOnData(), (torch.randn(2, 3),))
    finally:
        stop.set()
        other.join()
    err = capsys.readouterr().err
    assert "def forward" not in err and err.count("other thread") == len(written) > 0



def test_two_threads_capturing_a_transformer_at_once_both_succeed():
    """A transformer encoder takes export's decomposition (the local rewrites do not apply to it), which traced
    outside the export lock: two threads capturing it at once failed 5 of 6 compiles with a TraceError blaming the
    model ("could not make its graph functional", or "could not capture ... replace data-dependent control flow")."""
    import threading
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    errors = []

    def capture():
        for _ in range(2):
            try:
                trace(model, (x,))
            except fxforge.FxforgeError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=capture) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

class ConvFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_a_channels_last_input_of_the_compiled_shape_runs_as_in_eager(backend):
    """Export captured the flatten of a contiguous example as a view, which a channels_last input of the same shape
    cannot take: the artifact refused a valid input (the eager one only until it was saved and loaded), and
    channels_last validation or calibration batches failed the compile."""
    model = ConvFlatten().eval()
    x = torch.randn(2, 3, 8, 8)
    layout = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend=backend, measure_latency=False,
                         validation=[(layout(torch.randn(4, 3, 8, 8)),)])
    x = layout(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        assert compare([cm(x)], [model(x)]).max_rel < 1e-5


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, extras):
        return self.fc(x) + extras[0].mean(1) + extras["b"].mean(1)


def test_a_wrong_input_inside_a_structure_is_named_by_where_it_sits():
    """"input 2" alone did not say which tensor of a tuple or dict argument was wrong."""
    model = Structured().eval()
    extras = {0: torch.randn(2, 3, 4), "b": torch.randn(2, 5, 4)}
    cm = fxforge.compile(model, (torch.randn(2, 4), extras), passes=["fuse"], measure_latency=False)
    with pytest.raises(fxforge.InputError, match=r"input 2 \(argument 1\['b'\]\) has shape \[2, 6, 4\], compiled "
                                                 r"for \[None, 5, 4\]"):
        cm(torch.randn(2, 4), {0: torch.randn(2, 3, 4), "b": torch.randn(2, 6, 4)})
    with pytest.raises(fxforge.InputError, match=r"^input 0 has shape \[2, 5\]"):
        cm(torch.randn(2, 5), extras)


class GradBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        with torch.no_grad():
            y = self.a(x)
        with torch.enable_grad():
            return self.b(y.relu())


def test_a_graph_export_cannot_make_functional_is_a_named_trace_error():
    """An enable_grad block after a no_grad one made torch's decomposition raise a raw IndexError at capture."""
    with pytest.raises(fxforge.TraceError, match="could not make its graph functional: IndexError"):
        fxforge.compile(GradBlocks().eval(), (torch.randn(4, 16),), backend="eager", measure_latency=False)


class WithScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))

    def forward(self, x):
        return self.a(x) + 1


def test_a_torchscript_submodule_is_named_with_what_to_pass_instead():
    """export failed on it with a message about a state-dict entry, followed by remedies that do not apply."""
    with pytest.raises(fxforge.TraceError, match="submodule 'a' is a TorchScript module.*pass the plain nn.Module"):
        fxforge.compile(WithScripted().eval(), (torch.randn(2, 8),), backend="eager", measure_latency=False)
    frozen = torch.jit.freeze(torch.jit.script(nn.Sequential(nn.Linear(8, 8)).eval()))  # has no .training
    with pytest.raises(fxforge.TraceError, match="the model is a TorchScript module"):
        fxforge.compile(frozen, (torch.randn(2, 8),), backend="eager", measure_latency=False)


class Doubled:
    """A callable object, not a function."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x) * 2


class ForwardObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.forward = Doubled(self.lin)


def test_a_forward_that_is_a_callable_object_is_named():
    """Before: "torch.export could not capture the model: 'Doubled' object has no attribute '__code__'", then
    remedies about control flow and the batch size that do not apply. A ``functools.partial`` is captured."""
    with pytest.raises(fxforge.TraceError, match="^the model's forward is a Doubled object, not a function: "
                                                 "torch.export reads the code of a function; define forward as a "
                                                 "method that calls it$"):
        fxforge.compile(ForwardObject().eval(), (torch.randn(2, 4),), backend="eager", measure_latency=False)
    model = nn.Linear(4, 4).eval()
    model.forward = functools.partial(nn.Linear.forward, model)
    cm = fxforge.compile(model, (torch.randn(2, 4),), backend="eager", measure_latency=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(cm(x), model(x))


class HalfAttention(nn.Module):
    """A pre-norm transformer block with nn.MultiheadAttention."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln, self.mha = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2, self.f1, self.f2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln(x)
        x = x + self.mha(h, h, h, need_weights=False)[0]
        return x + self.f2(torch.nn.functional.gelu(self.f1(self.ln2(x))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_captured_to_its_own_tolerance(dtype):
    """The capture check held every graph to float32's 1e-4: a float16 attention block, 4.8e-4 from the model by
    its own rounding (bfloat16: 3.3e-3), was refused with a cause about control flow."""
    torch.manual_seed(0)
    model, x = HalfAttention().eval().to(dtype), torch.randn(2, 6, 32, dtype=dtype)
    cm = fxforge.compile(model, (x,), measure_latency=False)
    assert cm(x).dtype == dtype


class WritesAndReturns(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)

    def forward(self, x):
        x.mul_(2)
        return self.a(x), x


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_a_write_into_the_input_that_is_returned_too_is_captured_as_a_function(backend):
    """The graph kept `copy_` into the input where the written input was also an output: the eager and TorchScript
    artifacts wrote into the caller's tensor, and compile refused the model as if it had random ops."""
    model, x = WritesAndReturns().eval(), torch.randn(2, 6)
    cm = fxforge.compile(model, (x.clone(),), backend=backend, measure_latency=False)
    kept = x.clone()
    y, written = cm(x)
    assert torch.equal(x, kept) and "input_writes_dropped" in cm.report.meta
    want = model(kept.clone())
    torch.testing.assert_close(y, want[0])
    torch.testing.assert_close(written, want[1])


def test_an_empty_batch_is_refused_without_a_false_cause():
    """An empty batch was refused saying eager PyTorch raises below batch size 1; it does not."""
    cm = fxforge.compile(nn.Linear(4, 3).eval(), (torch.randn(2, 4),), measure_latency=False)
    with pytest.raises(fxforge.InputError, match=r"^input 0 has batch size 0: a compiled model takes batches of 1 or "
                                                 r"more \(an empty batch has nothing to compute; skip the call\)$"):
        cm(torch.randn(0, 4))


@dataclasses.dataclass
class Scores:
    logits: torch.Tensor
    probs: torch.Tensor


pytree.register_dataclass(Scores)


@dataclasses.dataclass
class Unregistered:
    logits: torch.Tensor


class ReturnsDataclass(nn.Linear):
    def __init__(self, kind):
        super().__init__(4, 3)
        self.kind = kind

    def forward(self, x):
        y = super().forward(x)
        return Scores(y, y.softmax(-1)) if self.kind is Scores else Unregistered(y)


def test_a_registered_dataclass_output_compiles_and_saves(tmp_path):
    """torch.utils._pytree.register_dataclass registers no serialized name: every compile failed with a raw
    NotImplementedError from treespec_dumps."""
    model, x = ReturnsDataclass(Scores).eval(), torch.randn(2, 4)
    cm = fxforge.compile(model, (x,), backend="onnx", measure_latency=False)
    out = fxforge.load(cm.save(tmp_path / "a"))(x)
    assert isinstance(out, Scores)
    torch.testing.assert_close(out.probs, model(x).probs)


def test_a_dataclass_pytree_cannot_see_into_is_named():
    """Its tensors hidden in one leaf, the model was said to return no tensor."""
    with pytest.raises(fxforge.InputError, match="returns its tensors inside a Unregistered, which "
                                                 "torch.utils._pytree cannot see into: register the class"):
        fxforge.compile(ReturnsDataclass(Unregistered).eval(), (torch.randn(2, 4),))


class TakesAPair(nn.Module):
    def forward(self, pair):
        return pair[0] + pair[1]


def test_inputs_nested_otherwise_than_compiled_are_named_so():
    """A tuple given where a list was compiled: "expected 2 input tensor(s) shaped like [...], got" the same two."""
    x = torch.randn(2, 3)
    cm = fxforge.compile(TakesAPair(), ([x, x.clone()],), measure_latency=False)
    with pytest.raises(fxforge.InputError, match=r"nested as tuple\(tuple\(\*, \*\)\), but the model was compiled "
                                                 r"for tuple\(list\(\*, \*\)\)"):
        cm((x, x))




def test_artifacts_of_two_classes_of_one_namedtuple_path_load_in_one_process(tmp_path, monkeypatch):
    """The second class compiled under one path is saved as `path#2`; a process that loaded the first artifact
    (its class registered under `path`) could not load the second: a class is registered under one name."""
    import importlib
    (tmp_path / "fxforge_test_out_module.py").write_text(NAMEDTUPLE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fxforge_test_out_module as module
    x = torch.randn(2, 4)
    fxforge.compile(module.Model(4, 3).eval(), (x,), measure_latency=False).save(tmp_path / "a")
    module = importlib.reload(module)  # another class of the same path, as a notebook cell run again makes
    fxforge.compile(module.Model(4, 3).eval(), (x,), measure_latency=False).save(tmp_path / "b")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    code = (f"import torch, fxforge; x = torch.randn(2, 4); "
            f"print(fxforge.load({a!r})(x)._fields, fxforge.load({b!r})(x)._fields)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "('logits', 'probs') ('logits', 'probs')"


def test_exports_advice_about_torchs_own_tensor_attributes_is_not_passed_on():
    """Before: every nn.LSTM/GRU/RNN compile (and parametrized weights) showed torch.export's "The tensor attributes
    self.r._flat_weights[0] ... were assigned during export. Such attributes must be registered as buffers", about
    torch's own modules."""
    model = nn.Sequential(nn.LSTM(4, 5, batch_first=True)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace(model, (torch.randn(2, 3, 4),))
    assert not [w for w in caught if "assigned during export" in str(w.message)]
