"""Quantizer numerics: gradients in every mode, bounds, eval integer grid, ONNX Q/DQ arithmetic."""

from __future__ import annotations

import shutil
from typing import Optional

import numpy as np
import pytest
import torch

from fxquant.quantizer import LearnableQuantizer, fake_quantize
from fxquant.quantizer.numerics import GridConstants


def act_quantizer(mode: str, bits: int = 4, nonnegative: bool = False, **kw) -> LearnableQuantizer:
    q = LearnableQuantizer(
        kind="activation", tensor_shape=(8, 16), bits=bits, min_bits=2, max_bits=8, mode=mode,
        nonnegative=nonnegative, **kw,
    )
    q.load_observed(torch.tensor(-1.0), torch.tensor(1.5))
    return q


def weight_quantizer(mode: str, bits: int = 4, granularity: str = "per_channel", **kw) -> LearnableQuantizer:
    q = LearnableQuantizer(
        kind="weight", tensor_shape=(6, 8), bits=bits, min_bits=2, max_bits=8, mode=mode,
        granularity=granularity, channel_axis=0, block_axis=1, symmetric=True, **kw,
    )
    return q


@pytest.mark.parametrize("mode", ["dither", "noise", "ste"])
def test_gradients_reach_clamps_bits_and_input(mode: str) -> None:
    q = act_quantizer(mode).train()
    x = (torch.randn(8, 16) * 1.5).requires_grad_()  # some values beyond both clamps
    # A loss that prefers more precision: the step (hence bits) must get gradient.
    y = q(x)
    loss = ((y - x.detach()) ** 2).sum() + y.sum()
    loss.backward()
    for name, p in [("lo", q.lo), ("hi", q.hi), ("bits", q.bits_param)]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"{name} got no gradient in {mode}"
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert float(q.step().detach()) > 0


@pytest.mark.parametrize("mode", ["dither", "noise", "ste"])
def test_weight_quantizer_gradients(mode: str) -> None:
    w = torch.randn(6, 8)
    q = weight_quantizer(mode, granularity="per_group", group_size=4, per_group_bits=True).train()
    q.init_from_tensor(w)
    w = w.clone().requires_grad_()
    out = q(w)
    ((out - 2 * w.detach()) ** 2).sum().backward()
    assert q.hi.grad is not None and float(q.hi.grad.abs().sum()) > 0
    assert q.bits_param.grad is not None and q.bits_param.grad.shape == (6, 2)
    assert float(q.bits_param.grad.abs().sum()) > 0
    assert w.grad is not None


def test_bits_stay_in_bounds_and_come_back_from_the_edge() -> None:
    q = act_quantizer("dither", bits=8).train()
    with torch.no_grad():
        q.bits_param.fill_(1.7)  # an optimizer overshot beyond max_bits
    assert float(q.bits().detach()) == 8.0
    with torch.no_grad():  # the plain clamp of bits() without autograd: the same value, no gradient path
        assert float(q.bits()) == 8.0 and not q.bits().requires_grad
        for p in (0.0, 0.3, 0.55, 1.0):
            q.bits_param.fill_(p)
            assert torch.equal(q.bits(), torch.enable_grad()(q.bits)().detach())
        q.bits_param.fill_(1.7)
    q(torch.randn(8, 16)).sum().backward()
    assert q.bits_param.grad is not None  # the straight-through clamp still passes gradient
    q.project_bits_()
    assert float(q.bits_param) == 1.0
    with torch.no_grad():
        q.bits_param.fill_(-3.0)
    assert float(q.bits()) == 2.0
    q.set_bits(5)
    assert float(q.bits()) == pytest.approx(5.0)


def test_dither_gradient_on_step_is_residual_plus_dither() -> None:
    torch.manual_seed(0)
    from fxquant.quantizer import round_clamp

    x = torch.tensor([0.1, 0.35, -0.7, 1.75, 3.0])
    step = torch.tensor(0.5, requires_grad=True)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.5)
    out = round_clamp(x, step, lo, hi, dither=True)
    assert torch.equal(out, torch.tensor([0.0, 0.5, -0.5, 1.5, 1.5]))
    out.sum().backward()
    u = x[:3] / 0.5  # the elements inside the clamps
    residual = float((torch.round(u) - u).sum())
    dither = float(step.grad) - residual
    # three draws of +-0.5/sqrt(3) (small group: every sign drawn): an odd multiple of 0.5/sqrt(3)
    k = dither * (3**0.5) / 0.5
    assert abs(k - round(k)) < 1e-4 and round(k) in (-3, -1, 1, 3)


