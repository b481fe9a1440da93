"""Tests of `fxq.finetune`: the penalty drives bits to the target, accuracy holds on digits, frozen equals
eval after fine-tuning, and bad input fails before any training with a clear message."""

from __future__ import annotations

import copy
import math
import os
import tempfile
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from small_models import MODEL_FACTORIES, make
from torch import nn

import fxquant as fxq
import fxquant.quantizer
from fxquant.errors import ConfigError, FxQuantError, PrepareError, StateError
from fxquant.finetune import FinetuneWarning
from fxquant.losses import distillation_loss, exterior_hinge, jeffreys_divergence
from fxquant.objectives import BitTarget, Schedule
from fxquant.optimization import default_optimizer
from fxquant.quantizer import LearnableQuantizer, iter_learnable


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models run faster without thread hand-offs on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _prepared(name: str = "mlp", first_last_bits=None, **cfg):  # noqa: ANN001, ANN202
    model, x = make(name, 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=first_last_bits, **cfg))
    batches = [MODEL_FACTORIES[name][1](16) for _ in range(6)]
    fxq.calibrate(qm, batches)
    return model, qm, batches


def _state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _learnable_int_bits(qm: nn.Module) -> List[float]:
    return [float(b) for _, q in iter_learnable(qm) if q.learn_bits for b in q.integer_bits().reshape(-1)]


# --------------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------------


def test_jeffreys_is_symmetric_zero_at_equality_and_matches_two_kls() -> None:
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert float(jeffreys_divergence(s, s)) == pytest.approx(0.0, abs=1e-7)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    kl_rev = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="batchmean")
    assert float(jeffreys_divergence(s, t)) == pytest.approx(float(kl + kl_rev), rel=1e-5)
    assert float(jeffreys_divergence(s, t)) == pytest.approx(float(jeffreys_divergence(t, s)), rel=1e-5)


def test_distillation_uses_mse_for_non_logits_and_sums_leaves() -> None:
    s = {"logits": torch.randn(4, 3), "feat": torch.randn(4, 3, 5)}
    t = {"logits": torch.randn(4, 3), "feat": torch.randn(4, 3, 5)}
    expected = jeffreys_divergence(s["logits"], t["logits"]) + F.mse_loss(s["feat"], t["feat"])
    assert float(distillation_loss(s, t)) == pytest.approx(float(expected), rel=1e-6)
    assert float(distillation_loss(s["logits"], t["logits"], "mse")) == pytest.approx(
        float(F.mse_loss(s["logits"], t["logits"])), rel=1e-6
    )


def test_exterior_hinge_counts_active_constraints_and_pushes_only_those_above_target() -> None:
    bits = torch.tensor([8.0, 3.0, 5.0], requires_grad=True)
    value, active = exterior_hinge(bits, torch.tensor([4.0, 4.0, 4.0]))
    assert active == 2
    value.backward()
    assert bits.grad is not None and bits.grad[1] == 0 and bits.grad[0] > 0 and bits.grad[2] > 0


# --------------------------------------------------------------------------------------------------
# Frozen equals eval, before and after fine-tuning at low bits.
# --------------------------------------------------------------------------------------------------


def test_frozen_equals_eval_mode_before_and_after_finetune(model_and_inputs) -> None:  # noqa: ANN001
    name, model, x = model_and_inputs
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None, weight=fxq.QuantSpec(min_bits=2)))
    batches = [MODEL_FACTORIES[name][1](8) for _ in range(4)]
    fxq.calibrate(qm, batches)
    probe = MODEL_FACTORIES[name][1](16)
    with torch.no_grad():
        assert torch.equal(fxq.freeze(qm)(probe), qm.eval()(probe))
    result = fxq.finetune(qm, batches, teacher=model, steps=40, target_bits=3, progress=False)
    assert result.met_target, result
    assert set(_learnable_int_bits(qm)) == {3.0}
    qm.eval()
    with torch.no_grad():
        assert torch.equal(fxq.freeze(qm)(probe), qm(probe))


