"""Rewrites of the exporter's ONNX into the spellings onnxruntime's graph optimizer fuses.

torch.onnx spells some ops differently from the patterns onnxruntime's fusions match. Each rule here is an
`onnxscript.rewriter` pattern (the library the exporter itself optimizes with) that computes the same
numbers up to float rounding, and each is kept only for a fusion measured to matter (docs/decisions.md):

- `x * rsqrt(v)`, exported as `Mul(x, Reciprocal(Sqrt(v)))`, becomes `Div(x, Sqrt(v))`: onnxruntime fuses the
  RMS norms of T5 and Llama (`pow, mean, add, sqrt, div, mul`) into one `SimplifiedLayerNormalization` only
  from the division.
- `ReduceMean` over every spatial axis with `keepdims=1` (how the exporter spells `adaptive_avg_pool2d(x, 1)`
  and `x.mean((2, 3), keepdim=True)`) becomes `GlobalAveragePool`: between DequantizeLinear and
  QuantizeLinear onnxruntime runs that as QLinearGlobalAveragePool on the codes, while a quantized ReduceMean
  stays float (squeeze-excite's pooling, a CNN's head).
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern


def _times_reciprocal_square_root(op: Any, x: ir.Value, v: ir.Value) -> ir.Value:
    return op.Mul(x, op.Reciprocal(op.Sqrt(v)))


def _divided_by_square_root(op: Any, x: ir.Value, v: ir.Value) -> ir.Value:
    return op.Div(x, op.Sqrt(v))


def _spatial_mean(op: Any, x: ir.Value, axes: ir.Value) -> ir.Value:
    return op.ReduceMean(x, axes, keepdims=1)


def _over_all_spatial_axes(context: Any, x: ir.Value, axes: ir.Value, **_: Any) -> bool:
    """`axes` is a constant naming every axis after the first two of an image or volume (rank 4 or 5; not rank 3,
    where the mean over the last axis is a norm's that onnxruntime fuses as it is)."""
    rank = len(x.shape) if x.shape is not None else None
    values = axes.const_value.numpy() if axes.const_value is not None else None
    if rank is None or not 4 <= rank <= 5 or values is None:
        return False
    return sorted(int(a) % rank for a in values.reshape(-1)) == list(range(2, rank))


def _global_average_pool(op: Any, x: ir.Value, axes: ir.Value) -> ir.Value:
    return op.GlobalAveragePool(x)


RULES = pattern.RewriteRuleSet(
    [
        pattern.RewriteRule(_times_reciprocal_square_root, _divided_by_square_root),
        pattern.RewriteRule(_spatial_mean, _global_average_pool, _over_all_spatial_axes),
    ],
    commute=True,
)
"""The rewrites `apply_runtime_patterns` applies, in order."""


def apply_runtime_patterns(model: ir.Model) -> int:
    """Apply `RULES` to `model` in place, then drop what the rewrites left unread (a `ReduceMean`'s axes
    constant: onnxruntime warns about every unused initializer); the number of rewrites."""
    count = RULES.apply_to_model(model)
    if count:
        RemoveUnusedNodesPass()(model)
    return count


__all__ = ["RULES", "apply_runtime_patterns"]
