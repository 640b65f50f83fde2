"""bench/gpu_check.py, the prepared GPU measurement script, run on CPU with tiny shapes (its
plumbing: checkpoint writer, job, report fields, perplexity); and the phase timer's device
synchronization that makes its per-phase seconds honest on an accelerator."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, job_env  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant import offload, pipeline  # noqa: E402

SCRIPT = REPO / "bench" / "gpu_check.py"


def _run(tmp_path: Path, *args: str) -> dict:
    data = tmp_path / "valid.txt"
    data.write_text(corpus_text(60_000))
    res = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "out"), "--data", str(data),
                          "--samples", "4", "--seq-len", "32", "--group", "32", "--", "runtime.threads=1"],
                         cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    return json.loads((tmp_path / "out" / f"{args[0]}.json").read_text())


def test_layers_job_reports_phases_per_layer(tmp_path):
    out = _run(tmp_path, "layers", "--layers", "2", "--hidden", "64", "--inter", "128", "--heads", "4",
               "--kv-heads", "2", "--device", "cpu")
    config = json.loads((tmp_path / "out" / "layers-checkpoint" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 128, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    run = out["run"]
    assert run["rc"] == 0 and [e["layer"] for e in run["per_layer"]] == [0, 1]
    for phase, total in run["seconds_by_phase"].items():  # the per-layer rows add up to the job's phases
        assert math.isclose(sum(e.get(phase, 0.0) for e in run["per_layer"]), total, abs_tol=2e-3)
    assert run["seconds_by_phase"]["solve"] > 0 and run["peak_device_gb"] is None  # CPU: no device peak
    assert 0 < run["error_mean"] < 1


def test_smollm2_job_gives_perplexity_per_device(tmp_path):
    model = make_tiny_model(tmp_path / "model", layers=2)
    out = _run(tmp_path, "smollm2", "--model", str(model), "--devices", "cpu", "--windows", "2",
               "--eval-seq-len", "32")
    (run,) = out["runs"]
    assert run["device"] == "cpu" and run["rc"] == 0
    assert math.isfinite(run["ppl"]) and run["ppl"] > 1
    assert "ppl_cuda_vs_cpu" not in out  # only one device ran


def test_phase_timer_synchronizes_accelerators(monkeypatch):
    calls = []
    monkeypatch.setattr(offload, "synchronize", lambda device: calls.append(device.type))
    record = pipeline.LayerRecord(layer=0)
    with pipeline._Phase(record, None, torch.device("cpu"))("solve"):
        pass
    assert calls == []  # CPU work is synchronous
    with pipeline._Phase(record, None, torch.device("meta"))("solve"):
        pass
    assert calls == ["meta", "meta"]  # before the clock starts and before it stops
    assert set(record.seconds) == {"solve"}