def test_round_clamp_gradients_match_lsq_autograd_reference() -> None:
    """The fused STE node equals LSQ's textbook formula written with plain autograd ops."""
    from fxquant.quantizer import round_clamp

    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    step = torch.full((4, 1), 0.3, requires_grad=True)
    levels = 3.0
    y = round_clamp(x, step, -step * levels, step * levels)
    g = torch.randn(4, 6)
    (y * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    s2 = step.detach().clone().requires_grad_(True)
    v = torch.clamp(x2 / s2, -levels, levels)
    y2 = (v + (torch.round(v) - v).detach()) * s2
    (y2 * g).sum().backward()
    assert torch.equal(y, y2)
    assert torch.allclose(x.grad, x2.grad) and torch.allclose(step.grad, s2.grad, atol=1e-6)


CLIPPED_SIDES = {"both sides": lambda x: x, "only above": lambda x: x.abs() - 1.0, "only below": lambda x: -x.abs() + 1.4,
                 "neither": lambda x: x.clamp(-1.0, 1.5)}
"""Inputs of `round_clamp(x, 0.25, -1, 1.5)` clipped on both sides, one side (a ReLU output's lower side clips
nothing) or none: `_clipped_gradients` takes a different branch for each."""


PATHS = ("fused CPU kernel", "torch ops, scalar bounds (CPU)", "torch ops, mask (other devices)")
"""The three ways `_RoundClamp` computes one clamp pair: `fused_cpu`'s one-pass kernel, torch ops with the bounds
as numbers, torch ops with a mask of the clipped elements."""


def _use_path(path: str, monkeypatch) -> None:  # noqa: ANN001
    import fxquant.quantizer.fused_cpu as fused_cpu
    import fxquant.quantizer.numerics as numerics

    if path == PATHS[0]:
        if shutil.which(fused_cpu.compiler()[0]) is None:
            pytest.skip("no C compiler on this machine: the fused CPU kernel cannot be built")
        monkeypatch.setattr(fused_cpu, "MIN_ELEMENTS", 1)  # the tests' small tensors too
        assert fused_cpu.library() is not None, "the fused kernel did not build on this machine"
    else:
        monkeypatch.setenv("FXQ_FUSED_KERNELS", "0")
        fused_cpu.reset()  # the setting is read once per process
    if path == PATHS[2]:
        monkeypatch.setattr(numerics, "bounds_as_numbers", lambda x, lo, hi: None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("clamp_shape", [(), (1, 3, 1), (5, 1, 7), (3, 1)],
                         ids=["one clamp pair", "per channel", "two axes", "right-aligned"])
@pytest.mark.parametrize("clipped", list(CLIPPED_SIDES))
def test_round_clamp_clamp_and_step_gradients_match_plain_autograd(clamp_shape: tuple, path: str, clipped: str,
                                                                    monkeypatch) -> None:  # noqa: ANN001
    """Every backward path (one clamp pair: the fused CPU kernel, torch ops with the bounds as numbers on the CPU,
    or sums over the clipped elements elsewhere; reductions per group otherwise) equals the same function written
    with plain autograd ops, asymmetric clamps included, whichever sides clip."""
    from fxquant.quantizer import round_clamp

    _use_path(path, monkeypatch)

    torch.manual_seed(0)
    x = CLIPPED_SIDES[clipped](torch.randn(5, 3, 7) * 2).requires_grad_(True)
    step = torch.full(clamp_shape, 0.25, requires_grad=True)
    lo = torch.full(clamp_shape, -1.0, requires_grad=True)
    hi = torch.full(clamp_shape, 1.5, requires_grad=True)
    g = torch.randn(5, 3, 7)
    y = round_clamp(x, step, lo, hi)
    with torch.no_grad():  # the values: one clamp pair takes the CPU's scalar clamp, the others tensor bounds
        assert torch.equal(y, torch.round(torch.clamp(x, lo, hi) / step) * step)
    (y * g).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, step, lo, hi)]
    x2, s2, lo2, hi2 = leaves
    u = x2 / s2
    rounded = (u + (torch.round(u) - u).detach()) * s2
    y2 = torch.where(x2 > hi2, hi2 + 0 * x2, torch.where(x2 < lo2, lo2 + 0 * x2, rounded))
    (y2 * g).sum().backward()
    assert bool((x2 > hi2).any()) == (clipped in ("both sides", "only above"))
    assert bool((x2 < lo2).any()) == (clipped in ("both sides", "only below"))
    for ours, reference in zip((x, step, lo, hi), leaves):
        assert ours.grad is not None and reference.grad is not None
        assert torch.allclose(ours.grad, reference.grad, atol=1e-5), (ours.grad, reference.grad)


NOISE_PATHS = ("fused CPU kernel", "torch ops")


@pytest.mark.parametrize("path", NOISE_PATHS)
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("clamp_shape", [(), (5, 1, 1), (1, 3, 1), (5, 1, 7)],
                         ids=["one clamp pair", "per row", "per channel", "two axes"])
def test_noise_node_matches_plain_autograd(clamp_shape: tuple, distribution: str, path: str, monkeypatch) -> None:  # noqa: ANN001
    """DiffQ's `clamp(x) + step * eps` in one node, drawn by the fused kernel (uniform noise, one clamp pair or one
    per row) or by torch: values within half a step of the clamped input, and gradients (x, step, both clamps, per
    group) equal to plain autograd's on the same draws away from the clamps; an element equal to a clamp (a ReLU's
    zeros at lo = 0) passes its whole gradient to x, as the rounding path does, and none to the clamp (torch's
    `maximum` would split it); a NaN passes none."""
    from fxquant.quantizer.numerics import clamp_with_noise, noise_draws, noise_fits_kernel

    _use_path(PATHS[0] if path == NOISE_PATHS[0] else PATHS[1], monkeypatch)
    torch.manual_seed(0)
    x = (torch.randn(5, 3, 7) * 2).requires_grad_(True)
    step = torch.full(clamp_shape, 0.25, requires_grad=True)
    lo = torch.full(clamp_shape, -1.0, requires_grad=True)
    hi = torch.full(clamp_shape, 1.5, requires_grad=True)
    kernel = noise_fits_kernel(x, step, lo, hi, distribution)
    assert kernel == (path == NOISE_PATHS[0] and distribution == "uniform" and clamp_shape in ((), (5, 1, 1)))
    g = torch.randn(5, 3, 7)
    torch.manual_seed(1)
    y = clamp_with_noise(x, step, lo, hi, distribution)
    (y * g).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, step, lo, hi)]
    x2, s2, lo2, hi2 = leaves
    clamped = torch.minimum(torch.maximum(x2, lo2), hi2)
    if kernel:  # the kernel's draws, read back from its output (multiples of 2^-24 in [-1/2, 1/2))
        eps = ((y.detach() - clamped.detach()) / s2.detach()).detach()
        torch.manual_seed(1)
        again = clamp_with_noise(x.detach(), step.detach(), lo.detach(), hi.detach(), distribution)
        assert torch.equal(again, y), "the same seed draws the same noise"
        assert not torch.equal(clamp_with_noise(x.detach(), step.detach(), lo.detach(), hi.detach(), distribution), y)
    else:
        torch.manual_seed(1)
        eps = noise_draws(x2, distribution)
    assert float(eps.abs().max()) > 0.3 and (distribution == "gaussian" or float(eps.abs().max()) <= 0.5 + 1e-6)
    y2 = clamped + s2 * eps
    assert torch.allclose(y, y2, atol=1e-6)
    (y2 * g).sum().backward()
    assert bool((x2 > hi2).any()) and bool((x2 < lo2).any())
    for ours, reference in zip((x, step, lo, hi), leaves):
        assert ours.grad is not None and reference.grad is not None and ours.grad.shape == reference.grad.shape
        assert torch.allclose(ours.grad, reference.grad, atol=1e-5), (ours.grad, reference.grad)

    at_bounds = torch.tensor([-1.0, 0.0, 1.5, float("nan"), -2.0, 2.0], requires_grad=True)
    lo_t, hi_t = torch.tensor(-1.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    out = clamp_with_noise(at_bounds, torch.tensor(0.25), lo_t, hi_t, distribution)
    assert bool(out.detach()[3].isnan()) and float(out.detach()[4]) <= -1.0 + 0.125 + 1e-6
    out.backward(torch.arange(1.0, 7.0))
    assert at_bounds.grad is not None and at_bounds.grad.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]
    assert lo_t.grad is not None and hi_t.grad is not None and float(lo_t.grad) == 5.0 and float(hi_t.grad) == 6.0


