"""The fused CPU kernels of the round-clamp (`fxquant.quantizer.fused_cpu`) and the one-node quantizer built on
them (`numerics.fused_rounding`, per tensor and per row): the same values as the torch ops, built once and
cached, and a clear fallback where they cannot be built."""

from __future__ import annotations

import math
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
    fused_cpu.reset()  # the setting is read once per process
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
    fused_cpu.reset()  # the setting is read once per process
    assert not fused_cpu.applies(big) and fused_cpu.library() is None



def test_the_kernel_setting_is_read_once_per_process_and_again_after_reset(monkeypatch) -> None:  # noqa: ANN001
    """`FXQ_FUSED_KERNELS` is read on the first use (a training step asks ~100 times), and again after `reset()`."""
    monkeypatch.setenv("FXQ_FUSED_KERNELS", "1")
    assert fused_cpu.enabled()
    monkeypatch.setenv("FXQ_FUSED_KERNELS", "off")
    assert fused_cpu.enabled() and not fused_cpu.enabled_in_environment()
    fused_cpu.reset()
    assert not fused_cpu.enabled() and fused_cpu.library() is None

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


SHAPES = {
    "per tensor": ((8, 16, 40), ()),
    "per tensor, small": ((3, 20), ()),  # below MIN_ELEMENTS and DITHER_EXACT_BELOW: the dither's signs one by one
    "per row": ((8, 16, 40), (8, 1, 1)),  # a per-channel weight: one clamp pair per output channel
    "per row, short rows": ((16, 3, 3, 3), (16, 1, 1, 1)),  # rows of 27 < DITHER_EXACT_BELOW
}


def _params(shape: Tuple[int, ...], value: float, requires_grad: bool) -> torch.Tensor:
    """A clamp parameter of `shape` around `value` (rows differ by up to 40%)."""
    rows = torch.linspace(0.6, 1.4, max(math.prod(shape), 1)).reshape(shape) if shape else torch.tensor(1.0)
    return (rows * value).requires_grad_(requires_grad)