# --------------------------------------------------------------------------------------------------
# The penalty drives bits to the target within the budget (tiny model), in every mode.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dither", "noise", "ste"])
def test_exterior_penalty_reaches_per_kind_target_by_half_budget(mode: str) -> None:
    model, qm, batches = _prepared(mode=mode)
    steps = 100
    result = fxq.finetune(qm, batches, teacher=model, steps=steps, target_bits={"weight": 3, "activation": 4},
                          progress=False)
    print(f"{mode}: bits before {result.bits_before} after {result.bits_after}")
    assert result.bits_before["avg_weight_bits"] == 8.0
    assert result.met_target and result.converged_step is not None and result.converged_step <= steps // 2
    assert result.bits_after["avg_weight_bits"] == 3.0  # floor: exactly on target, not below
    assert result.bits_after["avg_activation_bits"] == 4.0
    assert result.best_step is not None and result.best_step >= result.converged_step
    assert len(result.history) == steps == result.steps_run
    assert result.history[0].penalty == 0.0  # zero during the warm-up
    assert result.history[-1].coefficient > result.history[steps // 2].coefficient > 0  # grows linearly
    # LR: warm-up, then constant until converged, then exponential decay.
    lrs = result.series("lr")
    assert lrs[0] < lrs[4] and lrs[-1] < lrs[result.converged_step]


def test_weight_average_target_gives_mixed_precision_at_or_below_target() -> None:
    model, qm, batches = _prepared()
    result = fxq.finetune(qm, batches, teacher=model, steps=120,
                          target_bits=BitTarget(weight=3.5, weight_average=True), progress=False)
    assert result.met_target
    average = result.bits_after["avg_learnable_weight_bits"]
    assert average <= 3.5
    assert result.bits_after["avg_activation_bits"] == 8.0  # not constrained
    assert "W avg 3.5" in str(result)
    # what the rounding left below the target was spent: no layer below 8 bits fits one more bit in it
    weights = [q for _, q in iter_learnable(qm) if q.kind == "weight" and q.learn_bits]
    total = sum(q.numel() for q in weights)
    for q in weights:
        if float(q.integer_bits()) < q.max_bits:
            assert average * total + q.numel() > 3.5 * total + 1e-6


def _weights_at_bits(layers: Tuple[Tuple[str, int, float], ...]) -> nn.Module:
    """A module holding per-tensor weight quantizers `(name, elements, continuous bits)`."""
    holder = nn.Module()
    for name, numel, bits in layers:
        q = LearnableQuantizer(kind="weight", tensor_shape=(numel,), bits=8, min_bits=2, max_bits=8, symmetric=True)
        q.set_bits(bits)
        setattr(holder, name, q)
    return holder


def test_a_met_average_target_is_filled_to_its_budget_and_held() -> None:
    """Once a size-weighted average target is met, the layers closest to rounding up are raised one bit each while
    the integer average stays within the target; then every layer is held within 0.25 bits of its bits."""
    from fxquant.objectives import LearnedBits

    holder = _weights_at_bits((("a", 10, 2.4), ("b", 20, 3.3), ("c", 40, 2.1)))
    learned = LearnedBits(holder, BitTarget(weight=2.6, weight_average=True))
    assert learned.stats()["avg_weight_bits"] == pytest.approx(160 / 70) and learned.met()
    # budget 2.6 * 70 - 160 = 22 bits: `a` (closest to rounding up) takes 10, `b` (20) no longer fits, nor `c` (40)
    assert learned.fill_average_budget() == [holder.a]
    assert [float(q.integer_bits()) for q in (holder.a, holder.b, holder.c)] == [3.0, 3.0, 2.0]
    assert learned.met() and learned.fill_average_budget() == []  # once only
    with torch.no_grad():
        holder.b.bits_param.fill_(1.0)
        holder.c.bits_param.fill_(-0.5)
    learned.apply_floor()
    assert float(holder.b.bits().detach()) == pytest.approx(3.25) and float(holder.c.bits().detach()) == 2.0  # 1.75 < min
    per_kind = LearnedBits(holder, BitTarget(weight=3))
    assert per_kind.fill_average_budget() == [] and per_kind.held is None


def test_the_fill_never_breaks_a_met_target_by_rounding() -> None:
    """A raise that would put the integer average a hair above the target (2 bits short of a million-element layer)
    is not made: the fill keeps `met`'s own tolerance."""
    from fxquant.objectives import LearnedBits

    holder = _weights_at_bits((("a", 1_000_000, 2.45), ("b", 1_000_000, 2.3), ("c", 1_000_002, 4.0)))
    learned = LearnedBits(holder, BitTarget(weight=3, weight_average=True))
    assert learned.met() and learned.fill_average_budget() == [] and learned.met()


def test_first_last_fixed_bits_are_reported_but_not_constrained() -> None:
    model, qm, batches = _prepared(first_last_bits=8)
    result = fxq.finetune(qm, batches, teacher=model, steps=60, target_bits=4, progress=False)
    assert result.met_target
    after = result.bits_after
    assert after["avg_learnable_weight_bits"] == 4.0
    assert after["avg_weight_bits"] > 4.0  # fc1 and fc3 stay at 8 bits


def test_never_meeting_the_target_warns_and_flags() -> None:
    model, qm, batches = _prepared()
    with pytest.warns(FinetuneWarning, match="never met the target W2A2") as caught:
        result = fxq.finetune(qm, batches, teacher=model, steps=3, target_bits=2, schedule=Schedule(bits_lr=1e-3),
                              progress=False)
    assert not result.met_target and result.best_step is None
    assert {w.filename for w in caught if issubclass(w.category, FinetuneWarning)} == {__file__}  # the caller's line
    assert "met=False" in str(result)


# --------------------------------------------------------------------------------------------------
# Optimizer, task loss, held-out selection, robustness.
# --------------------------------------------------------------------------------------------------


def test_param_groups_separate_quantizers_without_weight_decay_and_custom_optimizer() -> None:
    model, qm, batches = _prepared()
    seen: List[List[dict]] = []

    def make_opt(groups: List[dict]) -> torch.optim.Optimizer:
        seen.append(groups)
        return torch.optim.RAdam(groups)

    schedule = Schedule(weight_decay=0.01)
    fxq.finetune(qm, batches, teacher=model, steps=5, target_bits=6, optimizer=make_opt, schedule=schedule,
                 progress=False)
    groups = {g["name"]: g for g in seen[0]}
    assert set(groups) == {"weights", "quantizer_clamps", "quantizer_bits"}
    assert groups["weights"]["weight_decay"] == 0.01
    assert groups["quantizer_clamps"]["weight_decay"] == 0.0 == groups["quantizer_bits"]["weight_decay"]
    assert groups["quantizer_bits"]["betas"][0] == 0.0
    names = {id(p): n for n, p in qm.named_parameters()}
    assert all(names[id(p)].startswith("fxq_quantizers.") for p in groups["quantizer_bits"]["params"])
    assert not any(names[id(p)].startswith("fxq_quantizers.") for p in groups["weights"]["params"])


def test_default_optimizer_is_fused_adam_for_plain_parameters_only() -> None:
    _, qm, _ = _prepared()
    groups = fxq.param_groups(qm)
    opt = default_optimizer(groups)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    # a parameter the fused kernel does not take (a complex one here) falls back to torch's default Adam
    odd = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    plain = default_optimizer(groups + [{"params": [odd], "lr": 1e-3}])
    assert not plain.defaults["fused"]
    # one fused step equals one default step on the same gradients
    p1, p2 = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    p2.data.copy_(p1.data)
    a, b = default_optimizer([{"params": [p1], "lr": 1e-2}]), torch.optim.Adam([p2], lr=1e-2)
    for opt_, p in ((a, p1), (b, p2)):
        p.grad = torch.ones(5)
        opt_.step()
    torch.testing.assert_close(p1, p2)


def test_public_param_groups_and_bits_fixed_without_a_target() -> None:
    model, qm, batches = _prepared()
    groups = fxq.param_groups(qm)
    assert [g["name"] for g in groups] == ["weights", "quantizer_clamps", "quantizer_bits"]
    assert [g["name"] for g in fxq.param_groups(qm, learn_bits=False)] == ["weights", "quantizer_clamps"]
    before = {n: p.detach().clone() for n, p in qm.named_parameters() if n.endswith("bits_param")}
    fxq.finetune(qm, batches, teacher=model, steps=10, progress=False)  # no target: fixed-bit fine-tuning
    after = {n: p.detach() for n, p in qm.named_parameters() if n.endswith("bits_param")}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_mode_is_chosen_at_finetune_time_and_restored() -> None:
    model, qm, batches = _prepared()
    quantizers = [q for _, q in fxq.quantizer.iter_learnable(qm)]
    own = {q.mode for q in quantizers}
    seen = []
    hook = quantizers[0].register_forward_pre_hook(lambda m, a: seen.append(m.mode) if m.training else None)
    fxq.finetune(qm, batches, teacher=model, steps=3, mode="ste", progress=False)
    hook.remove()
    assert seen and set(seen) == {"ste"}
    assert {q.mode for q in quantizers} == own
    with pytest.raises(fxq.ConfigError, match="mode='lsq' is unknown"):
        fxq.finetune(qm, batches, teacher=model, steps=3, mode="lsq", progress=False)


def test_task_loss_alone_with_labelled_batches_and_val_selection() -> None:
    model, qm, _ = _prepared()
    pairs = [(torch.randn(16, 16), torch.randint(0, 10, (16,))) for _ in range(4)]
    calls = []

    def task(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return F.cross_entropy(out, y)

    result = fxq.finetune(qm, pairs, loss_fn=task, steps=40, target_bits=6, val_batches=pairs[:1],
                          eval_every=5, progress=False)
    assert len(calls) > 40  # dry run + 40 steps + val evaluations
    assert result.metric == "val_distillation" and result.best_step is not None and result.met_target


def test_uncalibrated_module_is_calibrated_and_generators_work() -> None:
    model, x = make("mlp", 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    gen = (torch.randn(16, 16) for _ in range(20))
    result = fxq.finetune(qm, gen, teacher=model, steps=12, progress=False)
    assert result.calibrated and result.steps_run == 12 and result.met_target  # no target: always met


def test_a_generator_that_runs_out_stops_finetune_with_a_warning_and_keeps_the_steps_run() -> None:
    model, x = make("mlp", 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x], progress=False)
    gen = (torch.randn(16, 16) for _ in range(5))
    with pytest.warns(FinetuneWarning, match=r"finetune stopped after 5 steps: batches is a one-shot iterator that "
                                             r"ran out; pass a list or a DataLoader"):
        result = fxq.finetune(qm, gen, teacher=model, steps=12, progress=False)
    assert result.steps_run == 5 and len(result.history) == 5 and "one-shot iterator" in result.stop_reason


def test_nonfinite_loss_skips_step_restores_last_good_state_and_reports() -> None:
    model, qm, batches = _prepared()
    bad = torch.full((16, 16), float("nan"))
    stream = batches[:3] + [bad] + batches[3:]
    with pytest.warns(FinetuneWarning, match="non-finite loss or gradient") as caught:
        result = fxq.finetune(qm, stream, teacher=model, steps=14, progress=False)
    assert {w.filename for w in caught if issubclass(w.category, FinetuneWarning)} == {__file__}  # the caller's line
    assert result.nonfinite_steps == [4, 11]
    assert math.isnan(result.history[3].loss)
    assert all(torch.isfinite(p).all() for p in qm.parameters())


def test_only_nonfinite_batches_stop_after_five() -> None:
    model, qm, _ = _prepared()
    with pytest.warns(FinetuneWarning, match="non-finite") as caught:
        result = fxq.finetune(qm, [torch.full((4, 16), float("inf"))], teacher=model, steps=50, progress=False)
    assert result.stop_reason == "5 non-finite steps in a row" and result.steps_run == 5
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # skipped steps are not torch's misuse


class _Interrupting:
    """Batches that raise KeyboardInterrupt after `n` batches (a user pressing Ctrl-C)."""

    def __init__(self, batches: List[torch.Tensor], n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(10_000):
            if i == self.n:
                raise KeyboardInterrupt
            yield self.batches[i % len(self.batches)]


def test_keyboard_interrupt_returns_best_state_so_far() -> None:
    model, qm, batches = _prepared()
    with pytest.warns(FinetuneWarning, match="interrupted at step"):
        result = fxq.finetune(qm, _Interrupting(batches, 81), teacher=model, steps=100, target_bits=4,
                              eval_every=5, progress=False)
    # batch 0 serves the dry run and step 1; batch 81 interrupts step 82
    assert result.interrupted and result.steps_run == 81 and result.stop_reason == "interrupted (Ctrl-C) at step 82"
    assert result.met_target and result.best_step is not None and result.best_step <= 81
    assert set(_learnable_int_bits(qm)) == {4.0}


def test_ddp_wrapped_module_trains() -> None:
    import torch.distributed as dist

    model, qm, batches = _prepared()
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(qm)
            result = fxq.finetune(ddp, batches, teacher=model, steps=60, target_bits=4, progress=False)
        finally:
            dist.destroy_process_group()
    assert result.met_target and set(_learnable_int_bits(qm)) == {4.0}


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training.
# --------------------------------------------------------------------------------------------------


class _OtherHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _bad_cases() -> List[Tuple[str, dict, type, str]]:
    return [
        ("target above max_bits", dict(target_bits=9), ConfigError, r"target_bits weight=9 is outside \[min_bits, max_bits\]=\[2, 8\]"),
        ("target below min_bits", dict(target_bits={"activation": 1}), ConfigError, r"activation=1 is outside \[min_bits, max_bits\]"),
        ("no batches", dict(batches=[]), PrepareError, "batches is empty; give at least one batch"),
        ("batches None", dict(batches=None), PrepareError, "got batches=None"),
        ("teacher shape", dict(teacher=_OtherHead()), PrepareError, r"teacher's output \(out: \(16, 5\)\) differs"),
        ("batch type", dict(batches=["not a tensor"]), PrepareError, "a batch of type str is not understood"),
        ("batch shape", dict(batches=[torch.randn(4, 7)]), PrepareError, "does not fit the quantized module"),
        ("single tensor", dict(batches=torch.randn(4, 16)), PrepareError, "wrap it in a list"),
        ("loss_fn without targets", dict(loss_fn=F.cross_entropy), PrepareError, "batches carry no targets"),
        ("loss_fn not scalar", dict(batches=[(torch.randn(4, 16), torch.zeros(4))], loss_fn=lambda o, y: o),
         ConfigError, r"returned Tensor\(4, 10\); it must return a scalar"),
        ("empty val", dict(val_batches=[]), PrepareError, "val_batches is empty"),
        ("steps", dict(steps=0), ConfigError, "steps=0 must be a positive integer"),
        ("penalty", dict(penalty="l2"), ConfigError, "penalty='l2' is unknown"),
        ("distill", dict(distill="kl"), ConfigError, "distill='kl' is unknown"),
        ("eval_every", dict(eval_every=0), ConfigError, "eval_every=0 must be a positive integer"),
        ("grad_clip", dict(grad_clip=-1.0), ConfigError, "grad_clip=-1.0 must be positive"),
        ("schedule type", dict(schedule={"lr": 1}), ConfigError, "must be a fxq.Schedule"),
        ("exterior without target", dict(penalty="exterior"), ConfigError, "penalty='exterior' needs target_bits"),
        ("size lambda", dict(penalty="size", size_lambda=0.0), ConfigError, "size_lambda=0.0 must be positive"),
        ("no teacher no loss", dict(teacher=None), ConfigError, "needs a teacher to distil from"),
        ("target not a number", dict(target_bits="4"), ConfigError, "target_bits='4' is not a finite number"),
        ("target keys", dict(target_bits={"weights": 4}), ConfigError, r"unknown keys \['weights'\]"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_before_training(case: Tuple[str, dict, type, str]) -> None:
    _, kwargs, error, match = case
    model, qm, batches = _prepared()
    args = dict(batches=batches, teacher=model, steps=5, progress=False)
    args.update(kwargs)
    before = _state(qm)
    with pytest.raises(error, match=match) as info:
        fxq.finetune(qm, args.pop("batches"), **args)
    assert isinstance(info.value, FxQuantError)
    if error is not StateError:
        assert isinstance(info.value, ValueError)
    after = _state(qm)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unprepared_or_quantizer_free_modules_are_rejected() -> None:
    model, x = make("mlp", 4)
    with pytest.raises(StateError, match="expects a module returned by fxq.prepare"):
        fxq.finetune(model, [x], teacher=model, progress=False)
    _, qm, batches = _prepared(weight=fxq.QuantSpec(learn_bits=False), activation=fxq.QuantSpec(learn_bits=False))
    with pytest.raises(ConfigError, match="no quantizer learns its bits"):
        fxq.finetune(qm, batches, teacher=model, target_bits=4, progress=False)
    _, qm, batches = _prepared(activation=None)
    with pytest.raises(ConfigError, match="sets activation=4 but no activation quantizer learns its bits"):
        fxq.finetune(qm, batches, teacher=model, target_bits={"activation": 4}, progress=False)


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda: BitTarget(), "neither a weight nor an activation target"),
        (lambda: BitTarget(activation=4, weight_average=True), r"weight_average=True\) needs weight="),
        (lambda: BitTarget(weight=float("nan")), "BitTarget.weight=nan is not a finite number"),
        (lambda: Schedule(lr=0.0), "Schedule.lr=0.0 must be positive"),
        (lambda: Schedule(warmup=1.5), r"Schedule.warmup=1.5 is a fraction and must lie in \[0, 1\]"),
        (lambda: Schedule(final_lr_ratio=0.0), "final_lr_ratio=0.0 is a fraction"),
        (lambda: fxq.FinetuneResult().series("acc"), "history has no column 'acc'"),
    ],
)
def test_config_objects_validate(make_bad, match: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=match):
        make_bad()


# --------------------------------------------------------------------------------------------------
# scikit-learn digits: accuracy vs FP for the three modes.
# --------------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """~40k parameters: a conv, a depthwise conv, a functional conv (`F.conv2d` on a parameter), a concat of
    two branches, a max-pool, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw_weight = nn.Parameter(torch.randn(16, 16, 1, 1) * 0.25)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(512, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        branch = F.relu(F.conv2d(F.relu(self.dw(x)), self.pw_weight))
        x = torch.cat([x, branch], dim=1)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def digits():  # noqa: ANN201
    """(FP model, train batches, test images, test labels, FP accuracy in %)."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        order = tr[torch.randperm(len(tr))]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    batches = [x[tr[i : i + 64]] for i in range(0, len(tr), 64)]
    fp = _accuracy(model, x[te], y[te])
    assert fp >= 95.0
    return model, batches, x[te], y[te], fp


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100.0


def _digits_run(digits, mode: str, activation: bool, **finetune_kwargs):  # noqa: ANN001, ANN202
    model, batches, x_te, y_te, fp = digits
    torch.manual_seed(0)
    cfg = fxq.QuantConfig(mode=mode, activation=fxq.QuantSpec() if activation else None)
    qm = fxq.prepare(model, batches[0][:8], cfg)
    fxq.calibrate(qm, batches[:4])
    result = fxq.finetune(qm, batches, teacher=model, steps=200, progress=False, **finetune_kwargs)
    acc = _accuracy(qm, x_te, y_te)
    print(f"\n{mode}: FP {fp:.2f}% -> {acc:.2f}%; {result}")
    return qm, result, acc, fp


def test_digits_dither_w4a4_loses_at_most_one_point(digits) -> None:  # noqa: ANN001
    qm, result, acc, fp = _digits_run(digits, "dither", True, target_bits=4)
    assert result.met_target
    assert result.bits_before["avg_learnable_weight_bits"] == 8.0
    assert result.bits_after["avg_learnable_weight_bits"] == 4.0
    assert set(_learnable_int_bits(qm)) == {4.0}
    assert acc >= fp - 1.0


def test_digits_dither_w2a2_trains_and_reports(digits) -> None:  # noqa: ANN001
    qm, result, acc, fp = _digits_run(digits, "dither", True, target_bits=2)
    assert result.met_target and set(_learnable_int_bits(qm)) == {2.0}
    assert result.bits_after["avg_weight_bits"] < 3.0  # first/last layers stay at 8 bits
    assert acc >= fp - 5.0
    print(fxq.report(qm))


def test_digits_noise_size_penalty_lowers_weight_bits_within_two_points(digits) -> None:  # noqa: ANN001
    qm, result, acc, fp = _digits_run(digits, "noise", False, penalty="size", size_lambda=5.0)
    assert result.penalty == "size" and result.size_lambda == 5.0
    assert result.bits_before["avg_weight_bits"] == 8.0
    assert result.bits_after["avg_weight_bits"] < 5.0
    assert result.bits_after["size_mb"] < result.bits_before["size_mb"]
    assert acc >= fp - 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module_trains_on_cpu_batches_with_cpu_teacher() -> None:
    model, qm, batches = _prepared()
    qm = qm.cuda()
    result = fxq.finetune(qm, batches, teacher=model, steps=60, target_bits=4, progress=False)
    assert result.met_target and all(p.is_cuda for p in qm.parameters())


def test_lr_factor_warms_up_holds_and_decays_never_before_decay_start() -> None:
    from fxquant.objectives import LrFactor

    factor = LrFactor(Schedule(warmup=0.1, final_lr_ratio=0.05, decay_start=None), steps=100, has_target=True)
    assert factor(0) == pytest.approx(0.1) and factor(9) == 1.0  # LambdaLR passes finished steps
    factor.start_decay(20)
    assert factor(19) == 1.0 and factor(20) < 1.0 and factor(99) == pytest.approx(0.05)
    late = LrFactor(Schedule(decay_start=0.5), steps=100, has_target=True)
    late.start_decay(20)  # the target met early: the decay still waits for half the budget
    assert late.decay_from == 50 and late(49) == 1.0 and late(50) < 1.0 and late(99) == pytest.approx(0.05)
    no_target = LrFactor(Schedule(), steps=100, has_target=False)
    assert no_target.decay_from == 50
    with pytest.raises(fxq.ConfigError, match=r"Schedule.decay_start=1.5 is a fraction"):
        Schedule(decay_start=1.5)


def test_integer_bits_of_all_quantizers_at_once_equal_each_quantizers_own() -> None:
    """`LearnedBits.integer_bits_by_quantizer` reads every quantizer's bits in a few ops; the values are each
    quantizer's `integer_bits()`, with different bit ranges, per-group bits and bits parameters outside [0, 1]."""
    from fxquant.objectives import LearnedBits
    from fxquant.quantizer import LearnableQuantizer

    holder = torch.nn.Module()
    holder.a = LearnableQuantizer(kind="weight", tensor_shape=(6, 4), bits=8, min_bits=2, max_bits=8,
                                  granularity="per_channel", channel_axis=0, per_group_bits=True, symmetric=True)
    holder.b = LearnableQuantizer(kind="activation", tensor_shape=(2, 4), bits=5, min_bits=3, max_bits=6)
    holder.c = LearnableQuantizer(kind="activation", tensor_shape=(2, 4), bits=4, min_bits=4, max_bits=4)
    with torch.no_grad():
        holder.a.bits_param.copy_(torch.tensor([-0.3, 0.0, 0.25, 0.5, 0.91, 1.7]).reshape(holder.a.bits_param.shape))
        holder.b.bits_param.fill_(0.5)  # 4.5 bits: a tie, rounded to even
    found = LearnedBits(holder, None).integer_bits_by_quantizer()
    for q in (holder.a, holder.b, holder.c):
        assert found[id(q)] == q.integer_bits().reshape(-1).tolist()
    assert found[id(holder.b)] == [4.0] and found[id(holder.c)] == [4.0]


def test_active_constraints_counted_in_numpy_equal_the_hinges_count() -> None:
    """`LearnedBits.active_constraints` (numpy, what the penalty reads to skip its graph) counts what
    `exterior_hinge(*constraints())` counts, at random bits and at the edges: exactly the target minus the margin,
    one float32 step around it, rounding ties; and the size-weighted average target is left to the torch ops."""
    from fxquant.losses import HINGE_MARGIN
    from fxquant.objectives import LearnedBits
    from fxquant.quantizer import LearnableQuantizer

    holder = torch.nn.Module()
    holder.w = LearnableQuantizer(kind="weight", tensor_shape=(6, 4), bits=8, min_bits=2, max_bits=8,
                                  granularity="per_channel", channel_axis=0, per_group_bits=True, symmetric=True)
    holder.a = LearnableQuantizer(kind="activation", tensor_shape=(2, 4), bits=5, min_bits=2, max_bits=8)
    bits = LearnedBits(holder, BitTarget(weight=4, activation=3))
    edge = torch.tensor((4 - HINGE_MARGIN - 2) / 6, dtype=torch.float32)
    special = [edge, torch.nextafter(edge, torch.tensor(1.0)), torch.nextafter(edge, torch.tensor(0.0)),
               torch.tensor(2.5 / 6), torch.tensor(0.5), torch.tensor(-0.2), torch.tensor(1.3)]
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        with torch.no_grad():
            values = torch.rand(7, generator=generator) * 1.4 - 0.2
            if trial < len(special):
                values[trial % 7] = special[trial]
            holder.w.bits_param.copy_(values[:6].reshape(holder.w.bits_param.shape))
            holder.a.bits_param.fill_(float(values[6]))
        cons = bits.constraints()
        assert cons is not None
        assert bits.active_constraints() == exterior_hinge(*cons)[1]
    assert LearnedBits(holder, BitTarget(weight=4, weight_average=True)).active_constraints() is None


def test_the_penalty_without_a_graph_leaves_the_gradients_as_with_it() -> None:
    """While no constraint is active (or before the penalty starts) the exterior penalty records no graph; the
    gradients of a backward through base loss plus penalty are those of the penalty computed with its graph."""
    from fxquant.objectives import ExteriorPenalty, LearnedBits
    from fxquant.quantizer import LearnableQuantizer

    holder = torch.nn.Module()
    holder.a = LearnableQuantizer(kind="activation", tensor_shape=(2, 4), bits=8, min_bits=2, max_bits=8)
    bits = LearnedBits(holder, BitTarget(activation=4))
    x = torch.randn(8, 4)
    for p_value, step in ((0.9, 50), (0.1, 50), (0.9, 0)):  # active; inactive; before the penalty starts
        grads = []
        for skip in (False, True):
            penalty = ExteriorPenalty(Schedule(), steps=100)
            penalty.last_active = 0 if skip else None
            with torch.no_grad():
                holder.a.bits_param.fill_(p_value)
            holder.a.bits_param.grad = None
            base = holder.a.bits_param.sum() * 0.5 + x.sum() * 0.0
            pen, active = penalty(bits, base, step)
            (base + pen).backward()
            grads.append((holder.a.bits_param.grad.clone(), active, float(pen)))
        assert torch.equal(grads[0][0], grads[1][0]) and grads[0][1:] == grads[1][1:]


def test_the_state_copy_matches_deepcopy_and_owns_its_tensors() -> None:
    """`state_selection.copied` (the last good optimizer state, kept every `eval_every` steps) gives deepcopy's
    tree with tensors of its own: a later optimizer step does not reach into it, and it loads back."""
    from fxquant.state_selection import copied

    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()
    state = opt.state_dict()
    ours, reference = copied(state), copy.deepcopy(state)
    assert ours["param_groups"] == reference["param_groups"]
    assert ours["state"].keys() == reference["state"].keys()
    for key, value in reference["state"][0].items():
        assert torch.equal(ours["state"][0][key], value)
        assert ours["state"][0][key].data_ptr() != state["state"][0][key].data_ptr()
    opt.step()
    assert torch.equal(ours["state"][0]["exp_avg_sq"], reference["state"][0]["exp_avg_sq"])
    opt.load_state_dict(ours)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg_sq"], reference["state"][0]["exp_avg_sq"])
