"""The CUDA path (issue 11), for a machine with a GPU: skipped without one (CI has none; the
prepared run is bench/README.md's "GPU checks"). What must hold on the device:

* a tiny GPTQ job on ``runtime.device=cuda`` quantizes like the same job on CPU (the
  integers ≥ 99 % equal and never more than one step apart, scales within 1e-3: GEMMs round
  differently on the two devices, so bit equality is not expected);
* the job reports its peak device memory;
* ``runtime.offload=host`` (pinned host memory, one batch copied to the device at a time)
  gives the same bits as the on-device job on the GPU;
* the GPTQ solve of one linear on the GPU matches the CPU solve (same rule as above).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main  # noqa: E402
from moe_reference import read_tensors  # noqa: E402
from reference import read_quant_linears  # noqa: E402
from tiny import make_tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SAMPLES, SEQ, BATCH = 8, 48, 2


def _job(model: Path, calib: Path, out: Path, device: str, *extra: str) -> list[str]:
    return [f"model.path={model}", f"calib.path={calib}", "calib.format=ids", f"calib.num_samples={SAMPLES}",
            f"calib.seq_len={SEQ}", f"calib.batch_size={BATCH}", "quant=gptq_w4a16", "quant.group_size=32",
            "runtime.threads=1", f"runtime.device={device}", f"output.dir={out}", f"runtime.run_dir={out}.run",
            *extra]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    path = make_tiny_model(root / "model", layers=2)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(3))
    (root / "calib.jsonl").write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in ids))
    return path, root


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        qa, qb = a[name].q.long(), b[name].q.long()
        assert (qa - qb).abs().max() <= 1, name
        assert (qa == qb).float().mean() >= 0.99, name
        torch.testing.assert_close(a[name].scale.float(), b[name].scale.float(), rtol=1e-3, atol=1e-6)


def test_cuda_job_matches_cpu_job_and_reports_device_memory(model):
    path, root = model
    calib = root / "calib.jsonl"
    assert call_main(_job(path, calib, root / "cpu", "cpu")) == 0
    assert call_main(_job(path, calib, root / "gpu", "cuda")) == 0
    _close(read_quant_linears(root / "cpu", 4)[0], read_quant_linears(root / "gpu", 4)[0])
    report = json.loads((root / "gpu" / "quant_report.json").read_text())
    assert all(v > 0 for v in report["peak_device_bytes_by_rank"].values())


def test_pinned_host_offload_gives_the_on_device_bits(model):
    path, root = model
    calib = root / "calib.jsonl"
    if not (root / "gpu" / "quant_report.json").is_file():
        assert call_main(_job(path, calib, root / "gpu", "cuda")) == 0
    assert call_main(_job(path, calib, root / "gpu_host", "cuda", "runtime.offload=host",
                          "runtime.activation_budget=1KB")) == 0
    a, b = read_tensors(root / "gpu"), read_tensors(root / "gpu_host")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_solve_on_cuda_matches_cpu():
    from dist_quant.algorithms.gptq import GPTQParams, gptq_quantize
    from dist_quant.quant.qparams import QuantArgs

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(4096, 512, generator=g) * (10 ** (torch.rand(512, generator=g) * 2 - 1))
    h = (2.0 / 4096) * (x.T @ x)
    args = QuantArgs(bits=4, group_size=64, symmetric=True)
    cpu = gptq_quantize(w.clone(), h.clone(), args, GPTQParams())
    gpu = gptq_quantize(w.cuda(), h.cuda(), args, GPTQParams())
    q_cpu, q_gpu = cpu.q.long(), gpu.q.cpu().long()
    assert (q_cpu - q_gpu).abs().max() <= 1 and (q_cpu == q_gpu).float().mean() >= 0.99
    torch.testing.assert_close(cpu.scale.float(), gpu.scale.cpu().float(), rtol=1e-3, atol=1e-6)
