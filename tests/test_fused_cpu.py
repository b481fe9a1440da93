"""The fused CPU kernel of a per-tensor quantizer (`fxquant.quantizer.fused_cpu`): the same values as the torch
ops, built once and cached, and a clear fallback where it cannot be built."""

from __future__ import annotations

import os
import shutil
from typing import Iterator, Tuple

import pytest
import torch

from fxquant.quantizer import fused_cpu, round_clamp

needs_compiler = pytest.mark.skipif(
    shutil.which(fused_cpu.compiler()[0]) is None, reason="no C compiler: the fused CPU kernel cannot be built"
)


@pytest.fixture(autouse=True)
def fresh_library() -> Iterator[None]:
    """Every test looks for the library afresh, and leaves none of its environment behind."""
    fused_cpu.reset()
    yield
    fused_cpu.reset()


def _quantize(fused: bool, x0: torch.Tensor, dither: bool, monkeypatch) -> Tuple[torch.Tensor, ...]:  # noqa: ANN001
    """Output and gradients of `round_clamp` on `x0` with the fused kernel or the torch ops; one seed for the
    dither's draw."""
    monkeypatch.setenv("FXQ_FUSED_KERNELS", "1" if fused else "0")
    x = x0.clone().requires_grad_(True)
    step = torch.tensor(0.1, requires_grad=True)
    lo, hi = torch.tensor(-0.4, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    y = round_clamp(x, step, lo, hi, dither)
    g = torch.linspace(-1.0, 1.0, x.numel()).reshape(x.shape)
    torch.manual_seed(7)
    y.backward(g)
    return y.detach(), x.grad, step.grad, lo.grad, hi.grad


@needs_compiler
@pytest.mark.parametrize("dither", [False, True], ids=["ste", "dither"])
def test_fused_kernel_computes_what_the_torch_ops_compute(dither: bool, monkeypatch) -> None:  # noqa: ANN001
    """Bitwise the same forward (ties at half steps included: round half to even) and input gradient; the
    clamps' and step's gradients (sums) equal up to the order of float additions, the dither drawn alike."""
    torch.manual_seed(0)
    x0 = torch.randn(16, 8, 16, 16) * 0.8
    x0.view(-1)[:200] = torch.arange(-100, 100) * 0.05  # exact multiples of half a step, on both sides of 0
    x0.view(-1)[200:210] = torch.tensor([-0.4, 1.5] * 5)  # at the bounds themselves
    assert fused_cpu.applies(x0)
    fused = _quantize(True, x0, dither, monkeypatch)
    ours = _quantize(False, x0, dither, monkeypatch)
    assert torch.equal(fused[0], ours[0]) and torch.equal(fused[1], ours[1])
    for a, b in zip(fused[2:], ours[2:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (a, b)
    assert bool((fused[1] == 0).any()) and bool((fused[1] != 0).any())  # both sides of the clamps were exercised


def test_fused_kernel_applies_only_where_it_can(monkeypatch) -> None:  # noqa: ANN001
    """float32, contiguous, on the CPU and large enough; never with `FXQ_FUSED_KERNELS=0`."""
    big = torch.zeros(fused_cpu.MIN_ELEMENTS)
    assert not fused_cpu.applies(big.double())
    assert not fused_cpu.applies(torch.zeros(fused_cpu.MIN_ELEMENTS - 1))
    assert not fused_cpu.applies(torch.zeros(2, fused_cpu.MIN_ELEMENTS).t())
    monkeypatch.setenv("FXQ_FUSED_KERNELS", "0")
    assert not fused_cpu.applies(big) and fused_cpu.library() is None


@needs_compiler
def test_fused_kernel_is_built_once_and_cached(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("FXQ_CACHE_DIR", str(tmp_path))
    assert fused_cpu.library() is not None
    built = os.listdir(tmp_path / "kernels")
    assert len(built) == 1 and built[0].endswith(".so")
    fused_cpu.reset()

    def no_build(*args: object) -> None:
        raise AssertionError("built again although the cache holds the library")

    monkeypatch.setattr(fused_cpu, "build", no_build)
    assert fused_cpu.library() is not None


def test_without_a_compiler_fine_tuning_warns_once_and_uses_the_torch_ops(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A machine with no C compiler gets one warning naming the fix, and the same values from torch's ops."""
    monkeypatch.setenv("FXQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    x = torch.randn(64, 128)
    with pytest.warns(fused_cpu.FusedKernelWarning, match=r"could not build its fused CPU quantizer kernel.*CC"):
        assert not fused_cpu.applies(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        assert not fused_cpu.applies(x)
        y = round_clamp(x, torch.tensor(0.25), torch.tensor(-1.0), torch.tensor(1.0))
    assert torch.equal(y, torch.round(x.clamp(-1.0, 1.0) / 0.25) * 0.25)


@needs_compiler
@pytest.mark.parametrize("dither", [False, True], ids=["ste", "dither"])
@pytest.mark.parametrize("kind", ["asymmetric", "nonnegative", "symmetric", "lo above 0", "dead (hi = lo = 0)"])
def test_per_tensor_node_equals_the_grid_and_round_clamp_nodes(kind: str, dither: bool) -> None:
    """`per_tensor_rounding` (the grid as float32 numbers and the fused kernel in one node) gives the values and
    gradients of `training_grid` followed by `round_clamp`, for every kind of clamp pair, at fractional bits."""
    from fxquant.quantizer.numerics import GridConstants, per_tensor_rounding, training_grid

    torch.manual_seed(0)
    x0 = torch.randn(8, 16, 40) * 1.3
    symmetric = kind == "symmetric"
    k = GridConstants(min_bits=2.0, span=6.0, symmetric=symmetric, clamp_grad_scale=0.01)
    hi0, lo0 = {"dead (hi = lo = 0)": (0.0, 0.0), "lo above 0": (1.7, 0.3)}.get(kind, (1.7, -0.9))

    def run(one_node: bool) -> Tuple[torch.Tensor, ...]:
        x = x0.clone().requires_grad_(True)
        bits = torch.tensor(0.41, requires_grad=True)  # 4.46 bits: rounds to 4, the gradient passes straight
        hi = torch.tensor(hi0, requires_grad=True)
        lo = None if symmetric else torch.tensor(0.0 if kind == "nonnegative" else lo0, requires_grad=kind != "nonnegative")
        torch.manual_seed(3)
        if one_node:
            y = per_tensor_rounding(x, bits, lo, hi, k, dither)
        else:
            y = round_clamp(x, *training_grid(bits, lo, hi, k), dither)
        (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
        grads = [t.grad if t is not None and t.requires_grad else torch.zeros(()) for t in (x, bits, lo, hi)]
        return (y.detach(), *grads)

    ours, reference = run(True), run(False)
    assert torch.equal(ours[0], reference[0])
    assert torch.equal(ours[1], reference[1])
    for name, a, b in zip(("bits", "lo", "hi"), ours[2:], reference[2:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, a, b)


@needs_compiler
def test_learnable_quantizer_takes_the_one_node_path_on_the_cpu(monkeypatch) -> None:  # noqa: ANN001
    """A per-tensor activation quantizer in training mode quantizes through `per_tensor_rounding`."""
    import fxquant.quantizer.learnable as learnable
    from fxquant.quantizer import LearnableQuantizer

    q = LearnableQuantizer(kind="activation", tensor_shape=(8, 1024), bits=4, min_bits=2, max_bits=8,
                           mode="dither", nonnegative=True)
    x = torch.rand(8, 1024)
    q.init_from_tensor(x)
    calls = []
    original = learnable.per_tensor_rounding
    monkeypatch.setattr(learnable, "per_tensor_rounding", lambda *a: calls.append(1) or original(*a))
    q.train()
    q(x).sum().backward()
    assert calls and q.hi.grad is not None and q.bits_param.grad is not None
