"""`plan_quantizers`: how each frozen quantizer is lowered to ONNX (its container type and opset).

Export is a thin lowering of what freeze decided: each frozen quantizer's `QParams` (`fxquant.qparams`:
scale, zero point, code range, layout, container). `plan_quantizers` keeps its container unless the target
opset lacks it or an `export_onnx` option asks for another (`int8_weights`, `narrow_activations`,
`uint8_weights`); a quantizer with no container at the opset is planned as float arithmetic that computes
the same numbers (`lowering="float"`, with the reason).

`uint8_weights`: the 8-bit weights that can saturate (`can_saturate`) stored as UINT8 codes shifted by 128
with zero point 128 (the same numbers). onnxruntime then runs them in its u8u8 integer kernels, which are
exact on every CPU; its default u8s8 GEMM kernels (uint8 activations x int8 weights) sum pairs of products
in saturating int16 on x86 CPUs with AVX2 but without VNNI (`u8s8_kernels_saturate`), where 8-bit weights
with 8-bit inputs can overflow. They cannot with weights of at most 7 bits (2 * 255 * 64 = 32640 < 32767) or
inputs of at most 7 bits (2 * 127 * 128 = 32512), and depthwise convs run in another kernel that
does not saturate (measured: docs/decisions.md, "8-bit weights on CPUs without VNNI"); those keep INT8,
whose u8s8 kernels are the faster ones. onnxruntime's quantization guide gives the same advice (U8U8 or
`reduce_range`). `fxquant.export.qdq`'s docstring says which ONNX patterns each
plan becomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import onnx
from torch import fx

from fxquant.graph import quantizer_calls, quantizer_container, quantizer_name, quantizer_readers, quantizer_target
from fxquant.op_registry import facts_of
from fxquant.qparams import CONTAINER_BITS, smallest_container
from fxquant.quantizer import FrozenActivationQuantizer, FrozenBias, FrozenWeight

T = onnx.TensorProto
# (bits that fit, ONNX type, type's min, type's max, opset that introduced it)
_SIGNED = [(2, T.INT2, -2, 1, 25), (4, T.INT4, -8, 7, 21), (8, T.INT8, -128, 127, 13), (16, T.INT16, -(2**15), 2**15 - 1, 21)]
_UNSIGNED = [(2, T.UINT2, 0, 3, 25), (4, T.UINT4, 0, 15, 21), (8, T.UINT8, 0, 255, 13), (16, T.UINT16, 0, 2**16 - 1, 21)]
TYPE_NAMES = {v: k for k, v in T.DataType.items()}
TYPE_BITS: Dict[int, int] = {T.INT2: 2, T.UINT2: 2, T.INT4: 4, T.UINT4: 4, T.INT8: 8, T.UINT8: 8, T.INT16: 16, T.UINT16: 16, T.INT32: 32}


@dataclass
class QuantizerPlan:
    """How one frozen quantizer is lowered to ONNX."""

    name: str
    kind: str
    bits: int
    granularity: str
    lowering: str  # "qdq" (integer Q/DQ) or "float" (same numbers as float ops; no integer container)
    onnx_type: Optional[int]
    fx_node: str
    serves: Tuple[str, ...]
    opset_needed: int
    reason: str = ""
    zero_point_offset: int = 0  # 128: symmetric int8 codes stored as UINT8 codes + 128 with zero point 128
    transposed: bool = False
    gathered: bool = False  # an embedding table: its rows are gathered as integer codes, then scaled
    lookup_alias: Optional[str] = None  # a table also read by linears (tied head): its lookups' stand-in's name
    # a hard-sigmoid gate's quantizer reads `x + input_shift` (`lowering.hard_sigmoid_gates`): QuantizeLinear's
    # scale is `quantize_scale_factor` times the frozen scale, DequantizeLinear's the frozen scale
    quantize_scale_factor: float = 1.0
    input_shift: float = 0.0

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.onnx_type, "FLOAT") if self.onnx_type is not None else "FLOAT"


ONNX_CONTAINERS: Dict[str, Tuple[int, int, int, int]] = {
    name: (onnx_type, tmin, tmax, since)
    for table, prefix in ((_SIGNED, "int"), (_UNSIGNED, "uint"))
    for fits, onnx_type, tmin, tmax, since in table
    for name in [f"{prefix}{fits}"]
}
"""ONNX type, type min, type max and the opset that introduced it, by `QParams.container` name."""


def _lowest_allowed(container: str, opset: Optional[int]) -> Optional[str]:
    """`container`, or the next wider one of the same signedness that exists at `opset` (None: none does)."""
    unsigned = container.startswith("u")
    for name, (_, _, _, since) in ONNX_CONTAINERS.items():  # each signedness in increasing width
        if name.startswith("u") == unsigned and CONTAINER_BITS[name] >= CONTAINER_BITS[container]:
            if opset is None or since <= opset:
                return name
    return None


def u8s8_kernels_saturate(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether onnxruntime's uint8 x int8 integer kernels can saturate on this CPU: x86-64 with AVX2 but
    without VNNI (`avx512_vnni` / `avx_vnni` absent from the flags in `cpuinfo`). False where that cannot be
    read."""
    try:
        with open(cpuinfo) as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), None)
    except OSError:
        return False
    if flags is None or "avx2" not in flags:
        return False
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def can_saturate(
    gm: fx.GraphModule, target: str, weight_shape: Tuple[int, ...], readers: Dict[str, List[fx.Node]]
) -> bool:
    """Whether a u8s8 GEMM kernel can overflow int16 on an 8-bit weight quantizer's readers: false only when
    every reader is a depthwise conv (one input channel per group) or reads an input quantized to at most 7
    bits (a conservative rule: any other reader can)."""
    container = quantizer_container(gm)
    for node in readers.get(target, []):
        facts = facts_of(node)
        if facts is None:
            return True
        groups = facts.argument(node, "groups", 1) if facts.kind == "conv" else 1
        if isinstance(groups, int) and groups > 1 and len(weight_shape) > 1 and weight_shape[1] == 1:
            continue  # depthwise: (out, 1, k...) weights
        x = facts.argument(node, "input")
        name = quantizer_name(x)
        q = container[name] if name is not None and name in container else None
        if isinstance(q, FrozenActivationQuantizer) and q.qparams().bits <= 7:
            continue
        return True
    return False


