"""Lazy, validated checkpoint reading (dist_quant/checkpoint.py) against HF-written
checkpoints (sharded with an index, or one file) read with the reference safetensors reader,
and against broken / unsafe model directories."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_quant.checkpoint as checkpoint_mod  # noqa: E402
from dist_quant.checkpoint import Checkpoint, CheckpointError  # noqa: E402

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    from tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("sharded") / "model", arch="qwen2", layers=2,
                           shard_size="200KB")
    assert (path / INDEX).is_file()
    return path


@pytest.fixture
def model(sharded, tmp_path) -> Path:
    """A private copy of the sharded checkpoint that a test may damage."""
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def shards(path: Path) -> list[str]:
    return sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))


def to_single_file(path: Path) -> Path:
    """Merge the shards into one model.safetensors and drop the index."""
    tensors = {}
    for f in shards(path):
        tensors.update(load_file(str(path / f)))
        (path / f).unlink()
    (path / INDEX).unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# -- good checkpoints ------------------------------------------------------------------------
def test_sharded_checkpoint_via_index(sharded):
    files = shards(sharded)
    assert len(files) >= 2
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    ckpt = Checkpoint(sharded)
    assert ckpt.config == json.loads((sharded / "config.json").read_text())
    assert set(ckpt.tensors) == set(weight_map)
    for fname in files:
        ref = load_file(str(sharded / fname))
        for name, t in ref.items():
            info = ckpt.tensors[name]
            assert info.file == fname == weight_map[name]
            assert info.shape == tuple(t.shape)
            assert info.dtype == {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
            assert info.nbytes == t.numel() * t.element_size()
            got = ckpt.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    assert "model.layers.0.self_attn.q_proj.bias" in ckpt
    assert "model.layers.9.self_attn.q_proj.weight" not in ckpt
    with pytest.raises(CheckpointError, match="nope"):
        ckpt.get("nope")
    ckpt.close()


def test_single_file_checkpoint(model):
    to_single_file(model)
    ref = load_file(str(model / "model.safetensors"))
    ckpt = Checkpoint(model)
    assert set(ckpt.tensors) == set(ref)
    for name, t in ref.items():
        assert ckpt.tensors[name].file == "model.safetensors"
        assert torch.equal(ckpt.get(name), t)


# -- broken checkpoints ----------------------------------------------------------------------
def test_missing_shard_named_by_index(model):
    victim = shards(model)[1]
    (model / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        Checkpoint(model)


def test_index_names_tensor_missing_from_its_file(model):
    index = json.loads((model / INDEX).read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = shards(model)[0]
    (model / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight"):
        Checkpoint(model)


@pytest.mark.parametrize("keep", ["half", "minus_one", "header_only", "eight_bytes", "four_bytes"])
def test_truncated_safetensors_file(model, keep):
    victim = model / shards(model)[0]
    data = victim.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cut = {"half": len(data) // 2, "minus_one": len(data) - 1, "header_only": 8 + header_len,
           "eight_bytes": 8, "four_bytes": 4}[keep]
    victim.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as err:
        Checkpoint(model)
    assert victim.name in str(err.value)


def test_truncated_single_file(model):
    to_single_file(model)
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(model)


@pytest.mark.parametrize("content", [
    b"this is not a safetensors file at all, just some text" * 10,
    os.urandom(4096),
    (10**12).to_bytes(8, "little") + b"{}",  # absurd header length
    (20).to_bytes(8, "little") + b"[1, 2, 3]           ",  # header is JSON but not an object
    (14).to_bytes(8, "little") + b'{"a": {"x": 1}}',
    b"",
])
def test_garbage_file(model, content):
    to_single_file(model)
    (model / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(model)
    assert "model.safetensors" in str(err.value)


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors"])
def test_index_path_outside_model_dir(model, name):
    outside = model.parent / "outside.safetensors"
    shutil.copy(model / shards(model)[0], outside)  # present and valid: only its place is wrong
    index = json.loads((model / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (model / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside") as err:
        Checkpoint(model)
    assert name in str(err.value)


def test_index_absolute_path(model):
    index = json.loads((model / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    absolute = str(model / shards(model)[0])
    index["weight_map"][first] = absolute
    (model / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        Checkpoint(model)


def test_hf_cache_snapshot_layout_loads(sharded, tmp_path):
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sharded.iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    ckpt = Checkpoint(snap)
    assert set(ckpt.tensors) == set(Checkpoint(sharded).tensors)


def test_only_pickle_weights(model):
    for f in shards(model):
        (model / f).unlink()
    (model / INDEX).unlink()
    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle") as err:
        Checkpoint(model)
    assert "pytorch_model.bin" in str(err.value)


def test_no_weights_at_all(model):
    for f in shards(model):
        (model / f).unlink()
    (model / INDEX).unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        Checkpoint(model)


@pytest.mark.parametrize("victim", ["config.json", INDEX])
def test_oversized_json_refused(model, monkeypatch, victim):
    size = (model / victim).stat().st_size
    config_size = (model / "config.json").stat().st_size
    assert (model / INDEX).stat().st_size > config_size
    # config.json over the limit; or config.json within it and only the index over it.
    limit = size - 1 if victim == "config.json" else config_size
    monkeypatch.setattr(checkpoint_mod, "MAX_JSON_BYTES", limit)
    with pytest.raises(CheckpointError, match="limit") as err:
        Checkpoint(model)
    assert victim in str(err.value) and str(size) in str(err.value)
    monkeypatch.setattr(checkpoint_mod, "MAX_JSON_BYTES", 10 * size)
    Checkpoint(model)  # the same files under a larger limit are fine


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe garbage"])
def test_bad_config_json(model, content):
    (model / "config.json").write_text(content, encoding="latin-1")
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(model)


def test_missing_config_and_missing_dir(model, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint(tmp_path / "does-not-exist")
    (model / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(model)


def test_index_without_weight_map(model):
    (model / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint(model)


def _rss_file_mb() -> float:
    """Resident pages of mapped files (RssShmem too: a tmpfs tmp_path counts there)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    if "RssFile" not in fields:
        pytest.skip("no RssFile in /proc/self/status (not Linux)")
    return sum(fields.values())


