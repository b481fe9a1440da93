"""The fused CPU kernels of a quantizer's straight-through round-clamp: one pass forward, one backward.

`numerics._RoundClamp` with one clamp pair makes five memory passes over the activation forward and about
as many backward; on the CPU those passes, not arithmetic, were most of a fine-tuning step's overhead over a
float step (docs/decisions.md, "A fused CPU kernel for per-tensor quantizers"). `round_clamp.c` does each
direction in one pass, for one clamp pair per tensor or one per row (a weight's output channels); this
module builds it with the system C compiler on first use, caches the shared
library, and calls it through `ctypes` with the tensors' data pointers.

Why not torch's own tools: `torch.utils.cpp_extension` compiles torch's C++ headers (about a minute on first
use, and it needs ninja), and `torch.compile` compiles a kernel per shape and guards every call; the C file has
no dependency and builds in well under a second. Where it cannot be used (no C compiler, another device or
dtype, a non-contiguous tensor, `FXQ_FUSED_KERNELS=0`), the torch ops compute the same values: the forward
is bitwise the same, the gradients the same up to the order of float sums.

Environment: `FXQ_FUSED_KERNELS=0` turns the kernel off (read on the first use in a process, and again after
`reset()`: a training step asks for the library ~100 times); `CC` names the compiler (default: see `compilers`);
`FXQ_CACHE_DIR` moves the cache (default `~/.cache/fxquant`).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor


class FusedKernelWarning(UserWarning):
    """The fused CPU kernel could not be built; the torch ops compute the same values, more slowly."""


SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "round_clamp.c")
FLAGS = ("-O3", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp")
"""`-fno-trapping-math` lets the selects vectorise (no value changes); never `-ffast-math` (the rounding relies
on IEEE float arithmetic); `-ffp-contract=off`: no fused multiply-adds, so the grid is numpy's float32 arithmetic
operation for operation."""
NATIVE_FLAGS = ("-march=native",)
"""Tried first: this CPU's widest vectors (AVX-512 halves the backward's time against SSE2's on an Intel Xeon).
The cache key holds the CPU's identity, so a home directory shared by different machines keeps one library
per CPU; a compiler that rejects the flag builds without it."""
ABI_VERSION = 11
ASYMMETRIC, NARROW, FULL_RANGE = 0, 1, 2
"""The code ranges of a grid as round_clamp.c numbers them (`numerics.GridConstants.code_range`)."""
MIN_ELEMENTS = 4096
"""Smaller tensors take the torch path in `numerics._RoundClamp` (the call's fixed cost is larger than the
passes it saves there); `numerics.fused_rounding`, which also replaces the grid's ops, takes any size."""

_library: Optional[ctypes.CDLL] = None
_tried = False
_enabled: Optional[bool] = None


def enabled() -> bool:
    """Whether the environment allows the fused kernel (`FXQ_FUSED_KERNELS=0` turns it off), as it was on the first
    call after import or `reset()` (reading the environment costs ~2 us, on the path of every quantizer call)."""
    global _enabled
    if _enabled is None:
        _enabled = enabled_in_environment()
    return _enabled


