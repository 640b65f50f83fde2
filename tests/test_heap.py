"""dist_quant.memory: the glibc settings that keep freed activations in the process (see its
module docstring), the environment's settings taking precedence, a fresh process in which repeated
batch-sized allocations stop faulting in new pages once it is applied, and the huge-page restart
of the command (its rules, and a real job that restarts once and says so in its log)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# -- huge pages: the command restarts itself once with glibc.malloc.hugetlb=1 -------------------
def test_huge_pages_environment_rules():
    env = memory.huge_pages_env({"PATH": "/bin"}, glibc=(2, 36), thp=True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc=(2, 36), thp=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"  # the user's kept
    for environ, glibc, thp in (({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), True),  # user's choice
                                ({"DIST_QUANT_HUGE_PAGES": "0"}, (2, 36), True),  # opted out
                                ({}, (2, 34), True),  # glibc before the tunable
                                ({}, None, True),  # not glibc
                                ({}, (2, 36), False)):  # the kernel offers no huge pages
        assert memory.huge_pages_env(environ, glibc=glibc, thp=thp) is None, (environ, glibc, thp)


def test_transparent_huge_page_setting(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert memory._thp_offered(str(f))
    f.write_text("always madvise [never]\n")
    assert not memory._thp_offered(str(f))
    assert not memory._thp_offered(str(tmp_path / "missing"))


@pytest.mark.skipif(memory.huge_pages_env({}) is None, reason="needs glibc >= 2.35 and transparent huge pages")
def test_the_command_restarts_once_with_huge_pages(tmp_path):
    """A real job as a user starts it: the restarted process kept every argument (its output and
    run dir are where they were asked for) and its log says huge pages are on; opted out, off."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import command, job_env, small_calib_file
    from tiny import corpus_text, make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=1)
    (tmp_path / "text.txt").write_text(corpus_text(20_000), encoding="utf-8")
    calib = small_calib_file(tmp_path / "calib.txt", tmp_path / "text.txt", 10_000)
    for mode, extra in (("on", {}), ("off", {"DIST_QUANT_HUGE_PAGES": "0"})):
        out, run = tmp_path / f"out_{mode}", tmp_path / f"run_{mode}"
        proc = subprocess.run(command([f"model.path={model}", "quant=rtn_w4a16", "quant.group_size=32",
                                       f"calib.path={calib}", "calib.num_samples=2", "calib.seq_len=32",
                                       f"output.dir={out}", f"runtime.run_dir={run}"]),
                              env=job_env(**extra), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "config.json").exists()
        log = (run / "rank0.log").read_text()
        assert f"runtime.heap=trim, malloc huge pages {mode}" in log, log[-2000:]
