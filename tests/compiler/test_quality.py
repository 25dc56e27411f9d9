"""compile(..., validation=, metric=): the report's error columns come from the user's data."""
import pytest
import torch
import torch.fx as fx
from torch import nn

import fxforge
from fxforge.compiler.quality import Validation, _sample_cosines, flat_batches, reiterable
from fxforge.compiler.report import SYNTHETIC
from fxforge.compiler.verify import compare
from models import digits_cnn


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_sample_with_a_non_finite_value_its_reference_lacks_is_wrong_as_compare_finds_it():
    """Before: a reference sample holding NaN, +inf and -inf; Expected: a sample with the same non-finite values is
    measured on its finite rest (cosine 1), and each sample with one non-finite value moved, changed or added gets
    cosine 0, exactly where compare calls that sample infinitely wrong (one rule for both)."""
    nan, inf = float("nan"), float("inf")
    reference = [nan, inf, -inf, 2.0, 4.0]
    samples = [reference, [2.0, inf, -inf, 2.0, 4.0], [nan, -inf, -inf, 2.0, 4.0], [nan, inf, nan, 2.0, 4.0],
               [nan, inf, -inf, nan, 4.0], [nan, inf, -inf, 2.0, inf]]
    out, ref = torch.tensor(samples), torch.tensor([reference] * len(samples))
    cosines = _sample_cosines([out], [ref], len(samples))
    assert cosines.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert [compare([o], [r]).max_rel == float("inf") for o, r in zip(out, ref)] == [c == 0 for c in cosines]


def test_cosines_are_per_sample_and_top1_counts_matching_argmaxes():
    """Before: the reference outputs; Expected: a stage that flips one sample's sign and swaps another's top
    class shows cosine -1 for that sample, the mean over samples, and 2 of 4 top-1 agreements."""
    x = torch.tensor([[3.0, 1.0], [1.0, 2.0], [4.0, 0.0], [0.5, 1.0]])
    v = Validation.from_user([(x,)], lambda b: list(b), metric="agreement")
    reference = v.measure(lambda t: t)
    assert (reference.cosine_min, reference.cosine_mean) == pytest.approx((1.0, 1.0))
    assert (reference.top1, reference.max_rel) == (1.0, 0.0)
    changed = x.clone()
    changed[1] = -changed[1]      # cosine -1, argmax 1 → 0
    changed[3] = torch.tensor([1.0, 0.5])  # cosine 0.8, argmax 1 → 0
    q = v.measure(lambda t: changed)
    assert q.cosine_min == pytest.approx(-1.0) and q.cosine_mean == pytest.approx((1 - 1 + 1 + 0.8) / 4)
    assert q.top1 == 0.5 and q.metric == 0.5
    assert q.max_rel == pytest.approx(4.0 / 4.0)  # |2 - (-2)| over max |reference|


def test_unit_rows_are_embeddings_without_top1():
    e = nn.functional.normalize(torch.randn(6, 8), dim=1)
    v = Validation.from_user([(e,)], lambda b: list(b), metric="cosine")
    q = v.measure(lambda t: t)
    assert q.top1 is None and q.metric == q.cosine_mean == pytest.approx(1.0)
    with pytest.raises(fxforge.InputError, match="'agreement' needs classifier logits: the first output's rows are "
                                                 "unit vectors"):
        Validation.from_user([(e,)], lambda b: list(b), metric="agreement").measure(lambda t: t)


def test_integer_outputs_score_exact_matches():
    """Class ids alone (a model returning its argmax) are a classifier's output: top-1 is the share of equal ids."""
    x = torch.randn(4, 3)
    v = Validation.from_user([(x,)], lambda b: list(b), metric=None)
    assert v.measure(lambda t: t.argmax(1)).cosine_min == 1.0
    q = v.measure(lambda t: (t.argmax(1) + 1) % 3)
    assert (q.cosine_min, q.top1) == (0.0, 0.0)
    assert v.measure(lambda t: torch.where(torch.arange(4) < 1, (t.argmax(1) + 1) % 3, t.argmax(1))).top1 == 0.75


@pytest.fixture(scope="module")
def digits():
    model, (x_train, _, x_test, y_test) = digits_cnn()
    calibration = [(x_train[i:i + 200],) for i in range(0, 1400, 200)]
    validation = [(x_test[:200],), (x_test[200:],)]
    return model, calibration, validation, x_test, y_test



@pytest.mark.parametrize("sizes, says", [((25, 25, 25), "a bound for batches of 25 samples"),
                                         ((3, 97, 20), "measured on batches of 3-97 samples: a larger batch exceeds it"),
                                         ((40,), "one batch: max err is a sample")])