def enabled_in_environment() -> bool:
    """Whether `FXQ_FUSED_KERNELS` in the environment now allows the fused kernel."""
    return os.environ.get("FXQ_FUSED_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def compilers() -> List[List[str]]:
    """The C compiler commands to try, in order: `$CC` alone when set, else those that exist of the one Python
    was built with, `gcc`, `cc` and `clang` (gcc before cc and clang: its OpenMP is the libgomp torch loads)."""
    if os.environ.get("CC"):
        return [shlex.split(os.environ["CC"])]
    found: List[List[str]] = []
    for command in filter(None, [sysconfig.get_config_var("CC") or "", "gcc", "cc", "clang"]):
        words = shlex.split(command)
        if words and shutil.which(words[0]) is not None and words not in found:
            found.append(words)
    if found and "clang" in os.path.basename(found[0][0]) and ["gcc"] in found:
        found.remove(["gcc"])
        found.insert(0, ["gcc"])
    return found or [["cc"]]


def compiler() -> List[str]:
    """The first command `compilers()` tries."""
    return compilers()[0]


def cache_dir() -> str:
    """Where built kernels are kept: `$FXQ_CACHE_DIR`, else `~/.cache/fxquant`."""
    return os.environ.get("FXQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxquant")


def cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags where Linux lists them."""
    identity = [platform.machine(), platform.system(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    identity.append(line.strip())
                elif not line.strip() and len(identity) > 3:
                    break  # the first processor's entry is enough
    except OSError:
        pass
    return "\n".join(identity)


def _library_path(source: bytes, command: List[str]) -> str:
    key = hashlib.sha256(source + repr((command, FLAGS, NATIVE_FLAGS, cpu_identity())).encode()).hexdigest()
    return os.path.join(cache_dir(), "kernels", f"round_clamp-{key[:16]}.so")


def build(path: str, command: List[str]) -> None:
    """Compile `round_clamp.c` into the shared library `path`: for this CPU and with OpenMP where the compiler
    can, else without `-march=native`, else single-threaded without OpenMP (a compiler without it, such as Apple's
    clang: the pragmas are then ignored). Atomic: concurrent processes may race."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    without_openmp = tuple(f for f in FLAGS if f != "-fopenmp")
    attempts = [(*FLAGS, *NATIVE_FLAGS), FLAGS, (*without_openmp, *NATIVE_FLAGS), without_openmp]
    try:
        for i, flags in enumerate(attempts):
            try:
                subprocess.run([*command, *flags, SOURCE, "-o", tmp], check=True, capture_output=True, text=True,
                               timeout=120)
                break
            except subprocess.CalledProcessError:
                if i == len(attempts) - 1:
                    raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    if lib.fxq_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has ABI version {lib.fxq_abi_version()}, expected {ABI_VERSION}")
    ptr, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.fxq_round_clamp_forward.argtypes = [ptr, ptr, i64, f32, f32, f32, c_int]
    lib.fxq_round_clamp_forward.restype = None
    lib.fxq_round_clamp_backward.argtypes = [ptr, ptr, ptr, i64, f32, f32, f32, ptr, c_int]
    lib.fxq_round_clamp_backward.restype = None
    lib.fxq_grid_rows.argtypes = [ptr, ptr, i64, ptr, f32, f32, f32, c_int, ptr, ptr, ptr, ptr]
    lib.fxq_grid_rows.restype = c_int
    lib.fxq_grid_rows_backward.argtypes = [ptr, ptr, ptr, ptr, i64, f32, f32, c_int, ctypes.c_double, ptr, ptr, ptr,
                                           ctypes.c_double, ctypes.c_double]
    lib.fxq_grid_rows_backward.restype = ctypes.c_double
    lib.fxq_round_bias.argtypes = [ptr, i64, f32, ptr, i64, ptr]
    lib.fxq_quantize_forward.argtypes = [ptr, ptr, i64, i64, ptr, c_int]
    lib.fxq_quantize_forward.restype = None
    lib.fxq_quantize_backward.argtypes = [ptr, ptr, ptr, i64, i64, ptr, f32, f32, c_int, ctypes.c_double, ptr, ptr, ptr,
                                          ptr, ctypes.c_double, ctypes.c_double, ptr, c_int, c_int]
    lib.fxq_quantize_backward.restype = None
    lib.fxq_round_bias.restype = c_int
    lib.fxq_noise_forward.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ctypes.c_uint64, c_int]
    lib.fxq_noise_forward.restype = None
    lib.fxq_noise_backward.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_uint64, ptr, c_int]
    lib.fxq_noise_backward.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, built on first use; None when it is turned off or cannot be built (then a
    warning says why, once per process, and the torch path is used)."""
    global _library, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    _tried = True
    failures: List[str] = []
    try:
        commands = compilers()
        with open(SOURCE, "rb") as fh:
            source = fh.read()
    except ValueError as exc:  # an unbalanced quote in $CC
        commands, failures = [], [f"CC={os.environ.get('CC')!r}: {exc}"]
    except OSError as exc:  # the package lacks its C file
        commands, failures = [], [str(exc)]
    for command in commands:
        try:
            path = _library_path(source, command)
            if not os.path.exists(path):
                build(path, command)
            _library = _load(path)
            return _library
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            detail = exc.stderr.strip().splitlines()[-1] if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else exc
            failures.append(f"{' '.join(command)!r}: {detail}")
    warnings.warn(
        f"fxquant could not build its fused CPU quantizer kernel ({'; '.join(failures)}); fine-tuning on the CPU "
        "uses torch ops instead (same values, slower steps). Install a C compiler (e.g. gcc) or name one in CC; "
        "FXQ_FUSED_KERNELS=0 silences this.",
        FusedKernelWarning, stacklevel=2,
    )
    _library = None
    return _library


def reset() -> None:
    """Forget the loaded library and the environment's setting, so the next `library()` call reads
    `FXQ_FUSED_KERNELS` and looks again (after a change of the environment)."""
    global _library, _tried, _enabled
    _library, _tried, _enabled = None, False, None


def applies(x: Tensor, smallest: Optional[int] = None) -> bool:
    """Whether the fused kernel can quantize `x`: float32, contiguous, on the CPU, at least `smallest` elements
    (default `MIN_ELEMENTS`), available."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
        and x.numel() >= (MIN_ELEMENTS if smallest is None else smallest)
        and library() is not None
    )


