"""Host-memory hygiene for the layer loop: transparent huge pages for the heap, trimmed once
per layer (``runtime.heap=trim``, the default), or a heap kept whole (``keep``).

**Huge pages** (:func:`huge_pages_or_reexec`): ``python -m dist_quant`` restarts itself once,
before any import of torch, with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc 2.35+:
malloc asks the kernel for transparent huge pages, ``madvise(MADV_HUGEPAGE)``, on its heap and
its mapped chunks), where the kernel offers them (``/sys/kernel/mm/transparent_hugepage/enabled``
not ``never``). A fresh 2 MiB page is one fault instead of 512, so the pages a trimmed heap
grows back cost little. SmolLM2 32 x 512 GPTQ, 1 rank, on a 2-core AMD EPYC VM (no AVX-512),
2026-12-04, ``/usr/bin/time``: trim without huge pages 104.8 s, 2.62 M minor faults, 11.5 s
system time, peak RSS 0.86 GB; **trim with huge pages 81.6 / 84.3 s, 0.61 / 0.35 M faults, 5.6 s
system, 1.10 / 0.86 GB** (two runs); keep without huge pages 93.1 / 84.8 s, 0.38 / 0.34 M, 3.9 s,
1.30 / 1.15 GB (this VM's speed varies by about 10 % from run to run). ``DIST_QUANT_HUGE_PAGES=0``
in the environment turns it off; a ``GLIBC_TUNABLES`` that already sets
``glibc.malloc.hugetlb`` is left as it is. Library use (``dist_quant.__main__.main`` called in
a process) never restarts anything.

The calibration activations are lists of per-batch tensors of a few to a few tens of MB,
allocated and freed at every stage. Whatever memory the process hands back to the kernel
has to be faulted in again (zeroed pages, and in a virtual machine whose free pages are
reported to the host — virtio-balloon free page reporting, as on this project's machines —
each fault is a trip to the hypervisor: 0.75 s per GiB of fresh pages measured here).
``runtime.heap=keep``: :func:`keep_heap` tells glibc, once per process (``python -m dist_quant``
calls it before any work):

* ``M_MMAP_THRESHOLD`` 32 MiB, fixed: allocations below it come from the heap and are
  reused (a batch's tensors are below it for the usual batch sizes); larger ones (weights,
  Hessians) are mapped and unmapped as before, so they never pin heap memory;
* ``M_TRIM_THRESHOLD`` 2 GiB: ``free`` does not give the top of the heap back.

``runtime.heap=trim`` (the default again since the huge pages, 2026-12-04; ``keep`` was the
default on 2026-12-03) calls ``malloc_trim(0)`` once per layer (:func:`trim_heap`).
Measured without huge pages on the SmolLM2 32 x 512 GPTQ job, 1 rank, back to back, on the
AVX-512 machine of 2026-12-03 (bench/README.md): trim per
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
import sys

HUGE_PAGES_ENV = "DIST_QUANT_HUGE_PAGES"
HUGETLB = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def _thp_offered(path: str = THP_SETTING) -> bool:
    try:
        with open(path) as fh:
            return "[never]" not in fh.read()
    except OSError:
        return False


_DETECT = object()


def huge_pages_env(environ=None, glibc=_DETECT, thp=_DETECT) -> dict | None:
    """The environment to restart the command with for huge pages, or None when it already has
    them, cannot have them, or is told not to (see the module docstring). ``glibc`` (a version
    tuple, None: another C library) and ``thp`` default to this machine's."""
    env = dict(os.environ if environ is None else environ)
    glibc = _glibc_version() if glibc is _DETECT else glibc
    thp = _thp_offered() if thp is _DETECT else thp
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(HUGE_PAGES_ENV, "1") == "0" or HUGETLB in tunables or glibc is None or glibc < (2, 35) or not thp:
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB}=1" if tunables else f"{HUGETLB}=1"
    return env


def huge_pages_or_reexec() -> None:
    """Restart this command (same interpreter, flags and arguments) with huge pages for malloc,
    once; call it first thing in the command's entry point, before torch is imported."""
    env = huge_pages_env()
    if env is None or not getattr(sys, "orig_argv", None):
        return
    env[HUGE_PAGES_ENV] = "0"  # once: a restarted process never restarts again
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def huge_pages_on() -> bool:
    """Whether this process's malloc was started with huge pages (for the log)."""
    return f"{HUGETLB}=1" in os.environ.get("GLIBC_TUNABLES", "") and (_glibc_version() or (0, 0)) >= (2, 35)


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