UINT8_WEIGHT_ZERO_POINT = 128
"""The zero point of 8-bit weights stored as UINT8 (`uint8_weights`): signed codes -128..127 -> 0..255 (-127..127 -> 1..255 with `narrow_range`)."""


def plan_quantizers(
    gm: fx.GraphModule, opset: Optional[int], narrow_activations: bool = False, int8_weights: bool = False,
    uint8_weights: bool = False,
) -> Dict[str, QuantizerPlan]:
    """Lower every frozen quantizer's `QParams` (see the module docstring): its container, widened only where
    `opset` lacks it or `int8_weights` asks; narrowed only with `narrow_activations`; 8-bit weights stored
    unsigned with `uint8_weights`."""
    container = quantizer_container(gm)
    readers = quantizer_readers(gm.graph)
    fx_nodes: Dict[str, List[str]] = {}
    for node, name in quantizer_calls(gm.graph):
        fx_nodes.setdefault(name, []).append(node.name)
    plans: Dict[str, QuantizerPlan] = {}
    for name, q in container.items():
        if name not in fx_nodes or not isinstance(q, (FrozenWeight, FrozenActivationQuantizer, FrozenBias)):
            continue
        qp = q.qparams()
        common: Dict[str, Any] = dict(name=name, kind=q.kind, granularity=q.granularity, fx_node=",".join(fx_nodes[name]),
                      serves=tuple(q.served), bits=qp.bits)
        if qp.kind == "bias":
            plans[name] = QuantizerPlan(lowering="qdq", onnx_type=T.INT32, opset_needed=13, **common)
        elif qp.kind == "weight":
            want = smallest_container(8, signed=True) if int8_weights and CONTAINER_BITS[qp.container] < 8 else qp.container
            chosen = _lowest_allowed(want, opset)
            if qp.layout == "blocked" and opset is not None and opset < 21:
                plans[name] = QuantizerPlan(
                    lowering="float", onnx_type=None, opset_needed=21,
                    reason=f"blocked scales need opset 21 (got {opset})", **common,
                )
            elif chosen is None:  # 9-16 bits below opset 21: int32 holds them
                plans[name] = QuantizerPlan(lowering="qdq", onnx_type=T.INT32, opset_needed=13, **common)
            else:
                offset = 0
                if (uint8_weights and chosen == "int8" and qp.bits == 8 and qp.layout != "blocked"
                        and can_saturate(gm, quantizer_target(name), tuple(q.codes.shape) if isinstance(q, FrozenWeight) else (), readers)):
                    chosen, offset = "uint8", UINT8_WEIGHT_ZERO_POINT
                onnx_type, _, _, since = ONNX_CONTAINERS[chosen]
                since = max(since, 21 if qp.layout == "blocked" else 13)
                plans[name] = QuantizerPlan(
                    lowering="qdq", onnx_type=onnx_type, opset_needed=since, zero_point_offset=offset, **common
                )
        else:
            want = smallest_container(qp.bits, signed=False) if narrow_activations else qp.container
            chosen = _lowest_allowed(want, opset)
            if chosen is None or qp.layout != "per_tensor":
                need = ONNX_CONTAINERS[smallest_container(qp.bits, signed=False)][3]
                plans[name] = QuantizerPlan(
                    lowering="float", onnx_type=None, opset_needed=need,
                    reason=f"no {qp.bits}-bit QuantizeLinear type at opset {opset}", **common,
                )
            else:
                onnx_type, _, _, since = ONNX_CONTAINERS[chosen]
                plans[name] = QuantizerPlan(lowering="qdq", onnx_type=onnx_type, opset_needed=since, **common)
    return plans


