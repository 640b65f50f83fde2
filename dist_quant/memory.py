"""Host-memory hygiene for the layer loop.

The calibration activations are lists of per-batch tensors of a few to a few tens of MB.
glibc serves allocations below its (dynamic, up to 32 MB) mmap threshold from the heap, and
after a stage frees them the pages stay resident, fragmented between live blocks, so the
peak RSS of a run creeps up layer after layer. ``trim_heap()`` (glibc ``malloc_trim(0)``)
hands the free pages back to the kernel. On other C libraries it does nothing.

What it costs is mostly not the call (~25-70 ms of CPU for a heap of a few hundred MB) but
the page faults when the released pages are used again. Measured on SmolLM2's first 4
layers, 32 x 512 tokens (bench/README.md, "Solve speed and start-up"): called between
stages (16 calls) it released 2.25 GB, all faulted in again (961 k minor faults against
400 k without, sys time 3.35 s against 1.94 s) for a peak RSS of 0.914 GB against 0.945 GB;
called once per layer (4 calls) 664 k faults, sys 2.32 s, peak 0.919 GB: most of the saving
for well under half the cost. So the layer loop calls it once per layer.
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


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes: ``VmHWM`` of /proc/self/status (the
    high-water mark of this address space), else ``ru_maxrss``.

    Not ``ru_maxrss`` first: Linux carries the *old* address space's high-water mark across
    ``execve`` (fs/exec.c, ``setmax_mm_hiwater_rss`` in ``exec_mmap``), and Python's
    ``subprocess`` / torchrun start a child with vfork + exec, so a process started by a big
    parent reports the parent's peak. Measured on the SmolLM2 32 x 512 job: 2.20 GB by
    ``ru_maxrss`` when bench/run_all.py (holding the FP model it had just evaluated) started
    it, 0.79-0.94 GB by ``VmHWM`` or when started from a shell."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
