"""The console script: listings, a real compile from the command line, one-line errors with exit status 2."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxforge
from fxforge.cli import _parser, main
from fxforge.compiler.pass_manager import split_passes
from models import NAMEDTUPLE_MODEL


def test_passes_and_targets_list_everything(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in fxforge.available_passes())
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "x86" in out and "arm64" in out and "cuda" in out and "torchscript" in out


def test_compile_writes_a_loadable_artifact(tmp_path, capsys):
    out_dir = tmp_path / "mlp"
    assert main(["compile", "models:Mlp", "--input-shape", "4,32", "--passes", "fuse",
                 "--backend", "torchscript", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "fuse_batchnorm" in printed and "backend:torchscript" in printed
    art = fxforge.load(out_dir)
    assert art(torch.randn(5, 32)).shape == (5, 10)


@pytest.mark.parametrize("argv, message", [
    (["compile", "models:Nope", "--input-shape", "4,32"], "no attribute 'Nope'"),
    (["compile", "no_such_module:f", "--input-shape", "4,32"], "cannot import"),
    (["compile", "models:Mlp", "--input-shape", "4,x"], "comma-separated integers"),
    (["compile", "models:Mlp", "--input-shape", "4,31"], "does not run on the example inputs"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--passes", "fusion"], "unknown pass 'fusion'"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--target", "mars"], "unknown target 'mars'"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--dtype", "float99"], "unknown dtype"),
    # before: "cannot allocate inputs of shape ['4,32']: check_random_bounds handles only ..." and torch's warning
    (["compile", "models:Mlp", "--input-shape", "4,32", "--dtype", "qint8"],
     "--dtype qint8: fxforge makes example inputs of float, integer and bool dtypes only"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--dtype", "complex64"], "--dtype complex64: fxforge makes"),
    # before: argparse's "argument --input-shape: expected one argument"
    (["compile", "models:Mlp", "--input-shape", "-1,32"], "--input-shape takes positive sizes, got -1,32 (-1 is no"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--backend", "onnx", "--target", "cuda", "--strict"],
     "lacks CUDAExecutionProvider; the artifact runs on CPUExecutionProvider (strict=True)"),
    (["compile", "models:accuracy", "--input-shape", "4,32"], "accuracy() failed"),
    # the exception's first line only: the second was a line of its own
    (["compile", "test_cli:two_line_factory", "--input-shape", "4,32"],
     "test_cli:two_line_factory() failed: RuntimeError: factory failed"),
])
def test_bad_arguments_give_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxforge: error:") and message in err and "\n" not in err


def endless():
    while True:
        yield (torch.randn(4, 32),)


@pytest.mark.parametrize("argv, message", [
    (["compile", "models:Mlp", "--input-shape", "4,32", "--passes", "low_rank{energy=0.5}", "--passes", "fuse"],
     "--passes given twice: give it once"),
    (["bench", "--list", "--rounds", "5", "--rounds", "3"], "--rounds given twice"),  # 5: the default's own object
    (["compile", "models:Mlp", "--input-shape", "4,32", "--backend", "onnx", "--backend-option", "opset=18",
      "--backend-option", "opset=20"], "--backend-option opset given twice"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--passes", "int8", "--calibration", "test_cli:endless"],
     "calibration data gave more than 10000 batches (an endless iterable?)"),
    (["tune", "models:Mlp", "--input-shape", "4,32", "--trials", "4", "--trials-per-task", "0"],
     "trials_per_task must be an integer of at least 1"),
])
def test_what_the_cli_dropped_or_read_without_end_is_refused(argv, message, capsys):
    """Found by a differential run: an option given twice kept the last (``--passes a --passes b`` compiled b
    alone); ``--trials-per-task 0`` was dropped; an endless ``--calibration`` generator was listed until memory ran
    out, before compile's limit on batches could say so."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors exit there
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_bench_refuses_an_out_directory_holding_a_users_results(tmp_path, capsys):
    """Found by a differential run: ``bench --out`` replaced a user's results.md and results.json without a word,
    where ``compile --out`` refuses a directory it did not write."""
    (tmp_path / "results.md").write_text("# mine")
    assert main(["bench", "models:Mlp", "--input-shape", "4,32", "--systems", "eager", "--rounds", "1",
                 "--out", str(tmp_path)]) == 2
    assert "holds results.md, not written by fxforge bench; refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "results.md").read_text() == "# mine"


