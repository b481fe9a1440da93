"""Keeping freed memory in the C allocator during CPU training loops (glibc only).

glibc gives a freed block back to the system when the free memory at the top of its heap exceeds a trim threshold
(twice the mmap threshold, which starts at 128 KiB and rises to the size of the largest freed mmapped block, at
most 32 MiB). A training step frees most of what it allocated, so with activations of a few hundred KiB every
step gave its buffers back and page-faulted them in again on the next one: ~730-1160 page faults per fine-tuning
step of a 40k-parameter CNN (~1 ms of a ~17 ms step; docs/decisions.md, "The grid in C, once per parameter
update"). `keep_freed_memory` frees one block of just under 32 MiB, which raises both thresholds through glibc's
own rule, as freeing any tensor of that size would: blocks up to that size then come from the heap and up to
twice that much free memory stays there between steps. Nothing else of the process's allocator changes (no
`mallopt`, which would switch glibc's adaptive thresholds off for good); other C libraries are left alone.
"""

from __future__ import annotations

import platform
import sys

import torch

KEEP_BYTES = 31 * 1024 * 1024
"""The block `keep_freed_memory` frees: below glibc's 32 MiB ceiling of the adaptive mmap threshold."""

_kept = False


def keep_freed_memory() -> bool:
    """On Linux with glibc, once per process: allocate and free a `KEEP_BYTES` tensor (never written, so no page is
    touched) so that glibc's mmap threshold rises to its size and its trim threshold to twice that. Returns whether
    it did (now or before)."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    block = torch.empty(KEEP_BYTES, dtype=torch.uint8)
    del block
    _kept = True
    return True
