"""Bad input, case by case: each gets a named fxforge error whose one-line message names the cause (and the
node/op where there is one), and the CLI turns it into ``fxforge: error: ...`` with exit status 2.

``python tests/test_bad_input.py`` prints the table of classes and actual messages for docs/reliability.md.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fxforge
from fxforge.backends import base
from fxforge.cli import main


# ---------------------------------------------------------------------------------------- models the cases use

class ReturnsNone(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class Logits(dict):
    """A dict subclass pytree does not know (a model's output class)."""


class ReturnsLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Logits:
        return Logits(logits=self.fc(x))


class ReturnsNan(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return self.fc(x), float("nan")


class DataDependent(nn.Module):
    """Branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class UnsupportedPython(nn.Module):
    """Leaves the tensor world: a NumPy round trip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)


class Counter(nn.Module):
    """Counts its calls in a buffer and scales by the count: each call depends on the calls before it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x) * self.calls


class MaskedMean(nn.Module):
    """A mean over the tokens a mask keeps: clamp_min of an int64 count, which TVM imports but cannot legalize."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class Gather(nn.Module):
    """Gathers along ``dim`` at ids it is given (``shift=0``) or computes (``shift=1``): only the former can the
    signature bound."""

    def __init__(self, shift: int = 0, dim: int = 1) -> None:
        super().__init__()
        self.shift, self.dim = shift, dim

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, self.dim, index + self.shift if self.shift else index) * 2


def gathered(shift: int, backend: str, index: list[list[int]], dim: int = 1) -> torch.Tensor:
    """A call of :class:`Gather` with ``index`` (a computed index is read mod the size it indexes, the call's batch
    along dim 0, so the guard, not the kernel, refuses one out of range)."""
    compiled = compile_(Gather(shift, dim), (torch.randn(2, 5), torch.tensor([[0], [0]])), backend=backend)
    return compiled(torch.randn(2, 5), torch.tensor(index))


class Loss(nn.Module):
    """A classifier's loss on its labels (cross-entropy, ignore_index -100)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(x), labels)


class Scatters(nn.Module):
    """Scatters ones at its labels (a one-hot by scatter)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x).scatter(1, labels.unsqueeze(1), 1.0) * x


class Counts(nn.Module):
    """Counts its values in at least 4 bins, less ``shift`` where it computes them."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bincount(x - self.shift if self.shift else x, minlength=4)


class Bce(nn.Module):
    """Binary cross-entropy of its scores against its target, which torch wants in [0, 1]."""

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy(scores.sigmoid(), target)


class KthValue(nn.Module):
    """aten.kthvalue has no ONNX translation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(x, 2, dim=1).values


class ResizesUint8(nn.Module):
    """Resizes a uint8 image before converting it to float (torchvision's v2 order: Resize, then ToDtype)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        resized = nn.functional.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False)
        return resized.float() / 255


class AddsTwo(nn.Module):
    def forward(self, x, y):
        return x * 2 + y.sin()


class WritesIntoX(nn.Module):
    def forward(self, x, y):
        x.mul_(2)
        return x + y


class Overflows(nn.Module):
    """Squares its input before a linear: finite inputs past 1e19 overflow float32 inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * x)


def endless():
    while True:
        yield (torch.randn(2, 4),)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def nan_weights() -> nn.Module:
    model = mlp()
    model[2].weight.data[1, 2] = float("nan")
    return model


def inf_buffer() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    model[1].running_var[3] = float("inf")
    return model


def pruned() -> nn.Module:
    """A linear pruned by torch.nn.utils.prune and run with gradients: its hook leaves ``weight`` a non-leaf tensor."""
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    model(x)
    return model


def calibration() -> list:
    return [(torch.randn(2, 4),) for _ in range(2)]


def compile_(model: nn.Module | None = None, example=None, **kw):
    kw.setdefault("measure_latency", False)
    return fxforge.compile(model if model is not None else mlp(), example if example is not None else
                           (torch.randn(2, 4),), **kw)


def saved(tmp: Path, backend: str = "eager") -> Path:
    return compile_(passes="fuse", backend=backend).save(tmp / "artifact")


