"""TVM backend: x86 builds match eager (dynamic batch, save/load), int8 QDQ graphs match the eager int8 graph,
ops the frontend lacks become a BackendError, arm64 gives an AArch64 NEON library, cuda gives CUDA kernels."""
import json
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxforge
from fxforge.backends.tvm import lower as tvm_backend
from fxforge.backends.base import get_backend
from fxforge.compiler.target import get_target
from fxforge.compiler.trace import trace
from fxforge.compiler.verify import compare, fresh_inputs
from models import ZOO, Mystery, zoo_params

qd = torch.ops.quantized_decomposed
EM_AARCH64 = 183  # ELF e_machine of AArch64


@pytest.fixture(scope="module")
def convbnrelu():
    model, (x,) = ZOO["convbnrelu"]()  # batch 2, 3×16×16
    return model, x, fxforge.compile(model, (x,), passes=["fuse"], backend="tvm", measure_latency=False)


def test_x86_matches_eager_at_any_batch(convbnrelu):
    model, x, cm = convbnrelu
    assert cm.signature.dynamic_batch and cm.report.final.stage == "backend:tvm"
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            assert compare([cm(xb)], [model(xb)]).max_rel < 1e-4


def test_mlp_matches_eager():
    model, example = ZOO["mlp"]()
    cm = fxforge.compile(model, example, passes=["fuse"], backend="tvm", measure_latency=False)
    inputs = fresh_inputs(example, seed=3)
    with torch.no_grad():
        assert compare([cm(*inputs)], [model(*inputs)]).max_rel < 1e-4


def test_save_load_round_trip_matches_in_memory(convbnrelu, tmp_path, capfd):
    _, x, cm = convbnrelu
    capfd.readouterr()
    path = cm.save(tmp_path / "cbr")
    assert "Scope Saving" not in capfd.readouterr().err  # TVM's empty per-scope warnings are dropped
    meta = json.loads((path / "fxforge.json").read_text())
    assert meta["backend"] == "tvm" and set(meta["files"]) == {"model.so", "report.json"}
    loaded = fxforge.load(path)
    xb = torch.randn(5, *x.shape[1:])
    torch.testing.assert_close(loaded(xb), cm(xb), rtol=0, atol=0)
    assert loaded.executable is not None  # loaded through tvm.runtime.load_module on first call
    assert "Scope Loaded" not in capfd.readouterr().err


def test_inputs_off_a_64_byte_boundary_run(convbnrelu):
    """TVM's zero-copy input takes 64-byte aligned data only; a slice (or an array numpy loaded from a file,
    as ``fxforge run`` does) starts anywhere."""
    model, x, cm = convbnrelu
    shifted = torch.randn(x.numel() + 1)[1:].view(x.shape)
    assert shifted.data_ptr() % 64 != 0
    with torch.no_grad():
        torch.testing.assert_close(cm(shifted), model(shifted), rtol=1e-4, atol=1e-4)


def test_a_lazily_negated_input_runs_as_its_values(convbnrelu, tmp_path):
    """``torch._neg_view`` (or the ``.imag`` of a conjugated tensor) keeps −x as x's memory and a bit; DLPack hands
    TVM the memory without the bit, and the artifact computed the model on −x, silently. Sliced, it is also off
    TVM's 64-byte boundary (``_aligned`` clones it, and a clone keeps the bit)."""
    _, x, cm = convbnrelu
    loaded = fxforge.load(cm.save(tmp_path / "cbr"))
    t = torch.randn(x.shape[0] + 1, *x.shape[1:])
    for negated in (torch._neg_view(t[1:]), torch._neg_view(t)[1:]):
        assert negated.is_neg() and negated.is_contiguous()
        for artifact in (cm, loaded):
            torch.testing.assert_close(artifact(negated), cm(-t[1:]), rtol=0, atol=0)


def test_default_cpu_schedule_parallelizes_and_vectorizes():
    model, (x,) = ZOO["convbnrelu"]()
    gm, _ = fxforge.trace(model, (x,))
    tgt = tvm_backend.tvm_target(get_target("x86"))
    mod = tvm_backend.schedule(tvm_backend.prepare(tvm_backend.relax_module(gm, (x,)), tgt), tgt)
    convs = [f.script() for gv, f in mod.functions.items() if gv.name_hint.startswith("fused_conv2d")]
    assert convs and all("T.parallel(" in s and "T.vectorized(" in s for s in convs)


