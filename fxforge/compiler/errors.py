"""The errors users see. Each names its cause in one line; none leaks an internal traceback."""
from __future__ import annotations

import re
from typing import Sequence

TORCHSCRIPT_HEADER = "The following operation failed in the TorchScript interpreter"
ERROR_PREFIX = re.compile(r"^(?:\w+(?:Error|Exception): )+")  # "RuntimeError: RuntimeError: " before a cause
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours some libraries put in their messages


class FxforgeError(Exception):
    """Base class of every error fxforge raises on purpose."""


class TraceError(FxforgeError):
    """The model could not be captured by torch.export."""


class PassError(FxforgeError):
    """An unknown pass, a bad pass option, an impossible pipeline, or a pass that failed."""


class VerificationError(FxforgeError):
    """An exact pass changed the model's numbers (or broke the graph)."""


class BackendError(FxforgeError):
    """A backend is unknown, not installed, or cannot lower an op."""


class TargetError(FxforgeError):
    """An unknown or malformed hardware target."""


class InputError(FxforgeError):
    """Inputs that do not match the compiled signature (count, shape, dtype) or hold NaN/Inf."""


class CalibrationError(FxforgeError):
    """Calibration (or training) data is missing or unusable."""


class ArtifactError(FxforgeError):
    """A saved artifact is missing, corrupt, foreign, or from another fxforge version."""


class TuningError(FxforgeError):
    """A tuning database is corrupt, partial or made for another target."""


class FallbackWarning(RuntimeWarning):
    """The artifact runs somewhere other than asked (e.g. on the CPU for a CUDA target whose execution provider
    is missing); ``compile(..., strict=True)`` turns it into a ``TargetError``."""


class BudgetError(FxforgeError):
    """A lossy pipeline ends outside its accuracy budget and ``strict=True`` forbids falling back."""


def missing_dependency(package: str, extra: str, why: str) -> BackendError:
    """The error for an optional dependency that is not installed."""
    return BackendError(f"{why} needs the '{package}' package: pip install 'fxforge[{extra}]'")


def missing_calibration(pass_name: str) -> CalibrationError:
    """The error for a pipeline whose pass ``pass_name`` reads calibration data that was not given."""
    return CalibrationError(f"pass {pass_name!r} needs calibration data: pass calibration=[(x1,), (x2,), ...] (an "
                            "iterable of input tuples like the example inputs) to fxforge.compile, or --calibration "
                            "MODULE:FN to the fxforge command")


def missing_train(pass_name: str) -> CalibrationError:
    """The error for a pipeline whose pass ``pass_name`` trains on data that was not given."""
    return CalibrationError(f"pass {pass_name!r} needs training data: pass train=[(x1,), (x2,), ...] (an iterable "
                            "of unlabeled input tuples like the example inputs) to fxforge.compile, or --train "
                            "MODULE:FN to the fxforge command")


def listed(items: Sequence[str], shown: int = 3) -> str:
    """``items`` in words for a message: the first ``shown``, then how many more; "" for none."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (colour codes removed), or its type's name. A
    TorchScript interpreter error opens with a fixed header and a TorchScript traceback and states its cause after
    it ("RuntimeError: index 9 is out of bounds ...", the type's name sometimes twice), followed by the Python
    frames of a traced call ("At: ..."), so the first line naming an error type is taken, without those names. A
    first line that announces what follows ("... failed with the following errors:") is joined with the next."""
    lines = [ln.strip() for ln in ANSI.sub("", str(e)).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith(TORCHSCRIPT_HEADER):
        cause = next((ln for ln in lines[1:] if ERROR_PREFIX.match(ln)), lines[-1])
        return ERROR_PREFIX.sub("", cause)
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
