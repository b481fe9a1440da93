"""Rewrites of the exporter's ONNX into the spellings onnxruntime's graph optimizer fuses.

torch.onnx spells some ops differently from the patterns onnxruntime's fusions match. Each rule here is an
`onnxscript.rewriter` pattern (the library the exporter itself optimizes with) that computes the same
numbers up to float rounding, and each is kept only for a fusion measured to matter (docs/decisions.md):

- `x * rsqrt(v)`, exported as `Mul(x, Reciprocal(Sqrt(v)))`, becomes `Div(x, Sqrt(v))`: onnxruntime fuses the
  RMS norms of T5 and Llama (`pow, mean, add, sqrt, div, mul`) into one `SimplifiedLayerNormalization` only
  from the division.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import pattern


def _times_reciprocal_square_root(op: Any, x: ir.Value, v: ir.Value) -> ir.Value:
    return op.Mul(x, op.Reciprocal(op.Sqrt(v)))


def _divided_by_square_root(op: Any, x: ir.Value, v: ir.Value) -> ir.Value:
    return op.Div(x, op.Sqrt(v))


RULES = pattern.RewriteRuleSet(
    [pattern.RewriteRule(_times_reciprocal_square_root, _divided_by_square_root)], commute=True
)
"""The rewrites `apply_runtime_patterns` applies, in order."""


def apply_runtime_patterns(model: ir.Model) -> int:
    """Apply `RULES` to `model` in place; the number of rewrites."""
    return RULES.apply_to_model(model)


__all__ = ["RULES", "apply_runtime_patterns"]
