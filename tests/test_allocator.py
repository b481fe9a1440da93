"""`fxquant.allocator.keep_freed_memory`: a training-like allocation pattern stops page-faulting on glibc."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PATTERN = r"""
import resource, sys, torch
from fxquant.allocator import keep_freed_memory

def faults_per_round(rounds=12):
    # a step's worth of activation-sized buffers (128 x 256 KiB = 32 MiB, written), all freed at the end of the step
    for _ in range(3):
        blocks = [torch.ones(64 * 1024) for _ in range(128)]
        del blocks
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        blocks = [torch.ones(64 * 1024) for _ in range(128)]
        del blocks
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / rounds

before = faults_per_round()
assert keep_freed_memory()
print(before, faults_per_round())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_buffers_stay_in_the_heap_after_keep_freed_memory() -> None:
    """In a fresh process glibc usually gives a step's freed buffers back and faults them in again every step (~8000
    page faults for 32 MiB); after `keep_freed_memory` they stay in the heap."""
    out = subprocess.run([sys.executable, "-c", PATTERN], capture_output=True, text=True, check=True, timeout=120)
    before, after = (float(v) for v in out.stdout.split())
    # `before` is ~8000 in most fresh processes (none when importing torch happened to raise glibc's thresholds)
    assert after < 50, (before, after)