def test_reads_leave_no_file_pages_resident(tmp_path):
    """Tensors are read with plain reads into fresh buffers, never through a memory map of
    the file: reading 64 MB adds no file-backed pages to the RSS (a mapped read would keep
    every page it touched), and the tensor read is an independent copy."""
    (tmp_path / "config.json").write_text("{}")
    a = torch.randn(4096, 4096)
    save_file({"a": a}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    before = _rss_file_mb()
    t = ckpt.get("a")
    assert torch.equal(t, a)  # touches every page
    held = _rss_file_mb()
    assert held - before < 8, (before, held)
    t.add_(1)  # writable, and not the file's bytes
    assert torch.equal(ckpt.get("a"), a)


def test_header_is_read_without_mapping_the_file(tmp_path, monkeypatch):
    """A file far larger than memory (a sparse 1 TB file here) is planned from its header:
    nothing maps it, and the table has the shapes, dtypes and data offsets of the header."""
    import mmap
    import struct

    def no_mmap(*a, **k):
        raise AssertionError("mmap called")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    (tmp_path / "config.json").write_text("{}")
    big = [2**19, 2**20]  # 2**39 bytes of BF16
    header = {"w": {"dtype": "BF16", "shape": big, "data_offsets": [0, 2**40]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [2**40, 2**40 + 12]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + 2**40 + 12)  # a hole: no disk blocks
    ckpt = Checkpoint(tmp_path)
    assert ckpt.tensors["w"].shape == tuple(big) and ckpt.tensors["w"].dtype == "BF16"
    assert ckpt.tensors["b"].offset == 8 + len(raw) + 2**40
    assert ckpt.get("b").tolist() == [0.0, 0.0, 0.0]  # the hole reads as zeros
    header["w"]["data_offsets"] = [0, 2**40 - 2]  # does not match shape × dtype
    raw = json.dumps(header).encode()
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="data_offsets"):
        Checkpoint(tmp_path)
