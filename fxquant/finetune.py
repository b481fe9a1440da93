"""Fine-tuning: distillation from the float teacher plus a bit-width penalty (docs/algorithms.md, sections
"Penalties on the bit-widths", "Distillation loss" and "Fine-tuning schedule and the chosen state").

`finetune(qm, batches, teacher=model, steps=300, target_bits=4)` trains a prepared module in place:

- base loss: Jeffreys divergence to the frozen teacher for logits, MSE for other outputs
  (`fxquant.losses.distillation_loss`), plus an optional user task loss `loss_fn(outputs, targets)`;
- penalty: `"exterior"` (GDNSQ: one-sided hinge of the bits to the target, coefficient zero during the
  warm-up then growing linearly, multiplied by a running mean of the base loss and divided by the share
  of active constraints) or `"size"` (DiffQ: `size_lambda * model size in MB`);
- optimizer: weights, quantizer clamps and quantizer bits in separate param groups, no weight decay on
  quantizer parameters, `beta1 = 0` for the bits (Adam momentum would carry them past the one-sided
  hinge);
- schedule (`Schedule`, expressed as fractions of the step budget so that bits reach the target by about
  half of it): linear LR warm-up, constant LR until every quantizer meets its target, then exponential
  decay; the result is the best state among those that meet the target.

Targets apply to quantizers that learn their bits (`learn_bits=True`); first/last layers fixed at 8 bits
by `QuantConfig(first_last_bits=8)` are reported but not constrained. "Meets the target" is judged on the
integer bits that eval and `freeze` use (`round(b)`), never on the continuous ones.

Distributed: DDP-wrapped, or FSDP2-sharded with replicated quantizers (see `finetune`'s `qm` argument;
the helpers are `fxquant.distributed`). Targets, schedule and penalties are `fxquant.objectives`.

The parts are modules of their own: the result (`fxquant.finetune_result`), the optimizer's groups and
projection (`fxquant.optimization`, public for a loop of one's own), the choice of the returned state
(`fxquant.state_selection`).

Fine-tuning changes parameter values, never the graph. Calibration is `fxquant.calibration`; numerics of
the quantizers are `fxquant.quantizer`; the losses are `fxquant.losses`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fxquant.allocator import keep_freed_memory
from fxquant.batches import (
    Batch,
    call_batch,
    cycle_batches,
    model_device,
    required_inputs,
    run_batch,
    split_batch,
    to_device,
)
from fxquant.calibration import calibrate
from fxquant.distributed import (
    average_replicated_grads,
    broadcast_quantizers,
    check_fsdp,
    clip_grad_norm,
    on_every_rank,
    unwrap,
)
from fxquant.errors import ConfigError, PrepareError, StateError
from fxquant.finetune_result import FinetuneResult, step_record
from fxquant.graph import module_state
from fxquant.losses import DISTILL_KINDS, distillation_loss, output_leaves
from fxquant.objectives import (
    BitTarget,
    ExteriorPenalty,
    LearnedBits,
    LrFactor,
    Schedule,
    SizePenalty,
    check_number,
    check_target,
)
from fxquant.optimization import OptimizerFactory, default_optimizer, param_groups
from fxquant.quantizer import make_estimator, project_parameters
from fxquant.state_selection import StateSelector, copied, snapshot
from fxquant.utils import quantizers_enabled

PENALTIES = ("exterior", "size")
MAX_BAD_STEPS = 5
"""Consecutive non-finite steps after which fine-tuning stops (and returns the best state so far)."""

LossFn = Callable[[Any, Any], Tensor]


class FinetuneWarning(UserWarning):
    """Fine-tuning did something the caller must know about (target never met, non-finite loss, Ctrl-C)."""


# --------------------------------------------------------------------------------------------------
# Checks before training.
# --------------------------------------------------------------------------------------------------


def _describe(output: Any) -> str:
    return ", ".join(f"{p}: {tuple(t.shape)}" for p, t in output_leaves(output)) or "no floating-point tensors"


def _dry_run(
    inner: nn.Module, teacher: Optional[nn.Module], batch: Batch, n_required: int, loss_fn: Optional[LossFn]
) -> None:
    """Run the first batch through student (float), teacher and loss_fn; raise before any training."""
    split_batch(batch, n_required)  # an unknown batch type raises PrepareError here
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), quantizers_enabled(inner, False):
            out, target = call_batch(inner, batch, n_required, "quantized module")
            if teacher is not None:
                t_out, _ = call_batch(teacher, batch, n_required, "teacher")
                s_leaves, t_leaves = output_leaves(out), output_leaves(t_out)
                same = len(s_leaves) == len(t_leaves) and all(
                    s.shape == t.shape for (_, s), (_, t) in zip(s_leaves, t_leaves)
                )
                if not s_leaves or not same:
                    raise PrepareError(
                        f"the teacher's output ({_describe(t_out)}) differs in shape from the quantized module's "
                        f"({_describe(out)}); distillation needs the same outputs: pass the float model the "
                        "quantized module was prepared from as teacher."
                    )
            if loss_fn is not None:
                if target is None:
                    raise PrepareError(
                        "loss_fn was given but the batches carry no targets; give (inputs, target) pairs, "
                        "or drop loss_fn to distil from the teacher only."
                    )
                value = loss_fn(out, target)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ConfigError(
                        f"loss_fn(outputs, targets) returned {type(value).__name__}"
                        f"{tuple(value.shape) if isinstance(value, Tensor) else ''}; it must return a scalar tensor."
                    )
    finally:
        inner.train(was_training)


def finetune(
    qm: nn.Module,
    batches: Iterable[Batch],
    *,
    teacher: Optional[nn.Module] = None,
    steps: int = 300,
    target_bits: Union[None, float, Mapping[str, Any], BitTarget] = None,
    penalty: Optional[str] = None,
    size_lambda: float = 1.0,
    loss_fn: Optional[LossFn] = None,
    distill: str = "auto",
    val_batches: Optional[Iterable[Batch]] = None,
    eval_every: Optional[int] = None,
    schedule: Optional[Schedule] = None,
    optimizer: Optional[OptimizerFactory] = None,
    grad_clip: Optional[float] = None,
    progress: bool = True,
    mode: Optional[str] = None,
) -> FinetuneResult:
    """Fine-tune a prepared module's weights and quantizers in place; return what happened.

    Args:
        qm: a module returned by `fxq.prepare` (calibrated or not: an uncalibrated one is calibrated on the
            first 8 batches), or that module wrapped by `DistributedDataParallel` (its quantizer
            parameters exist before wrapping), or sharded in place by FSDP2 as
            `fully_shard(qm, ignored_params=set(qm.fxq_quantizers.parameters()))`: the weights are sharded
            (DTensors, one FSDP group: the flat graph reads them with get_attr, so `fully_shard` on their
            modules would never gather them) and the quantizer parameters are replicated (`fully_shard`
            refuses their scalar bits; they are written in place during training and read between steps).
            Under DDP and FSDP2 every rank starts from rank 0's quantizers (broadcast) and, under FSDP2,
            `finetune` averages the quantizer gradients over the ranks of the default process group, so
            every rank ends with the same state. Device: wherever `qm` lives; batches follow it.
        batches: any iterable of batches (`fxquant.batches`: a tensor, a tuple of positional inputs, a dict
            of keyword inputs, or an `(inputs, target)` pair as a DataLoader yields). A list or a
            DataLoader is cycled when `steps` exceeds its length.
        teacher: the float model to distil from (frozen: run in eval mode without gradients, restored to
            its mode afterwards; it may live on another device).
        steps: optimizer steps.
        target_bits: a number (the same target for weights and activations), a dict such as
            `{"weight": 4, "activation": 8}` or a `BitTarget` (per kind, or a size-weighted average of the
            weight bits). Applies to quantizers that learn their bits.
        penalty: `"exterior"` (GDNSQ hinge to the target; the default when a target is given), `"size"`
            (DiffQ: `size_lambda * model size in MB`; a target, if given, only decides which states are
            eligible) or `None` with no target (fixed-bits fine-tuning).
        size_lambda: weight of the size penalty (scale-dependent: it multiplies megabytes).
        loss_fn: optional task loss `loss_fn(outputs, targets) -> scalar`, added to the distillation loss;
            needs batches that carry targets.
        distill: `"auto"` (Jeffreys for logits: a leaf named `logits` or a 2-D `(batch, classes)` tensor;
            MSE for other outputs), `"jeffreys"` or `"mse"`.
        val_batches: held-out batches: the best eligible state is chosen by the eval-mode distillation loss
            on them (teacher outputs are cached: keep them few). Default: by the training loss.
        eval_every: steps between candidate checks (default `max(1, steps // 20)`).
        schedule: learning rates and schedule (`Schedule()` by default).
        optimizer: `param_groups -> torch.optim.Optimizer` to replace the default Adam, e.g.
            `lambda groups: torch.optim.RAdam(groups)`. Groups carry `name`, `lr`, `weight_decay`, `betas`.
        grad_clip: clip the global gradient norm to this value.
        progress: show a tqdm progress bar (loss, average bits, whether the target is met).
        mode: the training estimator for this run: `"dither"` (GDNSQ), `"ste"` (LSQ-style) or `"noise"`
            (DiffQ); default: each quantizer's own (`QuantConfig(mode=...)`). Restored afterwards; a
            checkpoint does not depend on it.

    Returns:
        A `FinetuneResult`; `qm` holds the chosen state (the best one that meets the target, or the last
        state if none did, with a `FinetuneWarning`) and is left in its original train/eval mode.

    Raises:
        StateError: `qm` is not a prepared module.
        ConfigError: a bad argument (steps, penalty, distill, a target outside `[min_bits, max_bits]`, ...),
            or FSDP2 sharding that fine-tuning cannot follow (sharded quantizer parameters, `fully_shard` on
            a submodule whose forward the graph never runs, or not on the prepared module itself).
        PrepareError: no batches, batches of a structure the module cannot take, a teacher whose output
            differs from the student's, or a `loss_fn` with batches that carry no targets.

    Example:
        >>> result = fxq.finetune(qm, loader, teacher=model, steps=300, target_bits=4)
        >>> print(result)
    """
    inner = unwrap(qm)
    if module_state(inner) != "prepared":
        raise StateError(
            f"finetune expects a module returned by fxq.prepare (state {module_state(inner)!r}); call "
            "fxq.prepare(model, example_inputs, config) first (and fine-tune before fxq.freeze)."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"finetune steps={steps!r} must be a positive integer, e.g. steps=300.")
    if penalty not in (None,) + PENALTIES:
        raise ConfigError(f"finetune penalty={penalty!r} is unknown; expected one of {PENALTIES} or None.")
    if distill not in DISTILL_KINDS:
        raise ConfigError(f"finetune distill={distill!r} is unknown; expected one of {DISTILL_KINDS}.")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ConfigError(f"finetune eval_every={eval_every!r} must be a positive integer.")
    if grad_clip is not None and not check_number("grad_clip", grad_clip) > 0:
        raise ConfigError(f"finetune grad_clip={grad_clip!r} must be positive, e.g. grad_clip=1.0.")
    schedule = schedule if schedule is not None else Schedule()
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"finetune schedule={schedule!r} must be a fxq.Schedule.")
    target = BitTarget.coerce(target_bits)
    if penalty is None and target is not None:
        penalty = "exterior"
    if penalty == "exterior" and target is None:
        raise ConfigError("penalty='exterior' needs target_bits (e.g. target_bits=4); or use penalty='size'.")
    if penalty == "size" and not check_number("size_lambda", size_lambda) > 0:
        raise ConfigError(f"finetune size_lambda={size_lambda!r} must be positive with penalty='size', e.g. 1.0.")
    if teacher is None and loss_fn is None:
        raise ConfigError("finetune needs a teacher to distil from (teacher=model) or a task loss (loss_fn=...).")
    if mode is not None:
        make_estimator(mode)  # ConfigError for an unknown name
    bits = LearnedBits(inner, target)
    if not bits.weights and not bits.activations:
        raise StateError("finetune found no quantizers in qm; pass the module returned by fxq.prepare.")
    check_target(target, bits)
    fsdp = check_fsdp(inner)
    if batches is None:
        raise PrepareError("finetune got batches=None; give an iterable of batches (a list or a DataLoader).")

    n_required = required_inputs(inner)
    stream = cycle_batches(batches, "batches")
    first = next(stream)  # PrepareError when empty
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    was_training = inner.training
    modes = [(q, q.mode) for q in bits.all_quantizers]
    if mode is not None:
        for q, _ in modes:
            q.mode = mode
    try:
        _dry_run(inner, teacher, first, n_required, loss_fn)
        val_list = None
        if val_batches is not None:
            val_list = list(val_batches)
            if not val_list:
                raise PrepareError("val_batches is empty; give at least one held-out batch or leave it None.")
            _dry_run(inner, teacher, val_list[0], n_required, None)
        result = FinetuneResult(target=target, penalty=penalty, size_lambda=size_lambda if penalty == "size" else None)
        prefetched = [first]
        if not all(bool(q.initialized) for q in bits.all_quantizers):
            prefetched += list(itertools.islice(stream, 7))
            calibrate(inner, prefetched, num_batches=len(prefetched))
            result.calibrated = True
        if fsdp or isinstance(qm, nn.parallel.DistributedDataParallel):
            broadcast_quantizers(inner)
        result.bits_before = bits.stats()
        run = _Run(
            qm=qm, inner=inner, teacher=teacher, n_required=n_required, steps=steps, target=target, penalty=penalty,
            size_lambda=size_lambda, loss_fn=loss_fn, distill=distill, val_batches=val_list,
            eval_every=eval_every or max(1, steps // 20), schedule=schedule, optimizer_factory=optimizer,
            grad_clip=grad_clip, progress=progress, bits=bits, fsdp=fsdp,
        )
        return _Training(run, result).train(itertools.chain(prefetched, stream))
    finally:
        inner.train(was_training)
        for q, own in modes:
            q.mode = own
        if teacher is not None:
            teacher.train(teacher_was_training)



# --------------------------------------------------------------------------------------------------
# The training loop.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What one `finetune` call fixed before its first step (checked there)."""

    qm: nn.Module  # as given: the prepared module, or it wrapped by DDP
    inner: nn.Module  # the prepared module itself
    teacher: Optional[nn.Module]
    n_required: int
    steps: int
    target: Optional[BitTarget]
    penalty: Optional[str]
    size_lambda: float
    loss_fn: Optional[LossFn]
    distill: str
    val_batches: Optional[List[Batch]]
    eval_every: int
    schedule: Schedule
    optimizer_factory: Optional[OptimizerFactory]
    grad_clip: Optional[float]
    progress: bool
    bits: LearnedBits
    fsdp: bool

    @property
    def distributed(self) -> bool:
        return self.fsdp or isinstance(self.qm, nn.parallel.DistributedDataParallel)


