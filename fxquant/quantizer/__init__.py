"""Quantizers: the numerics, the training estimators, and the learnable and frozen quantizer modules.

- `numerics`: pure functions (straight-through rounding, ONNX Q/DQ exactly, the fused round-clamp node,
  pseudo-quantization noise, the int32 bias grid, the group layout).
- `estimators`: how training mode computes values and gradients (`ste`, `dither`, `noise`).
- `base`: `Quantizer`, the base of every quantizer module, its `IntegerGrid` and `QuantizerSummary`.
- `learnable`: `LearnableQuantizer` (bits, clamps and zero point trained).
- `bias`: `BiasQuantizer`, the int32 bias derived from an op's input and weight quantizers.
- `frozen`: `FrozenActivationQuantizer`, `FrozenWeight`, `FrozenBias` (what `freeze` makes).

This package knows nothing of graphs; passes decide where quantizers go. Every name is importable from
`fxquant.quantizer` itself.
"""

from fxquant.quantizer.base import IntegerGrid, Quantizer, QuantizerSummary
from fxquant.quantizer.bias import BiasQuantizer
from fxquant.quantizer.estimators import (
    ESTIMATORS,
    DitherEstimator,
    Estimator,
    NoiseEstimator,
    SteEstimator,
    make_estimator,
)
from fxquant.quantizer.frozen import FrozenActivationQuantizer, FrozenBias, FrozenWeight
from fxquant.quantizer.learnable import LearnableQuantizer, iter_learnable, project_parameters
from fxquant.quantizer.numerics import (
    CODES_SLICE,
    DITHER_EXACT_BELOW,
    FOLLOW_COLUMNS,
    FOLLOW_RATIOS,
    FOLLOW_SAMPLE,
    INT32_MAX,
    KIND_ACTIVATION,
    KIND_BIAS,
    KIND_WEIGHT,
    MIN_STEP,
    MSE_SLICE,
    bias_scale,
    bits_storage_bytes,
    clamp_ste,
    clamp_with_noise,
    dequantize_codes,
    dither_of_groups,
    expand_groups,
    fake_quantize,
    fits_int32,
    grad_scale,
    group_param_shape,
    integer_codes,
    mean_over_ranks,
    quantize_bias,
    quantize_codes,
    reduce_to_groups,
    reduce_to_shape,
    round_clamp,
    round_ste,
)

__all__ = [
    "BiasQuantizer", "CODES_SLICE", "DITHER_EXACT_BELOW", "DitherEstimator", "ESTIMATORS", "Estimator", "FOLLOW_COLUMNS",
    "FOLLOW_RATIOS", "FOLLOW_SAMPLE", "FrozenActivationQuantizer", "FrozenBias", "FrozenWeight", "INT32_MAX",
    "IntegerGrid", "KIND_ACTIVATION", "KIND_BIAS", "KIND_WEIGHT", "LearnableQuantizer", "MIN_STEP", "MSE_SLICE",
    "NoiseEstimator", "Quantizer", "QuantizerSummary", "SteEstimator", "bias_scale", "bits_storage_bytes",
    "clamp_ste", "clamp_with_noise", "dequantize_codes", "dither_of_groups", "expand_groups", "fake_quantize", "fits_int32", "grad_scale",
    "group_param_shape", "integer_codes", "iter_learnable", "make_estimator", "mean_over_ranks", "project_parameters",
    "quantize_bias", "quantize_codes", "reduce_to_groups", "reduce_to_shape", "round_clamp", "round_ste",
]
