"""Rank invariance on any world size: calibration batches are formed from the global sample
order and every rank takes a contiguous block of whole batches, so every rank runs exactly
the batches one rank would. Checked two ways:

* ``rank_rows`` / ``rank_slice`` against an independent statement of the rule (global batch
  ``k`` = rows ``[k·B, (k+1)·B)``) for many sizes, including world sizes that do not divide
  the sample count and more ranks than batches;
* real processes (gloo): 12 samples in batches of 4 (three global batches) on 1, 2, 3 and 4
  ranks, GPTQ W4 with the default MSE observer, and Flex smooth W8A8 with the α/β search
  (whose token subset is indexed by global row) on 1 and 2 ranks. Every output tensor must
  be ``torch.equal`` to the 1-rank output. 2 ranks get 4 + 8 samples (under the old
  per-rank slicing, 6 + 6, batched 4 + 2: not the 1-rank batches), 3 ranks one batch each
  (the aligned case), 4 ranks: rank 0 gets no batch at all (more ranks than work).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main, ranks, wait_all  # noqa: E402
from reference import read_tensors  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

SAMPLES, SEQ, BATCH = 12, 32, 4


# -- the rule, stated independently -----------------------------------------------------------
def expected_batches(n: int, b: int) -> list[list[int]]:
    return [list(range(k, min(k + b, n))) for k in range(0, n, b)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 13, 33])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("b", [1, 2, 4, 5])
def test_every_rank_runs_whole_global_batches_in_order(n, w, b):
    from dist_quant.calibration import CalibrationSet

    ids = torch.arange(n * 3).reshape(n, 3)
    whole = CalibrationSet(ids, ids % 5 != 0)
    seen: list[list[int]] = []
    for r in range(w):
        part = whole.rank_slice(r, w, b)
        seen += [(x[:, 0] // 3).tolist() for x, _ in part.batches(b)]
    assert seen == expected_batches(n, b)  # the same batches, in global order, each run once
    per_rank = [len(list(whole.rank_slice(r, w, b).batches(b))) for r in range(w)]
    assert max(per_rank) - min(per_rank) <= 1  # batches spread evenly


# -- real processes -----------------------------------------------------------------------------
JOBS = {  # name -> (preset, extra overrides, world sizes compared with 1)
    "gptq": ("gptq_w4a16", ("quant.group_size=32",), (2, 3, 4)),
    "flex": ("flexsmooth_w8a8", ("quant.search_tokens=200",), (2,)),
}


def _overrides(model: Path, calib: Path, out: Path, preset: str, extra) -> list[str]:
    return [f"model.path={model}", f"calib.path={calib}", f"calib.num_samples={SAMPLES}",
            f"calib.seq_len={SEQ}", f"calib.batch_size={BATCH}", f"quant={preset}", *extra,
            f"output.dir={out}", f"runtime.run_dir={out}.run", "runtime.threads=1"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_batches")
    calib = root / "calib.txt"
    calib.write_text(corpus_text(60_000), encoding="utf-8")
    model = make_tiny_model(root / "model", layers=2)
    started = []
    for name, (preset, extra, worlds) in JOBS.items():
        for w in worlds:
            base = root / f"{name}-w{w}"
            base.mkdir()
            started.append((name, w, base, ranks(w, _overrides(model, calib, base / "out", preset, extra), base)))
    refs = {}
    for name, (preset, extra, _) in JOBS.items():  # the 1-rank references meanwhile, in this process
        out = root / f"{name}-w1"
        assert call_main(_overrides(model, calib, out, preset, extra)) == 0
        refs[name] = out
    wait_all([p for *_, ps in started for p in ps], 600)
    return refs, {(name, w): (base, ps) for name, w, base, ps in started}


@pytest.mark.parametrize("name,world", [(n, w) for n, (_, _, ws) in JOBS.items() for w in ws],
                         ids=lambda v: str(v))
def test_any_world_size_is_bit_identical_to_one_rank(outputs, name, world):
    refs, multi = outputs
    base, procs = multi[(name, world)]
    assert [p.returncode for p in procs] == [0] * world, (base / "out0.txt").read_text()[-3000:]
    one, many = read_tensors(refs[name]), read_tensors(base / "out")
    assert set(one) == set(many)
    different = [k for k in sorted(one) if one[k].dtype != many[k].dtype or not torch.equal(one[k], many[k])]
    assert not different, f"{len(different)} of {len(one)} tensors differ from 1 rank, e.g. {different[:3]}"
    if world == 4:  # 3 batches on 4 ranks: rank 0 calibrates on nothing and still takes part
        assert "this rank: 0 samples" in (base / "out.run" / "rank0.log").read_text()
