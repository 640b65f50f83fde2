"""Host-memory hygiene for the layer loop.

The calibration activations are lists of per-batch tensors of a few to a few tens of MB.
glibc serves allocations below its (dynamic, up to 32 MB) mmap threshold from the heap, and
after a stage frees them the pages stay resident, fragmented between live blocks, so the
peak RSS of a run creeps up layer after layer. ``trim_heap()`` (glibc ``malloc_trim(0)``)
hands the free pages back to the kernel; the layer loop calls it between stages. It costs
well under a millisecond per call. On other C libraries it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim_heap() -> bool:
    """Return freed heap pages to the OS; True if the C library supports it."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