@pytest.mark.parametrize("target, lanes", [("x86-avx2", 8), ("x86-avx512", 16)])
def test_default_cpu_schedule_uses_the_targets_vector_width(target, lanes):
    model, (x,) = ZOO["mlp"]()  # linears 32→64→10: the 64 outputs are vectorized, the 10 are not
    gm, _ = fxforge.trace(model, (x,))
    tgt = tvm_backend.tvm_target(get_target(target))
    mod = tvm_backend.schedule(tvm_backend.prepare(tvm_backend.relax_module(gm, (x,)), tgt), tgt)
    matmuls = "".join(f.script() for gv, f in mod.functions.items() if gv.name_hint.startswith("fused_matmul"))
    assert set(re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", matmuls)) == {str(lanes)}


def test_register_tile_is_three_vectors_wide_where_eight_rows_still_fit():
    """AVX-512 (16 lanes, 24 accumulators): 8 rows × 48 columns where 48 divides N (11 loads per 24 FMAs instead
    of 10 per 16), else 8 × 32; AVX2 (8 lanes, 12 accumulators) keeps two vectors (a 24-wide tile fits 4 rows)."""
    from fxforge.backends.tvm.schedules import _tile
    assert _tile(512, 1536, 16, 24) == (8, 48) and _tile(128, 384, 16, 24) == (8, 48)
    assert _tile(512, 256, 16, 24) == (8, 32)
    assert _tile(512, 384, 8, 12) == (4, 16)


class _Norms(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)

    def forward(self, x: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm(x), torch.softmax(scores, -1)


def test_default_cpu_schedule_vectorizes_row_reductions():
    """Before: layer norm's sums and softmax's max and sum of exps are scalar loops over each row. Expected: each
    reduction accumulates 16 lanes per row (an rfactor buffer [..., 16], vectorized) and sums them once, rows in
    parallel; and the build matches eager."""
    model, example = _Norms().eval(), (torch.randn(2, 8, 64), torch.randn(2, 4, 8, 32))
    gm, _ = fxforge.trace(model, example, static_batch=True)
    tgt = tvm_backend.tvm_target(get_target("x86-avx512"))
    mod = tvm_backend.schedule(tvm_backend.prepare(tvm_backend.relax_module(gm, example), tgt), tgt)
    funcs = {gv.name_hint: f.script() for gv, f in mod.functions.items() if gv.name_hint != "main"}
    reductions = re.findall(r'T\.sblock\("(\w+)_rf_update"\)', "".join(funcs.values()))
    assert len(reductions) == 4, (reductions, sorted(funcs))  # two sums of layer norm, max and sum of softmax
    for script in funcs.values():
        assert re.search(r"_rf = T\.sblock_alloc_buffer\(\(T\.int64\(\d+\), T\.int64\(\d+\), (T\.int64\(\d+\), )?"
                         r"T\.int64\(16\)\)\)", script)
        assert "T.parallel(" in script and "T.vectorized(T.int64(16))" in script
    compiled = fxforge.compile(model, example, passes=[], backend="tvm", target="x86", static_batch=True,
                               measure_latency=False)
    fresh = (torch.randn(2, 8, 64) * 3 + 1, torch.randn(2, 4, 8, 32) * 5)
    with torch.no_grad():
        assert compare(list(compiled(*fresh)), list(model(*fresh))).max_rel < 1e-5


class _Ffn(torch.nn.Module):
    """A transformer FFN (linear, GELU, linear) and, beside it, a matmul of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.down(torch.nn.functional.gelu(self.up(x)))
        return y, y @ x.transpose(-1, -2)


def _scheduled(model: torch.nn.Module, x: torch.Tensor, target: str) -> "tvm.IRModule":
    gm, _ = fxforge.trace(model, (x,), static_batch=True)
    tgt = tvm_backend.tvm_target(get_target(target))
    return tvm_backend.schedule(tvm_backend.prepare(tvm_backend.relax_module(gm, (x,)), tgt), tgt)


def test_default_cpu_schedule_packs_constant_weights_at_build_time():
    """Before: matmul(x, W) reads W as K rows of N. Expected: it reads W packed into [N/32, K, 32] panels (a
    constant in main: the packing ran at build time and no packing function is left), the bias is computed in
    the tile's write-back; the matmul of two activations is not packed."""
    mod = _scheduled(_Ffn().eval(), torch.randn(2, 32, 64), "x86-avx512")
    funcs = {gv.name_hint: f.script() for gv, f in mod.functions.items() if gv.name_hint != "main"}
    packed = {n: s for n, s in funcs.items() if n.endswith("_prepacked")}
    assert len(packed) == 2, sorted(funcs)
    text = "".join(packed.values())
    for panels, k in ((8, 64), (2, 256)):  # 256 outputs from 64 inputs, 64 from 256
        assert f"param_0_global: T.Buffer((T.int64({panels}), T.int64({k}), T.int64(32))" in text
    assert all("T.parallel(" in s and "T.vectorized(" in s for s in packed.values())
    assert not any(re.search(r"sblock\(\"T_add", s) for s in packed.values())  # bias added in the write-back
    assert not any("prepack" in n and not n.endswith("_prepacked") for n in funcs)  # packing folded away
    main = mod["main"].script()
    assert len(re.findall(r"call_tir\(fused_matmul\w*_prepacked, \(\w+, metadata", main)) == 2
    unpacked = [n for n in funcs if "matmul" in n and "add" not in n]
    assert unpacked and not any("prepack" in n for n in unpacked)


def test_packed_build_matches_eager():
    model, x = _Ffn().eval(), torch.randn(2, 32, 64)
    compiled = fxforge.compile(model, (x,), passes=[], backend="tvm", static_batch=True, measure_latency=False)
    for fresh in (torch.randn(2, 32, 64), torch.randn(2, 32, 64) * 10):
        with torch.no_grad():
            expected = model(fresh)
        for got, ref in zip(compiled(fresh), expected):
            assert (got - ref).abs().max() / ref.abs().max() < 1e-5


class Scaled(nn.Module):
    """A 0-d input (a temperature) before the batched one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, t, x):
        return self.fc(x) * t


def test_a_leading_0d_input_leaves_the_batch_to_the_next_one():
    """TVM took the batch from the first input alone: behind a 0-d one it built for the example's batch, while the
    signature (the first input with a dimension) promised any, and a batch of 3 failed in TVM's shape check."""
    model = Scaled().eval()
    compiled = fxforge.compile(model, (torch.tensor(2.0), torch.randn(4, 8)), passes=[], backend="tvm",
                               measure_latency=False)
    assert compiled.artifact.signature.dynamic_batch
    t, x = torch.tensor(0.5), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(compiled(t, x), model(t, x), rtol=1e-5, atol=1e-6)


def test_relax_module_is_static_unless_asked():
    from tvm import tirx
    model, (x,) = ZOO["mlp"]()
    gm, _ = fxforge.trace(model, (x,))
    static = tvm_backend.relax_module(gm, (x,))["main"].params[0].ty.shape
    dynamic = tvm_backend.relax_module(gm, (x,), batched=[True])["main"].params[0].ty.shape
    assert [int(d) for d in static] == list(x.shape)
    assert isinstance(dynamic[0], tirx.Var) and int(dynamic[1]) == x.shape[1]


class NarrowQdq(torch.nn.Module):
    """Q/DQ with a 7-bit range inside int8 (a clip after relax.quantize) and a per-channel weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = qd.quantize_per_tensor(x, 0.05, 3, -64, 63, torch.int8)
        y = qd.dequantize_per_tensor(q, 0.05, 3, -64, 63, torch.int8)
        w = qd.quantize_per_channel(y, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 1, 2, 3]), 1,
                                    0, 255, torch.uint8)
        return qd.dequantize_per_channel(w, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 1, 2, 3]), 1,
                                         0, 255, torch.uint8)


def test_qdq_ops_import_as_relax_quantize_and_match_torch():
    x = torch.randn(6, 4) * 4  # reaches past both clamp ranges
    cm = fxforge.compile(NarrowQdq(), (x,), backend="tvm", measure_latency=False)
    text = tvm_backend.relax_module(cm.graph_module, (x,)).script()
    assert text.count("R.quantize(") == 2 and text.count("R.dequantize(") == 2 and "R.clip(" in text
    xb = torch.randn(3, 4) * 4
    torch.testing.assert_close(cm(xb), NarrowQdq()(xb), rtol=0, atol=1e-6)


def test_int8_preset_matches_eager_int8():
    model, example = ZOO["convbnrelu"]()
    calibration = [fresh_inputs(example, s) for s in (3, 4)]
    eager = fxforge.compile(model, example, passes=["int8"], calibration=calibration, measure_latency=False)
    tvm = fxforge.compile(model, example, passes=["int8"], backend="tvm", calibration=calibration,
                          measure_latency=False)
    output_dq = next(n for n in tvm.graph_module.graph.nodes if n.op == "output").args[0][0]
    assert output_dq.target is qd.dequantize_per_tensor.default
    step = output_dq.args[1]
    for seed in (9, 10):
        test = fresh_inputs(example, seed)
        with torch.no_grad():
            diff = (tvm(*test) - eager(*test)).abs()
        # float accumulation order may move a value across a rounding boundary: at most one output step, rarely
        assert diff.max() <= step + 1e-6 and (diff > 1e-6).float().mean() <= 0.1, (diff.max(), step)


def test_op_without_converter_names_op_and_node():
    with pytest.raises(fxforge.BackendError) as info:
        fxforge.compile(Mystery(), (torch.randn(2, 4),), backend="tvm", measure_latency=False)
    message = str(info.value)
    assert re.search(r"cannot import op fxforge_test.mystery.default at node 'mystery'", message)
    assert "\n" not in message and info.value.__cause__ is None


class OffsetView(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_strided(x, (2, 2), (1, 1), 1) * 2


def test_converter_failure_names_node_and_op():
    with pytest.raises(fxforge.BackendError, match=r"failed on node 'as_strided' \(op aten.as_strided.default\): "
                                                   r"as_strided with non-zero storage_offset"):
        fxforge.compile(OffsetView(), (torch.randn(4, 4),), backend="tvm", static_batch=True, measure_latency=False)


@pytest.mark.parametrize("options, message", [
    ({"threads": 2}, "unknown tvm backend option.*threads"),
    ({"tune": 16}, "tune must be a dict"),
    ({"fast_math": "yes"}, "fast_math must be True or False"),
])
def test_bad_options_are_refused(options, message):
    model, example = ZOO["mlp"]()
    with pytest.raises(fxforge.BackendError, match=message):
        fxforge.compile(model, example, backend="tvm", measure_latency=False, verify="off", **options)


def test_a_tuning_database_path_of_the_wrong_type_is_refused():
    """pathlib raised a raw TypeError."""
    model, example = ZOO["mlp"]()
    with pytest.raises(fxforge.TuningError, match=r"^tune option db must be a directory path \(str or os.PathLike\), "
                                                  r"got 5$"):
        fxforge.compile(model, example, backend="tvm", measure_latency=False, verify="off", tune={"db": 5, "trials": 0})


def _libm_calls(mod) -> set[str]:
    """The libm-style intrinsics (one scalar call per element on x86) the module's PrimFuncs call."""
    return set(re.findall(r"T\.(exp|erf|tanh)\(", mod.script()))


def test_fast_math_replaces_exp_and_erf_in_a_tiny_transformer():
    model, example = ZOO["bert"]()  # transformers BertModel: GELU (erf) and softmax (exp)
    gm, _ = fxforge.trace(model, example)
    tgt = tvm_backend.tvm_target(get_target("x86"))
    before = tvm_backend.prepare(tvm_backend.relax_module(gm, example), tgt, fast_math=False)
    after = tvm_backend.prepare(tvm_backend.relax_module(gm, example), tgt)
    assert _libm_calls(before) == {"exp", "erf"}
    assert _libm_calls(after) == set()
    cm = fxforge.compile(model, example, passes=["fuse"], backend="tvm", measure_latency=False)
    assert cm.artifact.info["fast_math"] is True
    exact = fxforge.compile(model, example, passes=["fuse"], backend="tvm", fast_math=False, measure_latency=False)
    assert exact.artifact.info["fast_math"] is False
    for seed in (1, 2):
        inputs = fresh_inputs(example, seed=seed)
        with torch.no_grad():
            assert compare([cm(*inputs)], [model(*inputs)]).max_rel < 1e-4
            assert compare([cm(*inputs)], [exact(*inputs)]).max_rel > 0  # the approximation was compiled in


def test_tune_hands_the_prepared_module_to_metaschedule_and_fixes_the_batch(monkeypatch):
    calls = []

    def apply_tuning(mod, tvm_target, tune, cross_compiler=None):
        calls.append((mod, tvm_target, tune, cross_compiler))
        return mod, {"tasks": 3, "applied": 0}

    from fxforge.backends.tvm import tuning
    monkeypatch.setitem(sys.modules, "fxforge.backends.tvm.tuning",
                        types.SimpleNamespace(apply_tuning=apply_tuning, tune_options=tuning.tune_options))
    model, (x,) = ZOO["mlp"]()
    cm = fxforge.compile(model, (x,), backend="tvm", tune={"trials": 8, "db": "unused"}, measure_latency=False)
    (mod, tgt, tune, cross_compiler), = calls
    assert tune == {"trials": 8, "db": "unused"} and tgt.kind.name == "llvm" and cross_compiler is None
    assert "main" in [gv.name_hint for gv in mod.functions] and "fused_" in mod.script()  # prepared: fused
    assert cm.artifact.info["tuning"] == {"tasks": 3, "applied": 0}
    assert not cm.signature.dynamic_batch and "static" in cm.signature.note
    assert cm.report.meta["dynamic_batch"] is False  # the report describes the artifact it returns
    with pytest.raises(fxforge.InputError):
        cm(torch.randn(x.shape[0] + 1, *x.shape[1:]))
    with torch.no_grad():
        assert compare([cm(x)], [model(x)]).max_rel < 1e-4


class Rolled(nn.Module):
    """A roll, which TVM imports as a gather: its legalization logged "fast mode segfaults" on every build."""

    def forward(self, x):
        return x.roll(2, 3) + 1


@pytest.mark.parametrize("make", [ZOO["convbnrelu"], lambda: (Rolled(), (torch.randn(2, 3, 4, 5),))],
                         ids=["convbnrelu", "roll"])
def test_lower_is_quiet_and_never_mutates_the_graph(capfd, make):
    model, example = make()
    gm, sig = fxforge.trace(model, example)
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_backend("tvm").lower(gm, example, sig, get_target("x86"))
    assert capfd.readouterr() == ("", "") and not caught
    assert gm.code == code and all(torch.equal(state[k], v) for k, v in gm.state_dict().items())


# ---------------------------------------------------------------------------------------------------- arm64


@pytest.fixture(scope="module")
def cross_compiler():
    """aarch64-linux-gnu-g++, installed from Debian when missing and installable (root with apt-get)."""
    tool = get_target("arm64").cross_compiler
    if shutil.which(tool) is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "g++-aarch64-linux-gnu"], capture_output=True, timeout=600)
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is missing and cannot be installed here (needs root and apt-get)")
    return tool