def edit_meta(path: Path, keep_checksum: bool = False, **changes) -> Path:
    """The manifest edited as given, its checksum dropped unless kept: the checks before the checksum's (format version,
    backend) are what these cases meet."""
    meta = json.loads((path / base.META_FILE).read_text())
    if not keep_checksum:
        meta.pop("checksum")
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    (path / base.META_FILE).write_text(json.dumps(meta))
    return path


def without_module(mp: pytest.MonkeyPatch, module: str, backend: str) -> None:
    """Simulate an optional package that is not installed (its backend module not yet imported)."""
    mp.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    package = f"fxforge.backends.{backend}"
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        mp.delitem(sys.modules, name)
    mp.delitem(base._BACKENDS, backend, raising=False)


def tuning_db(tmp: Path, file: str, text: str) -> str:
    """A tuning database directory holding one file with ``text``."""
    from fxforge.backends.tvm import tuning as metaschedule
    db = tmp / "db"
    db.mkdir()
    (db / getattr(metaschedule, file)).write_text(text)
    return str(db)


def modified_file(tmp: Path) -> Path:
    path = saved(tmp)
    from fxforge.backends.eager import PROGRAM
    (path / PROGRAM).write_bytes((path / PROGRAM).read_bytes() + b"\0")
    return path


def garbage_dir(tmp: Path) -> Path:
    (tmp / "artifact").mkdir()
    (tmp / "artifact" / "notes.txt").write_text("mine")
    return tmp / "artifact"


def stray_manifest_dir(tmp: Path) -> Path:
    """A user's directory that happens to hold an fxforge.json beside their own work."""
    saved(tmp)
    (tmp / "artifact" / "thesis.tex").write_text("\\documentclass{article}")
    return tmp / "artifact"


