"""Frozen quantizers: integer bits, zero points and codes, eval only; exactly ONNX Q/DQ.

`freeze` replaces each learnable activation quantizer by a `FrozenActivationQuantizer`, each weight and its
quantizer by a `FrozenWeight` (int8/int16 codes and scales; it takes no input), and each int32 bias by a
`FrozenBias`. Each gives export and verify its typed `QParams`.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from fxquant.qparams import QParams, blocked_scale, container_for, per_tensor_or_axis, zeros_like_scale
from fxquant.quantizer.base import IntegerGrid, Quantizer
from fxquant.quantizer.learnable import LearnableQuantizer
from fxquant.quantizer.numerics import INT32_MAX, KIND_BIAS, expand_groups, fake_quantize, integer_codes


class FrozenActivationQuantizer(Quantizer):
    """Eval-only activation quantizer with integer bits and zero point: ONNX Q -> DQ exactly."""

    bits: Tensor
    scale: Tensor
    zero_point: Tensor
    qmin: Tensor
    qmax: Tensor

    def __init__(self, source: LearnableQuantizer) -> None:
        super().__init__(kind=source.kind, served=source.served, granularity=source.granularity,
                         tensor_shape=source.tensor_shape, channel_axis=source.channel_axis)
        p = source.integer_grid()
        self.nonnegative = source.nonnegative
        self.symmetric = source.symmetric
        self.register_buffer("bits", p.bits.to(torch.int64))
        self.register_buffer("scale", p.scale.detach().clone())
        self.register_buffer("zero_point", p.zero_point.to(torch.int64))
        self.register_buffer("qmin", p.qmin.to(torch.int64))
        self.register_buffer("qmax", p.qmax.to(torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        return fake_quantize(
            x, self.scale, self.zero_point.to(self.scale.dtype), self.qmin.to(self.scale.dtype),
            self.qmax.to(self.scale.dtype),
        )

    def integer_grid(self) -> IntegerGrid:
        dtype = self.scale.dtype
        return IntegerGrid(self.bits.to(dtype), self.scale, self.zero_point.to(dtype), self.qmin.to(dtype),
                           self.qmax.to(dtype))

    def qparams(self) -> QParams:
        """The typed parameters export and verify read (per tensor; a per-channel activation is per axis)."""
        bits = int(self.bits.max())
        axis = None if self.scale.numel() == 1 else next((d for d, n in enumerate(self.scale.shape) if n > 1), None)
        scale, layout, axis = per_tensor_or_axis(self.scale, axis)
        zero_point = self.zero_point.detach().reshape(scale.shape).clone()
        return QParams(
            self.kind, bits, scale, zero_point, int(self.qmin.min()), int(self.qmax.max()), layout, axis, None,
            container_for(self.kind, bits),
        )


class FrozenWeight(Quantizer):
    """A frozen quantized weight: integer codes, per-group scales; forward returns `codes * scale`.

    Replaces both the float parameter and its quantizer in a frozen graph; it takes no input. The codes
    are stored as int8 (bits <= 8) or int16 (bits <= 16) so a frozen state dict is small.
    """

    codes: Tensor
    bits: Tensor
    scale: Tensor
    qmin: Tensor
    qmax: Tensor

    def __init__(self, source: LearnableQuantizer, weight: Tensor) -> None:
        super().__init__(kind=source.kind, served=source.served, granularity=source.granularity,
                         tensor_shape=source.tensor_shape, channel_axis=source.channel_axis,
                         block_axis=source.block_axis, group_size=source.group_size)
        p = source.integer_grid()
        self.symmetric = True
        max_bits = int(p.bits.max().item())
        code_dtype = torch.int8 if max_bits <= 8 else torch.int16
        # sliced: the only float temporary is one slice, not a float copy of the weight
        codes = integer_codes(weight.detach(), p.scale, p.zero_point, p.qmin, p.qmax, code_dtype, self.block_axis,
                              self.group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("bits", p.bits.to(torch.int64))
        self.register_buffer("scale", p.scale.detach().clone())
        self.register_buffer("qmin", p.qmin.to(torch.int64))
        self.register_buffer("qmax", p.qmax.to(torch.int64))

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a frozen state dict of an fxquant before full-range codes has no qmin: its codes were narrow, -qmax..qmax
        if prefix + "qmin" not in state_dict and prefix + "qmax" in state_dict:
            state_dict[prefix + "qmin"] = -state_dict[prefix + "qmax"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # a frozen module pickled before full-range codes: narrow codes -qmax..qmax
        buffers = state.get("_buffers", {})
        if "qmin" not in buffers and "qmax" in buffers:
            buffers["qmin"] = -buffers["qmax"]
        super().__setstate__(state)

    def forward(self) -> Tensor:
        scale = expand_groups(self.scale, self.block_axis, self.group_size)
        return self.codes.to(scale.dtype) * scale

    def integer_grid(self) -> IntegerGrid:
        dtype = self.scale.dtype
        return IntegerGrid(self.bits.to(dtype), self.scale, torch.zeros_like(self.scale), self.qmin.to(dtype),
                           self.qmax.to(dtype))

    def qparams(self) -> QParams:
        """The typed parameters export and verify read: symmetric, per tensor / per axis / blocked."""
        bits = int(self.bits.max())
        qmin, qmax = int(self.qmin.min()), int(self.qmax.max())
        container = container_for(self.kind, bits)
        if self.granularity == "per_group":
            assert self.block_axis is not None and self.group_size is not None
            scale = blocked_scale(self.scale, tuple(self.codes.shape), self.block_axis, self.group_size)
            return QParams(self.kind, bits, scale, zeros_like_scale(scale), qmin, qmax, "blocked", self.block_axis,
                           int(self.group_size), container)
        axis = None if self.granularity == "per_tensor" else self.channel_axis
        scale, layout, axis = per_tensor_or_axis(self.scale, axis)
        return QParams(self.kind, bits, scale, zeros_like_scale(scale), qmin, qmax, layout, axis, None, container)


class FrozenBias(Quantizer):
    """A conv/linear bias on the int32 grid `s_x * s_w` of the op's input and weight scales.

    Integer kernels (onnxruntime's QLinearConv, QGemm) add the bias as int32 codes on that grid, so the
    frozen module adds it the same way, as the eval-mode prepared module's `BiasQuantizer` does.
    Forward returns `codes * scale` (ONNX DequantizeLinear of an int32 tensor).
    """

    codes: Tensor
    scale: Tensor

    def __init__(self, codes: Tensor, scale: Tensor, served: Tuple[str, ...]) -> None:
        super().__init__(kind=KIND_BIAS, served=served, granularity="per_channel", tensor_shape=tuple(codes.shape),
                         channel_axis=0)
        self.register_buffer("codes", codes.to(torch.int32))
        self.register_buffer("scale", scale.detach().clone())

    def forward(self) -> Tensor:
        return self.codes.to(self.scale.dtype) * self.scale

    def integer_grid(self) -> IntegerGrid:
        return IntegerGrid.int32(self.scale)

    def qparams(self) -> QParams:
        """The typed parameters export reads: int32 codes, one scale per output channel."""
        scale, layout, axis = per_tensor_or_axis(self.scale, 0)
        return QParams(self.kind, 32, scale, zeros_like_scale(scale), -(2**31), INT32_MAX, layout, axis, None, "int32")