@pytest.fixture(scope="module")
def arm64(cross_compiler, tmp_path_factory):
    model, (x,) = ZOO["convbnrelu"]()
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="tvm", target="arm64", measure_latency=False)
    return model, cm, cm.save(tmp_path_factory.mktemp("arm64") / "cbr")


def test_arm64_library_is_an_aarch64_elf_with_neon(arm64):
    _, cm, path = arm64
    lib = (path / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[4] == 2  # 64-bit
    assert int.from_bytes(lib[18:20], "little") == EM_AARCH64
    assert cm.artifact.library == lib
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "binutils-aarch64-linux-gnu comes with the cross compiler"
    asm = subprocess.run([objdump, "-d", str(path / "model.so")], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bfmla\s+v\d+\.4s", asm) and re.search(r"\bld1\w*\s+\{v\d+", asm)


def test_arm64_artifact_says_where_it_runs(arm64):
    _, cm, path = arm64
    assert "arm64" in cm.artifact.info["runs_on"]
    for artifact in (cm.artifact, fxforge.load(path)):
        with pytest.raises(fxforge.TargetError, match="built for arm64.*cannot run on this machine"):
            artifact(torch.randn(2, 3, 16, 16))


RUN_ON_ARM = """
import sys
import numpy as np
import tvm
from tvm import relax
vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
np.save(sys.argv[3], vm["main"](tvm.runtime.tensor(np.load(sys.argv[2])))[0].numpy())
"""


@pytest.mark.slow
def test_arm64_library_runs_under_qemu(arm64, tmp_path):
    """Runs the AArch64 library with an aarch64 TVM runtime under qemu-user (recipe: docs/backends.md)."""
    import numpy as np
    runtime = Path(os.environ.get("FXFORGE_AARCH64_RUNTIME", "/nonexistent"))
    python = runtime / "sysroot" / "usr" / "bin" / "python3.11"
    if not (shutil.which("qemu-aarch64") and python.exists() and (runtime / "site" / "tvm").is_dir()):
        pytest.skip("needs qemu-aarch64 and FXFORGE_AARCH64_RUNTIME=<dir with sysroot/ and site/>")
    model, _, path = arm64
    x = torch.randn(3, 3, 16, 16)  # another batch than the example's: the batch is dynamic on ARM too
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "run.py").write_text(RUN_ON_ARM)
    env = {**os.environ, "QEMU_LD_PREFIX": str(runtime / "sysroot"), "PYTHONPATH": str(runtime / "site")}
    subprocess.run(["qemu-aarch64", str(python), str(tmp_path / "run.py"), str(path / "model.so"),
                    str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], env=env, check=True, timeout=300)
    with torch.no_grad():
        assert compare([torch.from_numpy(np.load(tmp_path / "y.npy"))], [model(x)]).max_rel < 1e-4


def test_arm64_without_cross_compiler_names_the_package(monkeypatch):
    monkeypatch.setattr(tvm_backend.shutil, "which", lambda name: None)
    model, example = ZOO["mlp"]()
    with pytest.raises(fxforge.BackendError, match=r"aarch64-linux-gnu-g\+\+.*apt-get install g\+\+-aarch64-linux-gnu"):
        fxforge.compile(model, example, backend="tvm", target="arm64", measure_latency=False)


# ----------------------------------------------------------------------------------------------------- cuda


def test_cuda_source_has_a_kernel_for_every_function(tmp_path):
    import tvm
    model, (x,) = ZOO["convbnrelu"]()
    cm = fxforge.compile(model, (x,), passes=["fuse"], backend="tvm", target="cuda", measure_latency=False)
    source = cm.artifact.source
    kernels = set(tvm_backend.KERNEL.findall(source))
    assert cm.artifact.info["cuda_kernels"] == len(kernels) >= 4  # 2 convs, mean, linear
    assert sum("conv2d" in k for k in kernels) == 2
    path = cm.save(tmp_path / "cuda")
    assert (path / "model.cu").read_text() == source and (path / "model.so").stat().st_size > 0
    if tvm.cuda(0).exist:  # a GPU machine with a CUDA-enabled TVM
        with torch.no_grad():
            assert compare([cm(x)], [model(x)]).max_rel < 1e-4
    else:
        for artifact in (cm.artifact, fxforge.load(path)):
            with pytest.raises(fxforge.TargetError, match="needs a cuda device"):
                artifact(x)


def test_unscheduled_cuda_functions_are_refused():
    model, (x,) = ZOO["mlp"]()
    gm, _ = fxforge.trace(model, (x,))
    tgt = tvm_backend.tvm_target(get_target("cuda"))
    mod = tvm_backend.prepare(tvm_backend.relax_module(gm, (x,)), tgt)
    with pytest.raises(fxforge.BackendError, match="got no GPU kernel"):
        tvm_backend._check_kernels(mod, source="")


# ------------------------------------------------------------------------------------------------------ zoo


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.values[0] for p in zoo_params()])
def test_zoo_after_fuse_matches_eager(name):
    model, example = ZOO[name]()
    cm = fxforge.compile(model, example, passes=["fuse"], backend="tvm", measure_latency=False)
    inputs = fresh_inputs(example, seed=11)
    with torch.no_grad():
        assert compare([cm(*inputs)], [model(*inputs)]).max_rel < 1e-4


