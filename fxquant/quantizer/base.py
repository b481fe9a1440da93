"""What every quantizer module is: the `Quantizer` base class, its `IntegerGrid` and its `QuantizerSummary`.

A learnable quantizer (weights, activations), the int32 bias derived from two of them, and the three frozen
quantizers `freeze` makes of them share one description (`kind`, the graph nodes `served`, `granularity`,
the quantized tensor's shape and its group layout) and answer one question the same way: `integer_grid()`,
the integer bits, scale, zero point and code range eval and freeze use, per group. Reports read
`summary()`; export and verify read the frozen quantizers' typed `QParams`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fxquant.quantizer.numerics import INT32_MAX


@dataclasses.dataclass(frozen=True)
class IntegerGrid:
    """A quantizer's integer grid, per group: `x_hat = (clamp(round(x / scale) + zero_point, qmin, qmax) -
    zero_point) * scale`. Every field is a float tensor of the group shape (integers except `scale`)."""

    bits: Tensor
    scale: Tensor
    zero_point: Tensor
    qmin: Tensor
    qmax: Tensor

    def clamps(self) -> Tuple[Tensor, Tensor]:
        """`(lo, hi)`: the lowest and highest value the grid represents."""
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    @staticmethod
    def int32(scale: Tensor) -> IntegerGrid:
        """The grid of an int32 bias with step `scale` (zero point 0, the whole int32 code range)."""
        return IntegerGrid(
            bits=torch.full_like(scale, 32.0), scale=scale, zero_point=torch.zeros_like(scale),
            qmin=torch.full_like(scale, -(2.0**31)), qmax=torch.full_like(scale, INT32_MAX),
        )

    def reshape(self, shape: Tuple[int, ...]) -> IntegerGrid:
        """The same grid with every field viewed as `shape` (to broadcast against a reshaped tensor)."""
        return IntegerGrid(*(t.reshape(shape) for t in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class QuantizerSummary:
    """What reports show of one quantizer, at the integer bits eval and freeze use."""

    kind: str
    served: Tuple[str, ...]
    granularity: str
    bits: float
    """Mean integer bits over groups."""
    bits_min: float
    bits_max: float
    bits_continuous: float
    """Mean continuous (learned) bits; equal to `bits` for a quantizer that does not learn them."""
    learn_bits: bool
    step_min: float
    step_max: float
    lo_min: float
    """Lowest clamp as the integer grid realises it."""
    hi_max: float
    zero_point_max: float
    signed: bool
    numel: int


class Quantizer(nn.Module, abc.ABC):
    """Base of every quantizer module in a prepared or frozen graph.

    Args:
        kind: `"weight"`, `"activation"` or `"bias"`.
        served: names of the graph nodes this quantizer serves (for reports and errors).
        granularity: `"per_tensor"`, `"per_channel"` or `"per_group"`.
        tensor_shape: shape of the quantized tensor (weights, biases) or of one example activation.
        channel_axis: the channel axis of per-channel parameters.
        block_axis, group_size: the axis and size of blocks (`"per_group"` only).
    """

    def __init__(
        self,
        *,
        kind: str,
        served: Tuple[str, ...],
        granularity: str,
        tensor_shape: Tuple[int, ...],
        channel_axis: Optional[int] = None,
        block_axis: Optional[int] = None,
        group_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.served = tuple(served)
        self.granularity = granularity
        self.tensor_shape = tuple(int(d) for d in tensor_shape)
        self.channel_axis = channel_axis
        self.block_axis = block_axis if granularity == "per_group" else None
        self.group_size = group_size if granularity == "per_group" else None

    @abc.abstractmethod
    def integer_grid(self) -> IntegerGrid:
        """The integer bits, scale, zero point and code range eval and freeze use, per group."""

    def continuous_bits(self) -> Tensor:
        """The bits training sees (learned, continuous); the integer bits for a quantizer that learns none."""
        return self.integer_grid().bits

    @property
    def learns_bits(self) -> bool:
        """Whether fine-tuning moves this quantizer's bit-width."""
        return False

    def numel(self) -> int:
        """Elements of the quantized tensor."""
        return math.prod(self.tensor_shape) if self.tensor_shape else 1

    @torch.no_grad()
    def summary(self) -> QuantizerSummary:
        """What reports show of this quantizer."""
        grid = self.integer_grid()
        lo, hi = grid.clamps()
        return QuantizerSummary(
            kind=self.kind,
            served=self.served,
            granularity=self.granularity,
            bits=float(grid.bits.float().mean()),
            bits_min=float(grid.bits.min()),
            bits_max=float(grid.bits.max()),
            bits_continuous=float(self.continuous_bits().detach().float().mean()),
            learn_bits=self.learns_bits,
            step_min=float(grid.scale.min()),
            step_max=float(grid.scale.max()),
            lo_min=float(lo.min()),
            hi_max=float(hi.max()),
            zero_point_max=float(grid.zero_point.max()),
            signed=bool(float(lo.min()) < 0.0),
            numel=self.numel(),
        )
