"""`QParams`: the typed quantization parameters of one frozen quantizer, from freeze to export and verify.

`fxq.freeze` makes every quantizer a frozen module (`FrozenWeight`, `FrozenActivationQuantizer`,
`FrozenBias`); each answers `qparams()` with one `QParams`: integer bits, scale and zero point in the layout
ONNX QuantizeLinear/DequantizeLinear read (per tensor, per axis, blocked), the code range, and the integer
container freeze chose for it (`container_for`). Export lowers exactly this object (widening the container
only where a lower opset or an export option asks), and verify reads output steps and weight widths from it;
nothing between the steps passes string-keyed dicts.

Containers (the smallest ONNX integer type holding the codes, with the exceptions onnxruntime needs):

- weights: signed INT4/INT8/INT16 (3, 5, 6, 7 bits ride in the next one); 2-bit weights ride in INT4 too,
  because onnxruntime miscompiles INT2 weights (docs/decisions.md, "2-bit weights ride in INT4";
  `tests/test_runtime_facts.py` says when that changes);
- activations: UINT8 up to 8 bits, UINT16 above (onnxruntime has no uint2/uint4 activation kernels; a
  narrower width is clipped to its code range inside the container);
- biases: INT32 (what integer kernels add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

LAYOUTS = ("per_tensor", "per_axis", "blocked")

# (container name, signed, bits it holds)
_CONTAINERS: Tuple[Tuple[str, bool, int], ...] = (
    ("int2", True, 2), ("int4", True, 4), ("int8", True, 8), ("int16", True, 16), ("int32", True, 32),
    ("uint2", False, 2), ("uint4", False, 4), ("uint8", False, 8), ("uint16", False, 16),
)
CONTAINER_BITS = {name: bits for name, _, bits in _CONTAINERS}


def smallest_container(bits: int, signed: bool, floor: int = 0) -> str:
    """The smallest ONNX integer container of the given signedness holding `max(bits, floor)` bits."""
    for name, is_signed, holds in _CONTAINERS:
        if is_signed == signed and max(bits, floor) <= holds:
            return name
    raise ValueError(f"no ONNX integer container holds {bits} bits")


def container_for(kind: str, bits: int) -> str:
    """The container freeze gives a quantizer of `kind` ("weight", "activation", "bias") at `bits` (see the
    module docstring)."""
    if kind == "bias":
        return "int32"
    if kind == "weight":
        return smallest_container(bits, signed=True, floor=4)
    return smallest_container(bits, signed=False, floor=8)


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one frozen quantizer, as ONNX Quantize/DequantizeLinear read them.

    Attributes:
        kind: "weight", "activation" or "bias".
        bits: integer bit-width (the widest group's, for per-group bits).
        scale: 0-d (per tensor), `(channels,)` (per axis) or the codes' shape with `axis` divided by
            `block_size` (blocked).
        zero_point: integer tensor shaped like `scale` (zeros for symmetric weights and biases).
        qmin, qmax: the code range (the widest group's).
        layout: "per_tensor", "per_axis" or "blocked".
        axis: the channel axis (per axis) or the block axis (blocked); None per tensor.
        block_size: elements per block along `axis` (blocked only).
        container: the ONNX integer type freeze chose for the codes ("int4", "uint8", "int32", ...).
    """

    kind: str
    bits: int
    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    layout: str
    axis: Optional[int]
    block_size: Optional[int]
    container: str

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"QParams layout {self.layout!r} is not one of {LAYOUTS}")
        if (self.layout == "per_tensor") != (self.axis is None):
            raise ValueError(f"QParams layout {self.layout!r} with axis {self.axis}: per_tensor has no axis, others one")
        if (self.layout == "blocked") != (self.block_size is not None):
            raise ValueError(f"QParams layout {self.layout!r} with block_size {self.block_size}")
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(f"QParams scale {tuple(self.scale.shape)} and zero point {tuple(self.zero_point.shape)} differ")
        if self.container not in CONTAINER_BITS:
            raise ValueError(f"QParams container {self.container!r} is not one of {sorted(CONTAINER_BITS)}")

    @property
    def signed(self) -> bool:
        return not self.container.startswith("u")

    @property
    def step(self) -> float:
        """The largest quantization step (one code) of the tensor."""
        return float(self.scale.max())

    def transposed(self) -> "QParams":
        """The parameters of the transposed 2-D tensor (a linear weight stored `(in, out)` for MatMul)."""
        if self.layout == "per_tensor":
            return self
        assert self.axis is not None
        scale = self.scale.t().contiguous() if self.scale.dim() == 2 else self.scale
        zero_point = self.zero_point.t().contiguous() if self.zero_point.dim() == 2 else self.zero_point
        return QParams(
            self.kind, self.bits, scale, zero_point, self.qmin, self.qmax, self.layout, 1 - self.axis,
            self.block_size, self.container,
        )


def per_tensor_or_axis(scale: Tensor, axis: Optional[int]) -> Tuple[Tensor, str, Optional[int]]:
    """(scale, layout, axis) for a scale of one value (per tensor) or one per index of `axis`."""
    if axis is None or scale.numel() == 1:
        return scale.detach().reshape(()).clone(), "per_tensor", None
    return scale.detach().reshape(-1).clone(), "per_axis", int(axis)


def blocked_scale(scale: Tensor, codes_shape: Tuple[int, ...], axis: int, block_size: int) -> Tensor:
    """A group scale broadcast to the blocked layout: the codes' shape with `axis` divided by `block_size`."""
    target = list(codes_shape)
    target[axis] = target[axis] // block_size
    return scale.detach().expand(target).contiguous()


def zeros_like_scale(scale: Tensor) -> Tensor:
    return torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