def test_noise_kernel_draws_uniform_noise_on_any_number_of_threads(monkeypatch) -> None:  # noqa: ANN001
    """The fused kernel's noise is uniform in [-1/2, 1/2) (mean, variance 1/12, both halves of every row), its
    values the same on one thread as on several (drawn from the seed and the element's index), and its backward on
    a large tensor equals the reduction in float64 of the same draws."""
    from fxquant.quantizer.numerics import clamp_with_noise

    _use_path(PATHS[0], monkeypatch)
    x = torch.zeros(64, 4096, requires_grad=True)  # above the kernel's threading threshold
    step, lo, hi = torch.tensor(1.0, requires_grad=True), torch.tensor(-10.0), torch.tensor(10.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        one = clamp_with_noise(x.detach(), step.detach(), lo, hi, "uniform")
        torch.set_num_threads(max(threads, 2))
        torch.manual_seed(3)
        y = clamp_with_noise(x, step, lo, hi, "uniform")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)
    eps = y.detach()
    assert float(eps.min()) >= -0.5 and float(eps.max()) < 0.5
    assert abs(float(eps.mean())) < 0.005 and abs(float(eps.var()) - 1 / 12) < 0.002
    assert bool(((eps > 0).float().mean(dim=1) > 0.45).all()) and bool(((eps < 0).float().mean(dim=1) > 0.45).all())
    g = torch.randn(64, 4096)
    y.backward(g)
    assert step.grad is not None and x.grad is not None and torch.equal(x.grad, g)
    assert abs(float(step.grad) - float((g.double() * eps.double()).sum())) < 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_round_clamp_passes_the_gradient_at_the_bounds_themselves(path: str, monkeypatch) -> None:  # noqa: ANN001
    """The straight-through gradient reaches `x` on the closed interval `[lo, hi]` (elements equal to a bound,
    such as the largest weight after `hi = max|w|`, keep theirs); the clamps' gradients sum what lies strictly
    outside. The CPU's one-pair paths select by comparing with the bounds: checked at their float32 neighbours."""
    from fxquant.quantizer import round_clamp

    _use_path(path, monkeypatch)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.5)
    below, above = np.nextafter(np.float32(-1.0), np.float32(-2.0)), np.nextafter(np.float32(1.5), np.float32(2.0))
    values = [-3.0, float(below), -1.0, 0.0, 0.7, 1.5, float(above), 4.0]
    for shape in ((), (1,)):  # one pair as 0-d and as 1-element tensors
        x = torch.tensor(values, requires_grad=True)
        step = torch.full(shape, 0.25, requires_grad=True)
        lo_t = lo.reshape(shape).clone().requires_grad_(True)
        hi_t = hi.reshape(shape).clone().requires_grad_(True)
        g = torch.arange(1.0, 9.0)
        (round_clamp(x, step, lo_t, hi_t) * g).sum().backward()
        assert x.grad.tolist() == [0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]
        assert lo_t.grad.item() == 1.0 + 2.0 and hi_t.grad.item() == 7.0 + 8.0


def test_large_groups_draw_the_dither_sum_with_its_exact_variance() -> None:
    from fxquant.quantizer import dither_of_groups

    torch.manual_seed(0)
    g = torch.randn(3, 4096)
    draws = torch.stack([dither_of_groups(g, torch.Size([3, 1]), g) for _ in range(2000)])
    expected = (g * g).sum(1) / 12.0
    assert torch.allclose(draws.var(0).reshape(-1), expected, rtol=0.1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_eval_takes_at_most_2_pow_b_values_and_is_integer_qdq(bits: int) -> None:
    q = act_quantizer("dither", bits=bits).eval()
    x = torch.linspace(-3, 3, 2001).reshape(1, -1)
    y = q(x)
    assert torch.unique(y).numel() <= 2**bits
    p = q.integer_grid()
    s, zp = p.scale, p.zero_point
    assert float(zp) == round(float(zp))
    codes = y / s + zp
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)
    assert torch.equal(y, fake_quantize(x, s, zp, p.qmin, p.qmax))
    # exactly ONNX QuantizeLinear/DequantizeLinear: q = saturate(round(x/s) + zp), x_hat = (q - zp) * s
    ref_q = torch.clamp(torch.round(x / s) + zp, 0, 2**bits - 1)
    assert torch.equal(y, (ref_q - zp) * s)


def test_weights_are_symmetric_narrow_range_per_channel() -> None:
    w = torch.randn(6, 8)
    q = weight_quantizer("dither", bits=3).eval()
    q.init_from_tensor(w)
    y = q(w)
    p = q.integer_grid()
    assert p.scale.shape == (6, 1) and torch.all(p.zero_point == 0)
    codes = torch.round(y / p.scale)
    assert codes.abs().max() <= 3  # 2^(3-1) - 1
    for row in range(6):
        assert torch.unique(y[row]).numel() <= 7
    # each channel's largest magnitude is exactly representable (clamp = absmax)
    assert torch.allclose(y.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6)


