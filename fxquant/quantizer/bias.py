"""`BiasQuantizer`: the int32 bias of a conv/linear, derived from two learnable quantizers (the op's input and
weight): its grid is `s_x * s_w` of their current integer scales, so the eval-mode prepared module adds the bias
exactly as `freeze` stores it (`FrozenBias`) and integer kernels add it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fxquant.errors import StateError
from fxquant.quantizer import fused_cpu
from fxquant.quantizer.base import IntegerGrid, Quantizer
from fxquant.quantizer.learnable import LearnableQuantizer
from fxquant.quantizer.numerics import KIND_BIAS, bias_scale, fits_int32, quantize_bias


class BiasQuantizer(Quantizer):
    """The int32 bias of a conv/linear: `round(b / (s_x * s_w)) * s_x * s_w`, in training and eval alike.

    It reads the current integer scales of the op's input and weight quantizers (held as plain
    references, not submodules, so they are neither registered nor saved twice), so the eval-mode
    prepared module computes exactly what `freeze` stores as a `FrozenBias` and what integer kernels add.
    In training the rounding is straight-through (the bias learns on the grid it is deployed on): at low
    bits `s_x * s_w` is coarse, and a float bias in training left eval with a systematic per-channel offset
    the weights never learned to absorb (docs/decisions.md, "Int32 bias in training").
    """

    input_quantizer: LearnableQuantizer
    weight_quantizer: LearnableQuantizer

    def __init__(self, input_quantizer: LearnableQuantizer, weight_quantizer: LearnableQuantizer, channels: int) -> None:
        super().__init__(kind=KIND_BIAS, served=weight_quantizer.served, granularity="per_channel",
                         tensor_shape=(channels,), channel_axis=0)
        self.nonnegative = False
        object.__setattr__(self, "input_quantizer", input_quantizer)
        object.__setattr__(self, "weight_quantizer", weight_quantizer)

    def active(self) -> bool:
        """Whether the bias is rounded now (both quantizers on, not observing, and calibrated)."""
        sources = (self.input_quantizer, self.weight_quantizer)
        return all(q.enabled and not q.observing and q.is_initialized() for q in sources)

    @torch.no_grad()
    def _step(self, channels: int) -> Tensor:
        """`s_x * s_w` of the current integer scales, one step per output channel."""
        return bias_scale(self.input_quantizer.integer_scale(), self.weight_quantizer.integer_scale(), channels)

    def integer_grid(self) -> IntegerGrid:
        """The int32 grid `s_x * s_w` of the current integer scales, one step per output channel."""
        return IntegerGrid.int32(self._step(self.tensor_shape[0]))

    @torch.no_grad()
    def integer_bias(self, bias: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """`(codes, scale)` shaped like `bias`, or None when the codes would not fit in int32."""
        if bias.numel() != self.tensor_shape[0]:
            raise StateError(f"bias quantizer for {', '.join(self.served)} expects {self.tensor_shape[0]} channels, "
                             f"got a bias of shape {tuple(bias.shape)}")
        scale = self._step(bias.numel())
        codes = quantize_bias(bias, scale)
        if codes is None:
            return None
        return codes.reshape(bias.shape), scale.reshape(bias.shape)

    def forward(self, bias: Tensor) -> Tensor:
        if not self.active():
            return bias
        if self.training:
            # straight through: the rounding's difference is a constant (no node recorded for the subtraction)
            return bias + (self._rounded(bias) - bias.detach())
        found = self.integer_bias(bias)
        if found is None:
            return bias
        codes, scale = found
        return codes.to(scale.dtype) * scale

    def _rounded(self, bias: Tensor) -> Tensor:
        """The values `integer_bias` gives, computed in float without a host sync (a training step on CUDA
        must not wait on every bias): `round(b / s) * s`, or `b` when a code would not fit in int32. Equal
        to eval's: the rounded codes are float32 integers, which int32 holds exactly. Records no graph."""
        on_cpu = self._rounded_on_cpu(bias)  # C on a detached bias: nothing to record
        if on_cpu is not None:
            return on_cpu
        with torch.no_grad():
            scale = self._step(bias.numel()).reshape(bias.shape)
            codes = torch.round(bias / scale)
            return torch.where(fits_int32(codes), codes * scale, bias)

    def _rounded_on_cpu(self, bias: Tensor) -> Optional[Tensor]:
        """`_rounded`'s values by round_clamp.c's `fxq_round_bias` (the same float32 arithmetic, one call instead of
        ~25 small tensor ops per bias and step: docs/decisions.md, "Per-channel weights in one node") when the bias
        is float32 on the CPU and both quantizers have their grid values (`LearnableQuantizer.grid_values`), else
        None."""
        if bias.dtype != torch.float32 or bias.device.type != "cpu" or not bias.is_contiguous():
            return None
        input_grid, weight_grid = self.input_quantizer.grid_values(), self.weight_quantizer.grid_values()
        if input_grid is None or weight_grid is None or input_grid.rows != 1 or weight_grid.rows not in (1, bias.numel()):
            return None
        return fused_cpu.round_bias(bias.detach(), float(input_grid.step[0]), weight_grid.step_address, weight_grid.rows)
