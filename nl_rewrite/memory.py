"""Keep freed memory in the process instead of handing it back to the kernel after every large tensor.

glibc serves each allocation above its mmap threshold (a few MB once tuned) with a fresh ``mmap`` and unmaps it on
free, so every vocabulary-sized tensor of the Evaluator (8 × 31 × 49,152 floats, ~50 MB) costs a round of page faults
the next time one is made: a cold default run took 81 M minor page faults and 224 s of system time. With the mmap
threshold raised and trimming off, freed blocks are reused from the heap. It is a process-wide setting, so only the
command-line entry point calls it (a library must not change its host's allocator); elsewhere than glibc it does
nothing. ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the environment do the same for any process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""mallopt parameters, from glibc's malloc.h."""
MMAP_THRESHOLD = 1 << 30
"""Allocations below 1 GiB come from the heap (glibc's ceiling for this value is HEAP_MAX_SIZE/2 on 64-bit)."""


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if it took effect."""
    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    log.debug("glibc keeps freed memory in the heap: %s", ok)
    return ok