def read_only_dir(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    """A directory nobody may write into; root ignores the mode, so there creating anything in it is refused as
    the kernel would refuse it to a user."""
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    if os.geteuid() == 0:
        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        mp.setattr(base.tempfile, "mkdtemp", refuse)
    return tmp / "ro" / "out"


# -------------------------------------------------------------------------------------------------- the table

Case = Callable[[Path, pytest.MonkeyPatch], object]
x = torch.randn(2, 4)

CASES: list[tuple[str, type, str, Case]] = [
    # capture
    ("data-dependent if", fxforge.TraceError,
     r"torch\.export could not capture the model: .* at .*test_bad_input\.py:\d+ in forward: if x\.sum\(\) > 0",
     lambda t, mp: compile_(DataDependent())),
    ("unsupported Python (NumPy in forward)", fxforge.TraceError,
     r"torch\.export could not capture the model: \.numpy\(\) is not supported.* in forward: .*x\.numpy\(\)",
     lambda t, mp: compile_(UnsupportedPython())),
    ("a forward that updates a buffer it reads", fxforge.TraceError,
     r"forward updates the buffer\(s\) calls in place, so each call depends on the calls before it",
     lambda t, mp: compile_(Counter())),
    ("one tensor given for two example inputs that differ in use", fxforge.TraceError,
     r"example inputs 0 and 1 are one tensor, and export captured them as one input; give separate tensors",
     lambda t, mp: (lambda y: compile_(AddsTwo(), (y, y)))(torch.randn(2, 4))),
    ("a model deepcopy refuses (a pruning hook's weight, computed with gradients)", fxforge.InputError,
     r"fxforge cannot copy the model: a module holds a tensor computed with gradients.*prune\.remove$",
     lambda t, mp: compile_(pruned())),
    ("example inputs not tensors", fxforge.InputError, r"example_inputs must be a tuple of tensors, got \['str'\]",
     lambda t, mp: compile_(example=("abc",))),
    ("a None example input (a skipped optional argument)", fxforge.InputError,
     r"got \[\[2, 4\], 'NoneType'\]: input 1 is None \(a skipped optional argument\), which a compiled model cannot",
     lambda t, mp: compile_(TwoInputs(), (torch.randn(2, 4), None))),
    ("too few example inputs", fxforge.InputError,
     r"does not run on the example inputs \[\[2, 4\]\]: .*missing 1 required positional argument: 'y'",
     lambda t, mp: compile_(TwoInputs())),
    ("example input of the wrong shape", fxforge.InputError,
     r"does not run on the example inputs \[\[2, 5\]\]: .*cannot be multiplied",
     lambda t, mp: compile_(example=(torch.randn(2, 5),))),
    ("example input of the wrong dtype", fxforge.InputError,
     r"does not run on the example inputs .*(dtype|Long|Float)",
     lambda t, mp: compile_(example=(torch.ones(2, 4, dtype=torch.long),))),
    # calling the compiled model
    ("call with too many inputs", fxforge.InputError,
     r"expected 1 input tensor\(s\) shaped like \[\[None, 4\]\], got \[\[2, 4\], \[2, 4\]\]",
     lambda t, mp: compile_()(x, x)),
    ("call with the wrong shape", fxforge.InputError, r"input 0 has shape \[2, 5\], compiled for \[None, 4\]",
     lambda t, mp: compile_()(torch.randn(2, 5))),
    ("call with the wrong dtype", fxforge.InputError, r"input 0 has dtype torch\.float64, compiled for torch\.float32",
     lambda t, mp: compile_()(x.double())),
    ("call of an int8 model with NaN in its input", fxforge.InputError,
     r"input 0 holds NaN or Inf: the compiled model would turn them into finite numbers \(int8 quantizers",
     lambda t, mp: compile_(passes="int8", calibration=[(x,)] * 4, max_drop=math.inf)(
         torch.tensor([[float("nan"), 0.0, 1.0, 2.0]]))),
    ("call with a non-tensor", fxforge.InputError, r"input 0 must be a tensor, got float",
     lambda t, mp: compile_()(3.0)),
    ("call with keyword arguments", fxforge.InputError,
     r"a compiled model takes its inputs by position, as it was compiled; got keyword argument\(s\) x",
     lambda t, mp: compile_()(x=torch.randn(2, 4))),
    ("call with one tensor for an input the model writes into and another input", fxforge.InputError,
     r"inputs 0 and 1 share memory, and the model writes into input 0 in place",
     lambda t, mp: (lambda y: compile_(WritesIntoX(), (x, x.clone()))(y, y))(torch.zeros(2, 4))),
    ("call with a token id past the vocabulary", fxforge.InputError,
     r"input 0 holds indices from 60 to 60, but it indexes an embedding of 50 rows: each must be in \[0, 50\)",
     lambda t, mp: compile_(nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(56, 3)).eval(),
                            (torch.randint(0, 50, (2, 7)),), backend="onnx")(torch.full((3, 7), 60))),
    ("call with a negative token id (ONNX's Gather would wrap it around)", fxforge.InputError,
     r"input 0 holds indices from -3 to -3, but it indexes an embedding of 50 rows",
     lambda t, mp: compile_(nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(56, 3)).eval(),
                            (torch.randint(0, 50, (2, 7)),), backend="onnx")(torch.full((3, 7), -3))),
    ("call with an index outside a gather's dimension (TVM would read other memory)", fxforge.InputError,
     r"input 1 holds indices from 1 to 9, but it indexes dimension 1 \(size 5\) at node 'gather': each must be in "
     r"\[0, 5\)",
     lambda t, mp: gathered(0, "onnx", [[1], [9]])),
    ("call with a class label outside a loss's classes (ONNX Runtime returned a loss)", fxforge.InputError,
     r"input 1 holds labels from -5 to 1, but it indexes 3 classes at node 'cross_entropy_loss': each must be in "
     r"\[0, 3\) or -100 \(its ignore_index\)",
     lambda t, mp: compile_(Loss().eval(), (x, torch.tensor([0, 2])), backend="onnx")(x, torch.tensor([1, -5]))),
    ("call with a negative index into a scatter (ONNX Runtime wrapped it around)", fxforge.InputError,
     r"input 1 holds indices from -2 to 0, but it indexes dimension 1 \(size 4\) at node 'scatter': each must be in "
     r"\[0, 4\)",
     lambda t, mp: compile_(Scatters(), (x, torch.tensor([0, 3])), backend="onnx")(x, torch.tensor([0, -2]))),
    ("call with a negative value for a bincount (ONNX Runtime counted it in the last bin)", fxforge.InputError,
     r"^input 0 holds indices from -1 to 2, but it indexes the bins of a bincount at node 'bincount': each must be in "
     r"\[0, ∞\)$",
     lambda t, mp: compile_(Counts(), (torch.tensor([0, 1, 3]),), backend="onnx")(torch.tensor([2, -1]))),
    ("call whose computed bincount value is negative (ONNX Runtime counted it in the last bin)", fxforge.InputError,
     r"^node 'bincount' reads indices the model computes from its inputs, from -1 to 1, but it indexes the bins of a "
     r"bincount: each must be in \[0, ∞\)",
     lambda t, mp: compile_(Counts(1), (torch.tensor([1, 2, 4]),), backend="onnx")(torch.tensor([2, 0]))),
    ("call whose computed index is out of range (ONNX's Gather would wrap -1 around, TVM read other memory)",
     fxforge.InputError, r"node 'gather' reads indices the model computes from its inputs, from -1 to 4, but it "
     r"indexes dimension 1 \(size 5\): each must be in \[0, 5\)",
     lambda t, mp: gathered(1, "onnx", [[-2], [3]])),
    ("a computed index a kernel refuses (TorchScript)", fxforge.BackendError,
     r"^the torchscript artifact failed on inputs that match its signature: RuntimeError: index 9 is out of bounds "
     r"for dimension 1 with size 5$",
     lambda t, mp: gathered(1, "torchscript", [[1], [8]])),
    ("a meta tensor, which has no values (sparse ones are refused alike)",
     fxforge.InputError,
     r"^input 0 is a meta tensor; a compiled model takes dense tensors with values$",
     lambda t, mp: compile_(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).eval(), (torch.randn(2, 5),),
                            backend="torchscript")(torch.empty(3, 5, device="meta"))),
    ("a computed index into the batch out of range (ONNX Runtime failed by itself, naming its own node)",
     fxforge.InputError, r"^node 'gather' reads indices the model computes from its inputs, from 2 to 9, but it "
     r"indexes dimension 0 \(the batch\): each must be in \[0, 2\)",
     lambda t, mp: gathered(1, "onnx", [[1], [8]], dim=0)),
    ("a model raising on fresh inputs like the example (a binary cross-entropy's target above 1)", fxforge.InputError,
     r"^the model raises on fresh inputs like the example, which every compiled model is checked on \(normal floats, "
     r"folded to the example's sign .*\): RuntimeError: all elements of target should be between 0 and 1$",
     lambda t, mp: compile_(Bce(), (torch.rand(2, 4), torch.rand(2, 4)))),
    ("a model returning None", fxforge.InputError, r"the model returns no tensor \(got NoneType\)",
     lambda t, mp: compile_(ReturnsNone(), backend="onnx")),
    ("a model returning NaN as a Python number", fxforge.InputError,
     r"the model returns NaN as a Python number \(output 1\), which torch\.export cannot match",
     lambda t, mp: compile_(ReturnsNan())),
    ("passes given as a set (no order)", fxforge.PassError,
     r"passes must be a pass name, a fxforge\.Pass or a list of them, got set",
     lambda t, mp: compile_(passes={"fuse_batchnorm", "fuse_activation"})),
    ("a model returning its tensor in a dict subclass", fxforge.InputError,
     r"the model returns its tensors inside a Logits, which torch\.utils\._pytree cannot see into",
     lambda t, mp: compile_(ReturnsLogits())),
    ("a plain function instead of a module", fxforge.TraceError, r"expected a torch\.nn\.Module, got builtin_function_or_method",
     lambda t, mp: compile_(torch.relu)),
    ("a bfloat16 model on ONNX Runtime's CPU", fxforge.BackendError,
     r"ONNX Runtime cannot run the exported model on CPUExecutionProvider: Could not find an implementation for "
     r"Gemm",
     lambda t, mp: compile_(mlp().to(torch.bfloat16), (torch.randn(2, 4, dtype=torch.bfloat16),), backend="onnx")),
    # passes
    ("unknown pass", fxforge.PassError, r"unknown pass 'fusion'; valid passes: .*fuse_batchnorm.*; presets: .*fuse",
     lambda t, mp: compile_(passes="fusion")),
    ("unknown pass option", fxforge.PassError, r"pass 'low_rank' has no option 'rank'; options: energy",
     lambda t, mp: compile_(passes="low_rank{rank=3}")),
    ("pass option of the wrong type", fxforge.PassError,
     r"option 'energy' of pass 'low_rank' must be float, got 'high'",
     lambda t, mp: compile_(passes="low_rank{energy='high'}")),
    ("pass option out of range", fxforge.PassError,
     r"bad options for pass 'low_rank': energy must be in \(0, 1\], got 2\.0",
     lambda t, mp: compile_(passes="low_rank{energy=2.0}")),
    ("unparsable pass options", fxforge.PassError, r"cannot parse options of 'low_rank'",
     lambda t, mp: compile_(passes="low_rank{energy=}")),
    ("passes that are neither a name nor a list", fxforge.PassError,
     r"passes must be a pass name, a fxforge\.Pass or a list of them, got int",
     lambda t, mp: compile_(passes=3)),
    ("a pass option given twice", fxforge.PassError, r"option 'energy' of 'low_rank' is given twice",
     lambda t, mp: compile_(passes="low_rank{energy=0.9,energy=0.5}")),
    ("a string pass option without quotes", fxforge.PassError,
     r"option 'budget' of 'low_rank': latency is not a value; a string needs quotes \(budget='latency'\)",
     lambda t, mp: compile_(passes="low_rank{budget=latency}")),
    ("impossible pass order", fxforge.PassError, r"pass 'calibrate' must come after 'insert_qdq' in the pipeline",
     lambda t, mp: compile_(passes=["calibrate", "insert_qdq"], calibration=calibration())),
    ("channel pruning after quantization", fxforge.PassError,
     r"pass 'prune_channels' must come before 'insert_qdq' in the pipeline \(got: .* → fold_qdq → prune_channels\)",
     lambda t, mp: compile_(passes=["int8", "prune_channels"], calibration=calibration())),
    ("unknown verify mode", fxforge.PassError, r"verify must be one of .*, got 'always'",
     lambda t, mp: compile_(verify="always")),
    # backends and targets
    ("unknown backend", fxforge.BackendError, r"unknown backend 'tensorrt'; valid backends: eager, onnx, torchscript",
     lambda t, mp: compile_(backend="tensorrt")),
    ("unknown target", fxforge.TargetError, r"unknown target 'mars'; valid targets: arm64, arm64-dotprod, cuda, x86, x86-amx",
     lambda t, mp: compile_(target="mars")),
    ("unknown backend option (eager)", fxforge.BackendError, r"the eager backend takes no options, got opset",
     lambda t, mp: compile_(backend="eager", opset=18)),
    ("unknown backend option (onnx)", fxforge.BackendError, r"unknown onnx backend option\(s\) threads",
     lambda t, mp: compile_(backend="onnx", threads=2)),
    ("onnxruntime not installed", fxforge.BackendError,
     r"the onnx backend needs the 'onnxruntime' package: pip install 'fxforge\[onnx\]'",
     lambda t, mp: (without_module(mp, "onnxruntime", "onnx"), compile_(backend="onnx"))),
    ("TVM not installed", fxforge.BackendError,
     r"the tvm backend needs the 'tvm' package: pip install 'fxforge\[tvm\]'",
     lambda t, mp: (without_module(mp, "tvm", "tvm"), compile_(backend="tvm"))),
    ("an op TVM imports but cannot legalize", fxforge.BackendError,
     r"TVM's Relax pipeline \(decompose, legalize, fold, fuse\) failed on the imported model: RuntimeError: "
     r"Cannot convert infinity to BigInt",
     lambda t, mp: compile_(MaskedMean(), (torch.randn(2, 7), torch.randint(0, 2, (2, 7))), backend="tvm")),
    ("op the ONNX exporter cannot lower", fxforge.BackendError,
     r"cannot lower op aten\.kthvalue\.default at node 'kthvalue'",
     lambda t, mp: compile_(KthValue(), (torch.randn(2, 5),), backend="onnx")),
    ("a uint8 image resized by interpolation (the ONNX and TVM kernels round otherwise)", fxforge.BackendError,
     r"^node 'upsample_bilinear2d' resizes a uint8 image by interpolation, which PyTorch computes in fixed point and "
     r"the onnx backend in float",
     lambda t, mp: compile_(ResizesUint8(), (torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8),),
                            backend="onnx")),
    ("op TVM's Relax frontend cannot import", fxforge.BackendError,
     r"cannot import op aten\.kthvalue\.default at node 'kthvalue'",
     lambda t, mp: compile_(KthValue(), (torch.randn(2, 5),), backend="tvm")),
    # calibration and numbers
    ("int8 without calibration data", fxforge.CalibrationError, r"pass 'calibrate' needs calibration data",
     lambda t, mp: compile_(passes="int8")),
    ("empty calibration data", fxforge.CalibrationError, r"pass 'calibrate' got an empty calibration iterable",
     lambda t, mp: compile_(passes="int8", calibration=[])),
    ("calibration batch of the wrong shape", fxforge.CalibrationError,
     r"calibration batch 0: input 0 has shape \[2, 5\], compiled for \[None, 4\]",
     lambda t, mp: compile_(passes="int8", calibration=[(torch.randn(2, 5),)])),
    ("(input, label) calibration batches", fxforge.CalibrationError,
     r"calibration batch 0 must be a tuple of 1 tensor\(s\) .* got 2: .* give input_key=0, or calibration_fn=",
     lambda t, mp: compile_(passes="int8", calibration=[(x, torch.zeros(2))])),
    ("input_key not in a calibration batch", fxforge.CalibrationError,
     r"calibration batch 0: input_key 'x' is not in it \(a dict with keys \['image', 'label'\]\)",
     lambda t, mp: compile_(passes="int8", calibration=[{"image": x, "label": 0}], input_key="x")),
    ("NaN in calibration data", fxforge.CalibrationError, r"calibration batch 1, input 0 holds NaN or Inf",
     lambda t, mp: compile_(passes="int8", calibration=[(x,), (torch.full((2, 4), float("nan")),)])),
    ("an empty calibration batch", fxforge.CalibrationError,
     r"calibration batch 1: input 0 has batch size 0: a compiled model takes batches of 1 or more",
     lambda t, mp: compile_(passes="int8", calibration=[(x,), (torch.randn(0, 4),)])),
    ("a meta tensor in calibration data", fxforge.CalibrationError,
     r"calibration batch 0: input 0 is a meta tensor; a compiled model takes dense tensors with values",
     lambda t, mp: compile_(passes="int8", calibration=[(x.to("meta"),)])),
    ("a sparse tensor in calibration data", fxforge.CalibrationError,
     r"calibration batch 0: input 0 is a torch\.sparse_coo tensor",
     lambda t, mp: compile_(passes="int8", calibration=[(x.to_sparse(),)], validation=[(torch.randn(2, 4),)])),
    ("calibration inputs of two batch sizes", fxforge.CalibrationError,
     r"calibration batch 0: inputs 0 and 1 have batch sizes 2 and 3",
     lambda t, mp: compile_(TwoInputs(), (x, x.clone()), passes="int8", calibration=[(x, torch.randn(3, 4))])),
    ("calibration data the model overflows on", fxforge.CalibrationError,
     r"the model computes Inf at mul on the calibration data, whose inputs are finite",
     lambda t, mp: compile_(Overflows(), passes=["insert_qdq", "calibrate"], calibration=[(torch.full((2, 4), 1e20),)])),
    ("an endless calibration generator", fxforge.CalibrationError,
     r"calibration data gave more than 10 batches \(an endless iterable\?\): give a finite one",
     lambda t, mp: mp.setattr("fxforge.compiler.quality.READ_LIMIT", 10) or compile_(passes="int8",
                                                                                      calibration=endless())),
    ("validation data the model's outputs are all NaN or Inf on", fxforge.InputError,
     r"validation batch 0: the model's outputs on it are all NaN or Inf",
     lambda t, mp: compile_(Overflows(), validation=[(torch.full((2, 4), 1e20),)])),
    ("distill without train data", fxforge.CalibrationError, r"pass 'distill' needs training data: pass train=",
     lambda t, mp: compile_(passes=["low_rank", "distill"])),
    ("train batch of the wrong shape", fxforge.InputError, r"train batch 1: input 0 has shape \[2, 5\]",
     lambda t, mp: compile_(passes=["low_rank", "distill"], train=[(x,), (torch.randn(2, 5),)])),
    ("NaN in train data", fxforge.InputError, r"train batch 1 holds NaN or Inf",
     lambda t, mp: compile_(passes=["low_rank", "distill"], train=[(x,), (torch.full((2, 4), float("nan")),)])),
    ("a metric callable returning NaN", fxforge.InputError, r"the metric callable '<lambda>' returned nan",
     lambda t, mp: compile_(validation=[(x,)], metric=lambda outputs, inputs: float("nan"))),
    ("a metric callable returning infinity", fxforge.InputError, r"the metric callable '<lambda>' returned inf",
     lambda t, mp: compile_(validation=[(x,)], metric=lambda outputs, inputs: float("inf"))),
    ("NaN in a weight", fxforge.InputError, r"model tensor '2\.weight' holds NaN",
     lambda t, mp: compile_(nan_weights())),
    ("Inf in batch-norm statistics", fxforge.InputError, r"model tensor '1\.running_var' holds Inf",
     lambda t, mp: compile_(inf_buffer())),
    ("a model on the meta device", fxforge.InputError,
     r"model tensor '0\.weight' is on the meta device \(it has no data\)",
     lambda t, mp: compile_(mlp().to("meta"))),
    ("an uninitialized lazy module (never run)", fxforge.InputError,
     r"model tensor '0\.weight' is an uninitialized lazy parameter",
     lambda t, mp: compile_(nn.Sequential(nn.LazyLinear(3)))),
    # saved artifacts
    ("artifact directory without fxforge.json", fxforge.ArtifactError,
     r"is not an fxforge artifact \(no fxforge\.json\)",
     lambda t, mp: fxforge.load(t)),
    ("artifact file modified after saving", fxforge.ArtifactError, r"was modified after saving \(hash mismatch\)",
     lambda t, mp: fxforge.load(modified_file(t))),
    ("fxforge.json edited after saving (a constant output changed: it would load as if compiled so)",
     fxforge.ArtifactError, r"fxforge\.json was modified after saving \(its checksum does not match\)",
     lambda t, mp: fxforge.load(edit_meta(saved(t), keep_checksum=True, info={"edited": True}))),
    ("artifact of another format version", fxforge.ArtifactError,
     r"has artifact format 99, this fxforge reads formats 1, 2, 3$",
     lambda t, mp: fxforge.load(edit_meta(saved(t), format=99))),
    ("loading a file instead of an artifact directory", fxforge.ArtifactError,
     r"program\.pt2 is a file; an fxforge artifact is the directory that holds fxforge\.json",
     lambda t, mp: fxforge.load(saved(t) / "program.pt2")),
    ("fxforge.json with a field of the wrong type", fxforge.ArtifactError,
     r"fxforge\.json is corrupt: field 'files' has the wrong type \(list\)",
     lambda t, mp: fxforge.load(edit_meta(saved(t), files=["program.pt2"]))),
    ("corrupt fxforge.json", fxforge.ArtifactError, r"fxforge\.json is corrupt",
     lambda t, mp: fxforge.load((saved(t) / base.META_FILE).write_text("{") and t / "artifact")),
    ("fxforge.json without a backend", fxforge.ArtifactError, r"fxforge\.json lacks 'backend'",
     lambda t, mp: fxforge.load(edit_meta(saved(t), backend=None))),
    ("artifact of a foreign backend", fxforge.ArtifactError,
     r"was saved by backend 'tensorrt', which this fxforge lacks",
     lambda t, mp: fxforge.load(edit_meta(saved(t), backend="tensorrt"))),
    ("saving over a directory that is not an artifact", fxforge.ArtifactError,
     r"exists and is not an fxforge artifact \(no readable fxforge\.json\); refusing to overwrite",
     lambda t, mp: compile_().save(garbage_dir(t))),
    ("saving over a directory with a stray fxforge.json beside the user's files", fxforge.ArtifactError,
     r"holds files that are not part of the artifact there \(thesis\.tex\); refusing to overwrite",
     lambda t, mp: compile_().save(stray_manifest_dir(t))),
    ("saving to a path that is a file", fxforge.ArtifactError, r"is a file, not a directory; refusing to overwrite",
     lambda t, mp: compile_().save((t / "out").write_text("x") and t / "out")),
    ("saving under a path that is a file", fxforge.ArtifactError, r"cannot write an artifact to .*out/artifact",
     lambda t, mp: compile_().save((t / "out").write_text("x") and t / "out" / "artifact")),
    ("saving into a read-only place", fxforge.ArtifactError,
     r"cannot write an artifact to .*ro/out: Permission denied",
     lambda t, mp: compile_().save(read_only_dir(t, mp))),
    # tuning
    ("corrupt tuning database", fxforge.TuningError, r"tuning database metadata .*db/fxforge_tuning\.json is corrupt",
     lambda t, mp: compile_(backend="tvm", tune={"trials": 1, "db": tuning_db(t, "META_FILE", "{")})),
    ("tuning records of unknown origin", fxforge.TuningError,
     r"db holds MetaSchedule records but no fxforge_tuning\.json, so its target and TVM version are unknown",
     lambda t, mp: compile_(backend="tvm", tune={"trials": 1, "db": tuning_db(t, "RECORD_FILE", "[0, []]\n")})),
]


