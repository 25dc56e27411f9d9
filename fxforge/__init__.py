"""fxforge: a compiler-style graph optimization toolchain for PyTorch models."""
from fxforge import passes  # noqa: F401  (the built-in passes and presets register themselves)
from fxforge.api import CompiledModel, compile
from fxforge.backends.base import Artifact, Backend, available_backends, load, register_backend
from fxforge.compiler.errors import (ArtifactError, BackendError, BudgetError, CalibrationError, FxforgeError,
                                     InputError, PassError, TargetError, TraceError, TuningError, VerificationError)
from fxforge.compiler.pass_manager import (Analysis, Pass, PassContext, PassManager, PassResult, available_passes,
                                           register_pass, register_preset)
from fxforge.compiler.target import Target, available_targets, get_target, register_target
from fxforge.compiler.trace import trace
from fxforge.autotune import AutotuneResult, autotune

__version__ = "0.1.0"

__all__ = [
    "Analysis", "Artifact", "ArtifactError", "AutotuneResult", "Backend", "BackendError", "BudgetError", "CalibrationError",
    "CompiledModel", "FxforgeError", "InputError", "Pass", "PassContext", "PassError", "PassManager",
    "PassResult", "Target", "TargetError", "TraceError", "TuningError", "VerificationError", "autotune",
    "available_backends", "available_passes", "available_targets", "compile", "get_target", "load",
    "register_backend", "register_pass", "register_preset", "register_target", "trace",
]