def two_line_factory():
    raise RuntimeError("factory failed\nsecond line of the message")


def test_module_entry_point_refuses_missing_arguments():
    result = subprocess.run([sys.executable, "-m", "fxforge.cli", "compile", "x:y"], capture_output=True, text=True)
    assert result.returncode == 2 and "--input-shape" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["compile", "models:Mlp"], "the following arguments are required: --input-shape"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--max-drop", "abc"], "invalid float value: 'abc'"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--verify", "always"], "invalid choice: 'always'"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
])
def test_arguments_argparse_refuses_give_one_line_and_status_2(argv, message, capsys):
    """argparse's own errors printed its whole usage block first (11 lines for compile)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("fxforge") and message in err and "\n" not in err


FXFORGE = str(Path(sys.executable).with_name("fxforge"))  # the installed console script


def console(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([FXFORGE, *argv], capture_output=True, text=True, cwd=cwd, timeout=600)


TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x).relu()


def tiny(width=8):
    return Tiny(width)


def held_out():
    torch.manual_seed(1)
    return [(torch.randn(2, 4),) for _ in range(2)]
'''


def test_console_script_compiles_a_model_from_the_current_directory_and_runs_the_artifact(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY)
    done = console("compile", "tinymodel:tiny", "--model-kwargs", '{"width": 6}', "--input-shape", "2,4",
                   "--passes", "fuse", "--backend", "onnx", "--static-batch", "--latency", "--out", "art",
                   "--backend-option", "intra_op_num_threads=1", "--validation", "tinymodel:held_out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "backend:onnx" in done.stdout and "dynamic_batch: False" in done.stdout
    assert "'intra_op_num_threads': 1," in done.stdout  # --backend-option
    assert "mean cos" in done.stdout and "synthetic" not in done.stdout.split("errors:")[-1]  # --validation
    assert "the backend row times the compiled artifact" in done.stdout  # --latency
    np.save(tmp_path / "x.npy", np.ones((2, 4), dtype=np.float32))
    ran = console("run", "art", "--input", "x.npy", "--save", "y", cwd=tmp_path)  # numpy adds .npz: said so
    assert ran.returncode == 0, ran.stderr
    assert "output 0: float32 [2, 6]" in ran.stdout and "latency:" in ran.stdout and "outputs: y.npz" in ran.stdout
    artifact = fxforge.load(tmp_path / "art")
    assert artifact.signature.dynamic_batch is False
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["arr_0"], artifact(torch.ones(2, 4)).numpy())
    assert console("run", "art", "--input", "x.npy", "--save", "y", cwd=tmp_path).returncode == 0  # its own: again
    np.savez(tmp_path / "data.npz", labels=np.arange(3))  # a user's file: the outputs replaced it without a word
    refused = console("run", "art", "--input", "x.npy", "--save", "data.npz", cwd=tmp_path)
    assert refused.returncode == 2 and "--save data.npz exists and holds no earlier `fxforge run` outputs" in \
        refused.stderr and list(np.load(tmp_path / "data.npz")) == ["labels"]


def test_version_and_python_dash_m():
    assert console("--version").stdout.strip() == f"fxforge {fxforge.__version__}"
    result = subprocess.run([sys.executable, "-m", "fxforge", "passes"], capture_output=True, text=True)
    assert result.returncode == 0 and "fuse_batchnorm" in result.stdout


def test_cli_and_python_defaults_agree():
    import inspect
    defaults = inspect.signature(fxforge.compile).parameters
    parser = _parser()
    args = parser.parse_args(["compile", "m:f", "--input-shape", "1"])
    assert args.backend == defaults["backend"].default and args.target == defaults["target"].default
    assert args.verify == defaults["verify"].default and not split_passes(args.passes)
    assert defaults["passes"].default is None
    assert args.latency is defaults["measure_latency"].default is False
    timed = lambda *flag: parser.parse_args(["compile", "m:f", "--input-shape", "1", *flag]).latency
    assert timed("--latency") is True and timed("--no-latency") is False


def test_no_latency_times_nothing_and_latency_times_the_artifact(capsys):
    """Timing is opt-in (``--latency``; ``--no-latency`` is the default): without it no row has a latency and the
    report says nothing about timing; with it the backend row times the artifact and the note says so."""
    from fxforge.compiler.report import LATENCY_NOTE
    for flag, timed in (("--no-latency", False), ("--latency", True)):
        assert main(["compile", "models:Mlp", "--input-shape", "4,32", "--passes", "fuse", flag]) == 0
        out = capsys.readouterr().out
        backend_row = next(ln for ln in out.splitlines() if ln.startswith("backend:eager"))
        assert (LATENCY_NOTE.split("(")[0] in out) is timed and ("ms " in backend_row) is timed, out


def test_tuning_db_and_backend_options_reach_compile(monkeypatch, tmp_path):
    seen = {}

    def fake_compile(model, example, **kwargs):
        seen.update(kwargs)
        raise fxforge.BackendError("stop here")

    monkeypatch.setattr(fxforge, "compile", fake_compile)
    assert main(["compile", "models:Mlp", "--input-shape", "4,32", "--backend", "tvm", "--tuning-db",
                 str(tmp_path), "--backend-option", "tune={'trials_per_task': 4}"]) == 2
    assert seen["tune"] == {"trials_per_task": 4, "trials": 0, "db": str(tmp_path)}


@pytest.mark.parametrize("argv, message", [
    (["compile", "models:Mlp", "--input-shape=-1,32"], "--input-shape takes positive sizes, got -1,32"),
    (["compile", "models:Mlp", "--input-shape", "100000000,100000000,100"], "cannot allocate inputs of shape"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--calibration", "test_cli:raising_calibration"],
     "calibration function test_cli:raising_calibration raised ValueError: no data today"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--tuning-db", "db"], "--tuning-db applies to the tvm"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--model-kwargs", "[1]"], "must be a JSON object"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--backend-option", "nokey"], "takes KEY=VALUE"),
    (["run", "no/such/dir", "--input", "x.npy"], "is not an fxforge artifact"),
    # found before the work, not after it (it ran, then failed with "internal error", status 1)
    (["run", "no/such/dir", "--input", "x.npy", "--save", "/nonexistent/dir/o.npz"],
     "--save /nonexistent/dir/o.npz: no directory /nonexistent/dir"),
    (["bench", "models:Mlp", "--input-shape", "4,31", "--systems", "eager"],
     "the model does not run on the example inputs (--input-shape 4,31, --dtype float32)"),
    (["bench", "models:Mlp", "--input-shape", "4,32", "--systems", "eager", "--out", str(Path(__file__) / "sub")],
     "test_cli.py is a file, not a directory"),
    # said as it is, not as "raised TypeError: 'NoneType' object is not iterable" / "'list' object is not callable"
    (["compile", "models:Mlp", "--input-shape", "4,32", "--calibration", "test_cli:returns_none"],
     "calibration function test_cli:returns_none returned None, not an iterable of input tuples"),
    (["compile", "models:Mlp", "--input-shape", "4,32", "--validation", "test_cli:BATCH_LIST"],
     "validation test_cli:BATCH_LIST is a list, not a function"),
])
def test_more_bad_arguments_give_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxforge: error:") and message in err and "\n" not in err


def raising_calibration():
    raise ValueError("no data today")


def returns_none():
    [(torch.randn(4, 32),)]  # the return forgotten


BATCH_LIST = [(torch.randn(4, 32),)]


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["compile", "models:Mlp", "--input-shape", "4,32", "--out",
                 str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_an_unexpected_exception_is_one_line_too(monkeypatch, capsys):
    monkeypatch.setattr(fxforge, "compile", lambda *a, **k: 1 / 0)
    assert main(["compile", "models:Mlp", "--input-shape", "4,32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fxforge: internal error: ZeroDivisionError: division by zero (set FXFORGE_TRACEBACK=1 for the " \
                  "traceback)"


def test_passes_lists_whole_descriptions_and_each_passs_options(capsys):
    assert main(["passes"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fold_qdq"))
    assert line.rstrip().endswith("merge requantization chains into one table lookup (exact).")
    assert main(["passes", "low_rank"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("low_rank") and "    energy: float = 0.95" in out
    assert "    method: Literal['svd', 'tucker2'] = 'svd'" in out
    assert main(["passes", "--verbose"]) == 0
    assert "    percentile: float = 99.99" in capsys.readouterr().out
    assert main(["passes", "lowrank"]) == 2
    assert "unknown pass or preset 'lowrank'" in capsys.readouterr().err


def test_a_preset_that_cannot_be_resolved_leaves_the_listing_alone(monkeypatch, capsys):
    """Before: a registered preset containing itself made ``fxforge passes --verbose`` fail ("preset 'loop' contains
    itself"), the listing resolving every preset only to tell presets from passes (a test left one registered, and
    the CLI test after it on the same worker failed)."""
    from fxforge.compiler import pass_manager
    for registry in ("_PRESETS", "_PRESET_DOCS"):
        monkeypatch.setattr(pass_manager, registry, dict(getattr(pass_manager, registry)))
    fxforge.register_preset("loop", ["fuse", "loop"], "holds itself")
    assert main(["passes", "--verbose"]) == 0 and main(["passes", "loop"]) == 0
    assert "preset: holds itself (fuse → loop)" in capsys.readouterr().out


def held_out():
    return [(torch.randn(4, 32),) for _ in range(2)]


def test_compile_validation_puts_the_users_data_in_the_report(capsys):
    assert main(["compile", "models:Mlp", "--input-shape", "4,32", "--passes", "fuse",
                 "--validation", "test_cli:held_out"]) == 0
    out = capsys.readouterr().out
    assert "mean cos" in out and "synthetic" not in out.split("errors:")[-1]


MISUSE = '''
import torch


def no_data():
    raise ValueError("no data today")


def batches():
    torch.manual_seed(0)
    return [(torch.randn(2, 4),) for _ in range(4)]


def pairs():
    torch.manual_seed(0)
    return [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(4)]
'''


@pytest.mark.parametrize("argv, message", [
    (["--input-shape=-1,4"], "--input-shape takes positive sizes, got -1,4"),
    (["--input-shape", "100000000,100000000,100"], "cannot allocate inputs of shape"),
    (["--input-shape", "2,4", "--passes", "int8", "--calibration", "misuse:no_data"],
     "calibration function misuse:no_data raised ValueError: no data today"),
    (["--input-shape", "2,4", "--out", "afile"], "afile is a file, not a directory; refusing to overwrite"),
], ids=["negative-shape", "too-large", "raising-calibration", "out-is-a-file"])
def test_console_misuse_is_one_line_and_status_2_before_any_compile(argv, message, tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY)
    (tmp_path / "misuse.py").write_text(MISUSE)
    (tmp_path / "afile").write_text("mine")
    done = console("compile", "tinymodel:tiny", *argv, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""  # no report: nothing was compiled
    assert done.stderr.startswith("fxforge: error: ") and done.stderr.count("\n") == 1
    assert message in done.stderr and (tmp_path / "afile").read_text() == "mine"


def test_console_input_key_picks_the_inputs_out_of_labelled_calibration_batches(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY)
    (tmp_path / "misuse.py").write_text(MISUSE)
    argv = ["compile", "tinymodel:tiny", "--input-shape", "2,4", "--passes", "int8", "--calibration", "misuse:pairs"]
    refused = console(*argv, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "got 2: float32 [2, 4], int64 [2] (a DataLoader of (input, label) pairs? give input_key=0" in refused.stderr
    done = console(*argv, "--input-key", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\ncalibrate.*batches=3", done.stdout), done.stdout  # 4 pairs, one held out by the budget
    keys = lambda text: _parser().parse_args(["compile", "m:f", "--input-shape", "1", "--input-key", text]).input_key
    assert keys("0") == 0 and keys("pixel_values") == "pixel_values" and keys("input_ids,1") == ("input_ids", 1)
    assert keys('"0"') == "0" and keys("'0', 1") == ("0", 1)  # a dict's key "0" could not be named
    with pytest.raises(SystemExit):
        keys('""')
    empty = console(*argv, "--input-key", "", cwd=tmp_path)  # was taken for the key "", which no batch holds
    assert empty.returncode == 2 and "argument --input-key: '' holds an empty key" in empty.stderr


def test_console_train_gives_distill_its_data_and_without_it_the_flag_is_named(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY)
    argv = ["compile", "tinymodel:tiny", "--input-shape", "2,4", "--passes",
            "prune_channels{ratio=0.5},distill{steps=2,eval_every=1}", "--calibration", "tinymodel:held_out"]
    refused = console(*argv, cwd=tmp_path)
    assert refused.returncode == 2 and "or --train MODULE:FN to the fxforge command" in refused.stderr
    done = console(*argv, "--train", "tinymodel:held_out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\ndistill.*steps=", done.stdout), done.stdout


def test_console_warnings_are_one_line_each(tmp_path):
    """`--passes fuse,int8` runs fuse once and says so; `--target cuda --backend onnx` without ONNX Runtime's
    CUDA provider says where the artifact runs instead (and --strict refuses it): one line each, no source."""
    import onnxruntime
    (tmp_path / "tinymodel.py").write_text(TINY)
    (tmp_path / "misuse.py").write_text(MISUSE)
    # --max-drop 1: the budget always holds, so --strict below refuses the target only (the tiny model's weights
    # are drawn anew in each process, and the budget's 2 held-out samples can flip one of two)
    argv = ["compile", "tinymodel:tiny", "--input-shape", "2,4", "--passes", "fuse,int8", "--calibration",
            "misuse:batches", "--backend", "onnx", "--target", "cuda", "--max-drop", "1"]
    done = console(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = ["fxforge: warning: pass 'int8' already begins with 'fuse'; those passes run once"]
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if not cuda:
        expected.append("fxforge: warning: target 'cuda': this onnxruntime lacks CUDAExecutionProvider; the "
                        "artifact runs on CPUExecutionProvider")
    assert done.stderr.splitlines() == expected
    assert done.stdout.count("\nfuse_batchnorm ") == 1
    if not cuda:
        strict = console(*argv, "--strict", cwd=tmp_path)
        assert strict.returncode == 2 and strict.stderr.splitlines()[-1] == (
            "fxforge: error: target 'cuda': this onnxruntime lacks CUDAExecutionProvider; the artifact runs on "
            "CPUExecutionProvider (strict=True)")


def test_console_help_shows_the_python_defaults_and_passes_describes_each_pass():
    import inspect
    defaults = inspect.signature(fxforge.compile).parameters
    helped = " ".join(console("compile", "--help").stdout.split())
    assert f"(default: {defaults['backend'].default})" in helped and f"(default: {defaults['target'].default})" \
        in helped and f"(default: {defaults['verify'].default})" in helped and "(default: none, as in" in helped
    assert "--latency, --no-latency" in helped and "default: --no-latency, as in fxforge.compile" in helped
    listed = console("passes").stdout.splitlines()
    assert next(ln for ln in listed if ln.startswith("fold_qdq")).endswith("into one table lookup (exact).")
    described = console("passes", "low_rank").stdout.splitlines()
    assert described[0].startswith("low_rank") and "    energy: float = 0.95" in described


def test_console_bench_lists_refuses_uncalibrated_int8_and_writes_json_and_plots(tmp_path):
    (tmp_path / "tinymodel.py").write_text(TINY)
    listed = console("bench", "--list", cwd=tmp_path)
    assert listed.returncode == 0 and "fxforge int8 → onnx" in listed.stdout.splitlines()
    refused = console("bench", "tinymodel:tiny", "--input-shape", "2,4", "--systems", "eager;fxforge int8 -> onnx",
                      cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr == (
        "fxforge: error: system(s) ['fxforge int8 → onnx'] need calibration data: give --calibration MODULE:FN\n")
    zero = console("bench", "tinymodel:tiny", "--input-shape", "2,4", "--rounds", "0", cwd=tmp_path)
    assert zero.returncode == 2 and "argument --rounds: must be at least 1, got 0" in zero.stderr
    done = console("bench", "tinymodel:tiny", "--input-shape", "2,4", "--rounds", "1", "--out", "out",
                   "--systems", "eager;fxforge fuse -> torchscript", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["system"] for r in results["rows"]) == ["eager", "fxforge fuse → torchscript"]  # ASCII -> too
    assert results["threads"] >= 1 and re.fullmatch(r"\d{4}-\d\d-\d\d", results["date"])  # the plots' caption
    for name in ("latency_vs_error.png", "speedup.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class DictInOut(torch.nn.Module):
    """Takes a dict, returns a number, a tensor, None and the batch size."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 3)

    def forward(self, d):
        return [0.5, self.l(d["x"]) + d["w"].sum(-1, keepdim=True), None, d["x"].shape[0], "scores"]


