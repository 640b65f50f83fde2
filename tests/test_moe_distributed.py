"""MoE jobs on 2 real processes (``torch.distributed.run``, gloo) against the same jobs on
one rank, with the checkpoint reader instrumented (tests/moe_trace_main.py):

* rank invariance: ≥ 99.9 % of the integers identical, none more than one step apart,
  scales within 1e-5 relative, unquantized tensors bit-identical;
* a rank reads only the routed experts it owns (and every non-expert weight of the
  layer), and never holds more than ceil(E / N) experts of a layer at once;
* tokens move between ranks (dispatch to the expert owners and back), and the report
  counts them consistently.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_jobs import finish, run_inprocess, start_ranks  # noqa: E402
from moe_reference import quantized_linears  # noqa: E402
from reference import read_tensors  # noqa: E402
from tiny import corpus_text  # noqa: E402
from tiny_moe import MOE_ARCHS, make_tiny_moe  # noqa: E402

NUM_SAMPLES, SEQ_LEN, BATCH = 16, 64, 4
EXPERTS = {"qwen2_moe": 4, "qwen3_moe": 6, "mixtral": 5}
HIDDEN = 64
CASES = {  # name → (arch, overrides, bits)
    **{f"gptq-{a}": (a, ("quant=gptq_w4a16", "quant.group_size=32"), 4) for a in MOE_ARCHS},
    "rtn_w8-qwen3_moe": ("qwen3_moe", ("quant=rtn_w8a16",), 8),
    "all_experts-qwen2_moe": ("qwen2_moe", ("quant=gptq_w4a16", "quant.group_size=32", "calib.all_experts=true"), 4),
    "w8a8-qwen3_moe": ("qwen3_moe", ("quant=smoothquant_w8a8", "quant.act_dynamic=true"), 8),
}
PARALLEL = 2  # two-rank jobs in the background at once


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-rank jobs as real processes in the background; the one-rank references run in
    this process meanwhile."""
    root = tmp_path_factory.mktemp("moe_dist")
    (root / "calib.txt").write_text(corpus_text(40_000), encoding="utf-8")
    models = {a: make_tiny_moe(root / f"m_{a}", a, layers=2, experts=EXPERTS[a]) for a in MOE_ARCHS}
    common = [f"calib.path={root / 'calib.txt'}", f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}",
              f"calib.batch_size={BATCH}"]
    jobs: dict = {}
    pending = list(CASES)
    running: list = []

    def launch():
        while pending and len(running) < PARALLEL:
            name = pending.pop(0)
            arch, overrides, _ = CASES[name]
            job = start_ranks(models[arch], root / "out" / f"{name}-w2", [*common, *overrides], 2,
                              root / "trace" / name)
            job.name = name
            running.append(job)

    launch()
    for name, (arch, overrides, _) in CASES.items():
        jobs[(name, 1)] = run_inprocess(models[arch], root / "out" / f"{name}-w1", [*common, *overrides])
        while running and running[0].proc.poll() is not None:
            job = finish(running.pop(0))
            jobs[(job.name, 2)] = job
            launch()
    while running:
        job = finish(running.pop(0))
        jobs[(job.name, 2)] = job
        launch()
    return SimpleNamespace(root=root, models=models, jobs=jobs)


def ok(runs, name, nproc):
    job = runs.jobs[(name, nproc)]
    if nproc > 1:
        assert job.rc == 0, job.stderr[-4000:]
    return job


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_rank(runs, name):
    _, _, bits = CASES[name]
    one, two = read_tensors(ok(runs, name, 1).out), read_tensors(ok(runs, name, 2).out)
    assert set(one) == set(two)
    qa, qb = quantized_linears(one, bits), quantized_linears(two, bits)
    assert sum(".experts." in n for n in qa) == 2 * 3 * EXPERTS[CASES[name][0]]
    quant = {f"{lin}{s}" for lin in qa for s in (".weight_packed", ".weight", ".weight_scale")}
    for n in set(one) - quant:
        assert one[n].dtype == two[n].dtype and torch.equal(one[n], two[n]), n
    same = total = 0
    for lin in qa:
        a, b = qa[lin], qb[lin]
        assert (a.q - b.q).abs().max().item() <= 1, lin
        same += int((a.q == b.q).sum())
        total += a.q.numel()
        rel = ((a.scale.double() - b.scale.double()).abs() / a.scale.double().abs()).max().item()
        assert rel <= 1e-5, (lin, rel)
    assert same / total >= 0.999, same / total
    if name.startswith("rtn"):
        assert same == total
    r1, r2 = runs.jobs[(name, 1)].report["moe"], runs.jobs[(name, 2)].report["moe"]
    assert r1["layers"][0]["tokens_per_expert"] == r2["layers"][0]["tokens_per_expert"]
    for a, b in zip(r1["layers"][1]["tokens_per_expert"], r2["layers"][1]["tokens_per_expert"]):
        assert abs(a - b) <= 2