def test_nonnegative_activation_pins_lo_at_zero() -> None:
    q = act_quantizer("dither", nonnegative=True)
    assert not isinstance(q.lo, torch.nn.Parameter) and float(q.lo) == 0.0
    q.eval()
    assert float(q.integer_grid().zero_point) == 0.0


def test_dead_group_gets_one_level_not_nan() -> None:
    w = torch.zeros(6, 8)
    w[0] = 1.0
    q = weight_quantizer("dither", bits=4)
    q.init_from_tensor(w)
    for train in (True, False):
        q.train(train)
        y = q(w)
        assert torch.isfinite(y).all() and torch.all(y[1:] == 0)


def test_disabled_is_identity_and_uncalibrated_eval_is_refused() -> None:
    q = LearnableQuantizer(kind="activation", tensor_shape=(4,), bits=8, min_bits=2, max_bits=8)
    x = torch.randn(4)
    q.enabled = False
    assert torch.equal(q(x), x)
    q.enabled = True
    q.eval()
    from fxquant.errors import StateError

    with pytest.raises(StateError, match=r"has no clamps yet: run fxq.calibrate"):
        q(x)
    q.train()
    q(x)  # the first training-mode pass initialises the clamps from data
    assert bool(q.initialized)
    # loading the state of an uncalibrated quantizer makes it uncalibrated again (the flag is read from the tensor)
    fresh = LearnableQuantizer(kind="activation", tensor_shape=(4,), bits=8, min_bits=2, max_bits=8)
    q.eval()
    q(x)
    q.load_state_dict(fresh.state_dict())
    with pytest.raises(StateError, match=r"has no clamps yet"):
        q(x)


def test_zero_point_snapped_to_the_grid_in_training() -> None:
    q = act_quantizer("ste", bits=3).train()
    x = torch.linspace(-2, 2, 101)
    y = q(x).detach()
    lo, hi = q.clamp_bounds()
    step = float(q.step())
    zp = round(-float(lo) / step)
    codes = y / step + zp
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)


def test_clamps_follow_a_change_of_integer_bits_in_training() -> None:
    """When round(b) drops, the clamps shrink by the ratio of the least-squared-error clips of the two grids."""
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    q = weight_quantizer("ste", bits=8).train()
    q.init_from_tensor(w)
    q(w)  # records the integer bits trained on
    hi_8 = q.hi.detach().clone()
    from fxquant.quantizer import FOLLOW_RATIOS

    expected = q.mse_clip_ratio(w, torch.tensor(2.0), FOLLOW_RATIOS) / q.mse_clip_ratio(w, torch.tensor(8.0), FOLLOW_RATIOS)
    q.set_bits(2)
    q(w)
    assert torch.allclose(q.hi.detach(), hi_8 * expected)
    assert bool((q.hi.detach() < hi_8).all())
    q(w)  # no change of bits: the clamps stay
    assert torch.allclose(q.hi.detach(), hi_8 * expected)


def test_ste_fine_tuning_matches_a_plain_lsq_forward_and_gradients() -> None:
    """Differential test: fxquant configured like LSQ (STE, fixed 2 bits, steps copied) gives LSQ's forward
    values and the same gradient directions for weights and every clamp (the clamp gradient once pointed
    70-80 degrees away from LSQ's, which stalled W2A2 training)."""
    import math

    import torch.nn.functional as F
    from torch import nn

    import fxquant as fxq

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    def lsq(x: torch.Tensor, s: torch.Tensor, qn: float, qp: float) -> torch.Tensor:  # the paper's formula
        g = 1.0 / math.sqrt(x.numel() / s.numel() * qp)
        s = (s - s * g).detach() + s * g
        s = s.reshape(-1, *([1] * (x.dim() - 1))) if s.numel() > 1 else s
        v = torch.clamp(x / s, -qn, qp)
        return (v + (v.round() - v).detach()) * s

    model = Net().eval()
    x = torch.rand(16, 1, 6, 6)
    spec = fxq.QuantSpec(bits=2, learn_bits=False)
    cfg = fxq.QuantConfig(weight=spec, activation=spec, mode="ste", first_last_bits=None, integer_bias=False,
                          quantize_joins=False, quantize_outputs=False)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x])
    q = qm.fxq_quantizers
    w_conv, w_fc = model.conv.weight.detach().clone(), model.fc.weight.detach().clone()
    # LSQ steps: weights per channel (2 bits, full range as LSQ: Qn = 2, Qp = 1), activations unsigned (Qp = 3)
    s_wc = (2 * w_conv.abs().flatten(1).mean(1)).requires_grad_()
    s_wf = (2 * w_fc.abs().flatten(1).mean(1)).requires_grad_()
    s_x = torch.tensor([2 * float(x.mean()) / math.sqrt(3)], requires_grad=True)
    relu = F.relu(F.conv2d(x, w_conv, model.conv.bias, padding=1)).mean((2, 3))
    s_h = torch.tensor([2 * float(relu.mean()) / math.sqrt(3)], requires_grad=True)
    with torch.no_grad():
        q["conv_weight"].hi.copy_(s_wc.reshape(q["conv_weight"].hi.shape))
        q["fc_weight"].hi.copy_(s_wf.reshape(q["fc_weight"].hi.shape))
        q["act_x"].hi.fill_(3 * float(s_x))
        q["act_x"].lo.zero_()
        q["act_mean"].hi.fill_(3 * float(s_h))
    wc, wf = w_conv.clone().requires_grad_(), w_fc.clone().requires_grad_()
    h = F.relu(F.conv2d(lsq(x, s_x, 0, 3), lsq(wc, s_wc, 2, 1), model.conv.bias, padding=1)).mean((2, 3))
    ref = F.linear(lsq(h, s_h, 0, 3), lsq(wf, s_wf, 2, 1), model.fc.bias)
    qm.train()
    out = qm(x)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    cos = lambda a, b: float(F.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))  # noqa: E731
    params = dict(qm.named_parameters())
    assert cos(params["conv.weight"].grad, wc.grad) > 0.9999 and cos(params["fc.weight"].grad, wf.grad) > 0.9999
    for name, s in (("conv_weight", s_wc), ("fc_weight", s_wf)):
        assert cos(q[name].hi.grad, s.grad) > 0.9999, name  # per channel: the same direction as LSQ's steps
    for name, s in (("act_x", s_x), ("act_mean", s_h)):
        assert float(q[name].hi.grad) * float(s.grad) > 0, name  # per tensor: the same sign


