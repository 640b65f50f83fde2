"""Rank failure with real processes started the way a scheduler (srun) starts them: no
launcher agent stops the other ranks, so dist_quant itself must. Rank 1 raises, is SIGKILLed,
or hangs after layer 0 (``DIST_QUANT_TEST_FAIL``); every rank must exit nonzero within a
bound, rank 0 must show the cause, and only ``<out>.partial`` may exist.

Also: more ranks than work (3 ranks, 1 layer, 2 calibration samples: rank 0 gets none).
The jobs start together to share their start-up time."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ranks, wait_all  # noqa: E402
from tiny import WIKI, make_tiny_model  # noqa: E402

HANG_TIMEOUT_S = 20  # runtime.timeout_s of the hang job (also bounds its rendezvous under load)
BOUND_S = 30  # failure -> every rank gone (measured: a few seconds)


def overrides(model: Path, calib: Path, base: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
            "quant.group_size=32", f"output.dir={base / 'out'}", f"runtime.run_dir={base / 'run'}", *extra]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("failure")
    calib = WIKI
    model2 = make_tiny_model(root / "model2", layers=2)
    model1 = make_tiny_model(root / "model1", layers=1)
    started = {}
    for mode in ("raise", "kill", "hang"):
        base = root / mode
        base.mkdir()
        extra = (f"runtime.timeout_s={HANG_TIMEOUT_S}",) if mode == "hang" else ()
        started[mode] = (base, ranks(2, overrides(model2, calib, base, *extra), base,
                                     DIST_QUANT_TEST_FAIL=f"{mode}:1:0"))
    base = root / "three"
    base.mkdir()
    started["three"] = (base, ranks(3, overrides(model1, calib, base, "calib.num_samples=2"), base))
    procs = [p for _, ps in started.values() for p in ps]
    ends = iter(wait_all(procs, 500))
    return {mode: (base, ps, [next(ends) for _ in ps]) for mode, (base, ps) in started.items()}


def injected_at(base: Path) -> float:
    text = (base / "run" / "rank1.log").read_text()
    return float(re.search(r"test hook: \w+ on rank 1 after layer 0 \(t=([\d.]+)\)", text).group(1))


def check_failed_job(base: Path, procs, ends, bound: float) -> tuple[str, float]:
    out0 = (base / "out0.txt").read_text()
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    elapsed = max(ends) - injected_at(base)
    assert elapsed < bound, f"ranks took {elapsed:.1f} s to stop"
    assert not (base / "out").exists() and (base / "out.partial").is_dir()
    print(f"{base.name}: every rank exited {elapsed:.1f} s after the failure; codes "
          f"{[p.returncode for p in procs]}")
    return out0, elapsed


def test_rank_raises(jobs):
    base, procs, ends = jobs["raise"]
    out0, _ = check_failed_job(base, procs, ends, BOUND_S)
    assert [p.returncode for p in procs] == [1, 1]
    assert "rank 1 failed: RuntimeError: test-injected failure on rank 1 after layer 0" in out0
    log1 = (base / "run" / "rank1.log").read_text()
    assert "Traceback" in log1 and "test-injected failure" in log1  # the error with its traceback
    assert "rank 1 failed" in (base / "run" / "rank0.log").read_text()


def test_rank_sigkilled(jobs):
    base, procs, ends = jobs["kill"]
    out0, _ = check_failed_job(base, procs, ends, BOUND_S)
    assert procs[1].returncode == -9 and procs[0].returncode == 1
    assert "a collective failed on rank 0" in out0


def test_rank_hangs(jobs):
    base, procs, ends = jobs["hang"]
    out0, elapsed = check_failed_job(base, procs, ends, HANG_TIMEOUT_S + BOUND_S)
    assert elapsed >= HANG_TIMEOUT_S - 1  # stopped by the collective timeout, not before
    assert "Timed out" in out0 or "timed out" in out0.lower()
    assert "stopping rank 1" in (base / "run" / "rank1.log").read_text()  # the watchdog ended it


def test_more_ranks_than_work(jobs):
    base, procs, _ = jobs["three"]
    assert [p.returncode for p in procs] == [0, 0, 0], (base / "out0.txt").read_text()[-3000:]
    out = base / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3  # every rank wrote a part
    names = set()
    for f in files:
        tensors = load_file(str(out / f))
        names |= set(tensors)
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert names == set(index["weight_map"])
    assert "this rank: 0 samples" in (base / "run" / "rank0.log").read_text()
