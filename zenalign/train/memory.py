"""Keep the memory a CPU training step frees for the next step.

A step allocates its activations and gradients (megabytes each), frees them at the end, and
allocates the same sizes again in the next step. glibc's malloc hands large blocks back to the
operating system when they are freed (``munmap``, or trimming the top of the heap), so every step
touches fresh pages again: thousands of page faults per step, each a trap into the kernel and a
page of zeroes. Raising the two thresholds that decide this keeps freed memory inside the process
for reuse, as jemalloc and tcmalloc (the allocators recommended for PyTorch on CPU) do by design.

The process's resident memory then stays at its peak between steps instead of shrinking; the peak
itself does not grow. What it saves is the page faults, which weigh most where steps are short:
small models, and bf16 more than fp32 (measurements: docs/performance-notes.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: blocks above it still get their own mapping
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept up to this much

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once). False, with nothing changed,
    where the C library is not glibc (macOS, Windows, musl); False too if glibc refuses a value
    (it accepts both on every 64-bit build: 32 MiB is its own ceiling for the mmap threshold)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl also has mallopt, as a no-op
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.debug("mallopt refused the thresholds; the allocator is left as it was")
        return False
    _done = True
    return True
