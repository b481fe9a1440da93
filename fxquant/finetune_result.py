"""What `fxquant.finetune.finetune` returns: one `StepRecord` per step and the `FinetuneResult` of the run
(history, chosen step, whether the target was met, bits before and after). Plain data; nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

import torch

from fxquant.errors import ConfigError
from fxquant.objectives import BitTarget


@dataclass(frozen=True)
class StepRecord:
    """One training step of the history (bits and size after the step, at integer bits)."""

    step: int
    loss: float
    base: float
    penalty: float
    coefficient: float
    lr: float
    avg_weight_bits: float
    avg_learnable_weight_bits: float
    avg_activation_bits: float
    size_mb: float
    active_constraints: int
    met: bool


@dataclass
class FinetuneResult:
    """What `finetune` did: history, the chosen step and whether the target was met.

    Attributes:
        history: one `StepRecord` per step run (`loss` is NaN for a skipped non-finite step).
        best_step: the step (1-based: the state after that many steps) that was restored, or `None` when
            no state met the target (then the last state is kept).
        best_metric: its selection metric; `metric` says which (`"val_distillation"` or `"train_loss"`).
        met_target: whether the returned state meets the target (integer bits). `False` comes with a
            `FinetuneWarning`.
        converged_step: the first step at which every quantizer met its target.
        bits_before, bits_after: average bits before and after (`avg_weight_bits`: all quantized weights,
            size-weighted; `avg_learnable_weight_bits`: those that learn bits; `avg_activation_bits`: mean
            over activation quantizers; `size_mb`).
        interrupted: Ctrl-C stopped the run (the best state so far was returned).
        stop_reason: why training stopped before `steps`, or `None`.
        nonfinite_steps: steps whose loss or gradients were NaN/inf (skipped, last good state restored).
        calibrated: `finetune` calibrated the module itself because it was not calibrated yet.
    """

    history: List[StepRecord] = field(default_factory=list)
    best_step: Optional[int] = None
    best_metric: Optional[float] = None
    metric: str = "train_loss"
    met_target: bool = False
    converged_step: Optional[int] = None
    target: Optional[BitTarget] = None
    penalty: Optional[str] = None
    size_lambda: Optional[float] = None
    steps_run: int = 0
    interrupted: bool = False
    stop_reason: Optional[str] = None
    nonfinite_steps: List[int] = field(default_factory=list)
    bits_before: Dict[str, float] = field(default_factory=dict)
    bits_after: Dict[str, float] = field(default_factory=dict)
    calibrated: bool = False

    def series(self, name: str) -> List[float]:
        """One column of the history, e.g. `result.series("avg_weight_bits")`."""
        if name not in {f.name for f in fields(StepRecord)}:
            raise ConfigError(f"history has no column {name!r}; columns: {[f.name for f in fields(StepRecord)]}.")
        return [getattr(r, name) for r in self.history]

    def __str__(self) -> str:
        target = self.target.describe() if self.target else "none"
        b, a = self.bits_before, self.bits_after
        return (
            f"finetune: {self.steps_run} steps, target {target}, met={self.met_target}, best step {self.best_step} "
            f"({self.metric}={self.best_metric if self.best_metric is None else f'{self.best_metric:.4g}'}); "
            f"weight bits {b.get('avg_weight_bits', 0):.2f} -> {a.get('avg_weight_bits', 0):.2f} "
            f"(all quantized weights, size-weighted), activation bits {b.get('avg_activation_bits', 0):.2f} -> "
            f"{a.get('avg_activation_bits', 0):.2f}, size {b.get('size_mb', 0):.4f} -> {a.get('size_mb', 0):.4f} MB"
            + (f"; stopped: {self.stop_reason}" if self.stop_reason else "")
        )


def step_record(
    step: int, loss: float, base: float, pen: float, coefficient: float, opt: torch.optim.Optimizer,
    stats: Dict[str, float], active: int, met: bool,
) -> StepRecord:
    """The history entry of one step: its losses, the penalty coefficient, the first group's learning rate
    and the bit statistics `stats` (`fxquant.objectives.LearnedBits.stats`)."""
    return StepRecord(
        step=step, loss=loss, base=base, penalty=pen, coefficient=coefficient, lr=float(opt.param_groups[0]["lr"]),
        avg_weight_bits=stats["avg_weight_bits"], avg_learnable_weight_bits=stats["avg_learnable_weight_bits"],
        avg_activation_bits=stats["avg_activation_bits"], size_mb=stats["size_mb"], active_constraints=active,
        met=met,
    )
