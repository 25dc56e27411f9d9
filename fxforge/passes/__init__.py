"""The built-in passes (each registers itself by name) and the presets built from them."""
from fxforge.compiler.pass_manager import register_preset

from .adaround import AdaRound
from .addmm_to_linear import AddmmToLinear
from .bias_correction import BiasCorrection
from .calibrate import Calibrate
from .dead_channels import DeadChannels
from .depthwise_separable import DepthwiseSeparable
from .distill import Distill
from .eliminate_dead_code import EliminateDeadCode
from .equalize import Equalize
from .equalize_activations import EqualizeActivations
from .fold_constants import FoldConstants
from .fold_qdq import FoldQdq
from .fuse_activation import FuseActivation
from .fuse_batchnorm import FuseBatchNorm
from .insert_qdq import InsertQdq
from .low_rank import LowRank
from .prune_channels import PruneChannels
from .smooth_quant import SmoothQuant

register_preset("fuse", ["fold_constants", "addmm_to_linear", "fuse_batchnorm", "eliminate_dead_code", "fuse_activation"],
                "exact operator fusion")
# the quantization steps of the int8 and all presets (and of every quantized setting the tuning search tries)
QUANTIZE = ["equalize", "insert_qdq", "calibrate{method='percentile'}", "bias_correction", "fold_qdq"]
register_preset("int8", ["fuse", *QUANTIZE],
                "static int8 quantization: cross-layer equalization, percentile calibration and bias correction on "
                "the calibration data")
# the quantization steps of int8_dynamic (and of the accuracy budget's dynamic alternative to a static int8 that misses)
QUANTIZE_DYNAMIC = ["smooth_quant", "insert_qdq{activations='dynamic'}"]
register_preset("int8_dynamic", ["fuse", *QUANTIZE_DYNAMIC],
                "int8 weights with activations quantized per token at run time (transformers): SmoothQuant migration "
                "on the calibration data, then dynamic int8 linears")
# the per-layer error cap of compress: splits whose summed measured damage (top-1 drop or relative output
# error on the calibration data) stays within 2 %, each timed faster on the host
register_preset("compress", ["fuse", "dead_channels", "low_rank{budget='latency',max_error=0.02}"],
                "fusion, exact dead-channel removal, then low-rank splits chosen per layer: only those measured "
                "faster, cheapest in accuracy first, within a 2 % error cap on the calibration data")
register_preset("all", ["compress", *QUANTIZE],
                "the full pipeline: compress, then static int8 quantization")

__all__ = ["AdaRound", "AddmmToLinear", "BiasCorrection", "Calibrate", "DeadChannels", "DepthwiseSeparable", "Distill", "EliminateDeadCode",
           "Equalize", "EqualizeActivations", "FoldConstants", "FoldQdq", "FuseActivation", "FuseBatchNorm", "InsertQdq", "LowRank",
           "PruneChannels", "SmoothQuant"]