def _ids() -> list[str]:
    return [re.sub(r"\W+", "_", name).strip("_") for name, *_ in CASES]


@pytest.mark.parametrize("name, error, pattern, case", CASES, ids=_ids())
def test_bad_input_gets_a_named_one_line_error(name, error, pattern, case, tmp_path, monkeypatch):
    with pytest.raises(fxforge.FxforgeError) as info:
        case(tmp_path, monkeypatch)
    message = str(info.value)
    assert type(info.value) is error, f"{name}: {type(info.value).__name__}: {message}"
    assert "\n" not in message and re.search(pattern, message), message


CLI = [  # (case name, argv after `compile`) for a representative subset
    ("data-dependent if", ["test_bad_input:DataDependent", "--input-shape", "2,4"]),
    ("unknown pass", ["test_bad_input:mlp", "--input-shape", "2,4", "--passes", "fusion"]),
    ("unknown pass option", ["test_bad_input:mlp", "--input-shape", "2,4", "--passes", "low_rank{rank=3}"]),
    ("impossible pass order", ["test_bad_input:mlp", "--input-shape", "2,4", "--passes", "calibrate,insert_qdq",
                               "--calibration", "test_bad_input:calibration"]),
    ("unknown backend", ["test_bad_input:mlp", "--input-shape", "2,4", "--backend", "tensorrt"]),
    ("unknown target", ["test_bad_input:mlp", "--input-shape", "2,4", "--target", "mars"]),
    ("op the ONNX exporter cannot lower", ["test_bad_input:KthValue", "--input-shape", "2,5", "--backend", "onnx"]),
    ("int8 without calibration data", ["test_bad_input:mlp", "--input-shape", "2,4", "--passes", "int8"]),
    ("NaN in a weight", ["test_bad_input:nan_weights", "--input-shape", "2,4"]),
]


@pytest.mark.parametrize("name, argv", CLI, ids=[n for n, _ in CLI])
def test_cli_prints_one_line_and_exits_2(name, argv, capsys):
    pattern = next(p for n, _, p, _ in CASES if n == name)
    assert main(["compile", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fxforge: error: ") and "\n" not in err and "Traceback" not in captured.out + err
    assert re.search(pattern, err), err


def test_cli_passes_with_several_options():
    assert main(["compile", "test_bad_input:mlp", "--input-shape", "2,4", "--backend", "eager",
                 "--passes", "fuse,low_rank{energy=0.9,budget='flops'}"]) == 0


if __name__ == "__main__":  # the table in docs/reliability.md, from a real run
    import tempfile
    sys.path.insert(0, str(Path(__file__).parent))
    print("| bad input | error | message |\n|---|---|---|")
    for name, error, pattern, case in CASES:
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            try:
                case(Path(tmp), mp)
                message, raised = "(no error)", None
            except fxforge.FxforgeError as e:
                message, raised = str(e).replace(tmp, "<dir>"), type(e).__name__
        print(f"| {name} | `{raised}` | {message.replace('|', '∣')} |")
