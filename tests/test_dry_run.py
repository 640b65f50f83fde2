"""``dry_run=true runtime.world_size=N``: the plan for N ranks from config.json and
safetensors headers only (no tensor data, no process group), and the same errors a run
would give, exit 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import LINEARS, header_data_bytes  # noqa: E402
from helpers import REPO, job_env, run_main  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant.checkpoint import Checkpoint  # noqa: E402

HIDDEN, INTER, LAYERS = 64, 128, 2
# elements of one tiny layer: q 64x64, k/v 32x64 (2 of 4 heads), o 64x64, gate/up 128x64, down 64x128, 2 norms
LAYER_NUMEL = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128 + 2 * 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    model = make_tiny_model(root / "model", layers=LAYERS, hidden=HIDDEN, intermediate=INTER)
    calib = root / "calib.txt"
    calib.write_text(corpus_text(40_000))
    return root, model, calib


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"dry run read tensor data: {name}")

    monkeypatch.setattr(Checkpoint, "get", refuse)
    monkeypatch.setattr(torch, "load", lambda *a, **k: refuse(None, "torch.load"))


def _args(tiny, *extra):
    root, model, calib = tiny
    return [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
            "calib.batch_size=2", "quant.group_size=32", f"output.dir={root / 'out'}", *extra]


def test_plan_for_four_ranks_reads_no_tensor_data(tiny, no_tensor_reads):
    code, out, err = run_main(_args(tiny, "dry_run=true", "runtime.world_size=4"))
    assert code == 0, err
    assert "world size 4" in out
    assert not (tiny[0] / "out").exists() and not (tiny[0] / "out.partial").exists()
    table = out[out.index("rank  samples"):].splitlines()[1:5]
    assert [int(row.split()[0]) for row in table] == [0, 1, 2, 3]
    assert all(int(row.split()[1]) == 2 for row in table)  # 8 samples over 4 ranks
    plan = out[out.index("plan (module -> owner rank):"):]
    owners = {}
    for i in range(LAYERS):
        line = next(ln for ln in plan.splitlines() if ln.strip().startswith(f"layer {i}:"))
        for item in line.split(":", 1)[1].split():
            name, rank = item.rsplit("->", 1)
            owners[f"model.layers.{i}.{name}"] = int(rank)
    assert set(owners) == {f"model.layers.{i}.{rel}" for i in range(LAYERS) for rel in LINEARS}
    assert set(owners.values()) <= {0, 1, 2, 3} and len(set(owners.values())) == 4


def test_estimate_matches_the_plan_and_the_documented_formula(tiny, no_tensor_reads):
    from dist_quant.dry_run import estimate
    from dist_quant.pipeline import output_specs
    from dist_quant.run import prepare
    from dist_quant.settings import load_config
    from dist_quant.writer import plan_parts

    cfg = load_config(_args(tiny))
    per_world = {}
    for world in (1, 2, 4):
        ckpt, plan, owners, args = prepare(cfg, str(tiny[1]), world)
        parts = plan_parts(output_specs(plan, owners, ckpt, args), cfg.output.part_file_bytes)
        ranks = estimate(cfg, ckpt, plan, owners, parts, world)
        per_world[world] = ranks
        assert [e.rank for e in ranks] == list(range(world))
        assert sum(e.samples for e in ranks) == 8
        assert sum(e.write_bytes for e in ranks) == sum(p.nbytes for p in parts)
        assert sorted(f for e in ranks for f in e.part_files) == sorted(p.file for p in parts)
        layer_bytes = sum(t.nbytes for n, t in ckpt.tensors.items() if n.startswith("model.layers."))
        embed = ckpt.tensors["model.embed_tokens.weight"].nbytes
        for e in ranks:
            assert e.read_bytes >= layer_bytes + embed  # every rank runs every layer
            m = e.memory
            assert m["layer_weights"] == LAYER_NUMEL * 4  # float32 compute dtype
            assert e.peak_bytes == max(m["layer_weights"] + m["activations"] + m["hessians"]
                                       + m["solve_weight"], m["embedding_phase"]) + m["process"]
            assert e.peak_bytes == _documented_peak(e, owners, plan)
    # one rank holds all the activations; more ranks, less each
    assert per_world[1][0].memory["activations"] > per_world[4][0].memory["activations"]
    assert per_world[1][0].read_bytes >= max(e.read_bytes for e in per_world[4])


def _documented_peak(e, owners, plan) -> int:
    """The formula of dist_quant/estimate.py's docstring, written out for the tiny model
    (float32, 32 tokens a sample, batches of 2 samples, 4 heads, no row split)."""
    c, seq, h = 4, 32, HIDDEN
    t, bt = e.samples * seq, min(2, e.samples) * seq
    stages = {"attn_in": (HIDDEN, [(64, 64), (32, 64), (32, 64)]), "attn_out": (HIDDEN, [(64, 64)]),
              "mlp_in": (HIDDEN, [(INTER, 64), (INTER, 64)]), "mlp_out": (INTER, [(64, INTER)])}
    best = 0
    for layer in range(LAYERS):
        for stage, (n, shapes) in stages.items():
            extra = 3 * bt * n * c if stage == "mlp_out" else (bt // seq) * 4 * seq * seq * c if stage == "attn_out" else 0
            build = t * (2 * h + n) * c + extra
            lins = [lin for lin in plan.layer_linears(layer) if lin.stage == stage]
            mine = [lin for lin in lins if owners.owner[lin.name] == e.rank]
            solve = sum(lin.out_features * lin.in_features * (4 + 10) for lin in mine)  # F32 checkpoint
            received = sum(m * k + m * (k // 32) * 5 + 16 * m * k for m, k in shapes)  # group 32
            hess = 8 * n * n + 4 * n * n + min(4096, bt) * n * (4 + c)
            best = max(best, build, t * (h + n) * c + hess + solve + received)
    layer = LAYER_NUMEL * 4 + best
    return max(layer, e.memory["embedding_phase"]) + e.memory["process"]




def test_planned_part_files_are_what_a_run_writes(tiny):
    root = tiny[0]
    code, out, err = run_main(_args(tiny, "dry_run=true", "runtime.world_size=1", "output.part_file_size=100KB"))
    assert code == 0, err
    planned = {}
    for line in out[out.index("part files:"):out.index("plan (module")].splitlines()[1:]:
        if line.strip():
            fields = line.split()
            planned[fields[0]] = fields
    real = root / "out-real"
    code, _, err = run_main(_args(tiny, "output.part_file_size=100KB", f"output.dir={real}",
                               f"runtime.run_dir={root / 'run-real'}"))
    assert code == 0, err
    files = sorted(p.name for p in real.glob("*.safetensors"))
    assert files == sorted(planned) and len(files) > 1
    total = sum(header_data_bytes(real / f) for f in files)
    assert f"{total / 1e6:.1f} MB in {len(files)} part file(s)" in out


@pytest.mark.parametrize("override,needle", [
    ("quant.group_size=48", "quant.group_size=48 does not divide"),
    ("model.path=/nonexistent/model", "is not a directory"),
])
def test_impossible_settings_fail_in_one_line_exit_2(tiny, no_tensor_reads, override, needle):
    code, out, err = run_main(_args(tiny, "dry_run=true", "runtime.world_size=8", override))
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_unsupported_architecture_fails_exit_2(tiny, tmp_path, no_tensor_reads):
    model = tmp_path / "gpt2ish"
    shutil.copytree(tiny[1], model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(config))
    code, out, err = run_main(_args(tiny, "dry_run=true", f"model.path={model}"))
    assert code == 2 and "model_type='gpt_neox' is not supported" in err and "Traceback" not in err


def test_more_ranks_than_samples_warns(tiny, no_tensor_reads):
    code, out, err = run_main(_args(tiny, "dry_run=true", "runtime.world_size=16"))
    assert code == 0, err
    assert ("warning: calib.num_samples=8 in batches of calib.batch_size=2 is 4 batches < world size 16: "
            "12 rank(s) get no calibration samples") in out


def test_dry_run_script(tiny):
    root, model, calib = tiny
    env = job_env()
    env.update(NPROC="3", NNODES="2", PYTHON=sys.executable)
    res = subprocess.run([str(REPO / "launch" / "dry_run.sh"), *_args(tiny)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "world size 6" in res.stdout and "est. peak memory" in res.stdout
    assert not (root / "runs").exists()  # a dry run starts nothing and logs nowhere