class Remainder(torch.nn.Module):
    def forward(self, x, k):
        return x % k


def test_run_fills_the_models_arguments_and_numbers_its_outputs_as_the_model_returns_them(tmp_path, capsys):
    """`fxforge run` matched the input files against the dict the model takes and refused them ("expected 2 input
    tensors ... got" the same two); it printed the graph's own outputs, so the number and the None vanished and the
    tensor was "output 0"; an artifact's runtime failure was an "internal error" with ONNX Runtime's raw text."""
    model = DictInOut().eval()
    cm = fxforge.compile(model, ({"x": torch.randn(2, 4), "w": torch.randn(2, 5)},), backend="onnx",
                         measure_latency=False)
    cm.save(tmp_path / "art")
    x, w = np.ones((2, 4), ">f4"), np.ones((2, 5), np.float32)  # x big-endian, valid .npy: torch refused it
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    assert main(["run", str(tmp_path / "art"), "--input", str(tmp_path / "x.npy"), "--input", str(tmp_path / "w.npy"),
                 "--save", str(tmp_path / "y.npz")]) == 0
    out = capsys.readouterr().out
    assert "output 0: float32 []  [0.5]" in out and "output 1: float32 [2, 3]" in out and "output 2: None" in out
    assert "output 3: int64 []  [2]" in out and "output 4: 'scores'" in out
    saved = np.load(tmp_path / "y.npz")
    assert sorted(saved.files) == ["arr_0", "arr_1", "arr_3", "arr_4"]
    np.testing.assert_allclose(saved["arr_1"], model({"x": torch.ones(2, 4), "w": torch.ones(2, 5)})[1].detach(),
                               rtol=1e-5)
    ints = fxforge.compile(Remainder(), (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64)),
                           backend="onnx", measure_latency=False)
    ints.save(tmp_path / "mod")
    np.save(tmp_path / "k.npy", np.zeros((2, 3), np.int64))
    assert main(["run", str(tmp_path / "mod"), "--input", str(tmp_path / "k.npy"), "--input",
                 str(tmp_path / "k.npy")]) == 2
    err = capsys.readouterr().err
    assert "the onnx artifact failed on inputs that match its signature" in err and "internal error" not in err




