"""The built-in passes (each registers itself by name) and the presets built from them."""
from fxforge.compiler.pass_manager import register_preset

from .eliminate_dead_code import EliminateDeadCode
from .fold_constants import FoldConstants
from .fuse_activation import FuseActivation
from .fuse_batchnorm import FuseBatchNorm

register_preset("fuse", ["fold_constants", "fuse_batchnorm", "eliminate_dead_code", "fuse_activation"],
                "exact operator fusion")

__all__ = ["EliminateDeadCode", "FoldConstants", "FuseActivation", "FuseBatchNorm"]
