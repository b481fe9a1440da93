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

Fine-tuning changes parameter values, never the graph. Calibration is `fxquant.calibration`; numerics of
the quantizers are `fxquant.quantizer`; the losses are `fxquant.losses`.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

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
    reshard,
    unwrap,
)
from fxquant.errors import ConfigError, PrepareError, StateError
from fxquant.graph import is_quantizer_path, module_state
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
from fxquant.quantizer import (
    iter_learnable,
    make_estimator,
    mean_over_ranks,
)
from fxquant.shared_weights import own_weights
from fxquant.utils import quantizers_enabled

PENALTIES = ("exterior", "size")
MAX_BAD_STEPS = 5
"""Consecutive non-finite steps after which fine-tuning stops (and returns the best state so far)."""

OptimizerFactory = Callable[[List[Dict[str, Any]]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], Tensor]


class FinetuneWarning(UserWarning):
    """Fine-tuning did something the caller must know about (target never met, non-finite loss, Ctrl-C)."""


# --------------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The training loop.
# --------------------------------------------------------------------------------------------------


def param_groups(
    qm: nn.Module, schedule: Optional[Schedule] = None, steps: int = 300, *, learn_bits: bool = True
) -> List[Dict[str, Any]]:
    """The optimizer parameter groups `finetune` uses, for a training loop of one's own (as DiffQ's
    `setup_optimizer`): model weights, quantizer clamps, quantizer bits.

    Each group is a dict with `name` (`"weights"`, `"quantizer_clamps"`, `"quantizer_bits"`), `params`,
    `lr`, `weight_decay` (never on quantizer parameters) and `betas` (`beta1 = Schedule.bits_beta1` for the
    bits); empty groups are left out. After each `optimizer.step()`, call `fxq.project_quantizers(qm)`.
    Under FSDP2 the module is resharded first, so the groups hold the sharded (DTensor) weights. Weights the
    prepared module still shares with the float model get their own copies first (`fxq.own_weights`).

    Args:
        qm: a prepared module (or one wrapped by DistributedDataParallel, or sharded by FSDP2 `fully_shard`).
        schedule: learning rates (default `Schedule()`); `bits_lr` defaults to `3 / steps`.
        steps: the step budget (sets the default bits learning rate).
        learn_bits: include the bits group (False: bits stay fixed, as in fine-tuning without a target).

    Example:
        >>> opt = torch.optim.Adam(fxq.param_groups(qm))
    """
    schedule = schedule if schedule is not None else Schedule()
    weights: List[nn.Parameter] = []
    clamps: List[nn.Parameter] = []
    bits: List[nn.Parameter] = []
    inner = unwrap(qm)
    reshard(inner)
    own_weights(inner)  # the optimizer writes them: not into the float model's tensors (`fxquant.shared_weights`)
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if is_quantizer_path(name):
            (bits if name.endswith(".bits_param") else clamps).append(p)
        else:
            weights.append(p)
    bits_lr = schedule.bits_lr if schedule.bits_lr is not None else 3.0 / steps
    groups = [
        {"name": "weights", "params": weights, "lr": schedule.lr, "weight_decay": schedule.weight_decay,
         "betas": schedule.betas},
        {"name": "quantizer_clamps", "params": clamps, "lr": schedule.clamp_lr or schedule.lr, "weight_decay": 0.0,
         "betas": schedule.betas},
    ]
    if learn_bits:
        groups.append({"name": "quantizer_bits", "params": bits, "lr": bits_lr, "weight_decay": 0.0,
                       "betas": (schedule.bits_beta1, schedule.betas[1])})
    return [g for g in groups if g["params"]]


