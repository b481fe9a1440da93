"""Losses of fine-tuning: distillation from the float teacher and the penalties (docs/algorithms.md,
"Distillation loss" and "Penalties on the bit-widths").

- `jeffreys_divergence`: `KL(p_T || p_S) + KL(p_S || p_T)` at temperature 1, over the last axis (logits).
- `distillation_loss`: pairs the student's and the teacher's output leaves (tensors in nested tuples,
  lists, dicts, `ModelOutput`s) and sums Jeffreys for logits and MSE for other outputs.
- `exterior_hinge`: GDNSQ's one-sided hinge of bit-widths to their targets, normalised by the number of
  active constraints.
- `model_size_mb`: DiffQ's differentiable model size (only `sum(group_numel * b)` carries gradient).

Pure functions: the schedule that weighs them lives in `fxquant.finetune`.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fxquant.quantizer import round_ste

DISTILL_KINDS = ("auto", "jeffreys", "mse")
HINGE_MARGIN = 1e-3
"""The hinge pushes continuous bits to `target - HINGE_MARGIN`, so `round(b)` lands on the target."""


def output_leaves(output: Any, path: str = "out") -> List[Tuple[str, Tensor]]:
    """Floating-point tensors of a (nested) model output with their paths, in a stable order."""
    if isinstance(output, Tensor):
        return [(path, output)] if output.is_floating_point() else []
    if isinstance(output, dict):
        leaves: List[Tuple[str, Tensor]] = []
        for key in output:
            leaves.extend(output_leaves(output[key], f"{path}[{key!r}]"))
        return leaves
    if isinstance(output, (tuple, list)):
        leaves = []
        for i, item in enumerate(output):
            leaves.extend(output_leaves(item, f"{path}[{i}]"))
        return leaves
    return []


def is_logits(path: str, tensor: Tensor) -> bool:
    """`distill="auto"` rule: a leaf named `logits`, or a 2-D `(batch, classes)` tensor with >= 2 classes."""
    if "'logits'" in path:
        return True
    return tensor.dim() == 2 and tensor.shape[-1] >= 2


def jeffreys_divergence(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """`KL(p_T || p_S) + KL(p_S || p_T)` over the last axis, averaged over every other axis.

    Equals `sum((p_T - p_S) * (log p_T - log p_S))`; computed in float32 for stability.
    """
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    per_row = ((log_t.exp() - log_s.exp()) * (log_t - log_s)).sum(dim=-1)
    return per_row.mean()


def distillation_loss(student_out: Any, teacher_out: Any, kind: str = "auto") -> Tensor:
    """Sum over output leaves of Jeffreys divergence (logits) or MSE (anything else).

    Args:
        student_out: the quantized module's output.
        teacher_out: the teacher's output (same structure and shapes; checked by `finetune`).
        kind: `"auto"` (Jeffreys for leaves that look like logits, see `is_logits`), `"jeffreys"` or `"mse"`.

    Returns:
        A scalar tensor.
    """
    s_leaves = output_leaves(student_out)
    t_leaves = output_leaves(teacher_out)
    total = s_leaves[0][1].new_zeros((), dtype=torch.float32)
    for (path, s), (_, t) in zip(s_leaves, t_leaves):
        t = t.detach()
        use_jeffreys = kind == "jeffreys" or (kind == "auto" and is_logits(path, s))
        if use_jeffreys:
            total = total + jeffreys_divergence(s, t)
        else:
            total = total + F.mse_loss(s.float(), t.float())
    return total


def exterior_hinge(bits: Tensor, targets: Tensor) -> Tuple[Tensor, int]:
    """GDNSQ's exterior-point hinge, summed over active constraints, and the number of active ones.

    Each constraint is a continuous bit-width `b` (an entry of `bits`) and its target `T` (the same entry
    of `targets`). The excess is `max(0, b - (T - 1e-3)) + max(0, round_ste(b) - T)`: the first term
    drives `b` just below the target, the second (straight-through rounding) keeps pushing while the
    *integer* bits still exceed it, which matters for size-weighted averages where the continuous mean can
    meet the target before the rounded one does. Dividing the sum by the number of active constraints is
    the mean hinge normalised by the share of active constraints.

    Args:
        bits: 1-D tensor of continuous bit-widths (differentiable).
        targets: 1-D tensor of targets, same length.

    Returns:
        `(sum of excesses / max(active, 1), active)`.
    """
    excess = torch.relu(bits - (targets - HINGE_MARGIN)) + torch.relu(round_ste(bits) - targets)
    active = int((excess.detach() > 0).sum())
    return excess.sum() / max(active, 1), active


def model_size_mb(size_bits: Tensor, float_numel: int, float_bits: int = 32) -> Tensor:
    """Model size in megabytes (1e6 bytes): quantized weights at their bits plus float parameters."""
    return (size_bits + float(float_numel * float_bits)) / 8e6
