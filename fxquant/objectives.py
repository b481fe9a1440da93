"""What fine-tuning aims at and how it gets there: the bit target, the schedule, and the penalties.

- `BitTarget`: the bits the penalty drives learned bit-widths to (uniform, or a size-weighted average for
  mixed precision); `check_target` refuses targets no quantizer can meet, before any training.
- `Schedule`: the LR warm-up/decay and penalty growth as fractions of the step budget (`LrFactor` is its
  `LambdaLR` multiplier).
- `LearnedBits`: the quantizers of a prepared module grouped for penalties and statistics.
- Penalties as objects: `ExteriorPenalty` (GDNSQ) and `SizePenalty` (DiffQ), each `(bits, base, step) ->
  (penalty, active constraints)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from fxquant.distributed import is_dtensor
from fxquant.errors import ConfigError
from fxquant.graph import is_quantizer_path
from fxquant.losses import HINGE_MARGIN, exterior_hinge, model_size_mb
from fxquant.quantizer import KIND_ACTIVATION, KIND_WEIGHT, LearnableQuantizer, clamp_ste, iter_learnable

FLOOR_MARGIN = 0.25
"""With `Schedule.floor`, continuous bits never go below `target - 0.25`, so `round(b)` stays on the target."""


def check_number(where: str, value: object) -> float:
    """`value` as a float; ConfigError naming `where` when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{where}={value!r} is not a finite number; give e.g. {where}=4.")
    return float(value)


@dataclass(frozen=True)
class BitTarget:
    """What the penalty drives the learned bit-widths to.

    Args:
        weight: bits of every weight quantizer that learns its bits (or, with `weight_average=True`, their
            size-weighted average: mixed precision). `None`: weights are not constrained.
        activation: bits of every activation quantizer that learns its bits. `None`: not constrained.
        weight_average: constrain the size-weighted average of the learnable weight bits instead of each
            one (DiffQ-style mixed precision).

    Example:
        >>> BitTarget(weight=4, activation=8)             # W4A8
        >>> BitTarget(weight=3.5, weight_average=True)     # 3.5 bits per weight on average
    """

    weight: Optional[float] = None
    activation: Optional[float] = None
    weight_average: bool = False

    def __post_init__(self) -> None:
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_number(f"BitTarget.{name}", value))
        if self.weight is None and self.activation is None:
            raise ConfigError("BitTarget has neither a weight nor an activation target; give at least one, e.g. weight=4.")
        if self.weight_average and self.weight is None:
            raise ConfigError("BitTarget(weight_average=True) needs weight=<average bits>, e.g. weight=3.5.")

    @classmethod
    def coerce(cls, value: Union[None, float, Mapping[str, Any], "BitTarget"]) -> Optional["BitTarget"]:
        """`None`, a number (the same target for weights and activations), a dict or a `BitTarget`."""
        if value is None or isinstance(value, BitTarget):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ConfigError(
                    f"target_bits has unknown keys {sorted(unknown)}; use 'weight', 'activation' and "
                    "'weight_average', e.g. {'weight': 4, 'activation': 8}."
                )
            return cls(**value)
        number = check_number("target_bits", value)
        return cls(weight=number, activation=number)

    def describe(self) -> str:
        """Short text, e.g. `W4A4` or `W avg 3.5 (learnable weights, size-weighted)`."""
        parts = []
        if self.weight is not None:
            w = f"{self.weight:g}"
            parts.append(f"W avg {w} (learnable weights, size-weighted)" if self.weight_average else f"W{w}")
        if self.activation is not None:
            parts.append(f"A{self.activation:g}")
        return " ".join(parts) if self.weight_average else "".join(parts)