class _Training:
    """One run of the loop: the optimizer, its `LambdaLR` schedule, the penalty term, the state selector and
    the last good state (restored after a non-finite step), built from a `_Run`; `train` runs the steps."""

    def __init__(self, run: _Run, result: FinetuneResult) -> None:
        self.run, self.result = run, result
        # without a target (and no size penalty) nothing drives the bits: they stay where they are
        groups = param_groups(run.inner, run.schedule, run.steps, learn_bits=run.target is not None or run.penalty == "size")
        self.opt = run.optimizer_factory(groups) if run.optimizer_factory is not None else default_optimizer(groups)
        self.params = [p for g in groups for p in g["params"]]
        self.quantizers = run.bits.all_quantizers
        self.device = model_device(run.inner)
        self.selector = StateSelector(run.inner, run.teacher, run.val_batches, run.n_required, run.distill, run.loss_fn)
        result.metric = self.selector.metric_name
        self.lr_factor = LrFactor(run.schedule, run.steps, has_target=run.target is not None)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.penalty: Optional[Union[ExteriorPenalty, SizePenalty]] = None
        if run.penalty == "exterior":
            self.penalty = ExteriorPenalty(run.schedule, run.steps)
        elif run.penalty == "size":
            self.penalty = SizePenalty(run.size_lambda)
        self.good_state, self.good_opt = snapshot(run.inner), copied(self.opt.state_dict())
        self.bad_in_a_row = 0
        self.updated = False  # an optimizer step was taken

    def base_loss(self, batch: Batch) -> Tensor:
        """The distillation loss to the teacher plus the user's task loss, on one batch."""
        run = self.run
        outputs, labels = run_batch(run.qm, batch, run.n_required)
        loss: Optional[Tensor] = None
        if run.teacher is not None:
            with torch.no_grad():
                t_out = to_device(run_batch(run.teacher, batch, run.n_required)[0], self.device)
            loss = distillation_loss(outputs, t_out, run.distill)
        if run.loss_fn is not None:
            task = run.loss_fn(outputs, labels)
            loss = task if loss is None else loss + task
        assert loss is not None  # finetune requires a teacher or a loss_fn
        return loss

    def finite_everywhere(self, finite: bool) -> bool:
        """`finite` on every rank (a step is skipped on all ranks when one rank's is not finite)."""
        return on_every_rank(finite, self.device) if self.run.distributed else finite

    def backward(self, base: Tensor, step: int) -> Tuple[Tensor, int, bool]:
        """Penalty, backward and gradient clipping; returns the penalty, the active constraints and whether
        the gradients are finite."""
        run = self.run
        pen, active = base.new_zeros(()), 0
        if self.penalty is not None:
            pen, active = self.penalty(run.bits, base, step)
        self.opt.zero_grad(set_to_none=True)
        (base + pen).backward()
        if run.fsdp:
            average_replicated_grads(self.params)
        norm = clip_grad_norm(self.params, run.grad_clip if run.grad_clip is not None else math.inf)
        return pen, active, self.finite_everywhere(math.isfinite(norm))  # FSDP2 norms each rank's own shard

    def skip(self, step: int, base_value: float, coefficient: float) -> bool:
        """Undo a non-finite step (restore the last good state); True when too many came in a row."""
        run = self.run
        self.result.nonfinite_steps.append(step)
        self.bad_in_a_row += 1
        run.inner.load_state_dict(self.good_state)
        for q in self.quantizers:
            q.forget_trained_bits()  # the restored clamps are fit for the restored bits: no rescale from the lost ones
        self.opt.load_state_dict(copied(self.good_opt))
        self.opt.zero_grad(set_to_none=True)
        warnings.warn(
            f"finetune step {step}: non-finite loss or gradient (loss={base_value}); skipped the step and "
            "restored the last good state. Check the batches for NaN/inf or lower the learning rate.",
            FinetuneWarning, stacklevel=5,
        )
        if self.bad_in_a_row < MAX_BAD_STEPS:
            return False
        self.result.stop_reason = f"{MAX_BAD_STEPS} non-finite steps in a row"
        self.result.history.append(
            step_record(step, math.nan, base_value, 0.0, coefficient, self.opt, run.bits.stats(), 0, False)
        )
        return True

    def update(self) -> None:
        """The optimizer step and the projection of the quantizers into their domain."""
        self.bad_in_a_row = 0
        self.opt.step()
        self.updated = True
        project_parameters(self.quantizers)
        if self.run.schedule.floor and self.run.penalty == "exterior":
            self.run.bits.apply_floor()

    def advance_schedule(self) -> None:
        """The learning rate of the next step. The schedule counts steps, skipped non-finite ones included; before
        the first optimizer step torch would warn that the scheduler stepped first, which is that skip, not a
        misuse."""
        if self.updated:
            self.lr_schedule.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.lr_schedule.step()

    def step(self, step: int, batch: Batch) -> Tuple[float, Dict[str, float], bool, bool]:
        """One step; returns its base loss, the bit statistics after it, whether it met the target, and
        whether training must stop (too many non-finite steps)."""
        run, result = self.run, self.result
        coefficient = self.penalty.coefficient(step) if self.penalty is not None else 0.0
        base = self.base_loss(batch)
        base_value = float(base.detach())
        finite = self.finite_everywhere(math.isfinite(base_value))
        pen, active = base.new_zeros(()), 0
        if finite:
            pen, active, finite = self.backward(base, step)
        if not finite:
            if self.skip(step, base_value, coefficient):
                return base_value, {}, False, True
        else:
            self.update()
        integer_bits = run.bits.integer_bits_by_quantizer()
        stats = run.bits.stats(integer_bits)
        met = finite and run.bits.met(integer_bits)
        # Without a target, states of the second half of the budget (after the decay starts) are eligible.
        eligible = met and (run.target is not None or step > run.steps // 2)
        pen_value = float(pen.detach()) if finite else 0.0
        result.history.append(
            step_record(step, base_value + pen_value if finite else math.nan, base_value, pen_value, coefficient,
                        self.opt, stats, active, met)
        )
        if eligible:
            self.selector.window.append(base_value)
            if result.converged_step is None and run.target is not None:
                result.converged_step = step
                self.lr_factor.start_decay(step)
                if run.schedule.floor and run.penalty == "exterior" and run.bits.fill_average_budget():
                    # a size-weighted average target spent what rounding left: the losses so far are of other bits
                    self.selector.window.clear()
        elif finite:
            self.selector.window.clear()
        if finite and step % run.eval_every == 0:
            self.good_state, self.good_opt = snapshot(run.inner), copied(self.opt.state_dict())
        if eligible and (step % run.eval_every == 0 or step == run.steps):
            self.selector.consider(step, run.eval_every)
        return base_value, stats, met, False

    def train(self, stream: Iterator[Batch]) -> FinetuneResult:
        """Run the steps on `stream`, restore the chosen state and fill the result."""
        run, result = self.run, self.result
        show_every = max(1, run.steps // 100)
        run.qm.train()
        if self.device.type == "cpu":
            keep_freed_memory()  # the steps' buffers stay in the heap instead of page-faulting in again each step
        bar = tqdm(total=run.steps, disable=not run.progress, desc="finetune", leave=False, dynamic_ncols=True)
        step = 0
        try:
            for step in range(1, run.steps + 1):
                batch = next(stream, None)
                if batch is None:  # a one-shot iterator ran out
                    result.stop_reason = ("batches is a one-shot iterator that ran out; pass a list or a DataLoader "
                                          "so it can be cycled, or fewer steps.")
                    warnings.warn(f"finetune stopped after {step - 1} steps: {result.stop_reason}", FinetuneWarning,
                                  stacklevel=3)
                    step -= 1
                    break
                base_value, stats, met, stop = self.step(step, batch)
                if stop:
                    break
                if step % show_every == 0 or step == run.steps:
                    bar.set_postfix(
                        loss=f"{base_value:.4g}", wbits=f"{stats['avg_weight_bits']:.2f}",
                        abits=f"{stats['avg_activation_bits']:.2f}", met=met, refresh=False,
                    )
                self.advance_schedule()
                bar.update(1)
        except KeyboardInterrupt:
            result.interrupted = True
            result.stop_reason = f"interrupted (Ctrl-C) at step {step}"
            if self.selector.best_state is None:
                run.inner.load_state_dict(self.good_state)
            warnings.warn(
                f"finetune interrupted at step {step}; returning the best state so far "
                f"(step {self.selector.best_step}).", FinetuneWarning, stacklevel=3,
            )
        finally:
            bar.close()
        return self.finish()

    def finish(self) -> FinetuneResult:
        """Restore the chosen state and say whether it meets the target (a warning when it does not)."""
        run, result, selector = self.run, self.result, self.selector
        result.steps_run = len(result.history)
        if selector.best_state is not None:
            run.inner.load_state_dict(selector.best_state)
            result.best_step, result.best_metric = selector.best_step, selector.best_metric
        result.met_target = run.bits.met()
        result.bits_after = run.bits.stats()
        if not result.met_target:
            target = run.target
            warnings.warn(
                f"finetune never met the target {target.describe() if target else ''} in {result.steps_run} steps "
                f"(now: weights {result.bits_after['avg_learnable_weight_bits']:.2f} bits on average over learnable "
                f"quantizers, activations {result.bits_after['avg_activation_bits']:.2f}); the last state is kept "
                "and result.met_target is False. Give more steps or a larger Schedule(penalty_growth=...).",
                FinetuneWarning, stacklevel=4,
            )
        return result
