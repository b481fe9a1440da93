"""Training estimators: how a learnable quantizer computes values and gradients in training mode.

`SteEstimator` (LSQ-style straight-through), `DitherEstimator` (GDNSQ: the step's straight-through gradient
carries a random dither) and `NoiseEstimator` (DiffQ's pseudo-quantization noise at the continuous bits),
chosen by name with `QuantConfig(mode=...)` or per run with `fxq.finetune(..., mode=...)`. An estimator holds
no state a checkpoint needs; eval mode never uses one.
"""

from __future__ import annotations

from torch import Tensor

from fxquant.errors import ConfigError
from fxquant.quantizer.numerics import clamp_with_noise, round_clamp


class Estimator:
    """How a learnable quantizer computes values and gradients in training mode (eval is always exact).

    An estimator holds no state that a checkpoint needs: the same trained quantizer can be fine-tuned
    further with another one (`fxq.finetune(..., mode=...)`).
    """

    name: str = ""
    rounds: bool = True
    """Whether it trains on hard rounding at integer bits `round(b)` (else on the continuous `b`)."""
    dither: bool = False
    """Whether the step's straight-through gradient carries GDNSQ's dither (rounding estimators)."""

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Training-mode value of `x` on the grid `step` between the on-grid clamps `lo <= hi`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SteEstimator(Estimator):
    """LSQ-style: hard rounding forward, straight-through backward (`d/dstep = round(u) - u`)."""

    name = "ste"

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return round_clamp(x, step, lo, hi, dither=False)


class DitherEstimator(Estimator):
    """GDNSQ: hard rounding forward; the step's straight-through gradient carries a random dither."""

    name = "dither"
    dither = True

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return round_clamp(x, step, lo, hi, dither=True)


class NoiseEstimator(Estimator):
    """DiffQ: no rounding; `clamp(x) + step * eps` so gradients reach `x`, the clamps and the bits exactly."""

    name = "noise"
    rounds = False

    def __init__(self, distribution: str = "uniform") -> None:
        self.distribution = distribution

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return clamp_with_noise(x, step, lo, hi, self.distribution)

    def __repr__(self) -> str:
        return f"NoiseEstimator({self.distribution!r})"


ESTIMATORS = {"dither": DitherEstimator, "ste": SteEstimator, "noise": NoiseEstimator}
"""The training estimators by the name `QuantConfig(mode=...)` and `finetune(mode=...)` use."""


def make_estimator(mode: str, noise: str = "uniform") -> Estimator:
    """The estimator called `mode` (`"dither"`, `"ste"` or `"noise"` with DiffQ's `noise` distribution)."""
    if mode not in ESTIMATORS:
        raise ConfigError(f"mode={mode!r} is unknown; expected one of {tuple(ESTIMATORS)} "
                          "('dither' = GDNSQ, 'noise' = DiffQ, 'ste' = LSQ-style).")
    return NoiseEstimator(noise) if mode == "noise" else ESTIMATORS[mode]()