@pytest.mark.parametrize("name", list(CASES))
def test_rank_reads_only_its_experts_and_at_most_ceil_e_over_n_at_once(runs, name):
    arch = CASES[name][0]
    job = ok(runs, name, 2)
    owners = job.report["owner_plan"]
    n_exp = EXPERTS[arch]
    expert_weights = {lin + ".weight": r for lin, r in owners.items() if ".experts." in lin}
    assert len(expert_weights) == 2 * 3 * n_exp
    src = read_tensors(runs.models[arch])
    for rank in (0, 1):
        trace = json.loads((job.trace / f"rank{rank}.json").read_text())
        expert_reads = [n for n in trace["reads"] if ".experts." in n]
        assert sorted(expert_reads) == sorted(n for n, r in expert_weights.items() if r == rank)  # each once
        assert len(expert_reads) == len(set(expert_reads))
        for layer, peak in trace["peak_live"].items():
            assert 1 <= peak <= math.ceil(n_exp / 2), (rank, layer, peak)
        # every non-expert weight of every layer was loaded by this rank (attention, norms, router, ...)
        layer_reads = {n for n in trace["reads"] if n.startswith("model.layers.") and ".experts." not in n}
        assert layer_reads == {n for n in src if n.startswith("model.layers.") and ".experts." not in n}
        for layer in job.report["moe"]["layers"]:
            info = layer["by_rank"][str(rank)]
            assert info["experts_loaded"] == sorted(info["experts_loaded"])
            assert info["experts_loaded"] == layer["experts_by_rank"][str(rank)]
            assert len(info["experts_loaded"]) <= math.ceil(n_exp / 2) and info["peak_live_experts"] == 1
    for layer in job.report["moe"]["layers"]:
        owned = {int(r): sorted(e) for r, e in layer["experts_by_rank"].items()}
        expect = {r: sorted({int(lin.split(".experts.")[1].split(".")[0]) for lin, o in owners.items()
                             if o == r and f"layers.{layer['layer']}." in lin and ".experts." in lin})
                  for r in (0, 1)}
        assert owned == expect


@pytest.mark.parametrize("name", list(CASES))
def test_tokens_move_between_ranks_and_are_counted(runs, name):
    job = ok(runs, name, 2)
    section = job.report["moe"]
    elem = HIDDEN * 4  # float32 rows
    for layer in section["layers"]:
        b = layer["by_rank"]
        for r in ("0", "1"):
            other = "1" if r == "0" else "0"
            sent = b[r]["bytes_sent"]
            assert 0 < b[r]["tokens_sent"] <= NUM_SAMPLES * SEQ_LEN // 2
            assert b[r]["tokens_sent"] <= b[r]["slots_sent"] <= 2 * b[r]["tokens_sent"]
            assert sent["dispatch"] == b[r]["tokens_sent"] * elem
            # results go back to the senders, summed in float64 (float32 model)
            assert sent["combine"] == b[other]["tokens_sent"] * HIDDEN * 8
            assert sent["metadata"] == b[r]["slots_sent"] * 24 + 16
            if layer["all_tokens_gathered"]:
                assert sent["all_tokens_gather"] == NUM_SAMPLES * SEQ_LEN // 2 * elem
        assert layer["tokens_moved"] == b["0"]["tokens_sent"] + b["1"]["tokens_sent"]
    assert section["tokens_moved_per_layer"] > 0
    assert section["max_live_experts_per_rank"] == 1
    assert "MoE coverage:" in (job.run_dir / "rank0.log").read_text()
    if name.startswith("all_experts"):
        assert all(layer["all_tokens_gathered"] for layer in section["layers"])
        for layer in job.report["layers"]:
            for lin, info in layer["modules"].items():
                if info.get("expert") is not None:
                    assert info["tokens"] == NUM_SAMPLES * SEQ_LEN, lin


def test_killed_moe_job_resumes_to_the_same_bytes(runs):
    """Rank 1 is SIGKILLed after layer 0 of a 2-rank MoE job; ``resume=true`` in the same run
    directory finishes it, and the output equals the uninterrupted 2-rank job's (same tensors,
    same bytes), with the MoE coverage of both layers in the report."""
    name = "gptq-mixtral"
    arch, overrides, _ = CASES[name]
    root = runs.root
    common = [f"calib.path={root / 'calib.txt'}", f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}",
              f"calib.batch_size={BATCH}", *overrides]
    out, run_dir = root / "out" / "resumed", root / "runs" / "resumed"
    killed = finish(start_ranks(runs.models[arch], out, common, 2, root / "trace" / "killed", run_dir,
                                {"DIST_QUANT_TEST_FAIL": "kill:1:0"}))
    assert killed.rc != 0 and not out.exists()
    resumed = finish(start_ranks(runs.models[arch], out, [*common, "resume=true"], 2, root / "trace" / "resumed",
                                 run_dir))
    assert resumed.rc == 0, resumed.stderr[-4000:]
    want, got = read_tensors(ok(runs, name, 2).out), read_tensors(out)
    assert set(want) == set(got)
    for n in want:
        assert want[n].dtype == got[n].dtype and torch.equal(want[n], got[n]), n
    section = resumed.report["moe"]
    assert [layer["layer"] for layer in section["layers"]] == [0, 1]
    assert section["layers"] == runs.jobs[(name, 2)].report["moe"]["layers"]
    # after the restart the ranks read only layer 1's experts
    for rank in (0, 1):
        reads = json.loads((root / "trace" / "resumed" / f"rank{rank}.json").read_text())["reads"]
        assert not any(".layers.0." in n and ".experts." in n for n in reads)
