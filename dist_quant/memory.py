"""Host-memory hygiene for the layer loop: keep the heap, do not trim it.

The calibration activations are lists of per-batch tensors of a few to a few tens of MB,
allocated and freed at every stage. Whatever memory the process hands back to the kernel
has to be faulted in again (zeroed pages, and in a virtual machine whose free pages are
reported to the host — virtio-balloon free page reporting, as on this project's machines —
each fault is a trip to the hypervisor: 0.75 s per GiB of fresh pages measured here).
:func:`keep_heap` therefore tells glibc, once per process (``python -m dist_quant`` calls it
before any work):

* ``M_MMAP_THRESHOLD`` 32 MiB, fixed: allocations below it come from the heap and are
  reused (a batch's tensors are below it for the usual batch sizes); larger ones (weights,
  Hessians) are mapped and unmapped as before, so they never pin heap memory;
* ``M_TRIM_THRESHOLD`` 2 GiB: ``free`` does not give the top of the heap back.

``runtime.heap=trim`` instead calls ``malloc_trim(0)`` once per layer (:func:`trim_heap`; the
default until 2026-12-03), for the lowest peak RSS when page faults are cheap.
Measured on the SmolLM2 32 x 512 GPTQ job, 1 rank, back to back (bench/README.md): trim per
layer 83.6 s, 3.59 M minor faults, 12.3 s system time, peak RSS 1.05 GB; :func:`keep_heap`
77.3 s, 0.42 M faults, 4.3 s, 1.36 GB (the same thresholds from the environment: 0.41 M,
1.34 GB; neither trim nor thresholds: 0.80 M faults, 1.21 GB). ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` in the environment take precedence (nothing is changed then).
On other C libraries both functions do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.lru_cache(maxsize=None)
def _glibc(symbol: str):
    """The C library's ``symbol``, or None where it has none (musl, macOS: nothing to tune or trim)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), symbol) if name else None
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    return _glibc("malloc_trim")


def _mallopt():
    return _glibc("mallopt")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: 2 GiB


def keep_heap() -> bool:
    """Keep freed memory in the process (see the module docstring); True if glibc took it."""
    fn = _mallopt()
    if fn is None or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


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