def round_clamp_forward(x: Tensor, step: float, lo: float, hi: float) -> Tensor:
    """`step * round(clamp(x, lo, hi) / step)`; `x` must pass `applies`."""
    lib = library()
    assert lib is not None
    out = torch.empty_like(x)
    lib.fxq_round_clamp_forward(x.data_ptr(), out.data_ptr(), x.numel(), step, lo, hi, torch.get_num_threads())
    return out


def round_clamp_backward(grad: Tensor, x: Tensor, step: float, lo: float, hi: float) -> Tuple[Tensor, Tensor]:
    """`(grad_in, sums)` of `round_clamp_forward(x, step, lo, hi)`: `grad` where `lo <= x <= hi` (0 elsewhere)
    and, in float64, the sums of `grad` where `x < lo` and where `x > hi`, of `grad_in * (u - round(u))` with
    `u = clamp(x, lo, hi) / step`, and of `grad_in ** 2`."""
    lib = library()
    assert lib is not None
    grad = grad.contiguous()
    grad_in = torch.empty_like(x)
    sums = torch.empty(4, dtype=torch.float64)
    lib.fxq_round_clamp_backward(
        grad.data_ptr(), x.data_ptr(), grad_in.data_ptr(), x.numel(), step, lo, hi, sums.data_ptr(),
        torch.get_num_threads(),
    )
    return grad_in, sums


GRID_ARRAYS = ("lo_v", "ratio", "step", "zero_point", "lo_grid", "hi_grid", "hi_free", "lo_free")
"""The rows of `grid_rows`' array, in order (round_clamp.c's enum)."""


