"""bench/fullsize.py: header-only checkpoints (real names, shapes and dtypes in the headers, the
data region a sparse hole) planned with ``dry_run=true``, on a small DeepSeek-V3-layout FP8
model (and its Kimi-K2 twin config): nothing stored, nothing read, and the dry run's input size
is the headers' data size."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fullsize  # noqa: E402
from helpers import run_main  # noqa: E402

from dist_quant.checkpoint import Checkpoint  # noqa: E402

SMALL = {"hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 256, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 8, "n_routed_experts": 16, "num_experts_per_tok": 4,
         "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "q_lora_rank": 384, "kv_lora_rank": 256,
         "vocab_size": 8192}


def _small(name: str) -> dict:
    cfg = json.loads((fullsize.HERE / "configs" / f"{name}.json").read_text())
    cfg.update(SMALL)
    if name == "kimi_k2":
        cfg.update(n_group=1, topk_group=1)
    return cfg


def _data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
def test_header_only_checkpoint_planned_without_reading_data(tmp_path, monkeypatch, capsys, name):
    cfg = _small(name)
    info = fullsize.write_header_only(tmp_path / name, cfg, fullsize.deepseek_tensors(cfg), shard_bytes=20 * 10**6)
    files = sorted((tmp_path / name).glob("*.safetensors"))
    data = sum(_data_bytes(f) for f in files)
    assert len(files) == info["files"] > 1 and data == info["data_bytes"] > 5 * 10**7
    assert all(f.stat().st_size <= 20 * 10**6 + 10**6 for f in files)  # shards within the limit (+ header)
    assert sum(os.stat(f).st_blocks * 512 for f in files) < 2 * 10**6  # holes: nothing stored

    ckpt = Checkpoint(tmp_path / name)  # headers parse, sizes check, FP8 scales fold
    specs = fullsize.deepseek_tensors(cfg)
    scales = [s for s in specs if s[0].endswith("_scale_inv")]
    assert scales and len(ckpt.tensors) == len(specs) - len(scales)
    assert sum(t.read_bytes for t in ckpt.tensors.values()) == data
    mtp = cfg["num_nextn_predict_layers"]
    assert any(n.startswith(f"model.layers.{cfg['num_hidden_layers']}.") for n in ckpt.tensors) == bool(mtp)

    def refuse(*a, **k):
        raise AssertionError("the dry run read tensor data")

    monkeypatch.setattr(Checkpoint, "get", refuse)
    monkeypatch.setattr(Checkpoint, "_read", refuse)
    code, out, err = run_main([f"model.path={tmp_path / name}", "dry_run=true", "runtime.world_size=4",
                               "quant=gptq_w4a16", "quant.group_size=128", "calib.num_samples=64",
                               "calib.seq_len=512", f"output.dir={tmp_path / 'out'}"])
    assert code == 0, err
    m = re.search(r"(\d+) layers, (\d+) quantized linears.*?, ([\d.]+) (GB|MB) of weights", out)
    layers, linears = int(m.group(1)), int(m.group(2))
    assert layers == cfg["num_hidden_layers"]
    experts = cfg["n_routed_experts"]
    assert linears == layers * 5 + 3 + (layers - 1) * (3 * experts + 3)  # MLA 5, dense MLP 3, experts + shared
    assert float(m.group(3)) * (1e9 if m.group(4) == "GB" else 1e6) == pytest.approx(data, rel=0.01)
    rows = [line for line in out.splitlines() if re.match(r"^\s+[0-3]\s+16\s", line)]
    assert len(rows) == 4  # one row per rank: samples, linears, solve cost, read, write, parts, peak memory
    assert not (tmp_path / "out").exists()


def test_bench_prints_plans_for_each_world_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fullsize.MODELS, "small", (_small("deepseek_v3"), fullsize.deepseek_tensors))
    assert fullsize.main(["--models", "small", "--ranks", "2", "4", "--dir", str(tmp_path), "--",
                          "calib.num_samples=16", "calib.seq_len=256"]) == 0
    out = capsys.readouterr().out
    assert out.count("world size ") == 2 and "est. peak memory" in out and "part files:" not in out