class AttnView(nn.Module):
    """GPT-2's attention tail: heads merged by transpose + reshape, then its Conv1D's view(-1, C)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 4).permute(2, 0, 3, 1, 4)
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(b, t, c)
        return self.proj(o.view(-1, c)).view(b, t, c)


def test_a_view_of_decomposed_attention_output_lowers_as_a_reshape():
    """The re-export for TVM decomposes scaled_dot_product_attention, whose output then has other strides than the
    fused kernel's, and the view after it failed ("Cannot view a tensor with shape [s, 6, 16] and strides (16, 16·s,
    1)"; GPT-2 and T5 fuse → tvm); views become reshapes for that export."""
    model = AttnView().eval()
    cm = fxforge.compile(model, (torch.randn(2, 6, 16),), passes=["fuse"], backend="tvm", measure_latency=False)
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)


class LastColumns(torch.nn.Module):
    """Reads columns counted from the end: ``index − 3`` is negative for the ids below 3."""

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x[:, index - 3] * 2


class LastRows(torch.nn.Module):
    """Reads rows counted from the end along the dynamic batch dimension."""

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x[index - 3] * 2


@pytest.mark.parametrize("model", [LastColumns(), LastRows()], ids=["static dimension", "batch dimension"])
def test_a_negative_index_counts_from_the_end_as_in_pytorch(model):
    """The importer's ``take`` read index −1 as memory outside the tensor (a silently wrong value on inputs eager
    accepts); each integer index of ``aten.index`` is now wrapped as PyTorch wraps it before the export for TVM, by
    a static size or by the symbolic batch."""
    cm = fxforge.compile(model, (torch.randn(4, 5), torch.tensor([3, 4, 5])), backend="tvm", measure_latency=False)
    for x in (torch.randn(4, 5), torch.randn(6, 5)):
        index = torch.tensor([0, 2, 5])
        torch.testing.assert_close(cm(x, index), model(x, index))