def test_the_error_line_says_which_batch_sizes_its_max_err_bounds(sizes, says):
    """``max|a − b| / max|b|`` of a batch is a maximum over its values, larger in a larger batch: a bound stated from
    batches of 25 was exceeded by 80 % of batches of 200 (the int8 wide digits CNN). The line names the sizes."""
    data = [(torch.randn(n, 4),) for n in sizes]
    line = Validation(data, data, None).describe()
    assert line.startswith(f"measured on validation data ({sum(sizes)} samples in {len(sizes)} batches)")
    assert says in line

def test_validation_data_changes_the_report_error_columns(digits):
    model, calibration, validation, x_test, _ = digits
    synthetic = fxforge.compile(model, (x_test[:4],), passes=["int8"], calibration=calibration)
    real = fxforge.compile(model, (x_test[:4],), passes=["int8"], calibration=calibration, validation=validation)
    assert synthetic.report.meta["errors"] == SYNTHETIC and "N(0,1)" in str(synthetic.report)
    assert real.report.meta["errors"].startswith("measured on validation data (397 samples in 2 batches)")
    s, r = synthetic.report.final, real.report.final
    assert s.cosine_mean is None and s.top1 is None and "top-1" not in str(synthetic.report)
    assert r.cosine != s.cosine and r.max_rel_err != s.max_rel_err
    assert "min cos" in str(real.report) and "top-1" in str(real.report)
    with torch.no_grad():  # the backend row's agreement is the compiled model's, recomputed here
        agree = (real(x_test).argmax(1) == model(x_test).argmax(1)).float().mean().item()
    assert r.top1 == pytest.approx(agree) and r.top1 > 0.97 and r.cosine_mean > 0.99
    first = real.report.rows[0]
    assert (first.stage, first.max_rel_err, first.top1) == ("input", 0.0, 1.0)


def test_a_wrong_quality_compile_is_visible_in_the_error_columns(digits):
    """Pruning half the channels of the trained CNN with no fine-tuning destroys it, and the report says so."""
    model, _, validation, x_test, _ = digits
    good = fxforge.compile(model, (x_test[:4],), passes=["fuse"], validation=validation, measure_latency=False)
    bad = fxforge.compile(model, (x_test[:4],), passes=["fuse", "prune_channels{ratio=0.5}"],
                          validation=validation, measure_latency=False)
    assert good.report.final.top1 == 1.0 and good.report.final.cosine > 0.9999
    pruned = bad.report.row("prune_channels")
    assert pruned.top1 < 0.5 and pruned.cosine_mean < 0.5 and bad.report.final.top1 < 0.5


def test_metric_callable_sees_outputs_and_inputs_in_order(digits):
    model, _, validation, x_test, y_test = digits
    seen = []

    def accuracy(outputs, inputs):
        seen.append([len(i[0]) for i in inputs])
        return float((torch.cat(outputs).argmax(1) == y_test).float().mean())

    cm = fxforge.compile(model, (x_test[:4],), passes=["fuse"], validation=validation, metric=accuracy,
                         measure_latency=False)
    with torch.no_grad():
        fp32 = float((model(x_test).argmax(1) == y_test).float().mean())
    assert cm.report.rows[0].metric == pytest.approx(fp32) and cm.report.final.metric == pytest.approx(fp32)
    assert seen[0] == [200, 197] and "metric: accuracy" in cm.report.meta["errors"]


@pytest.mark.parametrize("kwargs, message", [
    ({"metric": "accuracy", "validation": [(torch.ones(2, 4),)]}, "metric must be None, 'agreement' or 'cosine'"),
    ({"metric": "cosine"}, "metric= needs validation data"),
    ({"validation": []}, "validation is empty"),
    ({"validation": 3}, "validation must be an iterable of input tuples, got int"),
    ({"validation": [(torch.ones(2, 5),)]}, r"validation batch 0: input 0 has shape \[2, 5\]"),
    ({"validation": [(torch.full((2, 4), float("nan")),)]}, "validation batch 0 holds NaN or Inf"),
    ({"validation": [(torch.ones(2, 4),)], "metric": lambda o, i: 1 / 0}, "the metric callable failed: ZeroDivision"),
])
def test_bad_validation_or_metric_is_a_one_line_input_error(kwargs, message):
    with pytest.raises(fxforge.InputError, match=message) as e:
        fxforge.compile(Identity(), (torch.ones(2, 4),), measure_latency=False, **kwargs)
    assert "\n" not in str(e.value)


