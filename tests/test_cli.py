"""The console script: listings, a real compile from the command line, one-line errors with exit status 2."""
import subprocess
import sys

import pytest
import torch

import fxforge
from fxforge.cli import main


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
    (["compile", "models:accuracy", "--input-shape", "4,32"], "accuracy() failed"),
])
def test_bad_arguments_give_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxforge: error:") and message in err and "\n" not in err


def test_module_entry_point_refuses_missing_arguments():
    result = subprocess.run([sys.executable, "-m", "fxforge.cli", "compile", "x:y"], capture_output=True, text=True)
    assert result.returncode == 2 and "--input-shape" in result.stderr and "Traceback" not in result.stderr