def _direct_mse_clip_ratio(q: LearnableQuantizer, x: torch.Tensor, bits: torch.Tensor, ratios: int) -> torch.Tensor:
    """The clip search written plainly: `fake_quantize` at every candidate, error summed per group."""
    from fxquant.quantizer import expand_groups, reduce_to_groups

    lo0, hi0 = q.clamp_bounds()
    best_err, best_r = None, torch.ones(q.param_shape)
    for r in torch.linspace(1.0, 0.2, ratios).tolist():
        p = q._grid(lo0 * r, hi0 * r, bits)
        y = fake_quantize(x, *(expand_groups(getattr(p, k), q.block_axis, q.group_size) for k in ("scale", "zero_point", "qmin", "qmax")))
        err = (y - x).pow(2)
        err = reduce_to_groups(err, q.param_shape, q.block_axis, q.group_size, "sum") if q.param_shape else err.sum()
        err = err.reshape(q.param_shape)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r


@pytest.mark.parametrize("layout", ["per_channel_conv", "per_channel_transposed", "per_group", "activation", "nonnegative"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_clip_ratio_matches_the_direct_search_across_slices(layout: str, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import fxquant.quantizer.learnable as fq

    monkeypatch.setattr(fq, "MSE_SLICE", 64)  # many slices, and a last one that is shorter
    torch.manual_seed(bits)
    if layout == "per_channel_conv":
        x = torch.randn(13, 3, 3, 3) * torch.rand(13, 1, 1, 1)
        q = LearnableQuantizer(kind="weight", tensor_shape=tuple(x.shape), bits=bits, min_bits=2, max_bits=8,
                               granularity="per_channel", channel_axis=0, symmetric=True)
    elif layout == "per_channel_transposed":  # channels on axis 1: the groups sum across slices
        x = torch.randn(9, 5, 3, 3)
        q = LearnableQuantizer(kind="weight", tensor_shape=tuple(x.shape), bits=bits, min_bits=2, max_bits=8,
                               granularity="per_channel", channel_axis=1, symmetric=True)
    elif layout == "per_group":
        x = torch.randn(7, 96)
        q = LearnableQuantizer(kind="weight", tensor_shape=tuple(x.shape), bits=bits, min_bits=2, max_bits=8,
                               granularity="per_group", channel_axis=0, block_axis=1, group_size=32, symmetric=True)
    else:
        x = torch.randn(1000) + (2.0 if layout == "nonnegative" else 0.3)
        if layout == "nonnegative":
            x = x.clamp(min=0.0)
        q = LearnableQuantizer(kind="activation", tensor_shape=(1000,), bits=bits, min_bits=2, max_bits=8,
                               nonnegative=layout == "nonnegative")
    q.init_from_tensor(x)
    b = torch.tensor(float(bits))
    expected = _direct_mse_clip_ratio(q, x, b, 24)
    assert torch.equal(q.mse_clip_ratio(x, b), expected)
    assert bool((expected < 1.0).any()) or bits == 8  # the search does pick clips below min/max at low bits


@pytest.mark.parametrize("bias_scale", [1.0, 1e12], ids=["fits int32", "codes overflow int32"])
def test_bias_in_training_has_the_values_eval_and_freeze_give_it(bias_scale: float) -> None:
    """Training mode rounds the bias in float without a host sync; its values equal eval's int32 path, also
    when a code would not fit in int32 (then both keep the float bias), and its gradient is straight-through."""
    from fxquant.quantizer import BiasQuantizer

    torch.manual_seed(0)
    x_q = LearnableQuantizer(kind="activation", tensor_shape=(4, 6), bits=4, min_bits=2, max_bits=8)
    w_q = LearnableQuantizer(kind="weight", tensor_shape=(5, 6), bits=4, min_bits=2, max_bits=8,
                             granularity="per_channel", channel_axis=0, symmetric=True)
    x_q.init_from_tensor(torch.randn(4, 6))
    w_q.init_from_tensor(torch.randn(5, 6))
    q = BiasQuantizer(x_q, w_q, 5)
    bias = (torch.randn(5) * bias_scale).requires_grad_(True)
    trained = q.train()(bias)
    evaluated = q.eval()(bias.detach())
    assert torch.equal(trained.detach(), evaluated)
    assert torch.equal(evaluated, bias.detach()) == (bias_scale > 1.0)  # an overflow keeps the float bias
    trained.sum().backward()
    assert torch.equal(bias.grad, torch.ones(5))


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_bias_rounded_in_c_equals_the_torch_ops(weights: str, monkeypatch) -> None:  # noqa: ANN001
    """On the CPU the training-mode bias is rounded in float32 by round_clamp.c (`_rounded_on_cpu`): the values of the torch
    ops (`integer_scale` and `bias_scale`), bit for bit, for random clamps and bits of both quantizers."""
    from fxquant.quantizer import BiasQuantizer

    gen = torch.Generator().manual_seed(0)
    for i in range(60):
        x_q = LearnableQuantizer(kind="activation", tensor_shape=(4, 6), bits=8, min_bits=2, max_bits=8)
        w_q = LearnableQuantizer(kind="weight", tensor_shape=(5, 6), bits=8, min_bits=2, max_bits=8, symmetric=True,
                                 granularity=weights, channel_axis=0 if weights == "per_channel" else None)
        x_q.init_from_tensor(torch.randn(4, 6, generator=gen) * 3)
        w_q.init_from_tensor(torch.randn(5, 6, generator=gen))
        with torch.no_grad():
            for q in (x_q, w_q):
                q.hi.mul_(torch.rand(q.hi.shape, generator=gen) + 0.2)
                q.bits_param.fill_(float(torch.rand((), generator=gen)))
            x_q.lo.mul_(float(torch.rand((), generator=gen)) + 0.2)
        q = BiasQuantizer(x_q, w_q, 5).train()
        bias = torch.randn(5, generator=gen) * 10 ** float(torch.randint(-3, 3, (), generator=gen))
        ours = q._rounded_on_cpu(bias)
        assert ours is not None
        with monkeypatch.context() as m:
            m.setattr(BiasQuantizer, "_rounded_on_cpu", lambda self, b: None)
            reference = q._rounded(bias)
        assert torch.equal(ours, reference), i
        assert torch.equal(q(bias), q.eval()(bias)), i


@pytest.mark.parametrize("layout", ["per_tensor", "per_channel_conv", "per_channel_transposed", "per_group", "per_group_axis0"])
@pytest.mark.parametrize("slice_numel", [1, 50, 1 << 18])
def test_frozen_weight_codes_made_in_slices_equal_the_whole_tensor_codes(layout: str, slice_numel: int) -> None:
    """`integer_codes` (slices of rows, blocked parameters not repeated) gives `quantize_codes`' codes exactly."""
    from fxquant.quantizer import expand_groups, integer_codes, quantize_codes

    torch.manual_seed(3)
    kw = dict(kind="weight", bits=4, min_bits=2, max_bits=8, symmetric=True)
    if layout == "per_tensor":
        x = torch.randn(11, 7)
        q = LearnableQuantizer(tensor_shape=(11, 7), granularity="per_tensor", **kw)
    elif layout == "per_channel_conv":
        x = torch.randn(13, 3, 3, 3) * torch.rand(13, 1, 1, 1)
        q = LearnableQuantizer(tensor_shape=tuple(x.shape), granularity="per_channel", channel_axis=0, **kw)
    elif layout == "per_channel_transposed":
        x = torch.randn(9, 5, 3, 3)
        q = LearnableQuantizer(tensor_shape=tuple(x.shape), granularity="per_channel", channel_axis=1, **kw)
    else:
        axis = 1 if layout == "per_group" else 0
        x = torch.randn(7, 96) if axis == 1 else torch.randn(96, 7)
        q = LearnableQuantizer(tensor_shape=tuple(x.shape), granularity="per_group", channel_axis=1 - axis,
                               block_axis=axis, group_size=32, symmetric=True, kind="weight", bits=4, min_bits=2,
                               max_bits=8)
    q.init_from_tensor(x)
    p = q.integer_grid()
    params = (p.scale, p.zero_point, p.qmin, p.qmax)
    expected = quantize_codes(x, *(expand_groups(t, q.block_axis, q.group_size) for t in params)).to(torch.int8)
    codes = integer_codes(x, *params, torch.int8, q.block_axis, q.group_size, slice_numel=slice_numel)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert torch.equal(codes, expected)
    assert int(codes.abs().max()) == 7  # the grid is used to its end


def _reference_grid(p: torch.Tensor, lo: Optional[torch.Tensor], hi: torch.Tensor, k: GridConstants) -> tuple:
    """The training grid written op by op with autograd (what `LearnableQuantizer` computed before
    `training_grid`)."""
    from fxquant.quantizer.numerics import MIN_STEP, clamp_ste, grad_scale, round_ste

    bits = round_ste(k.min_bits + k.span * clamp_ste(p, 0.0, 1.0))
    levels = torch.pow(2.0, bits - 1.0) - 1.0 if k.symmetric else torch.pow(2.0, bits) - 1.0
    hi_v = grad_scale(torch.clamp(hi, min=0.0), k.clamp_grad_scale)
    if k.symmetric:
        step = torch.clamp(hi_v / levels, min=MIN_STEP)
        return step, -step * (levels + (1.0 if k.full_range else 0.0)), step * levels
    lo_v = grad_scale(torch.clamp(lo, max=0.0), k.clamp_grad_scale)
    step = torch.clamp((hi_v - lo_v) / levels, min=MIN_STEP)
    zero_point = round_ste(-lo_v / step)
    lo_grid = -zero_point * step
    return step, lo_grid, lo_grid + step * levels


@pytest.mark.parametrize(
    "symmetric, full_range, bits, lo, hi",
    [
        (True, False, [0.37], None, [0.8, -0.1, 1e-12, 2.5]),  # narrow, per channel, a negative and a tiny clamp
        (True, True, [0.37], None, [0.8, -0.1, 1e-12, 2.5]),  # the same with full-range codes
        (True, True, [0.0, 0.6], None, [0.3, 1.1]),  # full range at 2 bits (codes -2..1) and per-group bits
        (False, False, [1.3], [-0.7], [1.9]),  # asymmetric per tensor, bits parameter above its bound
        (False, False, [0.5], [0.2], [3.0]),  # a positive lo is clamped to 0
        (False, False, [0.2, 0.9, -0.3], [-1.0, -0.01, 0.0], [1.0, 0.5, 2.0]),  # per-group bits
    ],
)
def test_training_grid_equals_the_op_by_op_chain(symmetric: bool, full_range: bool, bits: list, lo: Optional[list],
                                                 hi: list) -> None:
    """`training_grid` (one autograd node) gives the op-by-op chain's values (to an ulp: the chain's LSQ gradient
    scale `(x - x s) + x s` may move a value by one) and its gradients."""
    from fxquant.quantizer.numerics import training_grid

    k = GridConstants(min_bits=2.0, span=6.0, symmetric=symmetric, clamp_grad_scale=0.037, full_range=full_range)
    leaves = [torch.tensor(bits), None if lo is None else torch.tensor(lo), torch.tensor(hi)]
    ours = [None if t is None else t.clone().requires_grad_(True) for t in leaves]
    theirs = [None if t is None else t.clone().requires_grad_(True) for t in leaves]
    out = training_grid(*ours, k)
    ref = _reference_grid(*theirs, k)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)
    weights = [torch.randn(out[0].shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sum(((o * w).sum() for o, w in zip(out, weights)), torch.zeros(())).backward()
    sum(((r * w).sum() for r, w in zip(ref, weights)), torch.zeros(())).backward()
    for a, b in zip(ours, theirs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
            assert bool(a.grad.abs().sum() > 0) or a is ours[1]


def test_one_integer_bit_width_read_as_a_number_equals_integer_bits() -> None:
    """`follow_bits_`'s shortcut reads one bit-width as a number: the value `integer_bits()` gives, ties (4.5 ->
    4, 5.5 -> 6) and parameters outside [0, 1] included; several bit-widths take the tensor path (None)."""
    q = LearnableQuantizer(kind="activation", tensor_shape=(4, 6), bits=8, min_bits=2, max_bits=8)
    for p in (-0.4, 0.0, 0.1, 0.25, 7 / 12, 0.5, 0.99, 1.0, 1.3):
        with torch.no_grad():
            q.bits_param.fill_(p)
        assert q._one_integer_bits() == float(q.integer_bits()), p
    w = LearnableQuantizer(kind="weight", tensor_shape=(3, 6), bits=8, min_bits=2, max_bits=8, symmetric=True,
                           granularity="per_channel", channel_axis=0, per_group_bits=True)
    assert w._one_integer_bits() is None


@pytest.mark.parametrize("symmetric, narrow_range", [(False, False), (True, False), (True, True)],
                         ids=["asymmetric", "full range", "narrow range"])
def test_training_grid_is_the_eval_grid_exactly(symmetric: bool, narrow_range: bool) -> None:
    """What the rounding estimators train on is, bit for bit, the grid eval and freeze use (`integer_grid`), for
    random clamps and bits (the LSQ gradient scale must not move a value by an ulp: it did for ~1 pair in 1,000)."""
    from fxquant.quantizer.numerics import training_grid

    gen = torch.Generator().manual_seed(0)
    q = LearnableQuantizer(kind="weight" if symmetric else "activation", tensor_shape=(2000, 4), bits=8,
                           min_bits=2, max_bits=8, symmetric=symmetric, narrow_range=narrow_range,
                           granularity="per_channel", channel_axis=0, per_group_bits=True)
    with torch.no_grad():
        q.hi.copy_(torch.rand(q.hi.shape, generator=gen) * 5)
        if not symmetric:
            q.lo.copy_(-torch.rand(q.lo.shape, generator=gen) * 3)
        q.bits_param.copy_(torch.rand(q.bits_param.shape, generator=gen) * 1.2 - 0.1)
    step, lo, hi = training_grid(q.bits_param, q.lo, q.hi, q._grid_constants(torch.zeros(2000, 4)))
    grid = q.integer_grid()
    assert torch.equal(step, grid.scale)
    assert torch.equal(lo, (grid.qmin - grid.zero_point) * grid.scale)
    # the upper bound is `lo + step * levels` (float rounding may differ from `(qmax - zp) * step` in the last bit);
    # it lies on the same code, so the clipped values are eval's
    assert torch.equal(torch.round(hi / step), grid.qmax - grid.zero_point)
    if symmetric:  # full range: 2^(B-1) codes below zero, 2^(B-1) - 1 above; narrow: as many on each side
        assert torch.equal(grid.qmin, -grid.qmax - (0.0 if narrow_range else 1.0))


def test_projection_of_many_quantizers_clamps_each_one() -> None:
    """`project_parameters` (four foreach calls for all quantizers) leaves every quantizer as clamping its own
    parameters would: bits parameter in [0, 1], `hi >= 0`, a learnable `lo <= 0`, a pinned `lo` untouched."""
    from fxquant.quantizer import project_parameters

    quantizers = [
        LearnableQuantizer(kind="activation", tensor_shape=(4, 8), bits=8, min_bits=2, max_bits=8),
        LearnableQuantizer(kind="activation", tensor_shape=(4, 8), bits=8, min_bits=2, max_bits=8, nonnegative=True),
        LearnableQuantizer(kind="weight", tensor_shape=(4, 8), bits=8, min_bits=2, max_bits=8, symmetric=True,
                           granularity="per_channel", channel_axis=0),
    ]
    with torch.no_grad():
        for i, q in enumerate(quantizers):
            q.bits_param.fill_(1.5 if i % 2 else -0.5)
            q.hi.copy_(torch.linspace(-1.0, 1.0, q.hi.numel()).reshape(q.hi.shape))
            if isinstance(q.lo, torch.nn.Parameter):
                q.lo.fill_(0.7)
    expected = []
    for q in quantizers:
        lo = q.lo.clamp(max=0.0) if isinstance(q.lo, torch.nn.Parameter) else q.lo
        expected.append((q.bits_param.clamp(0.0, 1.0), q.hi.clamp(min=0.0), None if lo is None else lo.clone()))
    project_parameters(quantizers)
    for q, (bits, hi, lo) in zip(quantizers, expected):
        assert torch.equal(q.bits_param, bits) and torch.equal(q.hi, hi)
        assert (q.lo is None) == (lo is None) and (lo is None or torch.equal(q.lo, lo))


@pytest.mark.parametrize("numel", [256, 8192])  # the torch path, and the fused CPU kernel (from 4096 elements)
@pytest.mark.parametrize("nonnegative", [True, False])
def test_exact_zeros_draw_no_dither(numel: int, nonnegative: bool) -> None:
    """0 is on every grid (integer zero point): elements exactly 0 have no rounding error, and the dither of the step
    leaves them out. Half the input exactly 0, the rest clipped above the clamps (outside: no dither either): the
    dither adds nothing, and every parameter's gradient is the plain straight-through one."""
    grads = {}
    for mode in ("ste", "dither"):
        q = act_quantizer(mode, bits=4, nonnegative=nonnegative).train()
        x = torch.zeros(numel)
        x[::2] = 10.0  # above hi = 1.5
        torch.manual_seed(0)
        (q(x) * torch.linspace(-1.0, 1.0, numel)).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in q.named_parameters() if p.grad is not None}
    assert grads["ste"].keys() == grads["dither"].keys() and "hi" in grads["ste"]
    for name, grad in grads["ste"].items():
        assert torch.equal(grad, grads["dither"][name]), name


def test_the_dither_of_a_group_leaves_its_exact_zeros_out() -> None:
    from fxquant.quantizer import dither_of_groups

    torch.manual_seed(0)
    g = torch.randn(2, 4096)
    x = torch.randn(2, 4096)
    x[0, :2048] = 0.0  # half of row 0 exactly 0
    draws = torch.stack([dither_of_groups(g, torch.Size([2, 1]), x) for _ in range(2000)])
    expected = torch.stack([(g[0, 2048:] ** 2).sum(), (g[1] ** 2).sum()]) / 12.0
    assert torch.allclose(draws.var(0).reshape(-1), expected, rtol=0.1)


@pytest.mark.parametrize("narrow_range, lowest", [(False, -4), (True, -3)], ids=["full range", "narrow range"])
def test_weight_codes_reach_one_code_below_minus_hi_unless_narrow(narrow_range: bool, lowest: int,
                                                                  monkeypatch) -> None:  # noqa: ANN001
    """Signed weights use all 2^B codes (3 bits: -4..3, one step beyond -hi) in training (the fused kernel and the
    torch ops), eval and freeze alike; `narrow_range=True` keeps -3..3."""
    from fxquant.quantizer import FrozenWeight, quantize_codes

    w = torch.tensor([[-1.2, -1.0, 0.3, 1.0, 2.0]])
    q = LearnableQuantizer(kind="weight", tensor_shape=(1, 5), bits=3, min_bits=2, max_bits=8, symmetric=True,
                           narrow_range=narrow_range, granularity="per_channel", channel_axis=0, learn_bits=False)
    q.init_from_tensor(w)
    with torch.no_grad():
        q.hi.fill_(1.0)  # step 1/3
    g = q.integer_grid()
    assert (float(g.qmin), float(g.qmax)) == (lowest, 3)
    codes = quantize_codes(w, g.scale, g.zero_point, g.qmin, g.qmax)
    assert codes.flatten().tolist() == [lowest, -3, 1, 3, 3]
    expected = codes * g.scale
    q.eval()
    assert torch.equal(q(w), expected)
    q.train()
    from fxquant.quantizer import fused_cpu

    try:
        for kernel in ("1", "0"):  # the fused kernel's grid (where a compiler is found) and the torch ops'
            monkeypatch.setenv("FXQ_FUSED_KERNELS", kernel)
            fused_cpu.reset()
            trained = q(w.clone().requires_grad_(True))
            assert torch.allclose(trained, expected, rtol=0, atol=1e-6), kernel
    finally:
        monkeypatch.delenv("FXQ_FUSED_KERNELS")
        fused_cpu.reset()
    frozen = FrozenWeight(q, w)
    assert frozen.codes.flatten().tolist() == [lowest, -3, 1, 3, 3] and torch.equal(frozen(), expected)
    assert frozen.qparams().qmin == lowest


def test_quantizers_saved_before_full_range_codes_load_with_narrow_codes() -> None:
    """A weight quantizer pickled by an fxquant before full-range codes (no `narrow_range`) and a frozen weight's
    state dict without `qmin` keep the narrow codes they were trained and frozen with."""
    from fxquant.quantizer import FrozenWeight

    w = torch.randn(4, 6)
    q = LearnableQuantizer(kind="weight", tensor_shape=(4, 6), bits=4, min_bits=2, max_bits=8, symmetric=True,
                           narrow_range=True, granularity="per_channel", channel_axis=0)
    q.init_from_tensor(w)
    state = q.__getstate__()
    del state["narrow_range"]
    old = LearnableQuantizer.__new__(LearnableQuantizer)
    old.__setstate__(state)
    assert old.narrow_range and torch.equal(old.integer_grid().qmin, -old.integer_grid().qmax)
    frozen = FrozenWeight(q, w)
    saved = frozen.state_dict()
    del saved["qmin"]
    full = FrozenWeight(LearnableQuantizer(kind="weight", tensor_shape=(4, 6), bits=4, min_bits=2, max_bits=8,
                                           symmetric=True, granularity="per_channel", channel_axis=0), w)
    full.load_state_dict(saved)
    assert torch.equal(full.qmin, -full.qmax) and full.qparams().qmin == -7
    pickled = dict(frozen.__getstate__())
    pickled["_buffers"] = {k: v for k, v in pickled["_buffers"].items() if k != "qmin"}
    unpickled = FrozenWeight.__new__(FrozenWeight)
    unpickled.__setstate__(pickled)
    assert unpickled.qparams().qmin == -7


def test_forgotten_trained_bits_are_not_followed() -> None:
    """After `forget_trained_bits` (a rollback restored clamps fit for the bits they were saved at), `follow_bits_`
    starts from the current bits instead of rescaling the clamps from the forgotten ones."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    q = LearnableQuantizer(kind="weight", tensor_shape=(4, 16), bits=8, min_bits=2, max_bits=8, symmetric=True,
                           granularity="per_channel", channel_axis=0)
    q.init_from_tensor(x)
    q.follow_bits_(x)  # remembers 8 bits
    q.set_bits(3)
    hi = q.hi.detach().clone()
    q.forget_trained_bits()
    q.follow_bits_(x)
    assert torch.equal(q.hi.detach(), hi) and bool((q.trained_bits == 3).all())
    q.set_bits(2)
    q.follow_bits_(x)  # a later change is followed again
    assert not torch.equal(q.hi.detach(), hi)
