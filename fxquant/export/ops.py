"""The custom ops export lowers to ONNX QuantizeLinear/DequantizeLinear, and their translations.

`fxquant::quantize_dequantize` is exactly `FrozenActivationQuantizer.forward` (ONNX Q -> DQ in float);
`fxquant::dequantize` is exactly `FrozenWeight.forward` / `FrozenBias.forward` (ONNX DequantizeLinear of
integer codes). torch.export keeps them as single nodes; `translation_table` turns them into onnxscript
functions emitting `QuantizeLinear [-> integer Clip] -> DequantizeLinear` and `[Cast ->] DequantizeLinear`. The
`Cast` of a constant code buffer is folded by the exporter into an integer initializer of the container
type (INT4, INT2, ...), which is what makes the file size reflect the bits.

Provenance: `fxquant::provenance(x, quantizer, end)` is the identity; its translation is a node of fxquant's
own domain (`PROVENANCE_DOMAIN`: `Begin`/`End` with a `quantizer` attribute) around each quantizer's stand-in,
so export knows which ONNX nodes each quantizer emitted from marks it wrote itself, then removes the marks
(`fxquant.export.qdq`). Nothing depends on the exporter's debug metadata.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import onnx
import onnxscript
import torch
from onnx import TensorProto
from onnx.defs import OpSchema
from onnxscript.values import Opset
from torch import Tensor

from fxquant.quantizer import fake_quantize, quantize_codes


@torch.library.custom_op("fxquant::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    code_min: Tensor,
    code_max: Tensor,
    qmin: int,
    qmax: int,
    onnx_type: int,
    clip: bool,
    dequantize_scale: Optional[Tensor] = None,
) -> Tensor:
    """`fake_quantize(x, scale, zero_point, qmin, qmax)`; `code_min`/`code_max` are `qmin`/`qmax` in the
    container's type, for the integer Clip of widths narrower than their container. With `dequantize_scale`
    the codes are dequantized with it instead of `scale` (a hard-sigmoid gate: `x + 3` quantized with
    `6 s`, read back with `s`; `fxquant.export.lowering.hard_sigmoid_gates`)."""
    zp = zero_point.to(scale.dtype)
    qmin_t, qmax_t = torch.full_like(zp, qmin), torch.full_like(zp, qmax)
    if dequantize_scale is None:
        return fake_quantize(x, scale, zp, qmin_t, qmax_t)
    return (quantize_codes(x, scale, zp, qmin_t, qmax_t) - zp) * dequantize_scale


@quantize_dequantize.register_fake
def _(x, scale, zero_point, code_min, code_max, qmin, qmax, onnx_type, clip, dequantize_scale=None):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("fxquant::provenance", mutates_args=())
def provenance(x: Tensor, quantizer: str, end: bool) -> Tensor:
    """The identity: marks `x` as entering (`end=False`) or leaving (`end=True`) quantizer `quantizer`'s part of
    the graph, for the ONNX translation (a copy, as a custom op may not return its input)."""
    return x.clone()


@provenance.register_fake
def _(x, quantizer, end):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


PROVENANCE_DOMAIN = "fxquant.provenance"
"""The ONNX domain of the provenance marks; they never reach a saved file."""

_MARK_TYPES = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "int64", "int32", "int16", "int8",
                                        "uint8", "uint16", "bool")]


def _register_provenance_schemas() -> None:
    """Declare `Begin`/`End` to onnx (onnxscript builds nodes only of declared ops); once per process."""
    for name in ("Begin", "End"):
        if onnx.defs.has(name, PROVENANCE_DOMAIN):
            continue
        onnx.defs.register_schema(OpSchema(
            name, PROVENANCE_DOMAIN, 1,
            doc="fxquant's mark of where a quantizer's nodes begin or end; removed after export",
            inputs=[OpSchema.FormalParameter("X", "T")], outputs=[OpSchema.FormalParameter("Y", "T")],
            type_constraints=[("T", _MARK_TYPES, "any tensor")],
            attributes=[OpSchema.Attribute("quantizer", OpSchema.AttrType.STRING, "the quantizer's name")],
        ))


def broadcast_scale(codes: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
    """The ONNX-shaped `scale` of DequantizeLinear, broadcast against `codes` (per tensor/axis/block)."""
    if scale.dim() == 0:
        return scale
    if block_size > 0:
        return scale.repeat_interleave(block_size, dim=axis)
    shape = [1] * codes.dim()
    shape[axis] = scale.numel()
    return scale.reshape(shape)


@torch.library.custom_op("fxquant::dequantize", mutates_args=())
def dequantize(
    codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], axis: int, block_size: int, onnx_type: int
) -> Tensor:
    """`(codes - zero_point) * scale` with ONNX DequantizeLinear's scale layout (`zero_point`: shaped like
    `scale`, or None for zero: int32 biases; symmetric weights have zeros, or 128 when stored as UINT8).

    `block_size > 0`: blocked along `axis`; `0`: one scale per index of `axis`; `< 0`: per tensor.
    """
    s = broadcast_scale(codes, scale, axis, block_size)
    values = codes.to(s.dtype)
    if zero_point is not None:
        values = values - broadcast_scale(codes, zero_point, axis, block_size).to(s.dtype)
    return values * s


@dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size, onnx_type):  # noqa: ANN001, ANN202
    return torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)


TORCH_STORABLE = {2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32}
"""ONNX container types a torch buffer holds directly (no Cast needed): UINT8, INT8, UINT16, INT16, INT32."""

CLIP_TYPE: Dict[int, int] = {TensorProto.UINT4: TensorProto.UINT8, TensorProto.UINT2: TensorProto.UINT8,
             TensorProto.INT4: TensorProto.INT8, TensorProto.INT2: TensorProto.INT8}
"""The 8-bit type a narrower width in a 4- or 2-bit container is clipped in: ONNX Clip takes no 4- or 2-bit
type, so QuantizeLinear -> Clip -> DequantizeLinear run in the 8-bit type of the same sign (the same numbers:
the codes fit it)."""


def clipped_type(onnx_type: int, clip: bool) -> int:
    """The ONNX type the codes of `quantize_dequantize` have in the exported graph."""
    return CLIP_TYPE.get(onnx_type, onnx_type) if clip else onnx_type


def translation_table(opset: int) -> Dict[Any, Callable[..., Any]]:
    """`custom_translation_table` for `torch.onnx.export` at `opset` (>= 18)."""
    module = getattr(onnxscript, f"opset{min(max(opset, 18), 23)}")
    op = module

    def qdq_onnx(x, scale, zero_point, code_min, code_max, qmin: int, qmax: int, onnx_type: int, clip: bool,  # noqa: ANN001, ANN202
                 dequantize_scale=None):  # noqa: ANN001
        codes_type = clipped_type(onnx_type, clip)
        if codes_type not in TORCH_STORABLE:
            zero_point = op.Cast(zero_point, to=codes_type)
            code_min, code_max = op.Cast(code_min, to=codes_type), op.Cast(code_max, to=codes_type)
        q = op.QuantizeLinear(x, scale, zero_point)
        if clip:  # a narrower width in a wider container: clip the integer codes, as integer kernels allow
            q = op.Clip(q, code_min, code_max)
        return op.DequantizeLinear(q, scale if dequantize_scale is None else dequantize_scale, zero_point)

    def dq_onnx(codes, scale, zero_point, axis: int, block_size: int, onnx_type: int):  # noqa: ANN001, ANN202
        # An explicit zero point on weights: onnxruntime builds QGemm (integer linear layers) only from a
        # DequantizeLinear that has one (docs/decisions.md, "An explicit zero point on weights").
        if onnx_type not in TORCH_STORABLE:
            codes = op.Cast(codes, to=onnx_type)
            if zero_point is not None:
                zero_point = op.Cast(zero_point, to=onnx_type)
        if block_size > 0:
            return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)
        if block_size < 0:  # per tensor
            return op.DequantizeLinear(codes, scale, zero_point)
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    _register_provenance_schemas()
    marks = Opset(PROVENANCE_DOMAIN, 1)

    def provenance_onnx(x, quantizer: str, end: bool):  # noqa: ANN001, ANN202
        return marks.End(x, quantizer=quantizer) if end else marks.Begin(x, quantizer=quantizer)

    return {
        torch.ops.fxquant.quantize_dequantize.default: qdq_onnx,
        torch.ops.fxquant.dequantize.default: dq_onnx,
        torch.ops.fxquant.provenance.default: provenance_onnx,
    }