@needs_compiler
@pytest.mark.parametrize("dither", [False, True], ids=["ste", "dither"])
@pytest.mark.parametrize("bits_p", [0.41, 1.3, -0.2], ids=["4.46 bits", "above the range", "below the range"])
@pytest.mark.parametrize("kind", ["asymmetric", "nonnegative", "symmetric", "symmetric narrow", "lo above 0",
                                  "hi below 0", "dead (hi = lo = 0)", "tiny (step at MIN_STEP)"])
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
def test_one_node_equals_the_grid_and_round_clamp_nodes(shapes: str, kind: str, bits_p: float, dither: bool) -> None:
    """`fused_rounding` (the grid in float32 by round_clamp.c and the fused kernel in one node) gives the values and gradients
    of `training_grid` followed by `round_clamp`, for every kind of clamp pair, inside and outside the bits'
    range, per tensor and per row (the gradients to float32 rounding of the two-node path's float32 arithmetic)."""
    from fxquant.quantizer.numerics import GridConstants, applies_fused_rounding, fused_rounding, training_grid

    x_shape, param_shape = SHAPES[shapes]
    torch.manual_seed(0)
    x0 = torch.randn(x_shape) * 1.3
    symmetric = kind.startswith("symmetric")
    k = GridConstants(min_bits=2.0, span=6.0, symmetric=symmetric, clamp_grad_scale=0.01, full_range=kind == "symmetric")
    hi0, lo0 = {"dead (hi = lo = 0)": (0.0, 0.0), "lo above 0": (1.7, 0.3), "hi below 0": (-0.5, -0.9),
                "tiny (step at MIN_STEP)": (2e-9, -1e-9)}.get(kind, (1.7, -0.9))
    if kind == "tiny (step at MIN_STEP)":
        x0 = x0 * 1e-9

    def run(one_node: bool) -> Tuple[torch.Tensor, ...]:
        x = x0.clone().requires_grad_(True)
        bits = torch.tensor(bits_p, requires_grad=True)
        hi = _params(param_shape, hi0, True)
        lo = None if symmetric else _params(param_shape, 0.0 if kind == "nonnegative" else lo0, kind != "nonnegative")
        torch.manual_seed(3)
        if one_node:
            assert applies_fused_rounding(x, bits, lo, hi)
            y = fused_rounding(x, bits, lo, hi, k, dither)
        else:
            y = round_clamp(x, *training_grid(bits, lo, hi, k), dither)
        (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
        grads = [t.grad if t is not None and t.requires_grad else torch.zeros(()) for t in (x, bits, lo, hi)]
        return (y.detach(), *grads)

    ours, reference = run(True), run(False)
    assert torch.equal(ours[0], reference[0])
    assert torch.equal(ours[1], reference[1])
    for name, a, b in zip(("bits", "lo", "hi"), ours[2:], reference[2:]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=5e-3, atol=1e-6), (name, a, b)


@needs_compiler
@pytest.mark.parametrize("needs", ["bits and clamps", "only x"])
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
def test_one_node_draws_the_dither_as_the_torch_path_does(shapes: str, needs: str) -> None:
    """The dither is drawn only when the step's gradient is wanted, and as the two-node path draws it (one
    Gaussian per group, or a sign per element of short groups), so the random stream after a backward is the
    same: with frozen bits and clamps neither draws."""
    from fxquant.quantizer.numerics import GridConstants, fused_rounding, training_grid

    x_shape, param_shape = SHAPES[shapes]
    k = GridConstants(min_bits=2.0, span=6.0, symmetric=False, clamp_grad_scale=0.01)
    x0 = torch.randn(x_shape)
    states = []
    for one_node in (True, False):
        wanted = needs == "bits and clamps"
        x = x0.clone().requires_grad_(True)
        params = [torch.tensor(0.41, requires_grad=wanted), _params(param_shape, -0.9, wanted),
                  _params(param_shape, 1.7, wanted)]
        torch.manual_seed(11)
        y = fused_rounding(x, *params, k, True) if one_node else round_clamp(x, *training_grid(*params, k), True)
        y.sum().backward()
        states.append(torch.randn(3))
    assert torch.equal(states[0], states[1])


def test_one_node_applies_only_to_one_pair_or_one_per_row() -> None:
    """Clamps per tensor or shaped `(rows, 1, ...)` along the first axis; other layouts (per column, blocks,
    several bit-widths, another dtype) keep the two-node path."""
    from fxquant.quantizer.numerics import applies_fused_rounding

    if fused_cpu.library() is None:
        pytest.skip("no fused kernel")
    x, bits = torch.randn(8, 6), torch.tensor(0.5)
    assert applies_fused_rounding(x, bits, None, torch.ones(()))
    assert applies_fused_rounding(x, bits, -torch.ones(8, 1), torch.ones(8, 1))
    assert not applies_fused_rounding(x, bits, None, torch.ones(1, 6))  # per column
    assert not applies_fused_rounding(x, bits, None, torch.ones(8))  # not broadcast along the rows
    assert not applies_fused_rounding(x, bits, -torch.ones(()), torch.ones(8, 1))  # lo and hi differ
    assert not applies_fused_rounding(x, torch.ones(8, 1), None, torch.ones(8, 1))  # bits per row
    assert not applies_fused_rounding(x.double(), bits, None, torch.ones(()))
    assert not applies_fused_rounding(x.t(), bits, None, torch.ones(()))  # not contiguous


@needs_compiler
def test_per_tensor_node_trains_on_the_values_eval_computes() -> None:
    """Training mode through the one-node path equals eval mode (`integer_grid`, what freeze stores) exactly, for
    random clamps and bits."""
    from fxquant.quantizer import LearnableQuantizer

    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        q = LearnableQuantizer(kind="activation", tensor_shape=(8, 1024), bits=8, min_bits=2, max_bits=8)
        x = torch.randn(8, 1024, generator=gen) * 3
        q.init_from_tensor(x)
        with torch.no_grad():
            q.hi.mul_(float(torch.rand((), generator=gen)) + 0.3)
            q.lo.mul_(float(torch.rand((), generator=gen)) + 0.3)
            q.bits_param.fill_(float(torch.rand((), generator=gen)))
        assert torch.equal(q.train()(x), q.eval()(x)), i


@needs_compiler
@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_learnable_quantizer_takes_the_one_node_path_on_the_cpu(kind: str, monkeypatch) -> None:  # noqa: ANN001
    """A per-tensor activation quantizer and a per-channel weight quantizer in training mode quantize through
    `fused_rounding`."""
    import fxquant.quantizer.learnable as learnable
    from fxquant.quantizer import LearnableQuantizer

    per_channel = kind == "weight"
    q = LearnableQuantizer(kind=kind, tensor_shape=(8, 1024), bits=4, min_bits=2, max_bits=8, mode="dither",
                           nonnegative=not per_channel, granularity="per_channel" if per_channel else "per_tensor",
                           channel_axis=0)
    x = torch.rand(8, 1024) - (0.5 if per_channel else 0.0)
    q.init_from_tensor(x)
    assert tuple(q.hi.shape) == ((8, 1) if per_channel else ())
    calls = []
    original = learnable.fused_rounding
    monkeypatch.setattr(learnable, "fused_rounding", lambda *a: calls.append(1) or original(*a))
    q.train()
    q(x).sum().backward()
    assert calls and q.hi.grad is not None and q.bits_param.grad is not None


@needs_compiler
def test_fused_rounding_is_torch_round_for_every_magnitude(monkeypatch) -> None:  # noqa: ANN001
    """Half to even at every magnitude (also where float spacing is 1/2, below 2^23) and the sign of zero kept:
    the kernel's forward is torch's, bit for bit."""
    monkeypatch.setattr(fused_cpu, "MIN_ELEMENTS", 1)
    u = torch.tensor([-0.3, -0.0, 0.0, 0.5, 1.5, 2.5, -2.5, 4194304.5, -4194305.5, 6000000.5, 8388607.5, 2.0**24 + 2,
                      1e30, -1e30, float("nan")] * 300)
    ours = fused_cpu.round_clamp_forward(u, 1.0, -float("inf"), float("inf"))
    ref = torch.round(u)
    same = (ours == ref) | (ours.isnan() & ref.isnan())
    assert bool(same.all()) and torch.equal(torch.signbit(ours), torch.signbit(ref))


@needs_compiler
def test_a_compiler_without_openmp_still_builds_a_single_threaded_kernel(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A compiler that rejects `-fopenmp` (Apple's clang) gets a kernel built without it: no warning, same values."""
    real = fused_cpu.compiler()[0]
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("FXQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_cpu.library() is not None
    x = torch.randn(64, 128)
    assert torch.equal(fused_cpu.round_clamp_forward(x, 0.25, -1.0, 1.0), torch.round(x.clamp(-1.0, 1.0) / 0.25) * 0.25)


def test_a_malformed_cc_warns_instead_of_failing(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("CC", '"gcc')
    with pytest.warns(fused_cpu.FusedKernelWarning, match="CC="):
        assert fused_cpu.library() is None


@needs_compiler
def test_double_backward_through_the_fused_kernel_says_how_to_get_it(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(fused_cpu, "MIN_ELEMENTS", 1)
    x = torch.randn(64, requires_grad=True)
    y = round_clamp(x, torch.tensor(0.25, requires_grad=True), torch.tensor(-1.0), torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="FXQ_FUSED_KERNELS=0"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@needs_compiler
def test_a_cached_library_of_another_abi_version_is_not_used(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A library whose ABI version is not the loader's is refused with a warning naming both versions."""
    monkeypatch.setenv("FXQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_cpu, "ABI_VERSION", fused_cpu.ABI_VERSION + 100)
    with pytest.warns(fused_cpu.FusedKernelWarning, match=r"has ABI version \d+, expected \d+"):
        assert fused_cpu.library() is None


@needs_compiler
def test_a_training_step_leaves_every_storage_resizable() -> None:
    """The one-node quantizers and the int32 bias read parameters as numpy copies, never `.numpy()` views (which
    would mark the storages not resizable for good: FSDP2 frees unsharded parameters and `freeze(inplace=True)`
    float weights by resizing their storage)."""
    import fxquant as fxq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4))
    x = torch.randn(4, 3, 8, 8)
    qm = fxq.prepare(model, x)
    fxq.calibrate(qm, [x])
    qm.train()
    qm(x).sum().backward()
    for p in qm.parameters():
        p.detach().untyped_storage().resize_(0)  # raises "Trying to resize storage that is not resizable"


@needs_compiler
@pytest.mark.parametrize("fused", [True, False], ids=["one node", "torch ops"])
def test_a_second_derivative_through_a_per_channel_weight_quantizer(fused: bool, monkeypatch) -> None:  # noqa: ANN001
    """A gradient penalty (`create_graph=True`, then a backward of the gradient) through a training-mode per-channel
    weight quantizer works on the one-node path and gives the torch path's values."""
    from fxquant.quantizer import LearnableQuantizer

    monkeypatch.setenv("FXQ_FUSED_KERNELS", "1" if fused else "0")
    fused_cpu.reset()  # the setting is read once per process
    torch.manual_seed(0)
    q = LearnableQuantizer(kind="weight", tensor_shape=(8, 30), bits=4, min_bits=2, max_bits=8, symmetric=True,
                           granularity="per_channel", channel_axis=0, mode="ste")
    w = torch.randn(8, 30, requires_grad=True)
    q.init_from_tensor(w.detach())
    q.train()
    a = torch.randn(30, 5, requires_grad=True)
    (grad_a,) = torch.autograd.grad((q(w) @ a).square().sum(), a, create_graph=True)
    grad_a.square().sum().backward()
    assert a.grad is not None and q.hi.grad is not None and w.grad is not None
    if fused:
        monkeypatch.setenv("FXQ_FUSED_KERNELS", "0")
        fused_cpu.reset()  # the setting is read once per process
        w2, a2 = w.detach().clone().requires_grad_(True), a.detach().clone().requires_grad_(True)
        hi = q.hi.grad.clone()
        q.hi.grad = None
        (g2,) = torch.autograd.grad((q(w2) @ a2).square().sum(), a2, create_graph=True)
        g2.square().sum().backward()
        assert torch.allclose(a.grad, a2.grad, rtol=1e-5) and torch.allclose(hi, q.hi.grad, rtol=1e-4)


@needs_compiler
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
def test_a_nan_input_gets_no_gradient_and_an_infinite_clamp_no_warning(shapes: str) -> None:
    """A NaN element counts as outside the clamps (its input gradient is 0, as the torch path's mask has it), and a
    diverged (infinite) clamp computes quietly in the one-node path, as torch's ops do."""
    import warnings

    from fxquant.quantizer.numerics import GridConstants, fused_rounding

    x_shape, param_shape = SHAPES[shapes]
    k = GridConstants(min_bits=2.0, span=6.0, symmetric=False, clamp_grad_scale=0.01)
    x = torch.randn(x_shape)
    x.view(-1)[3] = float("nan")
    x.requires_grad_(True)
    hi = _params(param_shape, 1.5, True)
    with torch.no_grad():
        hi.view(-1)[-1] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fused_rounding(x, torch.tensor(0.4, requires_grad=True), _params(param_shape, -0.9, True), hi, k, True)
        y.sum().backward()
    assert x.grad is not None and x.grad.view(-1)[3] == 0.0


@needs_compiler
def test_per_row_node_trains_on_the_values_eval_computes() -> None:
    """A per-channel weight through the one-node path (the grid by `fxq_grid_rows`) equals eval mode (the torch
    ops of `integer_grid`, what freeze stores) exactly, for random clamps and bits, rows with a negative or zero
    clamp included."""
    from fxquant.quantizer import LearnableQuantizer

    gen = torch.Generator().manual_seed(1)
    for i in range(40):
        q = LearnableQuantizer(kind="weight", tensor_shape=(12, 40), bits=8, min_bits=2, max_bits=8,
                               granularity="per_channel", channel_axis=0, symmetric=True)
        w = torch.randn(12, 40, generator=gen)
        q.init_from_tensor(w)
        with torch.no_grad():
            q.hi.mul_(torch.rand(12, 1, generator=gen) + 0.2)
            q.hi[3] = -0.5
            q.hi[7] = 0.0
            q.bits_param.fill_(float(torch.rand((), generator=gen)))
        assert torch.equal(q.train()(w), q.eval()(w)), i


@needs_compiler
def test_the_grid_is_computed_once_per_parameter_update() -> None:
    """`grid_values` is kept while the parameters hold the same values and computed again after every kind of
    update: an in-place write, a fused optimizer step (which bumps no version counter) without the projection, a
    write through `.data`, `load_state_dict`, `set_bits`, a new parameter, new storage or dtype through `.data`."""
    from fxquant.quantizer import LearnableQuantizer

    q = LearnableQuantizer(kind="activation", tensor_shape=(4, 64), bits=8, min_bits=2, max_bits=8)
    x = torch.randn(4, 64)
    q.init_from_tensor(x)
    first = q.grid_values()
    assert first is not None and q.grid_values() is first
    saved = {k: v.clone() for k, v in q.state_dict().items()}

    def changed(before: object) -> object:
        now = q.grid_values()
        assert now is not None and now is not before
        assert float(now.step[0]) == float(q.integer_scale())  # the values eval uses
        return now

    with torch.no_grad():
        q.hi.mul_(0.5)
    grid = changed(first)
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        q.train()(x).pow(2).sum().backward()
        opt.step()
        grid = changed(grid)
        assert torch.equal(q.train()(x), q.eval()(x))
    q.lo.data.mul_(2.0)
    grid = changed(grid)
    q.load_state_dict(saved)
    grid = changed(grid)
    assert float(grid.step[0]) == float(first.step[0])
    q.set_bits(4)
    grid = changed(grid)
    assert grid.bits == 4.0
    q.hi = torch.nn.Parameter(q.hi.detach().clone() * 2)
    grid = changed(grid)
    q.hi.data = q.hi.data.clone() * 3  # the same parameter object on new storage
    changed(grid)
    q.lo.data = q.lo.data.double()  # a dtype change through `.data`: checked again, not read as float32
    assert q.grid_values() is None
    q.lo.data = q.lo.data.float()
    assert q.grid_values() is not None
    assert q.double().grid_values() is None  # not float32: the torch ops compute it


def test_the_grid_needs_lo_exactly_when_asymmetric() -> None:
    """`fused_cpu.grid_rows` refuses an asymmetric grid without `lo` (it reads `lo` in place) instead of reading
    from a null pointer."""
    from fxquant.quantizer.numerics import GridConstants, fused_rounding

    if fused_cpu.library() is None:
        pytest.skip("no fused kernel")
    k = GridConstants(min_bits=2.0, span=6.0, symmetric=False, clamp_grad_scale=0.01)
    with pytest.raises(ValueError, match="lo exactly when"):
        fused_rounding(torch.randn(8, 8), torch.tensor(0.5), None, torch.tensor(1.0), k, False)


@needs_compiler
def test_a_copy_computes_its_own_grid() -> None:
    """A deep copy or a pickle of a quantizer does not carry the original's cached grid, and a quantizer pickled
    without the cache (an older fxquant) loads and trains."""
    import copy
    import io

    from fxquant.quantizer import LearnableQuantizer

    q = LearnableQuantizer(kind="activation", tensor_shape=(4, 64), bits=8, min_bits=2, max_bits=8)
    x = torch.randn(4, 64)
    q.init_from_tensor(x)
    assert q.grid_values() is not None
    twin = copy.deepcopy(q)
    assert twin._grid_values is None  # not carried (it would be compared and found stale anyway)
    with torch.no_grad():
        twin.hi.mul_(0.25)
    assert float(twin.grid_values().step[0]) == float(twin.integer_scale()) != float(q.integer_scale())
    state = q.__getstate__()
    del state["_grid_values"]
    old = LearnableQuantizer.__new__(LearnableQuantizer)
    old.__setstate__(state)
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.train()(x), q.train()(x))