class LastOfEach(nn.Module):
    """A float output beside integer ones: the last id of each row (a constant negative select) and ids · 0.5."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        return x + 1, ids[:, -1], (ids * 0.5).long(), ids * 1.0


def test_integer_outputs_and_promoted_arithmetic_match_eager():
    """TVM read ``ids[:, -1]`` as memory before the row and computed ``ids * 0.5`` in int64 (zeros), and nothing
    checked integer outputs beside a float one; now the select counts from the end, the integer operand is cast
    to the result's dtype first, and the artifact check compares integer outputs and every dtype."""
    model = LastOfEach().eval()
    cm = fxforge.compile(model, (torch.randn(2, 4), torch.randint(0, 9, (2, 4))), backend="tvm", measure_latency=False)
    x, ids = torch.randn(3, 4), torch.randint(0, 9, (3, 4))
    for got, want in zip(cm(x, ids), model(x, ids)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


class Scatter(nn.Module):
    def forward(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return x.scatter(1, index, values) * 2


def test_scatter_builds_where_build_time_weight_packing_cannot_split_it():
    """SplitLayoutRewritePreproc raised a raw InternalError on scatter's PrimFunc; the schedule is kept without it."""
    example = (torch.randn(2, 5), torch.tensor([[1, 3], [0, 4]]), torch.randn(2, 2))
    cm = fxforge.compile(Scatter().eval(), example, backend="tvm", measure_latency=False)
    torch.testing.assert_close(cm(*example), Scatter()(*example))


class ArgExtremes(nn.Module):
    def forward(self, x: torch.Tensor):
        return x.argmax(1), x.argmin(1)


def test_argmax_of_a_row_of_infinities_is_an_index_in_the_row():
    """TVM's argmax of an all −inf row was −1 (eager: 0), an index outside the row that a gather then read past."""
    cm = fxforge.compile(ArgExtremes().eval(), (torch.randn(2, 4),), backend="tvm", measure_latency=False)
    inf = float("inf")
    x = torch.tensor([[-inf] * 4, [inf] * 4, [1.0, 3.0, -inf, 3.0], [2.0, inf, -inf, inf]])
    for got, want in zip(cm(x), ArgExtremes()(x)):
        assert torch.equal(got, want), (got, want)


def test_argmax_of_an_integer_row_of_its_dtypes_extreme_is_an_index_in_the_row():
    """An all-zero uint8 row (a mask) had argmax −1 (eager: 0), and an all-255 row argmin −1: TVM starts from the
    dtype's lowest (highest) value and moves only on a strictly better one."""
    cm = fxforge.compile(ArgExtremes().eval(), (torch.tensor([[1, 2, 3], [3, 2, 1]], dtype=torch.uint8),),
                         backend="tvm", measure_latency=False)
    x = torch.tensor([[0, 0, 0], [255, 255, 255], [0, 7, 7], [255, 0, 255]], dtype=torch.uint8)
    for got, want in zip(cm(x), ArgExtremes()(x)):
        assert torch.equal(got, want), (got, want)


class Promoted(nn.Module):
    """Scaled sums (torchvision's grayscale is ``r·.299`` then ``add_(g, alpha=.587)``), an integer true division."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor):
        return (torch.add(x, y, alpha=0.5), torch.sub(x, y, alpha=2.0), torch.rsub(x, y, alpha=3.0),
                torch.add(x, 2.0, alpha=0.25), torch.floor(torch.true_divide(ids, 2)))


def test_alpha_scales_its_operand_and_an_integer_true_division_is_a_float_one():
    """TVM's importer dropped ``alpha`` (x + 0.5·y came out x + y: a grayscale image wholly wrong, unwarned with an
    all-black example) and divided integers by integers in ``true_divide`` (−7 / 2 floored to −3, eager −4: unseen
    where the example's values divided evenly)."""
    model = Promoted()
    example = (torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([[4, -6, 8, 0, 2]] * 2))
    cm = fxforge.compile(model, example, backend="tvm", measure_latency=False)
    fresh = (torch.randn(3, 5), torch.randn(3, 5), torch.tensor([[-7, 3, 5, -1, 9]] * 3))
    for got, want in zip(cm(*fresh), model(*fresh)):
        assert got.dtype == want.dtype and torch.allclose(got, want, atol=1e-6), (got, want)


class FloatDivisions(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        return x // 2, ids // 2.5, torch.remainder(x, 3), torch.fmod(ids, 2.5), ids % 3


def test_a_division_by_a_number_imports_whatever_the_dtypes():
    """A float halved by ``// 2`` (coordinates), int64 ids by ``// 2.5`` and ``fmod(ids, 2.5)`` were refused: the
    importer made the number an int32 constant ("Binary operators must have the same datatype")."""
    model = FloatDivisions()
    cm = fxforge.compile(model, (torch.randn(2, 5) * 10, torch.tensor([[1, -2, 7, 8, -9]] * 2)), backend="tvm",
                         measure_latency=False)
    fresh = (torch.randn(3, 5) * 10, torch.tensor([[3, -4, 11, 0, -13]] * 3))
    for got, want in zip(cm(*fresh), model(*fresh)):
        assert got.dtype == want.dtype and torch.allclose(got, want, atol=1e-5), (got, want)


class DividedByNumbers(nn.Module):
    def forward(self, ids: torch.Tensor):
        return (ids // 3, ids % 3, torch.fmod(ids, 4), torch.div(ids, -3, rounding_mode="trunc"), ids // -1,
                torch.div(ids, -1, rounding_mode="trunc"), ids % -1)


def test_an_integer_divided_by_a_number_imports():
    """The importer made the divisor 3 of an int64 ``ids // 3`` an int32 constant, and the import failed."""
    model, ids = DividedByNumbers(), torch.randint(-50, 50, (2, 4))
    cm = fxforge.compile(model, (ids,), backend="tvm", measure_latency=False)
    assert "zero_divisors" not in cm.artifact.info  # a constant divisor needs no guard
    ids = torch.randint(-50, 50, (3, 4))
    for got, want in zip(cm(ids), model(ids)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    lowest = torch.tensor([[-2 ** 63, 5, -5, 0]])  # the lowest // −1 trapped (SIGFPE) by a number too
    for got, want in zip(cm(lowest)[4:], (-lowest, -lowest, torch.zeros_like(lowest))):
        assert torch.equal(got, want)


class Extremes(nn.Module):
    """Reductions the stock importer has no converter for: amax/amin (``logsumexp`` and ``aminmax`` decompose to
    them), ``any`` over every element, ``min`` along a dim."""

    def forward(self, x: torch.Tensor):
        return (x.amax(1), x.amin(dim=(0, 2), keepdim=True), torch.logsumexp(x, 2), (x > 0).amax(1),
                x.relu().any(), (x > 0).any(), torch.min(x, 1)[0], torch.min(x, 2, keepdim=True)[1])


def test_amax_amin_any_and_min_along_a_dim_import():
    """Each was a BackendError "cannot import op aten.amax.default ...: it has no converter for it"."""
    model = Extremes()
    cm = fxforge.compile(model, (torch.randn(2, 3, 4),), backend="tvm", measure_latency=False)
    for x in (torch.randn(3, 3, 4), -torch.rand(5, 3, 4), torch.zeros(1, 3, 4)):
        for got, want in zip(cm(x), model(x)):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want)


class IntegerDivisions(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a // b, torch.remainder(a, b), torch.div(a, b, rounding_mode="trunc"), a.float() / b


def test_integer_division_by_zero_raises_as_in_eager_instead_of_killing_the_process():
    """TVM's integer division by a zero divisor raised SIGFPE and killed the process; the copy imported for TVM
    divides by b + (b == 0) and returns the count of zeros, and the artifact raises where eager raises. The lowest
    int64 divided by −1 (eager: itself, wrapped; remainder 0) killed it too: divided by 1 and negated there."""
    model = IntegerDivisions().eval()
    a, b = torch.randint(-1000, 1000, (2, 6)), torch.tensor([[3, -2, 7, -5, 1, 4]] * 2)
    cm = fxforge.compile(model, (a, b), backend="tvm", measure_latency=False)
    assert cm.artifact.info["zero_divisors"] == ["floor_divide", "remainder", "div"]  # not the true division
    for got, want in zip(cm(a, b), model(a, b)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    lowest, minus_one = torch.tensor([[-2 ** 63, 7, -7, 9, 5, -2 ** 63]]), torch.tensor([[-1, -1, -1, 2, -3, 1]])
    floors = lambda a, b: (a // b, torch.remainder(a, b))  # eager's trunc division traps on the lowest // −1 too
    for got, want in zip(cm(lowest, minus_one)[:2], floors(lowest, minus_one)):  # it trapped (SIGFPE) in TVM
        assert got.dtype == want.dtype and torch.equal(got, want)
    unsigned = fxforge.compile(model, (a.abs().to(torch.uint8), b.abs().to(torch.uint8)), backend="tvm",
                               measure_latency=False)  # the guard of −1 failed to import a uint8 divisor
    a8, b8 = torch.tensor([[200, 7, 255, 0, 9, 100]] * 2, dtype=torch.uint8), torch.tensor([[3, 255] * 3] * 2,
                                                                                           dtype=torch.uint8)
    for got, want in zip(unsigned(a8, b8), model(a8, b8)):
        assert got.dtype == want.dtype and torch.allclose(got, want), (got, want)
    b[1, 2] = 0
    with pytest.raises(fxforge.BackendError, match="integer division by zero at node 'floor_divide'"):
        cm(a, b)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        model(a, b)


class HalfReductions(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(64), nn.Linear(64, 8)
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # fuse_batchnorm: new float16 constants

    def forward(self, x: torch.Tensor):
        return (x.mean(-1), x.mean(-1, dtype=torch.float16), nn.functional.adaptive_avg_pool2d(x, 1), self.norm(x),
                self.fc(self.norm(x)), self.conv(x))


def test_float16_reductions_and_layers_accumulate_in_float32_as_in_eager():
    """TVM summed float16 in float16: the mean of values near 60000 was inf (eager: about 60096); and its importer's
    matmuls and convolutions return float32 whatever their operands, so a float16 linear or conv with a bias did not
    import ("Binary operators must have the same datatype")."""
    model = HalfReductions().half().eval()
    cm = fxforge.compile(model, (torch.randn(2, 3, 4, 64, dtype=torch.float16),), backend="tvm",
                         measure_latency=False)
    x = (torch.rand(2, 3, 4, 64) * 200 + 60000).half()
    for got, want in zip(cm(x)[:4], model(x)[:4]):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)
    x = torch.randn(3, 3, 4, 64, dtype=torch.float16)
    for got, want in zip(cm(x)[4:], model(x)[4:]):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_a_value_cast_back_records_the_dtype_it_gives():
    """Each float16 reduction and product of the copy imported for TVM computes in float32 and is cast back; the cast
    records the float16 value it gives, as any node put after an op does, for the rewrites after it that read their
    operands' dtypes (the casts recorded nothing)."""
    gm, _ = trace(HalfReductions().half().eval(), (torch.randn(2, 3, 4, 64, dtype=torch.float16),))
    casts = [n for n in tvm_backend._for_import(gm).graph.nodes
             if n.target is torch.ops.aten._to_copy.default and n.kwargs["dtype"] == torch.float16]
    assert len(casts) >= 6 and all(n.meta["val"].dtype == torch.float16 for n in casts)


def test_calls_from_several_threads_at_once_are_right():
    """The Relax VM is not reentrant: two threads calling one artifact crashed the process (SIGSEGV) or raised
    "Check failed: reg < frame->register_file.size()"; calls now take turns."""
    import threading
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 5)).eval()
    cm = fxforge.compile(model, (torch.randn(2, 3, 8, 8),), backend="tvm", measure_latency=False)
    inputs = [torch.randn(3, 3, 8, 8) for _ in range(4)]
    wanted = [model(x).detach() for x in inputs]
    failures: list[str] = []

    def calls(k: int) -> None:
        for _ in range(150):
            try:
                if not torch.allclose(cm(inputs[k]), wanted[k], rtol=1e-5, atol=1e-6):
                    failures.append(f"thread {k}: wrong values")
            except fxforge.FxforgeError as e:
                failures.append(f"thread {k}: {e}")

    threads = [threading.Thread(target=calls, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


class RollBatch(nn.Module):
    def forward(self, x: torch.Tensor):
        return torch.roll(x, 1, 0) * x.shape[0]


def test_the_batch_size_as_a_value_is_built_for_the_example_batch_not_crashed_on():
    """TVM's pipeline crashed the process (SIGSEGV in prepare) on an elementwise op with the symbolic batch as an
    operand (roll's index arithmetic, x * x.shape[0] on integers); such a graph is built for the example's batch."""
    model = RollBatch()
    cm = fxforge.compile(model, (torch.randint(-5, 6, (2, 4)),), backend="tvm", measure_latency=False)
    assert not cm.signature.dynamic_batch and "the batch size is a value" in cm.signature.note
    x = torch.randint(-5, 6, (2, 4))
    assert torch.equal(cm(x), model(x))


class PooledHead(nn.Module):
    """A conv, global pooling and a linear, the pooled [B, C, 1, 1] squeezed as models write it."""

    def __init__(self, squeeze):
        super().__init__()
        self.conv, self.fc, self.squeeze = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5), squeeze

    def forward(self, x):
        return self.fc(self.squeeze(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1)))


@pytest.mark.parametrize("squeeze", [lambda y: y.squeeze(-1).squeeze(-1), lambda y: y.squeeze()],
                         ids=["negative dims", "every size-1 dim"])
def test_a_pooled_head_squeezed_by_negative_or_no_dims_compiles(squeeze):
    """TVM's importer failed on ``squeeze(-1)`` (std::bad_alloc) and ``squeeze()`` (undefined bijective layout);
    each is now a squeeze of the non-negative dimensions it removes. ``squeeze()`` also removes a batch of 1 in
    eager, which a graph exported at batch 2 does not: it compiles for its example's batch alone."""
    model = PooledHead(squeeze).eval()
    x = torch.randn(2, 3, 8, 8)
    cm = fxforge.compile(model, (x,), backend="tvm", static_batch=True, measure_latency=False)
    with torch.no_grad():
        assert compare([cm(x)], [model(x)]).max_rel < 1e-5


class PaddedSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, padding):
        return self.attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]


def test_multihead_attention_with_a_padding_mask_compiles():
    """nn.MultiheadAttention squeezes by a negative dimension: the importer failed with std::bad_alloc."""
    model = PaddedSelfAttention().eval()
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 10:] = True
    cm = fxforge.compile(model, (torch.randn(2, 16, 32), padding), backend="tvm", measure_latency=False)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert compare([cm(x, padding)], [model(x, padding)]).max_rel < 1e-5


class ConvThen(nn.Module):
    """A conv (NHWC on CPUs) whose output a layer of another kind reads."""

    def __init__(self, layer):
        super().__init__()
        self.conv, self.layer = nn.Conv2d(3, 16, 3, stride=2, padding=1), layer

    def forward(self, x):
        return self.layer(torch.relu(self.conv(x)))


@pytest.mark.parametrize("layer", [nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.GroupNorm(4, 16),
                                   nn.GroupNorm(4, 16, affine=False), nn.InstanceNorm2d(16),
                                   nn.AdaptiveMaxPool2d((3, 5))],
                         ids=["conv transpose", "group norm", "group norm without weights", "instance norm",
                              "adaptive max pool"])
def test_layers_the_importer_or_the_cpu_layout_failed_on_compile_at_any_batch(layer):
    """Valid decoders and normalized CNNs were refused: a transposed conv took its input's NHWC layout, which has
    no legalization ("CodeGenVM cannot emit this Relax operator"); group norm's converter failed without weights,
    instance norm's decomposition failed at a symbolic batch, and adaptive max pooling had no converter (it still
    has none where the sizes do not divide: a BackendError naming the op)."""
    model = ConvThen(layer).eval()
    cm = fxforge.compile(model, (torch.randn(2, 3, 12, 10),), backend="tvm", measure_latency=False)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 12, 10)
        with torch.no_grad():
            assert compare([cm(x)], [model(x)]).max_rel < 1e-5


