"""TVM backend's Relax matmul layout rules (fxforge/backends/tvm/rewrites.py): a broadcast 2-D matmul weight is
read unbroadcast, reshapes sink below elementwise ops; Before/Expected modules, cases that must not fire, and
builds of the tiny BERT (static batch) against eager on fresh inputs."""
import re

import pytest
import torch

pytest.importorskip("tvm")
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.script import ir as I, relax as R  # noqa: E402

import fxforge  # noqa: E402
from fxforge.backends.tvm import lower as tvm_backend  # noqa: E402
from fxforge.backends.tvm.rewrites import matmul_layout  # noqa: E402
from fxforge.compiler.target import get_target  # noqa: E402
from fxforge.compiler.verify import compare, fresh_inputs  # noqa: E402
from models import ZOO  # noqa: E402


def _rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    return tvm.transform.Sequential([matmul_layout(), relax.transform.CanonicalizeBindings()])(mod)


def test_broadcast_weight_is_read_unbroadcast():
    """Before: matmul(broadcast_to(x), broadcast_to(W, [2, K, N])) (torch's matmul decomposition of a linear on a
    non-contiguous input). Expected: matmul(x, W), which Relax broadcasts itself."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8, 32), "float32"), w: R.Tensor((32, 16), "float32")):
            with R.dataflow():
                a = R.broadcast_to(x, R.shape([2, 8, 32]))
                b = R.broadcast_to(w, R.shape([2, 32, 16]))
                y = R.matmul(a, b, out_dtype="float32")
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8, 32), "float32"), w: R.Tensor((32, 16), "float32")):
            with R.dataflow():
                y = R.matmul(x, w, out_dtype="float32")
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(_rewrite(Before), Expected)


def test_broadcast_rows_or_batched_weight_are_left_alone():
    """The matmul broadcasts the rows over the weight's batch (x of batch 1: matmul(x, W) would have batch 1),
    the weight is a real batch of matrices, or a 2-D tensor broadcast along its columns too: no rewrite."""
    @I.ir_module
    class RowsBroadcast:
        @R.function
        def main(x: R.Tensor((1, 8, 32), "float32"), w: R.Tensor((32, 16), "float32")):
            with R.dataflow():
                b = R.broadcast_to(w, R.shape([2, 32, 16]))
                y = R.matmul(x, b, out_dtype="float32")
                R.output(y)
            return y

    @I.ir_module
    class Batched:
        @R.function
        def main(x: R.Tensor((2, 8, 32), "float32"), w: R.Tensor((1, 32, 16), "float32")):
            with R.dataflow():
                b = R.broadcast_to(w, R.shape([2, 32, 16]))
                y = R.matmul(x, b, out_dtype="float32")
                R.output(y)
            return y

    @I.ir_module
    class ColumnsBroadcast:  # a [32, 1] matrix broadcast along N too: matmul(x, v) would have one column
        @R.function
        def main(x: R.Tensor((2, 8, 32), "float32"), v: R.Tensor((32, 1), "float32")):
            with R.dataflow():
                b = R.broadcast_to(v, R.shape([2, 32, 16]))
                y = R.matmul(x, b, out_dtype="float32")
                R.output(y)
            return y

    for mod in (RowsBroadcast, Batched, ColumnsBroadcast):
        tvm.ir.assert_structural_equal(_rewrite(mod), mod)


def test_reshapes_sink_below_gelu_and_a_residual_add():
    """Before: a linear's [16, 64] output reshaped to [2, 8, 64], GELU, residual add, reshaped back to [16, 64].
    Expected: GELU and the add on [16, 64] (the residual reshaped to it), the two reshapes gone."""
    @I.ir_module
    class Before:
        @R.function
        def main(y: R.Tensor((16, 64), "float32"), z: R.Tensor((2, 8, 64), "float32")):
            with R.dataflow():
                r = R.reshape(y, R.shape([2, 8, 64]))
                g = R.nn.gelu(r)
                s = R.add(z, g)
                o = R.reshape(s, R.shape([16, 64]))
                R.output(o)
            return o

    @I.ir_module
    class Expected:
        @R.function
        def main(y: R.Tensor((16, 64), "float32"), z: R.Tensor((2, 8, 64), "float32")):
            with R.dataflow():
                g = R.nn.gelu(y)
                z2 = R.reshape(z, R.shape([16, 64]))
                o = R.add(z2, g)
                R.output(o)
            return o

    tvm.ir.assert_structural_equal(_rewrite(Before), Expected)


def test_reshape_before_a_broadcast_operand_or_a_reduction_stays():
    """An add whose other operand broadcasts (a bias of [64]) and a softmax are not moved across the reshape."""
    @I.ir_module
    class Before:
        @R.function
        def main(y: R.Tensor((16, 64), "float32"), b: R.Tensor((64,), "float32")):
            with R.dataflow():
                r = R.reshape(y, R.shape([2, 8, 64]))
                s = R.add(r, b)
                o = R.nn.softmax(s, axis=-1)
                R.output(o)
            return o

    tvm.ir.assert_structural_equal(_rewrite(Before), Before)


@pytest.fixture(scope="module")
def bert():
    model, example = ZOO["bert"]()  # transformers BertModel: attention output projection on a transposed input
    return model, example


def test_bert_output_projection_reads_one_weight_and_gelu_joins_its_matmul(bert):
    model, example = bert
    gm, _ = fxforge.trace(model, example, static_batch=True)
    tgt = tvm_backend.tvm_target(get_target("x86"))
    imported = tvm_backend.relax_module(gm, example)
    assert re.search(r"R\.broadcast_to\(lv\d+, R\.shape\(\[2, \d+, \d+\]\)\)\n.*R\.matmul", imported.script())
    mod = tvm_backend.prepare(imported, tgt)
    names = [gv.name_hint for gv in mod.functions]
    assert any(re.fullmatch(r"fused_matmul\d*_add\d*_gelu\d*", n) for n in names), names  # GELU in the epilogue
    assert not any("gelu" in n and "matmul" not in n for n in names), names
    weights = [[int(d) for d in c.ty.shape.values] for c in _constants(mod["main"])]
    assert [64, 64] in weights and [2, 64, 64] not in weights, weights  # no weight copied per batch element


def test_bert_static_build_matches_eager(bert):
    model, example = bert
    cm = fxforge.compile(model, example, passes=["fuse"], backend="tvm", static_batch=True, measure_latency=False)
    for seed in (1, 2):
        inputs = fresh_inputs(example, seed=seed)
        with torch.no_grad():
            assert compare([cm(*inputs)], [model(*inputs)]).max_rel < 1e-4


def _constants(func: relax.Function) -> list:
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, tvm.ir.expr.GenericConst) else None)
    return found
