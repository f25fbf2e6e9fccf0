"""glibc malloc settings for CPU inference processes.

glibc serves allocations above its mmap threshold (128 KiB at start) with a fresh `mmap` and
returns them to the OS on free, so every such tensor pays page faults again on first touch. A
decode step allocates hundreds of activations of that size (a 64 x 512 fp32 block is 128 KiB):
measured on the serving benchmark model, a 128 KiB `copy_` took ~345 us with mmap-backed blocks
and a few us once freed memory was kept for reuse. Raising the mmap and trim thresholds keeps
freed blocks in the heap, the same effect as `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`
set before start (which a Ray worker cannot do for itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the reusable heap (glibc caps the mmap threshold at 32 MiB on
# 64-bit); freed heap memory beyond the trim threshold goes back to the OS.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Applies the thresholds once per process; returns False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("no glibc mallopt here; allocator settings left as they are")
        return False
    mmap_ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return mmap_ok and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
