"""What analysis writes on the graph: the annotations that are the whole quantization plan.

`fxquant.analyze.analyze` sets `node.meta[META_KEY]` to a `NodeAnnotation` on every node it decides something
for: a `QuantOp` on quantized ops (weight and input specs, resolved), a `TensorInfo` on tensor producers
(sign, join group, and the `ActPoint`s: activation quantizers to insert after it). Insertion
(`fxquant.passes.insert`) reads them through `quant_op` and `tensor_info` and decides nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from torch import fx

from fxquant.config import QuantSpec

META_KEY = "fxquant"
MODULE_META_KEY = "fxquant_module"
"""`node.meta` key set by `functionalize_modules`: the module path a functional op came from."""


@dataclass(frozen=True)
class DerivedBias:
    """The int32 bias of an op: no spec of its own, derived from the quantizers of the op's input and weight
    (its grid is `s_x * s_w` of their integer scales). Names are quantizers of the plan."""

    quantizer: str
    input_quantizer: str
    weight_quantizer: str


@dataclass
class QuantOp:
    """Annotation of a quantized op node.

    Attributes:
        kind: "conv", "conv_transpose", "linear", "matmul" or "embedding".
        name: the user-facing name (module path, else node name).
        weight_index: position of the weight parameter in `node.args` (None: no parameter weight).
        weight_spec: spec of its weight quantizer (None: weight float).
        channel_axis, block_axis: output-channel and input (block) axes of the weight.
        input_indices: positions of activation inputs in `node.args` that are quantized.
        input_spec: spec of the input quantizers (None: inputs float).
        is_first, is_last: first / last quantized layer.
        reason: why this spec ("default", "override 'glob'", "first layer", ...).
        int32_bias: its stored bias is rounded to the int32 grid `s_x * s_w` (a `BiasQuantizer`): the op adds
            its bias in int32 in integer kernels, `QuantConfig(integer_bias=True)`, and its input (per tensor)
            and weight (per tensor or channel) are quantized.
        weight_quantizer: the name of the quantizer of its weight (shared by tied weights), set with the
            other names once the plan is complete (`fxquant.quantizer_names`).
        input_quantizers: `(argument index, quantizer name)` of each quantized activation input.
        bias: its int32 bias, derived from its input and weight quantizers (when `int32_bias`).

    Every spec is resolved here (granularity included), so insertion builds quantizers without deciding.
    """

    kind: str
    name: str
    weight_index: Optional[int]
    weight_spec: Optional[QuantSpec]
    channel_axis: Optional[int]
    block_axis: Optional[int]
    input_indices: Tuple[int, ...]
    input_spec: Optional[QuantSpec]
    is_first: bool = False
    is_last: bool = False
    reason: str = "default"
    int32_bias: bool = False
    weight_quantizer: Optional[str] = None
    input_quantizers: Tuple[Tuple[int, str], ...] = ()
    bias: Optional[DerivedBias] = None


@dataclass
class ActPoint:
    """One activation quantizer to insert after a producer node, serving `consumers`.

    `spec` is resolved (per tensor); `nonnegative` is the sign of the quantizer, which for a quantizer shared
    by a join group (`join_group`, with `QuantConfig(share_join_scales=True)`) holds for every member.
    `quantizer` names the quantizer (points of one join group with one spec share one) and `reads` the
    quantizer whose call on the same tensor this point reads instead of the tensor itself (None: the tensor),
    both set once the plan is complete (`fxquant.quantizer_names`).
    """

    consumers: Tuple[str, ...]
    spec: QuantSpec
    nonnegative: bool
    join_group: Optional[int] = None
    quantizer: str = ""
    reads: Optional[str] = None


@dataclass
class TensorInfo:
    """Annotation of a tensor-producing node: sign, join group, and quantizers to insert after it."""

    nonnegative: bool = False
    join_group: Optional[int] = None
    points: List[ActPoint] = field(default_factory=list)


@dataclass
class NodeAnnotation:
    """What analysis wrote on one node: `node.meta["fxquant"]`."""

    op: Optional[QuantOp] = None
    tensor: Optional[TensorInfo] = None


def tensor_info(node: fx.Node) -> Optional[TensorInfo]:
    """The TensorInfo annotation of a node, if analysis wrote one."""
    value = node.meta.get(META_KEY)
    return value.tensor if isinstance(value, NodeAnnotation) else None


def quant_op(node: fx.Node) -> Optional[QuantOp]:
    """The QuantOp annotation of a node, if it is a quantized op."""
    value = node.meta.get(META_KEY)
    return value.op if isinstance(value, NodeAnnotation) else None


def module_stack_path(node: fx.Node) -> str:
    """The path of the innermost user module a node was recorded in (`nn_module_stack`), or ""."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def is_float_tensor(node: Any) -> bool:
    """Whether `node` is a graph value of a floating-point dtype (from shape propagation)."""
    if not isinstance(node, fx.Node):
        return False
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point