@dataclass(frozen=True)
class Schedule:
    """Learning rates, warm-up, penalty growth and decay, as fractions of the step budget.

    Args:
        lr: learning rate of the model weights (and biases).
        clamp_lr: learning rate of quantizer clamps `lo`/`hi` (default: `lr`).
        bits_lr: learning rate of the bits parameters, which live in [0, 1] over `[min_bits, max_bits]`
            (default: `3 / steps`, so Adam can cross the whole range in a third of the budget).
        weight_decay: weight decay of the model weights (never applied to quantizer parameters).
        warmup: fraction of the steps with a linear LR warm-up.
        penalty_start: fraction of the steps before the exterior penalty starts (default: `warmup`).
        penalty_growth: the exterior penalty's coefficient grows linearly to this value at the end of the
            budget (so at half the budget it is about half of it).
        final_lr_ratio: once the target is met, the LR decays exponentially to this fraction of its value
            by the last step. Without a target the decay starts at half the budget.
        decay_start: fraction of the budget before which the decay never starts, even when the target is
            met earlier (default 0.5: a target met early gets the same LR schedule as fixed bits; None: the
            decay starts when the target is met). Measured in BENCHMARKS.md (ablation).
        loss_momentum: momentum of the running mean of the base loss that normalises the penalty.
        bits_beta1: Adam `beta1` of the bits group (0: no momentum to carry bits past the hinge).
        floor: with per-kind targets, keep continuous bits at or above `target - 0.25` so the rounded bits
            land exactly on the target instead of undershooting it; with a size-weighted average weight target,
            once it is met raise layers into what the rounding left below it and hold that allocation
            (`LearnedBits.fill_average_budget`).
        betas: Adam betas of the weights and clamps groups.
    """

    lr: float = 1e-3
    clamp_lr: Optional[float] = None
    bits_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup: float = 0.05
    penalty_start: Optional[float] = None
    penalty_growth: float = 100.0
    final_lr_ratio: float = 0.05
    decay_start: Optional[float] = 0.5
    loss_momentum: float = 0.9
    bits_beta1: float = 0.0
    floor: bool = True
    betas: Tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        for name in ("lr", "clamp_lr", "bits_lr", "penalty_growth", "weight_decay"):
            value = getattr(self, name)
            if value is None:
                continue
            number = check_number(f"Schedule.{name}", value)
            if number < 0 or (number == 0 and name.endswith("lr")):
                raise ConfigError(f"Schedule.{name}={value!r} must be positive; e.g. {name}=1e-3.")
        for name in ("warmup", "penalty_start", "final_lr_ratio", "decay_start", "loss_momentum", "bits_beta1"):
            value = getattr(self, name)
            if value is None:
                continue
            number = check_number(f"Schedule.{name}", value)
            if not (0.0 <= number <= 1.0) or (name == "final_lr_ratio" and number == 0.0):
                raise ConfigError(
                    f"Schedule.{name}={value!r} is a fraction and must lie in [0, 1] (final_lr_ratio in (0, 1]); "
                    "e.g. warmup=0.05."
                )


# --------------------------------------------------------------------------------------------------
# Bits bookkeeping: constraints, statistics, floors.
# --------------------------------------------------------------------------------------------------