def test_run_needs_no_output_class(tmp_path, monkeypatch, capsys):
    """`fxforge run` rebuilt the model's output namedtuple, whose module (the script that compiled it) is not
    importable where the artifact runs: it failed where the flat outputs were all it printed."""
    (tmp_path / "pairmodel.py").write_text(NAMEDTUPLE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import pairmodel
    fxforge.compile(pairmodel.Model(4, 3).eval(), (torch.randn(2, 4),), measure_latency=False).save(tmp_path / "a")
    (tmp_path / "pairmodel.py").unlink()  # and forgotten, as in a process that never imported it
    monkeypatch.delitem(sys.modules, "pairmodel")
    import torch.utils._pytree as pytree
    from fxforge.compiler.trace import _loads
    monkeypatch.delitem(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE, "pairmodel.Out")
    monkeypatch.delitem(pytree.SUPPORTED_SERIALIZED_TYPES, pairmodel.Out)
    _loads.cache_clear()
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    assert main(["run", str(tmp_path / "a"), "--input", str(tmp_path / "x.npy")]) == 0
    assert "output 1: float32 [2, 3]" in capsys.readouterr().out


@pytest.mark.parametrize("source, spec, message", [
    ('raise RuntimeError("import failed\\nsecond line")', "raises_mod:Net",
     "cannot import 'raises_mod': RuntimeError: import failed"),
    ("def f(:", "syntax_mod:Net", "cannot import 'syntax_mod': SyntaxError: "),
    ("import sys; sys.exit(3)", "exits_mod:Net", "cannot import 'exits_mod': it called sys.exit(3) on import"),
    ("", "./path_mod:Net", "cannot import './path_mod': MODULE is a module name as `import` takes it, not a path"),
    ('raise RuntimeError("import failed")', "--calibration", "cannot import 'cal_mod': RuntimeError: import failed"),
], ids=["raises", "syntax-error", "sys-exit", "path", "calibration"])
def test_a_module_failing_on_import_is_one_line_and_status_2(source, spec, message, tmp_path, monkeypatch, capsys):
    """Only ImportError was the user's: any other exception of their module's import was an "internal error",
    status 1, and a module calling sys.exit(3) ended fxforge with status 3 and no word."""
    module = message.split("'")[1].removeprefix("./")
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = ["compile", spec, "--input-shape", "4,32"]
    if spec == "--calibration":
        argv = ["compile", "models:Mlp", "--input-shape", "4,32", "--calibration", f"{module}:batches"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxforge: error: ") and message in err and "\n" not in err, err


def test_a_closed_or_full_stdout_is_no_internal_error():
    """`fxforge run ... | head -1` printed "internal error: BrokenPipeError" (status 1): a reader that leaves is
    normal shell use, so nothing is said and the status is a shell's for SIGPIPE; a full disk is one line."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before fxforge writes a line
    with open(write_end, "wb") as stdout:
        closed = subprocess.run([FXFORGE, "passes"], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600)
    assert closed.returncode == 141 and closed.stderr == ""
    if Path("/dev/full").exists():
        with open("/dev/full", "wb") as stdout:
            full = subprocess.run([FXFORGE, "passes"], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600)
        assert full.returncode == 2
        assert full.stderr == "fxforge: error: cannot write the output: No space left on device\n"


@pytest.mark.parametrize("out, message", [
    ("afile/sub", "--out afile/sub: afile is a file, not a directory"),
    ("/proc/fxforge_out", "--out /proc/fxforge_out cannot be written"),
    ("loop", "cannot write an artifact to loop: it is, or is under, a symbolic link loop"),
    ("", "--out is empty: name the directory to write the artifact to"),
], ids=["under-a-file", "proc", "symlink-loop", "empty"])
def test_out_that_cannot_be_written_is_refused_before_compiling(out, message, tmp_path, monkeypatch, capsys):
    """These were found after the whole compile (a loop as an internal error), and `--out ""` wrote nothing and
    exited 0."""
    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.setattr(fxforge, "compile", lambda *a, **k: pytest.fail("compiled before --out was checked"))
    assert main(["compile", "models:Mlp", "--input-shape", "4,32", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxforge: error: ") and message in err and "\n" not in err, err
    assert (tmp_path / "afile").read_text() == "mine"


def test_run_an_empty_input_file_is_one_line(tmp_path, capsys):
    """numpy's EOFError for a 0-byte .npy was an "internal error", status 1."""
    fxforge.compile(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),), measure_latency=False).save(tmp_path / "a")
    (tmp_path / "empty.npy").write_bytes(b"")
    assert main(["run", str(tmp_path / "a"), "--input", str(tmp_path / "empty.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fxforge: error: cannot read input {tmp_path / 'empty.npy'}: No data left in file"


def test_the_example_inputs_are_the_same_every_run():
    """Drawn from torch's global generator, they differed between two identical commands, and with them int8's first
    activation ranges: the report's error columns (0.046 against 0.041) and an eager int8 model itself."""
    from fxforge.cli import _example_inputs

    state = torch.get_rng_state()
    first, again = (_example_inputs(["2,3,4,4", "2,5"], dtype) for dtype in ("float32", "float32"))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(_example_inputs(["3"], "int64")[0], _example_inputs(["3"], "int64")[0])
