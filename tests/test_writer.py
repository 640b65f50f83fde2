"""Streaming safetensors part files (dist_quant/writer.py), read back with the reference
``safetensors`` library and compared bit for bit."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_quant.tensorspec import TensorSpec
from dist_quant.writer import PartFile, RankWriter, WriterError, plan_parts, write_index

ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32", torch.int64: "I64",
            torch.float16: "F16", torch.int8: "I8"}


def make_tensors(seed: int, n: int, prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    kinds = ["f32", "bf16", "i32", "i64", "f16", "i8"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rows, cols = 1 + (i * 7) % 13, 1 + (i * 5) % 11
        if kind == "f32":
            t = torch.randn(rows, cols, generator=g) * 1e3
        elif kind == "bf16":
            t = torch.randn(rows, cols, 3, generator=g).to(torch.bfloat16)
        elif kind == "f16":
            t = torch.randn(cols, generator=g).to(torch.float16)
        elif kind == "i32":
            t = torch.randint(-2**31, 2**31 - 1, (rows, cols), generator=g, dtype=torch.int32)
        elif kind == "i64":
            t = torch.randint(-2**62, 2**62, (cols,), generator=g, dtype=torch.int64)  # 1-D
        else:
            t = torch.randint(-128, 127, (rows, cols), generator=g, dtype=torch.int8)
        out[f"{prefix}.t{i:02d}.{kind}"] = t
    out[f"{prefix}.shape"] = torch.tensor([4096, 11008], dtype=torch.int64)
    out[f"{prefix}.big"] = torch.randn(40, 40, generator=g)  # 6400 bytes: larger than the limit below
    return out


def spec(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, ST_DTYPE[t.dtype], tuple(t.shape))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def data_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_all(directory: Path, per_rank_tensors: list[dict[str, torch.Tensor]], limit: int, seed: int = 0):
    per_rank_specs = [[spec(n, t) for n, t in d.items()] for d in per_rank_tensors]
    parts = plan_parts(per_rank_specs, limit)
    weight_map: dict[str, str] = {}
    for rank, tensors in enumerate(per_rank_tensors):
        writer = RankWriter(directory, parts, rank)
        order = list(tensors)
        random.Random(seed + rank).shuffle(order)
        for name in order:
            writer.add(name, tensors[name])
        got = writer.finish()
        assert not set(got) & set(weight_map)
        weight_map.update(got)
    return parts, weight_map


LIMIT = 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roundtrip_two_ranks_shuffled_bit_exact(tmp_path, seed):
    ranks = [make_tensors(10 + seed, 23, "r0"), make_tensors(20 + seed, 17, "r1")]
    parts, weight_map = write_all(tmp_path, ranks, LIMIT, seed)

    # Global naming model-0000k-of-0000N, rank 0's parts first, k = 1..N.
    n = len(parts)
    assert n > 2
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert [p.file for p in parts] == files
    ranks_in_order = [p.rank for p in parts]
    assert ranks_in_order == sorted(ranks_in_order) and set(ranks_in_order) == {0, 1}
    for f in files:
        assert re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)

    # Everything reads back bit-exactly with the reference reader, from the file the map names.
    everything = {**ranks[0], **ranks[1]}
    assert set(weight_map) == set(everything)
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(tmp_path / f))
        assert not set(part) & set(loaded)
        loaded.update(part)
        for name in part:
            assert weight_map[name] == f
    assert set(loaded) == set(everything)
    for name, ref in everything.items():
        got = loaded[name]
        assert got.dtype == ref.dtype, name
        assert got.shape == ref.shape, name
        assert torch.equal(bits(got), bits(ref)), name

    # Each rank's tensors stay in its own files, in its plan order.
    for rank, tensors in enumerate(ranks):
        mine = [p for p in parts if p.rank == rank]
        assert [s.name for p in mine for s in p.tensors] == list(tensors)
        for name in tensors:
            assert weight_map[name] in {p.file for p in mine}

    # Part size limit: a part exceeds it only when it is a single larger tensor; file sizes match.
    for p in parts:
        size = sum(data_bytes(everything[s.name]) for s in p.tensors)
        assert size == p.nbytes
        if size > LIMIT:
            assert len(p.tensors) == 1 and p.nbytes > LIMIT
        with open(tmp_path / p.file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
        assert (tmp_path / p.file).stat().st_size == 8 + header_len + size
    assert any(len(p.tensors) == 1 and p.nbytes > LIMIT for p in parts)  # the "big" tensors

    # Parts are filled greedily: the next tensor of the same rank did not fit.
    for a, b in zip(parts, parts[1:]):
        if a.rank == b.rank:
            assert a.nbytes + b.tensors[0].nbytes > LIMIT

    # Index.
    write_index(tmp_path, parts, weight_map)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(data_bytes(t) for t in everything.values())
    assert index["weight_map"] == weight_map
    for name, f in index["weight_map"].items():
        with safe_open(str(tmp_path / f), framework="pt") as fh:
            assert name in fh.keys()


def test_plan_parts_limits_and_naming_without_writing():
    specs = [[TensorSpec(f"a{i}", "F32", (100,)) for i in range(10)],  # 400 bytes each
             [TensorSpec("b0", "BF16", (3000,)), TensorSpec("b1", "I64", (2,))]]
    parts = plan_parts(specs, 1000, prefix="model")
    # rank 0: 2 per part (800 ≤ 1000 < 1200) → 5 parts; rank 1: b0 alone (6000 > limit), b1 → 2 parts.
    assert [[s.name for s in p.tensors] for p in parts] == [
        ["a0", "a1"], ["a2", "a3"], ["a4", "a5"], ["a6", "a7"], ["a8", "a9"], ["b0"], ["b1"]]
    assert [p.rank for p in parts] == [0] * 5 + [1] * 2
    assert [p.file for p in parts] == [f"model-{k:05d}-of-00007.safetensors" for k in range(1, 8)]
    assert parts[5].nbytes == 6000
    # A limit exactly equal to two tensors keeps them together.
    assert len(plan_parts([[TensorSpec("x", "F32", (250,)), TensorSpec("y", "F32", (250,))]], 2000)) == 1
    # An empty rank has no parts and does not disturb the numbering.
    parts = plan_parts([[], [TensorSpec("z", "F32", (1,))], []], 10)
    assert [(p.rank, p.file) for p in parts] == [(1, "model-00001-of-00001.safetensors")]


def one_part(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> tuple[list[PartFile], RankWriter]:
    parts = plan_parts([[spec(n, t) for n, t in tensors.items()]], 10**9)
    return parts, RankWriter(tmp_path, parts, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(tmp_path, dtype, bad):
    t = torch.ones(4, 4, dtype=dtype)
    t[2, 3] = bad
    _, writer = one_part(tmp_path, {"ok": torch.ones(2), "bad": t})
    with pytest.raises(WriterError, match="'bad'.*(NaN|Inf)"):
        writer.add("bad", t)
    writer.abort()


@pytest.mark.parametrize("wrong", [
    torch.zeros(3, 5),  # shape
    torch.zeros(5, 3, dtype=torch.bfloat16),  # dtype
    torch.zeros(15),  # same numel, other shape
    torch.zeros(5, 3, dtype=torch.int32),  # same size in bytes, other dtype
])
def test_wrong_shape_or_dtype_is_an_error(tmp_path, wrong):
    tensors = {"first": torch.zeros(5, 3), "second": torch.zeros(2)}
    _, writer = one_part(tmp_path, tensors)
    with pytest.raises(WriterError, match="'first'"):
        writer.add("first", wrong)
    writer.abort()


def test_wrong_tensor_arriving_early_is_caught_when_its_turn_comes(tmp_path):
    tensors = {"first": torch.zeros(2), "second": torch.zeros(5, 3)}
    _, writer = one_part(tmp_path, tensors)
    writer.add("second", torch.zeros(3, 5))  # pending: first has not arrived yet
    with pytest.raises(WriterError, match="'second'"):
        writer.add("first", tensors["first"])
    writer.abort()


def test_finish_complains_about_a_missing_last_tensor(tmp_path):
    tensors = make_tensors(3, 6, "m")
    _, writer = one_part(tmp_path, tensors)
    missing = list(tensors)[-1]
    for name in list(tensors)[:-1]:
        writer.add(name, tensors[name])
    with pytest.raises(WriterError, match=re.escape(repr(missing))):
        writer.finish()
    writer.abort()


def test_finish_names_a_missing_tensor_in_the_middle(tmp_path):
    tensors = make_tensors(4, 6, "m")
    _, writer = one_part(tmp_path, tensors)
    missing = list(tensors)[2]
    for name in tensors:
        if name != missing:
            writer.add(name, tensors[name])
    with pytest.raises(WriterError) as err:
        writer.finish()
    writer.abort()
    assert repr(missing) in str(err.value)


def test_finish_complains_about_missing_tensors_at_all(tmp_path):
    """Whatever the wording, finish() must not succeed while planned tensors are missing."""
    tensors = make_tensors(5, 6, "m")
    for skip in range(len(tensors)):
        sub = tmp_path / str(skip)
        sub.mkdir()
        _, writer = one_part(sub, tensors)
        for i, name in enumerate(tensors):
            if i != skip:
                writer.add(name, tensors[name])
        with pytest.raises(WriterError):
            writer.finish()
        writer.abort()


def test_unplanned_and_duplicate_tensors(tmp_path):
    tensors = {"a": torch.zeros(2), "b": torch.zeros(3)}
    _, writer = one_part(tmp_path, tensors)
    writer.add("zzz", torch.zeros(1))
    writer.add("b", tensors["b"])
    with pytest.raises(WriterError, match="twice"):
        writer.add("b", tensors["b"])
    writer.add("a", tensors["a"])
    with pytest.raises(WriterError, match="zzz"):
        writer.finish()
    writer.abort()


def test_write_index_total_size_and_sorted_weight_map(tmp_path):
    parts = plan_parts([[TensorSpec("w.b", "BF16", (3, 4)), TensorSpec("w.a", "I32", (5,))],
                        [TensorSpec("v", "I64", (7,))]], 24)
    weight_map = {"w.b": parts[0].file, "w.a": parts[0].file, "v": parts[1].file}
    write_index(tmp_path, parts, weight_map)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 3 * 4 * 2 + 5 * 4 + 7 * 8
    assert index["weight_map"] == weight_map
    assert list(index["weight_map"]) == sorted(weight_map)
