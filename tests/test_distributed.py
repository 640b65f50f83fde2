"""Real multi-process runs: ``torch.distributed.run --nproc_per_node=2 -m dist_quant …``
(gloo on CPU) against the same job on one rank. The output must not depend on the world
size (up to float64 summation order in the reduced statistics), both ranks must write
part files for the linears they own, and each rank logs to its own file in the shared
run directory. All jobs start once per module, concurrently."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import LINEARS, part_file_contents, quantized_linears, read_quant_linear, read_tensors  # noqa: E402
from helpers import free_ports, hash_dir, make_job, small_calib_file, isolated_main  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

NUM_SAMPLES, SEQ_LEN, BATCH = 16, 64, 4  # 8 samples per rank: batches of 4 align with one rank's
LAYERS = 2
QUANTS = {  # name → (preset, overrides, bits)
    "gptq_w4": ("gptq_w4a16", ("quant.group_size=32",), 4),
    "rtn_w8": ("rtn_w8a16", (), 8),
}
MODELS = {"llama": dict(arch="llama", tied=False), "qwen": dict(arch="qwen2", tied=True)}
CASES = [(m, q) for m in MODELS for q in QUANTS]
CASE_IDS = [f"{m}-{q}" for m, q in CASES]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    source = root / "wiki.txt"
    source.write_text(corpus_text(60_000),
                      encoding="utf-8")
    calib = small_calib_file(root / "calib.txt", source, 40_000)
    ports = iter(free_ports(len(CASES)))
    models, hashes, jobs = {}, {}, {}
    # Two-rank jobs are real torchrun launches (in the background); the one-rank references
    # run in this process meanwhile.
    for model_key, kwargs in MODELS.items():
        models[model_key] = make_tiny_model(root / model_key, layers=LAYERS, **kwargs)
        hashes[model_key] = hash_dir(models[model_key])
        for quant_key, (preset, extra, _) in QUANTS.items():
            extra = (*extra, f"calib.batch_size={BATCH}")
            for nproc in (1, 2):
                name = f"{model_key}-{quant_key}-w{nproc}"
                jobs[(model_key, quant_key, nproc)] = make_job(
                    name, models[model_key], root / "out" / name, root / "runs" / name, calib, preset, extra,
                    nproc=nproc, port=next(ports) if nproc == 2 else None, num_samples=NUM_SAMPLES,
                    seq_len=SEQ_LEN)
                if nproc == 2:
                    jobs[(model_key, quant_key, nproc)].start()
    for key, job in jobs.items():
        if key[2] == 1:
            _run_in_process(job)
    for job in jobs.values():
        job.wait()
    return SimpleNamespace(root=root, models=models, hashes=hashes, jobs=jobs)


def _run_in_process(job) -> None:
    """Run a one-rank job inside this process (``dist_quant.__main__.main``): the same code
    path as ``python -m dist_quant`` without paying the ~5 s of imports again."""
    import contextlib
    import io
    import time

    from dist_quant.__main__ import main

    overrides = job.argv[job.argv.index("dist_quant") + 1:]
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    try:
        with isolated_main(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            job.returncode = main(overrides)
    except BaseException as exc:  # noqa: BLE001 - reported by job.check()
        job.returncode = -1
        err.write(f"{type(exc).__name__}: {exc}")
    job.stdout, job.stderr, job.seconds = out.getvalue(), err.getvalue(), time.time() - t0


def _outputs(dist, model_key, quant_key):
    one = read_tensors(dist.jobs[(model_key, quant_key, 1)].check())
    two = read_tensors(dist.jobs[(model_key, quant_key, 2)].check())
    return one, two


def _report(dist, model_key, quant_key, nproc):
    return json.loads((dist.jobs[(model_key, quant_key, nproc)].check() / "quant_report.json").read_text())


@pytest.mark.parametrize("model_key,quant_key", CASES, ids=CASE_IDS)
def test_two_ranks_match_one_rank(dist, model_key, quant_key):
    """Same tensor names; ≥ 99.9 % of the integers identical and none more than one step
    apart; scales within 1e-5 relative; every unquantized tensor bit-identical."""
    bits = QUANTS[quant_key][2]
    one, two = _outputs(dist, model_key, quant_key)
    assert set(one) == set(two)
    linears = quantized_linears(one)
    assert linears == sorted(f"model.layers.{i}.{rel}" for i in range(LAYERS) for rel in LINEARS)
    quant_tensors = {f"{lin}{s}" for lin in linears
                     for s in (".weight_packed", ".weight_scale", ".weight_zero_point")}
    for name in sorted(set(one) - quant_tensors):  # norms, embeddings, lm_head, biases, weight_shape
        assert one[name].dtype == two[name].dtype and torch.equal(one[name], two[name]), name
    same = total = 0
    for lin in linears:
        a, b = read_quant_linear(one, lin, bits), read_quant_linear(two, lin, bits)
        assert a.q.shape == b.q.shape and a.scale.shape == b.scale.shape
        assert a.scale.dtype == b.scale.dtype
        steps = (a.q - b.q).abs().max().item()
        assert steps <= 1, (lin, steps)
        same += int((a.q == b.q).sum())
        total += a.q.numel()
        rel = ((a.scale.double() - b.scale.double()).abs() / a.scale.double().abs()).max().item()
        assert rel <= 1e-5, (lin, rel)
        assert torch.equal(a.zero, b.zero)
    assert same / total >= 0.999, same / total
    if quant_key.startswith("rtn"):  # RTN reads no activations: exactly equal
        assert same == total


@pytest.mark.parametrize("model_key,quant_key", CASES, ids=CASE_IDS)
def test_both_ranks_write_their_linears(dist, model_key, quant_key):
    """The owner plan splits the linears over both ranks; each rank solved what it owns with
    the statistics of all 16 samples, and wrote those linears into its own part files."""
    out = dist.jobs[(model_key, quant_key, 2)].check()
    report = _report(dist, model_key, quant_key, 2)
    assert report["world_size"] == 2
    owners = report["owner_plan"]
    assert set(owners.values()) == {0, 1}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    contents = part_file_contents(out)
    assert weight_map == {n: f for f, names in contents.items() for n in names}
    files_by_rank = {0: set(), 1: set()}
    for lin, rank in owners.items():
        suffixes = [".weight_packed", ".weight_scale", ".weight_shape"]
        files_by_rank[rank] |= {weight_map[lin + s] for s in suffixes}
        if lin + ".bias" in weight_map:  # a quantized linear's bias travels with it
            files_by_rank[rank].add(weight_map[lin + ".bias"])
    assert files_by_rank[0] and files_by_rank[1]
    assert not files_by_rank[0] & files_by_rank[1], "a part file holds linears of both ranks"
    for layer in report["layers"]:
        assert set(layer["seconds_by_rank"]) == {"0", "1"}
        for lin, info in layer["modules"].items():
            assert info["rank"] == owners[lin]
            assert info["tokens"] == NUM_SAMPLES * SEQ_LEN  # statistics reduced over both ranks
    one = {m: i["rel_output_error"] for layer in _report(dist, model_key, quant_key, 1)["layers"]
           for m, i in layer["modules"].items()}
    two = {m: i["rel_output_error"] for layer in report["layers"] for m, i in layer["modules"].items()}
    assert set(one) == set(two) == set(owners)
    for m in one:
        assert two[m] == pytest.approx(one[m], rel=1e-3, abs=1e-9), m


@pytest.mark.parametrize("model_key,quant_key", CASES, ids=CASE_IDS)
def test_per_rank_logs_in_shared_run_dir(dist, model_key, quant_key):
    job = dist.jobs[(model_key, quant_key, 2)]
    out = job.check()
    assert job.stdout.count("done:") == 1  # rank 0 only
    logs = sorted(p.name for p in job.run_dir.iterdir())
    assert logs == [".hydra", "rank0.log", "rank1.log"]  # the run record is written once, by rank 0
    assert sorted(p.name for p in (job.run_dir / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]
    for rank in (0, 1):
        text = (job.run_dir / f"rank{rank}.log").read_text()
        assert f"[rank {rank}]" in text and f"[rank {1 - rank}]" not in text
        assert "world size 2" in text
    assert not out.with_name(out.name + ".partial").exists()
    assert hash_dir(dist.models[model_key]) == dist.hashes[model_key]
