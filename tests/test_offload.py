"""``runtime.offload``: calibration activations held in host memory and handed to the device
one batch at a time (dist_quant/offload.py). No accelerator here: ``runtime.offload=host``
runs the same path on CPU (host and device both CPU, the copies plain instead of pinned), and
the checks are what must hold on any device: the list protocol the layer programs use, a
stored batch never overwriting the tensor a reader (the background resume write) holds, the
quantized output bit for bit the on-device job's, the budget decision, and one-line refusals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main, run_main  # noqa: E402
from moe_reference import read_tensors  # noqa: E402
from tiny import make_tiny_model  # noqa: E402
from tiny_moe import make_tiny_moe  # noqa: E402

from dist_quant import offload  # noqa: E402

SAMPLES, SEQ, BATCH = 8, 48, 2
CPU = torch.device("cpu")


def test_host_batches_behave_as_the_list_the_programs_use():
    xs = [torch.randn(2, 5, 4) for _ in range(3)]
    held = offload.hold((x for x in xs), CPU)  # filled from a generator, one batch at a time
    assert isinstance(held, offload.HostBatches) and len(held) == 3
    assert held.shapes == [x.shape for x in xs]
    assert held.nbytes() == sum(x.numel() * 4 for x in xs)
    for got, want in zip(held, xs):
        assert torch.equal(got, want)
    assert all(h.data_ptr() != x.data_ptr() for h, x in zip(offload.host_tensors(held), xs))  # stored: copies
    snapshot = offload.host_tensors(held)  # what the resume writer keeps while the next layer runs
    held[1] = held[1] + 5  # the programs' residual update
    assert torch.equal(snapshot[1], xs[1])  # a new buffer: the snapshot still has the old batch
    assert torch.equal(held[1], xs[1] + 5)
    assert [t.shape for t in held[0:2]] == [xs[0].shape, xs[1].shape]
    held.clear()
    assert len(held) == 0
    assert offload.hold(iter(xs), None) == xs  # not offloading: a plain list


@pytest.mark.parametrize("mode, device, resident, budget, want", [
    ("host", "cpu", 1, None, True),
    ("none", "cuda", 10**12, 1, False),
    ("auto", "cpu", 10**12, 1, False),      # host and device memory are the same on CPU
    ("auto", "cuda", 10**12, None, False),  # no budget: keep everything on the device
    ("auto", "cuda", 10**9, 10**9, False),
    ("auto", "cuda", 10**9 + 1, 10**9, True),
    ("auto", "npu", 10**9 + 1, 10**9, True),
])
def test_when_activations_go_to_the_host(mode, device, resident, budget, want):
    from types import SimpleNamespace

    dev = SimpleNamespace(type=device)  # torch.device("npu") exists only once torch_npu is imported
    assert offload.wanted(mode, dev, resident, budget) is want


def _job(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"calib.path={calib}", "calib.format=ids", f"calib.num_samples={SAMPLES}",
            f"calib.seq_len={SEQ}", f"calib.batch_size={BATCH}", "quant=gptq_w4a16", "quant.group_size=32",
            "runtime.threads=1", f"output.dir={out}", f"runtime.run_dir={out}.run", *extra]


def _ids(path: Path, vocab: int) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (SAMPLES, SEQ), generator=g)
    path.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in ids), encoding="utf-8")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    path = make_tiny_model(root / "model", layers=2)
    _ids(root / "calib.jsonl", json.loads((path / "config.json").read_text())["vocab_size"])
    return path, root


def test_host_held_job_gives_the_same_bits(model, monkeypatch):
    path, root = model
    calib = root / "calib.jsonl"
    assert call_main(_job(path, calib, root / "device")) == 0
    stored = []
    real = offload._to_host

    def spy(t, pin):
        stored.append(tuple(t.shape))
        return real(t, pin)

    monkeypatch.setattr(offload, "_to_host", spy)
    # with a tiny budget the closing stages would otherwise stream by recomputing: held on the host instead
    assert call_main(_job(path, calib, root / "host", "runtime.offload=host", "runtime.activation_budget=1KB")) == 0
    a, b = read_tensors(root / "device"), read_tensors(root / "host")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    inter = json.loads((path / "config.json").read_text())["intermediate_size"]
    batches = SAMPLES // BATCH
    assert stored.count((BATCH, SEQ, inter)) == 2 * batches  # down_proj's inputs, both layers, went to the host
    assert stored.count((BATCH, SEQ, hidden)) >= 2 * 5 * batches  # residual stream and the normed inputs too


def test_autoround_holds_its_float_chain_on_the_host_and_gives_the_same_bits(model, monkeypatch):
    """AutoRound's float chain and tuning targets are host-held like the residual stream; the tuning
    reads one sample at a time (HostBatches.sample), never a whole batch, and the bits do not change."""
    path, root = model
    calib = root / "calib.jsonl"
    tune = ("quant.method=autoround", "quant.autoround.iters=4")
    assert call_main(_job(path, calib, root / "ar_device", *tune)) == 0
    stored, samples = [], []
    real_store, real_sample = offload._to_host, offload.HostBatches.sample

    def spy_store(t, pin):
        stored.append(tuple(t.shape))
        return real_store(t, pin)

    def spy_sample(self, j, r):
        out = real_sample(self, j, r)
        samples.append(tuple(out.shape))
        return out

    monkeypatch.setattr(offload, "_to_host", spy_store)
    monkeypatch.setattr(offload.HostBatches, "sample", spy_sample)
    assert call_main(_job(path, calib, root / "ar_host", *tune, "runtime.offload=host")) == 0
    a, b = read_tensors(root / "ar_device"), read_tensors(root / "ar_host")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    batches = SAMPLES // BATCH
    # per layer: the float targets and the propagated quantized chain; the embeddings once
    assert stored.count((BATCH, SEQ, hidden)) >= 2 * 2 * batches + batches
    assert samples and set(samples) == {(1, SEQ, hidden)}  # the tuning read single samples


def test_host_refused_where_it_is_not_wired(model, tmp_path):
    path, root = model
    code, _, err = run_main(_job(path, root / "calib.jsonl", tmp_path / "kv", "runtime.offload=host",
                                 "quant.kv_cache=fp8"))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and any("runtime.offload=host" in line and "KV-cache" in line for line in lines), err
    assert not (tmp_path / "kv").exists()
    moe = make_tiny_moe(tmp_path / "moe", "qwen3_moe", layers=1, experts=4)
    _ids(tmp_path / "calib.jsonl", json.loads((moe / "config.json").read_text())["vocab_size"])
    code, _, err = run_main(_job(moe, tmp_path / "calib.jsonl", tmp_path / "out", "runtime.offload=host"))
    assert code != 0 and "only dense (Llama-style) layers" in err and "qwen3_moe" in err, err


def test_bad_mode_is_one_clear_error(model, tmp_path):
    path, root = model
    code, _, err = run_main(_job(path, root / "calib.jsonl", tmp_path / "bad", "runtime.offload=disk"))
    assert code != 0 and "runtime.offload" in err and "disk" in err, err


def test_dry_run_counts_offloaded_activations_on_the_host(model, tmp_path):
    import re

    path, root = model

    def dry(*extra):
        code, out, err = run_main(_job(path, root / "calib.jsonl", tmp_path / "dry", "dry_run=true",
                                       "runtime.world_size=1", "runtime.device=cuda", "calib.num_samples=64",
                                       *extra))
        assert code == 0, err
        return float(re.search(r"activations ([\d.]+) MB", out).group(1)), out

    (on_device, text), (offloaded, text_off) = dry(), dry("runtime.activation_budget=1KB")
    assert "pinned host memory" not in text and "pinned host memory" in text_off
    host = float(re.search(r"not in the device peak: ([\d.]+) MB", text_off).group(1))
    assert offloaded < on_device / 4 and host == pytest.approx(on_device, rel=0.01)
    assert "pinned host memory" not in dry("runtime.activation_budget=1KB", "runtime.offload=none")[1]