class Activations(nn.Module):
    def forward(self, x):
        return torch.cat([F.selu(x), F.celu(x, 0.7), F.elu(x, 0.5)], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selu_and_celu_keep_their_scales(dtype):
    """TVM's elu converter dropped the scales: selu came out 5 % off, refused in float32 and accepted in bfloat16,
    whose exact tolerance (6.25 %) is wider than that."""
    model = Activations()
    cm = fxforge.compile(model, (torch.randn(2, 8, dtype=dtype) * 3,), backend="tvm", measure_latency=False)
    x = torch.linspace(-4, 4, 24, dtype=dtype).reshape(3, 8)
    assert compare([cm(x).float()], [model(x).float()]).max_rel < (1e-5 if dtype == torch.float32 else 8e-3)


class PositionsAndRunningSums(nn.Module):
    def forward(self, mask, pixels):
        return mask.cumsum(-1) - 1, pixels.cumsum(-1).float() / 255


def test_cumulative_sums_of_bool_and_small_integers_accumulate_in_int64():
    """PyTorch sums bool and integer tensors in int64; TVM summed in the input's dtype: a uint8 running sum wrapped
    at 256, silently, and a bool mask's position ids failed to build."""
    model = PositionsAndRunningSums()
    example = (torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 8, dtype=torch.uint8))
    cm = fxforge.compile(model, example, backend="tvm", measure_latency=False)
    mask, pixels = torch.rand(3, 8) > 0.3, torch.full((3, 8), 200, dtype=torch.uint8)
    positions, sums = cm(mask, pixels)
    expected = model(mask, pixels)
    assert positions.dtype == torch.int64 and torch.equal(positions, expected[0])
    assert torch.allclose(sums, expected[1])