def default_optimizer(groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer `finetune` builds without `optimizer=`: Adam over `groups` (from `param_groups`), with
    torch's fused kernel (one call for every parameter) where it applies: every parameter a plain float tensor
    on the CPU or a CUDA device (not an FSDP2 `DTensor` shard). Otherwise torch's default Adam.

    A prepared module holds two or three small quantizer parameters per quantized tensor besides the weights;
    the per-parameter loop of torch's default CPU Adam cost ~5 ms of each step of the Fashion-MNIST ResNet
    of `benchmarks/bench_finetune.py`, the fused kernel ~1 ms (docs/decisions.md, "Fused Adam").
    """
    params = [p for g in groups for p in g["params"]]
    fusable = bool(params) and all(
        type(p) is nn.Parameter and p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.Adam(groups, fused=True) if fusable else torch.optim.Adam(groups)


@torch.no_grad()
def project_quantizers(qm: nn.Module) -> None:
    """Project every quantizer's parameters back into their domain (bits in bounds, `lo <= 0 <= hi`);
    call after each optimizer step of a training loop of one's own."""
    for _, q in iter_learnable(unwrap(qm)):
        q.project_bits_()


def _snapshot(module: nn.Module) -> Dict[str, Tensor]:
    # non-tensor entries (the checkpoint identity in `_extra_state`) are copied as they are
    return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in module.state_dict().items()}


