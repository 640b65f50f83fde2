"""calib.smooth_path (msModelSlim's anti_calib_file) as the smoothing lane of the stage API: the
smoothing set's activations are carried through every layer beside the calibration set's, the
AWQ statistics and search take the smoothing set's tokens only, the solves the calibration
set's. With RTN weights and no clipping search the weights depend on the chosen scales only, so
a run with a smoothing set must choose, at every pair of every layer, exactly what a run
calibrated on the smoothing set alone chooses (and write the same tensors), and differ from a run
on the calibration set alone; for a dense and an MoE model; 2 ranks = 1 rank; the dry run counts
the lane's activations."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main, free_port, job_env  # noqa: E402
from reference import read_tensors  # noqa: E402

CALIB = ["calib.num_samples=8", "calib.seq_len=32", "calib.batch_size=2", "runtime.threads=1"]
AWQ = ["quant=awq_w4a16", "quant.group_size=32", "quant.weight_solver=rtn", "quant.awq_clip=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny import corpus_text, make_tiny_model
    from tiny_moe import make_tiny_moe

    base = tmp_path_factory.mktemp("smooth_lane")
    (base / "main.txt").write_text(corpus_text(60_000))
    g = torch.Generator().manual_seed(1)  # traffic unlike the calibration text
    ids = [torch.randint(0, 500, (20 + 3 * i,), generator=g).tolist() for i in range(8)]
    (base / "smooth.jsonl").write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
    return {"base": base, "llama": make_tiny_model(base / "llama", arch="llama", layers=2),
            "moe": make_tiny_moe(base / "moe", arch="qwen3_moe", layers=2)}


def argv(setup, model, out, calib, *extra):
    return [f"model.path={setup[model]}", f"calib.path={setup['base'] / calib}", *CALIB, *AWQ,
            f"output.dir={out}", f"runtime.run_dir={out}.run", *extra]


def quantize(setup, name, model, calib, *extra) -> Path:
    out = setup["base"] / "out" / name
    if not out.exists():
        assert call_main(argv(setup, model, out, calib, *extra)) == 0
    return out


def choices(out: Path) -> dict:
    report = json.loads((out / "quant_report.json").read_text())
    return {pair: (c["alpha"], c["scale_sha1"]) for layer in report["layers"]
            for pair, c in layer["smoothing"].items()}


@pytest.mark.parametrize("model, pairs", [("llama", 8), ("moe", 4)])  # MoE: attention pairs only
def test_scales_come_from_the_smoothing_set_alone(setup, model, pairs):
    smooth = f"calib.smooth_path={setup['base'] / 'smooth.jsonl'}"
    lane = quantize(setup, f"{model}-lane", model, "main.txt", smooth)
    alone = quantize(setup, f"{model}-smooth-alone", model, "smooth.jsonl")
    main = quantize(setup, f"{model}-main-alone", model, "main.txt")
    got, ref, other = choices(lane), choices(alone), choices(main)
    assert len(got) == pairs and got == ref
    assert any(got[p][1] != other[p][1] for p in got)  # the calibration set would have chosen otherwise
    t1, t2 = read_tensors(lane), read_tensors(alone)
    assert t1.keys() == t2.keys()
    for name in t1:  # RTN, no clipping search: the weights follow from the scales alone
        assert torch.equal(t1[name], t2[name]), name
    # the solve's statistics are the calibration set's: its reported output errors are main's
    r_lane, r_main = (json.loads((o / "quant_report.json").read_text()) for o in (lane, main))
    e_lane = r_lane["layers"][0]["modules"]["model.layers.0.self_attn.q_proj"]
    e_main = r_main["layers"][0]["modules"]["model.layers.0.self_attn.q_proj"]
    assert e_lane["tokens"] == e_main["tokens"]


def test_two_ranks_choose_what_one_rank_chooses(setup):
    smooth = f"calib.smooth_path={setup['base'] / 'smooth.jsonl'}"
    out = setup["base"] / "out" / "llama-lane-2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "dist_quant", *argv(setup, "llama", out, "main.txt", smooth, "quant.awq_clip=true",
                                     "quant.weight_solver=gptq")]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600, env=job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_gptq = quantize(setup, "llama-lane-gptq", "llama", "main.txt", smooth, "quant.awq_clip=true",
                        "quant.weight_solver=gptq")
    assert json.loads((out / "quant_report.json").read_text())["world_size"] == 2
    assert choices(out) == choices(one_gptq)
    t1, t2 = read_tensors(one_gptq), read_tensors(out)
    assert t1.keys() == t2.keys()
    for name in t1:
        assert torch.equal(t1[name], t2[name]), name


def test_dry_run_counts_the_lane(setup):
    from dist_quant.dry_run import estimate
    from dist_quant.pipeline import output_specs
    from dist_quant.run import prepare
    from dist_quant.settings import load_config
    from dist_quant.writer import plan_parts

    base = [f"model.path={setup['llama']}", *CALIB, *AWQ]
    acts = []
    for extra in ([], [f"calib.smooth_path={setup['base'] / 'smooth.jsonl'}", "calib.smooth_num_samples=4"],
                  ["calib.num_samples=12"]):
        cfg = load_config(base + extra)
        ckpt, plan, owners, args = prepare(cfg, str(setup["llama"]), 1)
        parts = plan_parts(output_specs(plan, owners, ckpt, args), cfg.output.part_file_bytes)
        acts.append(estimate(cfg, ckpt, plan, owners, parts, 1)[0].memory["activations"])
    # a lane of 4 samples holds what 4 more calibration samples would
    assert acts[1] == acts[2] > acts[0]