class AlongTheLastDim(nn.Module):
    def forward(self, x):
        return x.max(-1).values, x.min(-2).indices, torch.logsumexp(x, -1), torch.logsumexp(x, (-1, 0))


def test_reductions_along_a_negative_dim_compile():
    """``x.max(-1)`` and ``logsumexp(x, -1)`` failed in TVM's pipeline with ``std::bad_alloc``."""
    model = AlongTheLastDim()
    cm = fxforge.compile(model, (torch.randn(4, 16),), backend="tvm", measure_latency=False)
    x = torch.randn(3, 16)
    for got, want in zip(cm(x), model(x)):
        torch.testing.assert_close(got, want)


class LastRowTimesAll(nn.Module):
    def forward(self, x):
        return x[-1:] * x + x.std(0)


@pytest.mark.filterwarnings("ignore:std")  # eager's own, when the artifact check runs the model at batch 1
def test_a_graph_tvm_cannot_build_for_a_symbolic_batch_is_built_for_the_examples():
    """A slice at the batch's end failed TVM's build and ``std`` over the batch its importer, both only for a
    symbolic batch: such graphs were refused, where the docs promise the example's batch."""
    model = LastRowTimesAll()
    cm = fxforge.compile(model, (torch.randn(4, 8),), backend="tvm", measure_latency=False)
    assert not cm.signature.dynamic_batch and "cannot compile this graph for a symbolic batch" in cm.signature.note
    x = torch.randn(4, 8)
    torch.testing.assert_close(cm(x), model(x))
    with pytest.raises(fxforge.InputError):
        cm(torch.randn(3, 8))


class Resized(nn.Module):
    def __init__(self, **how):
        super().__init__()
        self.how = how

    def forward(self, x):
        return F.interpolate(x, **self.how)


@pytest.mark.parametrize("how", [dict(scale_factor=1.5, mode="nearest"), dict(size=(5, 13), mode="nearest"),
                                 dict(scale_factor=2, mode="nearest"), dict(size=(5, 13), mode="bilinear"),
                                 dict(scale_factor=1.3, mode="bilinear", recompute_scale_factor=True),
                                 dict(scale_factor=(1.0, 0.5), mode="bilinear"), dict(scale_factor=(1.0, 1.5),
                                                                                     mode="bicubic")],
                         ids=["nearest ×1.5", "nearest to a size", "nearest ×2", "bilinear to a size",
                              "bilinear ×1.3 recomputed", "bilinear ×0.5 of an even size",
                              "bicubic ×1.5 of an even size"])
def test_resizes_match_pytorch(how):
    """TVM's resize rounded nearest source coordinates otherwise than PyTorch's floor (1.6 relative off at ×1.5 of
    a size 5 or to a size that is no multiple): refused by the artifact check, which said only how far off it was.
    A bilinear ×0.5 and ×1.5 of sizes they divide map alike and compile."""
    model = Resized(**how)
    cm = fxforge.compile(model, (torch.randn(2, 3, 5, 8),), backend="tvm", measure_latency=False)
    x = torch.randn(3, 3, 5, 8)
    torch.testing.assert_close(cm(x), model(x))


@pytest.mark.parametrize("how", [dict(scale_factor=1.7, mode="bilinear"), dict(scale_factor=0.6, mode="bicubic"),
                                 dict(scale_factor=2, mode="bilinear", antialias=True)],
                         ids=["bilinear ×1.7", "bicubic ×0.6", "antialiased"])
def test_resizes_tvm_computes_otherwise_are_named(how):
    with pytest.raises(fxforge.BackendError, match=r"TVM (resizes by this scale_factor|cannot resize with "
                                                   r"antialias).*node '_?upsample_bi"):
        fxforge.compile(Resized(**how), (torch.randn(2, 3, 4, 6),), backend="tvm", measure_latency=False)


