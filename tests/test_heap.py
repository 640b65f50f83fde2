"""dist_quant.memory.keep_heap: the glibc settings that keep freed activations in the process
(see its module docstring), the environment's settings taking precedence, and a fresh process
in which repeated batch-sized allocations stop faulting in new pages once it is applied."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_quant import memory

GLIBC = memory._mallopt() is not None


def test_sets_the_thresholds_unless_the_environment_does(monkeypatch):
    calls = []

    def fake(param, value):
        calls.append((param, value))
        return 1

    fake.argtypes = None
    monkeypatch.setattr(memory, "_mallopt", lambda: fake)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    assert memory.keep_heap() is True
    assert calls == [(-3, 32 << 20), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert memory.keep_heap() is False and calls == []


CHILD = r"""
import resource, sys, torch
from dist_quant import memory
if sys.argv[1] == "keep":
    assert memory.keep_heap()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # warm up: the heap settles into the loop's pattern
    torch.empty(3_000_000).fill_(1.0)
before = faults()
for _ in range(20):  # 12 MB batches allocated, filled and freed, then trimmed as a loop would
    x = torch.empty(3_000_000); x.fill_(1.0); del x
    memory.trim_heap() if sys.argv[1] == "trim" else None
print(faults() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_a_kept_heap_stops_faulting_where_trimming_faults_every_time():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def child(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    kept, trimmed = child("keep"), child("trim")
    pages = 12_000_000 // 4096
    assert trimmed > 10 * pages  # every batch faulted in again
    assert kept < pages // 2, kept  # measured: none