class GridScratch:
    """The buffers `grid_rows` writes into for one quantizer (a copy of the parameters' values, the grid, B and L),
    allocated once with their addresses, so that a call that finds the parameters unchanged allocates nothing.
    Copies and pickles make their own buffers (the addresses are this object's)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.values = np.empty(1 + 2 * rows, dtype=np.float32)
        self.grid = np.empty((len(GRID_ARRAYS), rows), dtype=np.float32)
        self.bits_levels = np.empty(2, dtype=np.float32)
        self.addresses = (int(self.values.ctypes.data), int(self.grid.ctypes.data), int(self.bits_levels.ctypes.data))

    def __reduce__(self) -> Tuple[type, Tuple[int]]:
        return (GridScratch, (self.rows,))


def grid_rows(hi: Tensor, lo: Optional[Tensor], bits_param: Tensor, min_bits: float, span: float, min_step: float,
              code_range: int, previous: Optional[int], scratch: Optional[GridScratch] = None,
              ) -> Optional[Tuple[np.ndarray, np.ndarray, float, float]]:
    """`(grid, values, B, L)`: the training grid of clamps `hi` and `lo` (one value per row or for the tensor; `lo`
    None when symmetric; `code_range`: `numerics.GridConstants.code_range`) at the integer bits of the one-element
    `bits_param`, as round_clamp.c's `fxq_grid_rows`
    computes it (`grid` holds the `GRID_ARRAYS`, one float32 row each), and a copy of the parameters' values; or None
    when they are bit for bit those at address `previous` (the `values` of an earlier call with as many rows, kept
    alive by the caller): its grid still holds.
    `scratch` (as many rows) holds the buffers the call writes into; the arrays returned are new.
    The tensors must be contiguous float32 on the CPU (`numerics.applies_grid_values`; they are read in place) and
    the library loaded."""
    lib = library()
    if lib is None or (lo is None) != (code_range != ASYMMETRIC):
        raise ValueError("grid_rows needs the fused kernel library and lo exactly when the grid is asymmetric")
    rows = hi.numel()
    if scratch is None or scratch.rows != rows:
        scratch = GridScratch(rows)
    values_address, grid_address, bits_levels_address = scratch.addresses
    changed = lib.fxq_grid_rows(
        hi.data_ptr(), None if lo is None else lo.data_ptr(), rows, bits_param.data_ptr(), min_bits, span, min_step,
        code_range, previous, values_address, grid_address,
        bits_levels_address,
    )
    if not changed:
        return None
    return scratch.grid.copy(), scratch.values.copy(), float(scratch.bits_levels[0]), float(scratch.bits_levels[1])


def quantize_forward(x: Tensor, grid_address: int, rows: int) -> Tensor:
    """round_clamp.c's `fxq_quantize_forward`: `x` (which must pass `applies`, with `rows` dividing its elements
    along its first axis) rounded and clamped on the grid at `grid_address` (`grid_rows`' array of `rows` columns,
    kept alive by the caller): one step and clamp pair for the tensor when `rows` is 1, else one per row."""
    lib = library()
    assert lib is not None
    out = torch.empty_like(x)
    lib.fxq_quantize_forward(x.data_ptr(), out.data_ptr(), rows, x.numel() // rows, grid_address, torch.get_num_threads())
    return out


def quantize_backward(grad: Tensor, x: Tensor, grid_address: int, rows: int, levels: float, min_step: float,
                      code_range: int, clamp_grad_scale: float, draws: Optional[Tensor], d_hi: Tensor,
                      d_lo: Optional[Tensor], d_bits: Optional[Tensor], span: float, chain: bool,
                      ) -> Tuple[Tensor, Optional[np.ndarray]]:
    """round_clamp.c's `fxq_quantize_backward` of `quantize_forward(x, grid_address, rows)`: `(grad_in, sums)`. With
    `chain` the kernel's sums go through the grid in the same call (`grid_rows_backward` with `draws`, writing `d_hi`,
    `d_lo` and `d_bits`) and `sums` is None; without it nothing is written but `grad_in`, and `sums` (float64, shape
    `(rows, 4)`) is for the caller to chain."""
    lib = library()
    assert lib is not None
    grad = grad.contiguous()
    grad_in = torch.empty_like(x)
    sums = torch.empty((rows, 4), dtype=torch.float64)
    lib.fxq_quantize_backward(
        grad.data_ptr(), x.data_ptr(), grad_in.data_ptr(), rows, x.numel() // rows, grid_address, levels, min_step,
        code_range, clamp_grad_scale, None if draws is None else draws.data_ptr(), d_hi.data_ptr(),
        None if d_lo is None else d_lo.data_ptr(), None if d_bits is None else d_bits.data_ptr(), LN2, span,
        sums.data_ptr(), int(chain), torch.get_num_threads(),
    )
    return grad_in, None if chain else sums.numpy()


def noise_forward(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, seed: int) -> Tensor:
    """round_clamp.c's `fxq_noise_forward`: `clamp(x, lo, hi) + step * eps`, `eps` uniform in [-1/2, 1/2) from
    `seed` (0 <= seed < 2^64) and each element's index. `x` must pass `applies`; `step`, `lo` and `hi` are contiguous
    float32 CPU tensors of `rows` values each (1: one pair for the tensor; else one per row of `x`'s first axis)."""
    lib = library()
    assert lib is not None
    out = torch.empty_like(x)
    rows = step.numel()
    lib.fxq_noise_forward(x.data_ptr(), out.data_ptr(), rows, x.numel() // rows, step.data_ptr(), lo.data_ptr(),
                          hi.data_ptr(), seed, torch.get_num_threads())
    return out


def noise_backward(grad: Tensor, x: Tensor, lo: Tensor, hi: Tensor, seed: int) -> Tuple[Tensor, Tensor]:
    """The backward of `noise_forward` with the same `seed` (the draws made again): `(grad_in, sums)`, `grad_in`
    being `grad` where `lo <= x <= hi` and `sums` (float64, `(rows, 3)`) each row's sums of `grad` below `lo`, above
    `hi`, and of `grad * eps`."""
    lib = library()
    assert lib is not None
    grad = grad.contiguous()
    grad_in = torch.empty_like(x)
    rows = lo.numel()
    sums = torch.empty((rows, 3), dtype=torch.float64)
    lib.fxq_noise_backward(grad.data_ptr(), x.data_ptr(), grad_in.data_ptr(), rows, x.numel() // rows, lo.data_ptr(),
                           hi.data_ptr(), seed, sums.data_ptr(), torch.get_num_threads())
    return grad_in, sums


LN2 = math.log(2.0)
"""ln 2 as Python computes it, for the bits' gradient in C (the same double as `math.log(2.0)` there)."""


def grid_rows_backward(sums: np.ndarray, draws: Optional[Tensor], extra: Optional[np.ndarray], grid: np.ndarray,
                       levels: float, min_step: float, code_range: int, clamp_grad_scale: float, d_hi: Tensor,
                       d_lo: Optional[Tensor], d_bits: Optional[Tensor], span: float) -> float:
    """round_clamp.c's `fxq_grid_rows_backward`: writes the clamps' gradients into `d_hi` and `d_lo` (float32,
    contiguous, one value per row of `grid`; `d_lo` None: not wanted) and the one-element bits parameter's into
    `d_bits` (None: not wanted; `span`: the bit range, max - min) from the round-clamp backward's `sums` (float64, 4
    per row) and the dither (`draws`: a float32 Gaussian per row; or `extra`: the dither per row in float64; neither:
    none); returns the gradient of the levels summed over the rows."""
    lib = library()
    assert lib is not None and sums.dtype == np.float64 and sums.flags.c_contiguous
    value: float = lib.fxq_grid_rows_backward(
        sums.ctypes.data, None if draws is None else draws.data_ptr(), None if extra is None else extra.ctypes.data,
        grid.ctypes.data, grid.shape[1], levels, min_step, code_range, clamp_grad_scale, d_hi.data_ptr(),
        None if d_lo is None else d_lo.data_ptr(), None if d_bits is None else d_bits.data_ptr(), LN2, span,
    )
    return value


def round_bias(bias: Tensor, input_scale: float, weight_scale_address: int, weight_scales: int) -> Tensor:
    """round_clamp.c's `fxq_round_bias`: the float32 bias (contiguous, on the CPU) rounded to the int32 grid of
    `input_scale * weight_scale` (`weight_scales` float32 weight scales at `weight_scale_address`, kept alive by the
    caller: one, or one per element), or the bias itself when a code would not fit in int32. The library must be
    loaded."""
    lib = library()
    assert lib is not None
    out = torch.empty_like(bias)
    lib.fxq_round_bias(bias.data_ptr(), bias.numel(), input_scale, weight_scale_address, weight_scales, out.data_ptr())
    return out