class _Selector:
    """Keeps the best state among those that meet the target."""

    def __init__(
        self, inner: nn.Module, teacher: Optional[nn.Module], val_batches: Optional[List[Batch]], n_required: int,
        distill: str, loss_fn: Optional[LossFn],
    ) -> None:
        self.inner, self.teacher, self.val, self.n_required = inner, teacher, val_batches, n_required
        self.distill, self.loss_fn = distill, loss_fn
        self.teacher_outputs: Optional[List[Any]] = None
        self.best_state: Optional[Dict[str, Tensor]] = None
        self.best_step: Optional[int] = None
        self.best_metric: Optional[float] = None
        self.window: List[float] = []  # train losses of consecutive steps that met the target

    @property
    def metric_name(self) -> str:
        return "val_distillation" if self.val is not None else "train_loss"

    @torch.no_grad()
    def val_loss(self) -> float:
        assert self.val is not None
        if self.teacher is not None and self.teacher_outputs is None:
            device = model_device(self.inner)
            self.teacher_outputs = [
                to_device(run_batch(self.teacher, b, self.n_required)[0], device) for b in self.val
            ]
        was_training = self.inner.training
        self.inner.eval()
        try:
            total = 0.0
            for i, b in enumerate(self.val):
                out, target = run_batch(self.inner, b, self.n_required)
                if self.teacher_outputs is not None:
                    total += float(distillation_loss(out, self.teacher_outputs[i], self.distill))
                else:
                    assert self.loss_fn is not None
                    total += float(self.loss_fn(out, target))
            return total / len(self.val)
        finally:
            self.inner.train(was_training)

    def consider(self, step: int, window: int) -> None:
        if self.val is not None:
            metric = self.val_loss()
        elif self.window:
            recent = self.window[-window:]
            metric = sum(recent) / len(recent)
        else:
            return
        # under DDP each rank sees other batches: the mean over ranks makes every rank pick the same step
        metric = float(mean_over_ranks(torch.tensor([metric], dtype=torch.float64, device=model_device(self.inner))))
        if math.isfinite(metric) and (self.best_metric is None or metric <= self.best_metric):
            self.best_metric, self.best_step = metric, step
            self.best_state = _snapshot(self.inner)


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
    modes = [(q, q.mode) for q in bits.weights + bits.activations]
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
        if not all(bool(q.initialized) for q in bits.weights + bits.activations):
            prefetched += list(itertools.islice(stream, 7))
            calibrate(inner, prefetched, num_batches=len(prefetched))
            result.calibrated = True
        if fsdp or isinstance(qm, nn.parallel.DistributedDataParallel):
            broadcast_quantizers(inner)
        result.bits_before = bits.stats()
        return _train(
            qm, inner, teacher, itertools.chain(prefetched, stream), n_required, steps, target, penalty,
            size_lambda, loss_fn, distill, val_list, eval_every or max(1, steps // 20), schedule, optimizer,
            grad_clip, progress, bits, result, fsdp,
        )
    finally:
        inner.train(was_training)
        for q, own in modes:
            q.mode = own
        if teacher is not None:
            teacher.train(teacher_was_training)


def _train(
    qm: nn.Module, inner: nn.Module, teacher: Optional[nn.Module], stream: Iterator[Batch], n_required: int,
    steps: int, target: Optional[BitTarget], penalty: Optional[str], size_lambda: float, loss_fn: Optional[LossFn],
    distill: str, val_list: Optional[List[Batch]], eval_every: int, schedule: Schedule,
    optimizer_factory: Optional[OptimizerFactory], grad_clip: Optional[float], progress: bool, bits: LearnedBits,
    result: FinetuneResult, fsdp: bool,
) -> FinetuneResult:
    # without a target (and no size penalty) nothing drives the bits: they stay where they are
    groups = param_groups(inner, schedule, steps, learn_bits=target is not None or penalty == "size")
    opt = optimizer_factory(groups) if optimizer_factory is not None else default_optimizer(groups)
    params = [p for g in groups for p in g["params"]]
    quantizers = bits.weights + bits.activations
    device = model_device(inner)
    distributed = fsdp or isinstance(qm, nn.parallel.DistributedDataParallel)
    selector = _Selector(inner, teacher, val_list, n_required, distill, loss_fn)
    result.metric = selector.metric_name

    lr_factor = LrFactor(schedule, steps, has_target=target is not None)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    penalty_term: Optional[Union[ExteriorPenalty, SizePenalty]] = None
    if penalty == "exterior":
        penalty_term = ExteriorPenalty(schedule, steps)
    elif penalty == "size":
        penalty_term = SizePenalty(size_lambda)
    good_state, good_opt = _snapshot(inner), copy.deepcopy(opt.state_dict())
    bad_in_a_row = 0
    show_every = max(1, steps // 100)

    qm.train()
    bar = tqdm(total=steps, disable=not progress, desc="finetune", leave=False, dynamic_ncols=True)
    step = 0
    try:
        for step in range(1, steps + 1):
            batch = next(stream, None)
            if batch is None:  # a one-shot iterator ran out
                result.stop_reason = ("batches is a one-shot iterator that ran out; pass a list or a DataLoader so "
                                      "it can be cycled, or fewer steps.")
                warnings.warn(f"finetune stopped after {step - 1} steps: {result.stop_reason}", FinetuneWarning,
                              stacklevel=3)
                step -= 1
                break
            coefficient = penalty_term.coefficient(step) if penalty_term is not None else 0.0

            outputs, labels = run_batch(qm, batch, n_required)
            base = outputs_loss = None
            if teacher is not None:
                with torch.no_grad():
                    t_out = to_device(run_batch(teacher, batch, n_required)[0], device)
                outputs_loss = distillation_loss(outputs, t_out, distill)
            if loss_fn is not None:
                task = loss_fn(outputs, labels)
                outputs_loss = task if outputs_loss is None else outputs_loss + task
            base = outputs_loss
            assert base is not None
            pen = base.new_zeros(())
            active = 0
            base_value = float(base.detach())
            finite = math.isfinite(base_value)
            if distributed:
                finite = on_every_rank(finite, device)
            if finite:
                if penalty_term is not None:
                    pen, active = penalty_term(bits, base, step)
                loss = base + pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if fsdp:
                    average_replicated_grads(params)
                finite = math.isfinite(clip_grad_norm(params, grad_clip if grad_clip is not None else math.inf))
                if distributed:  # FSDP2 norms each rank's own shard
                    finite = on_every_rank(finite, device)
            if not finite:
                result.nonfinite_steps.append(step)
                bad_in_a_row += 1
                inner.load_state_dict(good_state)
                opt.load_state_dict(copy.deepcopy(good_opt))
                opt.zero_grad(set_to_none=True)
                warnings.warn(
                    f"finetune step {step}: non-finite loss or gradient (loss={base_value}); skipped the step and "
                    "restored the last good state. Check the batches for NaN/inf or lower the learning rate.",
                    FinetuneWarning, stacklevel=3,
                )
                if bad_in_a_row >= MAX_BAD_STEPS:
                    result.stop_reason = f"{MAX_BAD_STEPS} non-finite steps in a row"
                    stats = bits.stats()
                    result.history.append(_record(step, math.nan, base_value, 0.0, coefficient, opt, stats, 0, False))
                    break
            else:
                bad_in_a_row = 0
                opt.step()
                for q in quantizers:
                    q.project_bits_()
                if schedule.floor and penalty == "exterior":
                    bits.apply_floor()
            integer_bits = bits.integer_bits_by_quantizer()
            stats = bits.stats(integer_bits)
            met = finite and bits.met(integer_bits)
            # Without a target, states of the second half of the budget (after the decay starts) are eligible.
            eligible = met and (target is not None or step > steps // 2)
            pen_value = float(pen.detach()) if finite else 0.0
            result.history.append(
                _record(step, base_value + pen_value if finite else math.nan, base_value, pen_value, coefficient,
                        opt, stats, active, met)
            )
            if eligible:
                selector.window.append(base_value)
                if result.converged_step is None and target is not None:
                    result.converged_step = step
                    lr_factor.start_decay(step)
            elif finite:
                selector.window.clear()
            if finite and step % eval_every == 0:
                good_state, good_opt = _snapshot(inner), copy.deepcopy(opt.state_dict())
            if eligible and (step % eval_every == 0 or step == steps):
                selector.consider(step, eval_every)
            if step % show_every == 0 or step == steps:
                bar.set_postfix(
                    loss=f"{base_value:.4g}", wbits=f"{stats['avg_weight_bits']:.2f}",
                    abits=f"{stats['avg_activation_bits']:.2f}", met=met, refresh=False,
                )
            lr_schedule.step()
            bar.update(1)
    except KeyboardInterrupt:
        result.interrupted = True
        result.stop_reason = f"interrupted (Ctrl-C) at step {step}"
        if selector.best_state is None:
            inner.load_state_dict(good_state)
        warnings.warn(
            f"finetune interrupted at step {step}; returning the best state so far "
            f"(step {selector.best_step}).", FinetuneWarning, stacklevel=3,
        )
    finally:
        bar.close()

    result.steps_run = len(result.history)
    if selector.best_state is not None:
        inner.load_state_dict(selector.best_state)
        result.best_step, result.best_metric = selector.best_step, selector.best_metric
    result.met_target = bits.met()
    result.bits_after = bits.stats()
    if not result.met_target:
        warnings.warn(
            f"finetune never met the target {target.describe() if target else ''} in {result.steps_run} steps "
            f"(now: weights {result.bits_after['avg_learnable_weight_bits']:.2f} bits on average over learnable "
            f"quantizers, activations {result.bits_after['avg_activation_bits']:.2f}); the last state is kept "
            "and result.met_target is False. Give more steps or a larger Schedule(penalty_growth=...).",
            FinetuneWarning, stacklevel=3,
        )
    return result


def _record(
    step: int, loss: float, base: float, pen: float, coefficient: float, opt: torch.optim.Optimizer,
    stats: Dict[str, float], active: int, met: bool,
) -> StepRecord:
    return StepRecord(
        step=step, loss=loss, base=base, penalty=pen, coefficient=coefficient, lr=float(opt.param_groups[0]["lr"]),
        avg_weight_bits=stats["avg_weight_bits"], avg_learnable_weight_bits=stats["avg_learnable_weight_bits"],
        avg_activation_bits=stats["avg_activation_bits"], size_mb=stats["size_mb"], active_constraints=active,
        met=met,
    )