def test_train_data_is_read_like_validation_data():
    """One helper flattens validation and train batches: a bare tensor is a 1-tuple, errors name the batch, and
    NaN or Inf is refused for both (measuring or training on it gives NaN)."""
    x = torch.ones(2, 4)
    batches, flat = flat_batches([x, (x * 2,)], lambda b: list(b), "train")
    assert [len(b) for b in batches] == [1, 1] and torch.equal(flat[1][0], x * 2)
    for kind in ("validation", "train"):
        with pytest.raises(fxforge.InputError, match=f"^{kind} batch 1 holds NaN or Inf$"):
            flat_batches([(x,), (torch.full((2, 4), float("inf")),)], lambda b: list(b), kind)
        with pytest.raises(fxforge.InputError, match=f"^{kind} must be an iterable of input tuples, got int$"):
            flat_batches(3, lambda b: list(b), kind)
    with pytest.raises(fxforge.InputError, match="train batch 0 holds NaN or Inf"):
        fxforge.compile(Identity(), (x,), passes=["low_rank", "distill"], train=[(x * float("nan"),), (x,)])


def test_a_graph_measured_before_is_not_run_again_even_as_a_copy():
    """The budget's final pipeline repeats the stages before its quantizer on copies of the same graphs: each ran
    all the validation data again. A copy with one constant changed runs."""
    import copy

    from fxforge.compiler.graph import content_key
    from fxforge.compiler.trace import trace

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    gm = trace(model, (torch.randn(2, 8),))[0]
    batches = [(torch.randn(16, 8),) for _ in range(3)]
    v = Validation(batches, batches, None)
    first = v.measure(gm)
    twin, calls = copy.deepcopy(gm), []
    twin.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert v.measure(twin) == first and not calls
    weight = next(n.target for n in twin.graph.nodes if n.op == "get_attr")
    with torch.no_grad():
        twin.get_parameter(weight).mul_(1.5)
    assert v.measure(twin).cosine_mean < 1 and len(calls) == 3
    out = next(n for n in twin.graph.nodes if n.op == "output")  # a Python function: its closure is not in the text
    last = out.all_input_nodes[0]
    with twin.graph.inserting_before(out):
        doubled = twin.graph.call_function(lambda t: t * 2, (last,))
    out.replace_input_with(last, doubled)
    twin.recompile()
    assert content_key(twin) is None


class Table(nn.Module):
    """Returns its table as is beside a projection: the output is a view of a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 4)
        self.register_buffer("table", torch.randn(1, 5))

    def forward(self, x):
        return self.l(x), self.table.expand(x.shape[0], -1)


def test_a_reference_output_that_is_a_view_of_a_constant_does_not_change_with_it():
    """The reference outputs were kept as the graph returned them: a constant returned as a view and then edited
    in place (a pass scaling it) changed the reference too, and every later stage measured itself at error 0."""
    from fxforge.compiler.graph import get_tensor
    from fxforge.compiler.trace import trace

    gm = trace(Table().eval(), (torch.randn(2, 8),))[0]
    batches = [(torch.randn(4, 8),) for _ in range(2)]
    v = Validation(batches, batches, None)
    assert v.measure(gm).max_rel == 0
    table = next(n for n in gm.graph.nodes if n.op == "get_attr" and get_tensor(gm, n).shape == (1, 5))
    with torch.no_grad():
        get_tensor(gm, table).mul_(2)
    assert v.measure(gm).max_rel == pytest.approx(1)  # the table doubled: |2t - t| / |t|


@torch.library.custom_op("fxforge_test::scaled", mutates_args=())
def _scaled(t: torch.Tensor) -> torch.Tensor:
    return t * SCALE[0]


_scaled.register_fake(lambda t: torch.empty_like(t))
SCALE = [1.0]


class Attention(nn.Module):
    def forward(self, x):
        return nn.functional.scaled_dot_product_attention(x, x, x)


def test_content_key_tells_apart_constant_layouts_and_has_none_for_a_users_operator():
    """Two graphs got one key where they compute otherwise: constants of equal values in other strides (what
    ``as_strided`` reads), and a user's custom operator, whose Python body may read state of its own. Such calls,
    writes and random draws make a graph impure (``pure_calls``): a value computed once cannot stand in for another
    run's."""
    from fxforge.compiler.graph import content_key, pure_calls
    from fxforge.compiler.ops import aten, is_op

    def graph(weight: torch.Tensor, op=None) -> fx.GraphModule:
        root = nn.Module()
        root.register_buffer("w", weight)
        g = fx.Graph()
        w = g.get_attr("w")
        g.output(g.call_function(op, (w, [2, 3], [1, 2])) if op is aten.as_strided.default else
                 g.call_function(op, (w,)) if op else w)
        return fx.GraphModule(root, g)

    w = torch.arange(6.0).reshape(2, 3)
    transposed = w.t().contiguous().t()
    assert torch.equal(w, transposed) and content_key(graph(w)) != content_key(graph(transposed))
    assert content_key(graph(w, aten.as_strided.default)) is None
    assert content_key(graph(w, aten.relu.default)) is not None
    assert content_key(graph(w, torch.ops.fxforge_test.scaled.default)) is None
    assert content_key(graph(w, aten.bernoulli.default)) is None  # random: another run, other outputs
    for op, pure in [(aten.relu.default, True), (torch.ops.fxforge_test.scaled.default, False),
                     (aten.bernoulli.default, False), (aten.relu_.default, False)]:  # relu_ writes its argument
        assert pure_calls(graph(w, op)) is pure, op
    attention = fxforge.trace(Attention(), (torch.randn(2, 2, 3, 8),))[0]
    assert is_op(list(attention.graph.nodes)[1], aten.scaled_dot_product_attention)
    assert pure_calls(attention)  # tagged random by PyTorch, without dropout it is not