class LearnedBits:
    """The quantizers of a prepared module, grouped for penalties and statistics."""

    def __init__(self, module: nn.Module, target: Optional[BitTarget]) -> None:
        quantizers = [q for _, q in iter_learnable(module)]
        self.target = target
        self.weights = [q for q in quantizers if q.kind == KIND_WEIGHT]
        self.activations = [q for q in quantizers if q.kind == KIND_ACTIVATION]
        self.learn_weights = [q for q in self.weights if q.learn_bits]
        self.learn_activations = [q for q in self.activations if q.learn_bits]
        self.all_quantizers = self.weights + self.activations
        quantized = sum(math.prod(q.tensor_shape) for q in self.weights)
        params = {id(p): p for n, p in module.named_parameters() if not is_quantizer_path(n)}
        self.float_numel = max(sum(p.numel() for p in params.values()) - quantized, 0)
        self._bit_bounds_cache: Dict[Tuple[Any, ...], Tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        # the weight quantizers' integer bits held by `fill_average_budget` (None: not filled)
        self.held: Optional[List[Tuple[LearnableQuantizer, float]]] = None
        # whether every bits parameter is a plain tensor on one device: then all are read at once
        bits_params = [q.bits_param for q in self.all_quantizers]
        self._one_device = len({p.device for p in bits_params}) <= 1 and not any(is_dtensor(p) for p in bits_params)

    def constraints(self) -> Optional[Tuple[Tensor, Tensor]]:
        """`(bits, targets)` as 1-D tensors for `exterior_hinge` (differentiable bits)."""
        t = self.target
        if t is None:
            return None
        bits: List[Tensor] = []
        targets: List[float] = []
        if t.weight is not None and self.learn_weights:
            weight_bits = self._continuous_bits(self.learn_weights)
            if t.weight_average:
                numel = self._bit_bounds(self.learn_weights, weight_bits.device)[3]
                bits.append(((weight_bits * numel).sum() / numel.sum()).reshape(1))
                targets.append(t.weight)
            else:
                bits.append(weight_bits)
                targets.extend([t.weight] * weight_bits.numel())
        if t.activation is not None and self.learn_activations:
            activation_bits = self._continuous_bits(self.learn_activations)
            bits.append(activation_bits)
            targets.extend([t.activation] * activation_bits.numel())
        if not bits:
            return None
        stacked = torch.cat(bits)
        return stacked, torch.tensor(targets, dtype=stacked.dtype, device=stacked.device)

    def _continuous_bits(self, quantizers: List[LearnableQuantizer]) -> Tensor:
        """Every element of the quantizers' continuous bits (`LearnableQuantizer.bits`, differentiable) as one 1-D
        tensor: on one device in a few ops for all of them (~5 ops per quantizer and step otherwise)."""
        if not self._one_device:
            return torch.cat([q.bits().reshape(-1) for q in quantizers])
        p = torch.cat([q.bits_param.reshape(-1) for q in quantizers])
        lows, spans, _, _ = self._bit_bounds(quantizers, p.device)
        return lows + spans * clamp_ste(p, 0.0, 1.0)

    def size_bits(self) -> Tensor:
        """Differentiable storage of all quantized weights in bits."""
        return torch.stack([q.size_bits() for q in self.weights]).sum()

    @torch.no_grad()
    def integer_bits_by_quantizer(self) -> Dict[int, List[float]]:
        """Every quantizer's integer bits (per group) by `id`, read in one device-to-host transfer (one sync
        per step on CUDA instead of one per quantizer)."""
        quantizers = self.all_quantizers
        if not quantizers:
            return {}
        params = [q.bits_param for q in quantizers]
        on_cpu = self._on_cpu_values(quantizers)
        if on_cpu is not None:
            # the same float32 arithmetic as `integer_bits`, element by element, in numpy (no tensor op per step)
            values, low_values, high_values = on_cpu
            flat = np.minimum(np.maximum(np.round(values), low_values), high_values).tolist()
            sizes = [p.numel() for p in params]
        elif self._one_device:
            # all quantizers at once (a handful of ops per step instead of ~8 per quantizer): the same float32
            # arithmetic as `integer_bits`, element by element
            lows, spans, highs, _ = self._bit_bounds(quantizers, params[0].device)
            p_all = torch.cat([p.reshape(-1) for p in params]).to(torch.float32)
            flat = torch.round(lows + spans * p_all.clamp(0.0, 1.0)).clamp_(lows, highs).tolist()
            sizes = [p.numel() for p in params]
        else:
            per_q = [q.integer_bits().reshape(-1) for q in quantizers]
            flat = torch.cat([b.to(per_q[0].device, torch.float32) for b in per_q]).tolist()
            sizes = [b.numel() for b in per_q]
        out: Dict[int, List[float]] = {}
        at = 0
        for q, n in zip(quantizers, sizes):
            out[id(q)] = flat[at : at + n]
            at += n
        return out

    def _on_cpu_values(self, quantizers: List[LearnableQuantizer]) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`(continuous bits, min_bits, max_bits)` of every element of the quantizers' bits parameters as float32 numpy
        arrays, the continuous bits `min + (max - min) * clamp(p, 0, 1)` in the float32 operations of
        `_continuous_bits`, when they are all float32 on the CPU (one tensor op per call), else None."""
        if not quantizers or not self._one_device:
            return None
        params = [q.bits_param for q in quantizers]
        if params[0].device.type != "cpu" or any(p.dtype != torch.float32 for p in params):
            return None
        lows, spans, highs, _ = (t.numpy() for t in self._bit_bounds(quantizers, params[0].device))
        p_all = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
        # clamp(p, 0, 1) as torch.clamp: max, then min (np.clip costs several microseconds more)
        return lows + spans * np.minimum(np.maximum(p_all, np.float32(0.0)), np.float32(1.0)), lows, highs

    def active_constraints(self) -> Optional[int]:
        """How many constraints `exterior_hinge(*constraints())` counts active, from the same float32 operations in
        numpy (no tensor ops), or None where that does not hold: a size-weighted average weight target (its mean is
        summed in another order), parameters that are not all float32 on the CPU."""
        t = self.target
        if t is None:
            return 0
        if t.weight is not None and self.learn_weights and t.weight_average:
            return None
        groups = [(self.learn_weights, t.weight), (self.learn_activations, t.activation)]
        active = 0
        for quantizers, target in groups:
            if target is None or not quantizers:
                continue
            found = self._on_cpu_values(quantizers)
            if found is None:
                return None
            bits = found[0]
            targets = np.float32(target)
            excess = (np.maximum(bits - (targets - np.float32(HINGE_MARGIN)), np.float32(0.0))
                      + np.maximum(np.round(bits) - targets, np.float32(0.0)))
            active += int((excess > 0).sum())
        return active

    def _bit_bounds(self, quantizers: List[LearnableQuantizer], device: torch.device
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(min_bits, max_bits - min_bits, max_bits, elements per group)` for every element of the quantizers' bits
        parameters, as float32 tensors on `device` (made once per list of quantizers)."""
        key = (tuple(id(q) for q in quantizers), tuple(q.bits_param.numel() for q in quantizers), device)
        cached = self._bit_bounds_cache.get(key)
        if cached is None:
            rows = [(float(q.min_bits), float(q.max_bits - q.min_bits), float(q.max_bits), float(q.group_numel()),
                     q.bits_param.numel()) for q in quantizers]
            lows, spans, highs, numels = (
                torch.tensor([row[i] for row in rows for _ in range(row[4])], dtype=torch.float32, device=device)
                for i in range(4)
            )
            cached = self._bit_bounds_cache[key] = (lows, spans, highs, numels)
        return cached

    def stats(self, integer_bits: Optional[Dict[int, List[float]]] = None) -> Dict[str, float]:
        """Average integer bits (what eval and freeze use) and model size (from `integer_bits` when given)."""
        found = integer_bits if integer_bits is not None else self.integer_bits_by_quantizer()

        def weighted(qs: List[LearnableQuantizer]) -> Tuple[float, float]:
            size = sum(sum(found[id(q)]) * q.group_numel() for q in qs)
            numel = sum(q.group_numel() * q.bits_param.numel() for q in qs)
            return size, float(numel)

        size_all, numel_all = weighted(self.weights)
        size_learn, numel_learn = weighted(self.learn_weights)
        act = [sum(found[id(q)]) / len(found[id(q)]) for q in self.activations]
        return {
            "avg_weight_bits": size_all / numel_all if numel_all else 0.0,
            "avg_learnable_weight_bits": size_learn / numel_learn if numel_learn else 0.0,
            "avg_activation_bits": sum(act) / len(act) if act else 0.0,
            "size_mb": (size_all + 32.0 * self.float_numel) / 8e6,
        }

    def met(self, integer_bits: Optional[Dict[int, List[float]]] = None) -> bool:
        """Whether every constrained quantizer meets its target at integer bits (from `integer_bits` when
        given)."""
        t = self.target
        if t is None:
            return True
        found = integer_bits if integer_bits is not None else self.integer_bits_by_quantizer()
        if t.weight is not None and self.learn_weights:
            if t.weight_average:
                if self.stats(found)["avg_learnable_weight_bits"] > t.weight + 1e-9:
                    return False
            elif any(max(found[id(q)]) > t.weight for q in self.learn_weights):
                return False
        if t.activation is not None:
            if any(max(found[id(q)]) > t.activation for q in self.learn_activations):
                return False
        return True

    @torch.no_grad()
    def fill_average_budget(self) -> List[LearnableQuantizer]:
        """Once a size-weighted average weight target is met, spend what the rounding left of it, then hold the
        allocation; returns the quantizers raised.

        The exterior penalty drives the continuous average to the target, but each layer rounds on its own, so the
        integer average lands below it (2.80-2.86 bits for a target of 3 on the benchmark's ResNet). Layers are raised
        one bit each, those whose continuous bits are closest to rounding up first, while the integer average stays
        within the target; then every one-bit-width weight quantizer is held within `FLOOR_MARGIN` of its integer
        bits (`apply_floor`), so the allocation that met the target is the one trained for the rest of the budget.
        Per-group bit-widths (`per_group_bits`) are neither raised nor held. The decisions read only the bits
        parameters, which are the same on every rank, so every rank makes them alike. Nothing happens without a
        size-weighted average target or once filled.
        """
        t = self.target
        if t is None or t.weight is None or not t.weight_average or not self.learn_weights or self.held is not None:
            return []
        found = self.integer_bits_by_quantizer()
        numel = sum(q.group_numel() * q.bits_param.numel() for q in self.learn_weights)
        budget = t.weight * numel - sum(sum(found[id(q)]) * q.group_numel() for q in self.learn_weights)
        single = [q for q in self.learn_weights if q.bits_param.numel() == 1]
        bits = {id(q): found[id(q)][0] for q in single}
        rounding_up = {id(q): float(q.bits().detach().reshape(-1)[0]) - bits[id(q)] for q in single}
        raised: List[LearnableQuantizer] = []
        for q in sorted(single, key=lambda q: rounding_up[id(q)], reverse=True):
            # the average after the raise must pass `met`'s own test (`<= target + 1e-9`)
            if bits[id(q)] + 1 <= q.max_bits and q.group_numel() <= budget + 1e-9 * numel:
                bits[id(q)] += 1
                budget -= q.group_numel()
                q.set_bits(bits[id(q)])
                raised.append(q)
        self.held = [(q, bits[id(q)]) for q in single]
        return raised

    @torch.no_grad()
    def apply_floor(self) -> None:
        """Keep continuous bits at or above `target - 0.25` (per-kind targets), and within 0.25 of the bits
        `fill_average_budget` holds (a size-weighted average target, once met)."""
        t = self.target
        if t is None:
            return
        for q, held in self.held or ():
            span = q.max_bits - q.min_bits
            if span > 0:
                q.bits_param.clamp_(min=(held - FLOOR_MARGIN - q.min_bits) / span,
                                    max=(held + FLOOR_MARGIN - q.min_bits) / span)
        pairs: List[Tuple[List[LearnableQuantizer], Optional[float]]] = [(self.learn_activations, t.activation)]
        if not t.weight_average:
            pairs.append((self.learn_weights, t.weight))
        for qs, target in pairs:
            if target is None:
                continue
            for q in qs:
                span = q.max_bits - q.min_bits
                if span > 0:
                    floor = (target - FLOOR_MARGIN - q.min_bits) / span
                    if floor > 0:
                        q.bits_param.clamp_(min=floor)


# --------------------------------------------------------------------------------------------------
# Schedule and penalties as objects.
# --------------------------------------------------------------------------------------------------


class LrFactor:
    """The LR multiplier of `Schedule` for `torch.optim.lr_scheduler.LambdaLR`: linear warm-up, constant
    until `decay_from` (set by `start_decay` when the target is met; half the budget without a target; never
    before `decay_start`), then exponential decay to `final_lr_ratio` at the last step."""

    def __init__(self, schedule: Schedule, steps: int, has_target: bool) -> None:
        self.steps, self.final = steps, schedule.final_lr_ratio
        self.warm_steps = max(1, round(schedule.warmup * steps))
        self.earliest = round(schedule.decay_start * steps) if schedule.decay_start is not None else 0
        self.decay_from: Optional[int] = None
        self.gamma = 1.0
        if not has_target:
            self.start_decay(steps // 2)

    def start_decay(self, step: int) -> None:
        """Decay from `step` (or `decay_start`, if later) on; only the first call counts."""
        if self.decay_from is None:
            step = max(step, self.earliest)
            self.decay_from = step
            self.gamma = self.final ** (1.0 / max(self.steps - step, 1))

    def __call__(self, done: int) -> float:
        step = done + 1  # LambdaLR counts finished steps; the factor is for the step about to run
        factor = min(1.0, step / self.warm_steps)
        if self.decay_from is not None and step > self.decay_from:
            factor *= self.gamma ** (step - self.decay_from)
        return factor


class ExteriorPenalty:
    """GDNSQ's exterior-point penalty: `t * mean_loss * hinge(bits, target)`, with `t` zero until
    `penalty_start` and then growing linearly to `penalty_growth` at the end of the budget, and `mean_loss`
    a running mean of the base loss (the penalty keeps its weight relative to the base loss)."""

    def __init__(self, schedule: Schedule, steps: int) -> None:
        start = schedule.penalty_start if schedule.penalty_start is not None else schedule.warmup
        self.start, self.steps = round(start * steps), steps
        self.growth, self.momentum = schedule.penalty_growth, schedule.loss_momentum
        self.loss_mean, self.loss_weight = 0.0, 0.0
        self.last_active: Optional[int] = None  # constraints active at the last step (None: none taken yet)

    def coefficient(self, step: int) -> float:
        return self.growth * max(0, step - self.start) / self.steps

    def __call__(self, bits: "LearnedBits", base: Tensor, step: int) -> Tuple[Tensor, int]:
        """`(penalty, active constraints)` for this step; `base` is the (finite) base loss."""
        value = float(base.detach())
        self.loss_mean = self.momentum * self.loss_mean + (1 - self.momentum) * value
        self.loss_weight = self.momentum * self.loss_weight + (1 - self.momentum)
        coefficient = self.coefficient(step)
        if coefficient == 0.0 or self.last_active == 0:
            # the penalty passes no gradient before it starts, nor when no constraint is active (the hinge's gradient
            # is zero where nothing exceeds its target): then no graph is recorded for it, which leaves the
            # gradients as they were and saves a dozen small ops forward and backward per step
            active = bits.active_constraints()
            if active is None:
                with torch.no_grad():
                    cons = bits.constraints()
                    active = 0 if cons is None else exterior_hinge(*cons)[1]
            if coefficient == 0.0 or active == 0:
                self.last_active = active
                return base.new_zeros(()), active
        cons = bits.constraints()
        if cons is None:
            return base.new_zeros(()), 0
        hinge, active = exterior_hinge(*cons)
        self.last_active = active
        return coefficient * (self.loss_mean / self.loss_weight) * hinge, active


class SizePenalty:
    """DiffQ's size penalty `size_lambda * model size in MB` (only the quantized sizes carry gradient)."""

    def __init__(self, size_lambda: float) -> None:
        self.size_lambda = size_lambda

    def coefficient(self, step: int) -> float:
        return self.size_lambda

    def __call__(self, bits: "LearnedBits", base: Tensor, step: int) -> Tuple[Tensor, int]:
        return self.size_lambda * model_size_mb(bits.size_bits(), bits.float_numel), 0


def check_target(target: Optional[BitTarget], bits: LearnedBits) -> None:
    if target is None:
        return
    if not bits.learn_weights and not bits.learn_activations:
        raise ConfigError(
            f"target_bits={target.describe()} but no quantizer learns its bits; prepare with "
            "QuantSpec(learn_bits=True) (the default) or drop target_bits."
        )
    checks = [("weight", target.weight, bits.learn_weights), ("activation", target.activation, bits.learn_activations)]
    for kind, value, qs in checks:
        if value is None:
            continue
        if not qs:
            raise ConfigError(
                f"target_bits sets {kind}={value:g} but no {kind} quantizer learns its bits; "
                f"remove the {kind} target or let those quantizers learn bits."
            )
        for q in qs:
            if not (q.min_bits <= value <= q.max_bits):
                raise ConfigError(
                    f"target_bits {kind}={value:g} is outside [min_bits, max_bits]=[{q.min_bits}, {q.max_bits}] "
                    f"of the {kind} quantizer serving {', '.join(q.served) or '?'}; choose a target in that "
                    "range or widen QuantSpec(min_bits=..., max_bits=...)."
                )