def test_overlapping_captures_of_stderr_leave_it_where_it_was():
    """Two threads compiling for TVM at once captured file descriptor 2 in overlapping windows: the second restored
    it to the first's temporary file, deleted since, and the process's stderr was lost."""
    import threading
    import time
    before = os.readlink("/proc/self/fd/2")

    def capture(wait, hold):
        time.sleep(wait)
        with tvm_backend._without_noise_lines():
            time.sleep(hold)
    threads = [threading.Thread(target=capture, args=(0.0, 0.2)), threading.Thread(target=capture, args=(0.1, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert os.readlink("/proc/self/fd/2") == before


@pytest.mark.parametrize("layer", [nn.MaxPool2d(2, return_indices=True), nn.AdaptiveMaxPool2d((2, 3),
                                                                                             return_indices=True)],
                         ids=["max pool", "adaptive max pool"])
def test_max_pooling_indices_are_named_not_given_as_float(layer):
    """TVM gave the indices as float32: a VerificationError said only that a dtype differed."""
    with pytest.raises(fxforge.BackendError, match="max pooling's indices as float32.*node '(adaptive_)?max_pool2d"):
        fxforge.compile(layer.eval(), (torch.randn(2, 3, 8, 6),), backend="tvm", measure_latency=False)
    plain = nn.MaxPool2d(2).eval()  # without its indices it compiles
    cm = fxforge.compile(plain, (torch.randn(2, 3, 8, 6),), backend="tvm", measure_latency=False)
    x = torch.randn(3, 3, 8, 6)
    torch.testing.assert_close(cm(x), plain(x))


@pytest.mark.parametrize("model", [nn.Linear(8, 4), nn.Linear(8, 4, bias=False)], ids=["with a bias", "without"])
def test_a_float64_product_comes_back_float64(model):
    """The importer computes a float64 linear in float32: with a bias it failed ("Binary operators must have the
    same datatype"), without one it returned float32."""
    model = model.double().eval()
    cm = fxforge.compile(model, (torch.randn(2, 8, dtype=torch.float64),), backend="tvm", measure_latency=False)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert cm(x).dtype == torch.float64 and compare([cm(x)], [model(x)]).max_rel < 1e-5


class IntegerProducts(nn.Module):
    def __init__(self, as_float):
        super().__init__()
        self.as_float = as_float

    def forward(self, a, b):
        product = a @ b
        return product.float() if self.as_float else product


def test_an_integer_product_read_as_integers_is_named():
    """An integer matmul came back float32 (a dtype mismatch the artifact check named, offering verify='off'):
    computed in float32, it is exact only below 2**24. Read as floats at once, it compiles."""
    example = (torch.randint(-9, 9, (2, 4)), torch.randint(-9, 9, (4, 3)))
    with pytest.raises(fxforge.BackendError, match=r"computes this int64 aten\.matmul\.default in float32 \(node "):
        fxforge.compile(IntegerProducts(False), example, backend="tvm", measure_latency=False)
    cm = fxforge.compile(IntegerProducts(True), example, backend="tvm", measure_latency=False)
    assert torch.equal(cm(*example), IntegerProducts(True)(*example))


def test_a_float16_model_pruned_compiles():
    """prune_channels rebuilds layers without a recorded value, so their float32 product was not cast back to
    float16 and met the float16 bias: "Binary operators must have the same datatype"."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).half().eval()
    x = torch.randn(4, 32, dtype=torch.float16)
    cm = fxforge.compile(model, (x,), passes=["prune_channels"], backend="tvm", measure_latency=False)
    assert cm(x).dtype == torch.float16


class Patches(nn.Module):
    def forward(self, x):
        return F.unfold(x, kernel_size=(2, 3), stride=2, padding=1).transpose(1, 2)


def test_unfold_compiles_as_a_grouped_convolution():
    """torch's decomposition of im2col indexes with broadcast index tensors, which TVM's importer refused."""
    model = Patches()
    cm = fxforge.compile(model, (torch.randn(2, 3, 8, 8),), backend="tvm", measure_latency=False)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(cm(x), model(x))


class Sampled(nn.Module):
    def __init__(self, **how):
        super().__init__()
        self.how = how

    def forward(self, x, grid):
        return F.grid_sample(x, grid, **self.how)


@pytest.mark.parametrize("how", [dict(align_corners=False), dict(mode="nearest", align_corners=True),
                                 dict(mode="bilinear", padding_mode="reflection", align_corners=False)],
                         ids=["bilinear", "nearest", "reflection"])
def test_grid_sample_reads_the_grid_as_pytorch_does(how):
    """The importer passed PyTorch's [N, H, W, 2] grid to a kernel that reads [N, 2, H, W]: a [2, 3, 7, 2] output
    where eager gives [2, 3, 4, 7]."""
    model = Sampled(**how)
    example = (torch.randn(2, 3, 5, 6), torch.rand(2, 4, 7, 2) * 2.4 - 1.2)
    cm = fxforge.compile(model, example, backend="tvm", measure_latency=False)
    x, grid = torch.randn(3, 3, 5, 6), torch.rand(3, 4, 7, 2) * 2.4 - 1.2
    torch.testing.assert_close(cm(x, grid), model(x, grid))


class EmptyPast(nn.Module):
    """Concatenates an empty 1-D tensor to a 4-D one, as a transformers cache does on its first step."""

    def __init__(self):
        super().__init__()
        self.register_buffer("past", torch.zeros(0))

    def forward(self, x):
        return torch.cat([self.past.clone(), x.transpose(1, 2)], dim=-2) * 2


@pytest.mark.parametrize("passes", [[], ["fuse"]], ids=["as captured", "constants folded"])
def test_an_empty_tensor_in_a_concatenation_is_skipped_as_in_pytorch(passes):
    """PyTorch's cat skips 1-D tensors of size 0 whatever the others' rank; TVM's importer refused the concatenation
    (GPT2Model with its default cache: "Concat expects all input tensors to have same ndim")."""
    model = EmptyPast()
    cm = fxforge.compile(model, (torch.randn(2, 4, 3, 5),), passes=passes, backend="tvm", measure_latency=False)
    x = torch.randn(3, 4, 3, 5)
    torch.testing.assert_close(cm(x), model(x))


class Guarded(nn.Module):
    """Clamps float16 activations by a 0-d float32 bound, as T5 guards against float16 overflow."""

    def forward(self, x):
        bound = torch.tensor(torch.finfo(torch.float16).max - 1000.0)
        return torch.clamp(x * 2, min=-bound, max=bound)


def test_a_float16_clamp_by_a_float32_bound_stays_float16():
    """PyTorch keeps the result float16; TVM's importer refused the mix ("Binary operators must have the same
    datatype"), so float16 T5 encoders did not compile."""
    model = Guarded()
    x = torch.randn(2, 8, dtype=torch.float16)
    cm = fxforge.compile(model, (x,), backend="tvm", measure_latency=False)
    assert cm(x).dtype == torch.float16 and torch.equal(cm(x), model(x))


@pytest.mark.parametrize("passes, match", [
    (["insert_qdq", "calibrate"], r"^the tvm backend lowers quantized graphs after fold_qdq, .*: add fold_qdq after "
                                  r"calibrate \(the int8 preset does\)$"),
    (["int8_dynamic"], r"^the tvm backend has no dynamic int8 linears \(node '\w+', from insert_qdq\{activations="
                       r"'dynamic'\} or int8_dynamic\): quantize statically \(int8\), or use the onnx backend$")])
def test_a_quantized_graph_tvm_cannot_import_is_refused_naming_the_remedy(passes, match):
    """Before: Relax's importer raised "Unsupported output datatype attribute for operation: 'int32" (cut mid-string)
    for an unfolded graph, and "no converter" for a dynamic linear; neither named a remedy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.raises(fxforge.BackendError, match=match):
        fxforge.compile(model, (torch.randn(2, 16),), passes=passes, backend="tvm", max_drop=float("inf"),
                        calibration=[(torch.randn(8, 16),) for _ in range(6)], measure_latency=False)