class Refilling:
    """A loader that copies each batch into one buffer it reuses (a prefetcher, ``torch.from_numpy`` over one
    array): a reader that keeps the batches it reads must copy them."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.buffer = batches, torch.empty_like(batches[0])

    def __iter__(self):
        for b in self.batches:
            self.buffer.copy_(b)
            yield (self.buffer,)


def test_batches_of_a_loader_refilling_one_buffer_are_kept_as_read():
    """Data from a loader that refills one buffer, as compile hands it to its readers (``reiterable``): each batch
    kept by validation or by a pass holds its own values (every kept batch was the last one, and the budget held on
    copies of one batch), on every reading; a list is the user's, neither copied nor capped."""
    from fxforge.passes.lib.qdq import checked_batches
    batches = [torch.full((2, 3), float(i)) for i in range(4)]
    _, flat = flat_batches(reiterable(Refilling(batches), "validation"), lambda b: list(b), "validation")
    assert [float(f[0][0, 0]) for f in flat] == [0.0, 1.0, 2.0, 3.0]
    data = reiterable(Refilling(batches), "calibration")
    for _ in range(2):
        kept = list(checked_batches(data, (batches[0],)))
        assert [float(b[0][0, 0]) for b in kept] == [0.0, 1.0, 2.0, 3.0]
    given = [(b,) for b in batches]
    assert reiterable(given, "calibration") is given


def test_an_endless_iterable_is_refused_past_the_read_limit(monkeypatch):
    """An endless generator given as data was read without end, its memory growing: past ``READ_LIMIT`` batches
    it is a named error saying how to bound it; a list of more batches is the user's to give."""
    import itertools
    from fxforge.compiler import quality
    monkeypatch.setattr(quality, "READ_LIMIT", 5)
    endless = ((torch.randn(2, 3),) for _ in itertools.count())
    with pytest.raises(fxforge.InputError, match=r"train data gave more than 5 batches \(an endless iterable\?\)"):
        reiterable(endless, "train")
    assert len(reiterable(((torch.randn(2, 3),) for _ in range(5)), "train")) == 5
    assert len(reiterable([(torch.randn(2, 3),)] * 9, "train")) == 9


def test_a_metric_callable_writing_into_its_arguments_changes_nothing_of_compiles(digits):
    """A metric normalizing in place got the user's validation tensors, which every later stage runs on, and the
    outputs kept as the reference: an exact pass was blamed for the change. It gets copies: the compile's rows are
    those of a metric that writes nothing, and the user's batches are as they were."""
    model, _, _, x, _ = digits
    validation = [(x[i:i + 16].clone(),) for i in range(0, 64, 16)]
    before = [b[0].clone() for b in validation]

    def scaled(outputs, inputs):
        for b in inputs:
            b[0].mul_(2)
        for o in outputs:
            o.mul_(-1)
        return 1.0

    cm = fxforge.compile(model, (x[:16],), passes=["fuse_batchnorm"], validation=validation, metric=scaled,
                         measure_latency=False)
    assert all(torch.equal(b[0], a) for b, a in zip(validation, before))
    assert all(r.max_rel_err < 1e-4 and r.metric == 1.0 for r in cm.report.rows)


class Masked(nn.Module):
    def forward(self, x, mask):
        return torch.relu(x) * mask


def test_constant_calibration_data_is_pointed_out():
    """Calibration data whose every input tensor holds one value (all zeros) tells the passes nothing of real
    inputs: low_rank's error cap held on it while the model's error on real inputs was 40× the cap. A constant
    mask beside varying data is data."""
    import warnings
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with pytest.warns(UserWarning, match="every input tensor of the calibration data holds one value"):
        fxforge.compile(model, (torch.randn(2, 8),), passes=["insert_qdq", "calibrate"],
                        calibration=[(torch.zeros(2, 8),)] * 4, measure_latency=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxforge.compile(Masked().eval(), (torch.randn(2, 8), torch.ones(2, 8)), passes=["insert_qdq", "calibrate"],
                        calibration=[(torch.randn(2, 8), torch.ones(2, 8))] * 4, measure_latency=False)
