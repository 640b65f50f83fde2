"""Owner plan (dist_quant/plan.py) against hand-built checkpoints whose contents are known.

The checkpoints are written here with safetensors directly (HF tensor naming of llama /
qwen2 decoders), so the expected sets of linears / other tensors are independent of the
code under test.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_quant.arch import UnsupportedModel
from dist_quant.checkpoint import Checkpoint
from dist_quant.config import ConfigError, QuantConfig
from dist_quant.plan import assign_owners, inspect_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_checkpoint(directory: Path, model_type: str = "llama", layers: int = 2, hidden: int = 64,
                     intermediate: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 96,
                     tied: bool = False) -> Path:
    """A tiny HF-layout checkpoint; qwen2 gets q/k/v biases like the real architecture."""
    directory.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    if not tied:
        t["lm_head.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        t[p + "self_attn.q_proj.weight"] = rnd(hidden, hidden)
        t[p + "self_attn.k_proj.weight"] = rnd(kv, hidden)
        t[p + "self_attn.v_proj.weight"] = rnd(kv, hidden)
        t[p + "self_attn.o_proj.weight"] = rnd(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = rnd(intermediate, hidden)
        t[p + "mlp.up_proj.weight"] = rnd(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = rnd(hidden, intermediate)
        if model_type == "qwen2":
            t[p + "self_attn.q_proj.bias"] = rnd(hidden)
            t[p + "self_attn.k_proj.bias"] = rnd(kv)
            t[p + "self_attn.v_proj.bias"] = rnd(kv)
    save_file(t, str(directory / "model.safetensors"))
    config = {"model_type": model_type, "num_hidden_layers": layers, "hidden_size": hidden,
              "intermediate_size": intermediate, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": tied}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama"), "llama", layers=4)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", layers=2)


def quant(**kw) -> QuantConfig:
    kw.setdefault("group_size", 32)
    return QuantConfig(**kw)


def ref_gptq_cost(out_f: int, in_f: int) -> float:
    """Documented GPTQ solve cost model: n^2 (n/3 + m) for an [m, n] weight."""
    return in_f * in_f * (in_f / 3 + out_f)


def owners_as_tuple(op):
    return op.world_size, sorted(op.owner.items()), op.solve_cost, op.write_bytes


# -- determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_owner_plan_is_deterministic_and_independent_of_tensor_order(llama, method, world_size):
    ckpt_a = Checkpoint(llama)
    plan_a = inspect_model(ckpt_a, quant())
    first = assign_owners(plan_a, ckpt_a, world_size, method)
    again = assign_owners(inspect_model(ckpt_a, quant()), ckpt_a, world_size, method)
    assert owners_as_tuple(first) == owners_as_tuple(again)

    for seed in (1, 2, 3):
        ckpt_b = Checkpoint(llama)
        names = list(ckpt_b.tensors)
        random.Random(seed).shuffle(names)
        if seed == 1:
            names.reverse()
        ckpt_b.tensors = {n: ckpt_b.tensors[n] for n in names}
        assert list(ckpt_b.tensors) != list(ckpt_a.tensors)
        plan_b = inspect_model(ckpt_b, quant())
        assert plan_b == plan_a
        other = assign_owners(plan_b, ckpt_b, world_size, method)
        assert other.owner == first.owner
        assert owners_as_tuple(other) == owners_as_tuple(first)


# -- coverage --------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["llama", "qwen2"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_linear_and_every_other_tensor_owned_exactly_once(request, fixture, world_size):
    path = request.getfixturevalue(fixture)
    ckpt = Checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    plan = inspect_model(ckpt, quant())
    owners = assign_owners(plan, ckpt, world_size, "gptq")

    # Independent expectation from the layout written by build_checkpoint.
    expected_linears = {f"model.layers.{i}.{rel}" for i in range(cfg["num_hidden_layers"]) for rel in LINEARS}
    assert [lin.name for lin in plan.linears] == sorted(
        expected_linears, key=lambda n: (int(n.split(".")[2]), LINEARS.index(n.split(".", 3)[3])))
    assert len(plan.linears) == len(set(lin.name for lin in plan.linears))
    linear_weights = {n + ".weight" for n in expected_linears}
    linear_biases = {n + ".bias" for n in expected_linears if n + ".bias" in ckpt.tensors}
    assert bool(linear_biases) == (fixture == "qwen2")
    others = set(ckpt.tensors) - linear_weights - linear_biases

    for lin in plan.linears:
        w = ckpt.tensors[lin.name + ".weight"]
        assert (lin.out_features, lin.in_features) == w.shape
        assert lin.has_bias == (lin.name + ".bias" in ckpt.tensors)

    # The plan's buckets partition the checkpoint's tensors.
    buckets = [n + ".weight" for n in expected_linears] + sorted(linear_biases)
    buckets += [n for grp in plan.layer_tensors for n in grp] + list(plan.global_tensors)
    assert sorted(buckets) == sorted(ckpt.tensors)
    assert len(buckets) == len(set(buckets))

    # Owner map: every quantized linear (by FQN) and every other tensor, each once, valid rank.
    for name in expected_linears | others:
        assert name in owners.owner, name
    assert set(owners.owner) - linear_biases == expected_linears | others
    assert not set(owners.owner) & linear_weights  # linear weights are owned through their FQN
    assert all(0 <= r < world_size for r in owners.owner.values())
    owned = [n for r in range(world_size) for n in owners.owned_by(r)]
    assert sorted(owned) == sorted(owners.owner)

    # Biases go with their linear's owner (explicitly, or implicitly through the output lists).
    for bias in linear_biases:
        lin = bias[: -len(".bias")]
        assert owners.owner.get(bias, owners.owner[lin]) == owners.owner[lin]
    from dist_quant.pipeline import output_specs
    from dist_quant.quant.qparams import QuantArgs

    per_rank = output_specs(plan, owners, ckpt, QuantArgs(4, 32))
    written = [s.name for specs in per_rank for s in specs]
    assert len(written) == len(set(written))
    where = {s.name: r for r, specs in enumerate(per_rank) for s in specs}
    for bias in linear_biases:
        assert where[bias] == owners.owner[bias[: -len(".bias")]]
    for name in others:
        assert where[name] == owners.owner[name]
    for lin in expected_linears:
        assert where[lin + ".weight_packed"] == owners.owner[lin]
    assert set(where) == others | linear_biases | {
        f"{lin}.{k}" for lin in expected_linears for k in ("weight_packed", "weight_scale", "weight_shape")}


# -- balance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_solve_cost_is_balanced_over_two_ranks(llama, method):
    ckpt = Checkpoint(llama)
    plan = inspect_model(ckpt, quant())
    assert plan.num_layers >= 4
    owners = assign_owners(plan, ckpt, 2, method)
    cost = [0.0, 0.0]
    for lin in plan.linears:
        w = ckpt.tensors[lin.name + ".weight"].shape
        c = ref_gptq_cost(*w) if method == "gptq" else float(w[0] * w[1])
        cost[owners.owner[lin.name]] += c
    assert owners.solve_cost == pytest.approx(tuple(cost))
    mean = sum(cost) / 2
    assert max(cost) <= 1.25 * mean, cost
    assert min(cost) >= 0.75 * mean, cost
    # Both ranks solve something in every layer (the stage-wise packing spreads each layer).
    for i in range(plan.num_layers):
        assert {owners.owner[lin.name] for lin in plan.layer_linears(i)} == {0, 1}
    # Bytes to write are spread too.
    assert sum(owners.write_bytes) == sum(t.nbytes for t in ckpt.tensors.values()
                                          if not t.name.endswith(".bias"))
    assert max(owners.write_bytes) <= 1.5 * sum(owners.write_bytes) / 2


def test_world_size_larger_than_number_of_linears(qwen2):
    ckpt = Checkpoint(qwen2)
    plan = inspect_model(ckpt, quant())
    world = 3 * len(plan.linears)
    owners = assign_owners(plan, ckpt, world, "gptq")
    assert all(0 <= r < world for r in owners.owner.values())
    assert {lin.name for lin in plan.linears} <= set(owners.owner)
    # Each linear gets a rank of its own: there are more ranks than linears.
    assert len({owners.owner[lin.name] for lin in plan.linears}) == len(plan.linears)
    assert len(owners.solve_cost) == world and len(owners.write_bytes) == world
    from dist_quant.pipeline import output_specs
    from dist_quant.quant.qparams import QuantArgs
    from dist_quant.writer import plan_parts

    per_rank = output_specs(plan, owners, ckpt, QuantArgs(4, 32))
    assert len(per_rank) == world
    parts = plan_parts(per_rank, 10**6)
    assert {p.rank for p in parts} == {r for r in range(world) if per_rank[r]}


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [48, 128, 7])
def test_group_size_not_dividing_in_features_is_a_config_error(llama, group_size):
    ckpt = Checkpoint(llama)
    with pytest.raises(ConfigError) as err:
        inspect_model(ckpt, quant(group_size=group_size))
    msg = str(err.value)
    assert f"quant.group_size={group_size}" in msg
    assert "model.layers.0.self_attn.q_proj" in msg  # first linear with 64 input features
    assert "64" in msg


def test_group_size_dividing_hidden_but_not_intermediate(tmp_path):
    path = build_checkpoint(tmp_path / "m", layers=1, hidden=64, intermediate=96)
    with pytest.raises(ConfigError) as err:
        inspect_model(Checkpoint(path), quant(group_size=64))
    assert "model.layers.0.mlp.down_proj" in str(err.value)
    assert "96" in str(err.value)
    # Per-channel (-1) and a common divisor both work.
    assert len(inspect_model(Checkpoint(path), quant(group_size=-1)).linears) == 7
    assert len(inspect_model(Checkpoint(path), quant(group_size=32)).linears) == 7


@pytest.mark.parametrize("model_type", ["gpt2", "falcon_mamba"])
def test_unsupported_model_type_is_named(tmp_path, model_type):
    path = build_checkpoint(tmp_path / "m", layers=1)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match=repr(model_type)):
        inspect_model(Checkpoint(path), quant())


def test_missing_model_type_is_unsupported(tmp_path):
    path = build_checkpoint(tmp_path / "m", layers=1)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["model_type"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="model_type"):
        inspect_model(Checkpoint(path), quant())


# -- ignore ----------------------------------------------------------------------------------
def test_ignored_modules_stay_float_tensors(qwen2):
    ckpt = Checkpoint(qwen2)
    plan = inspect_model(ckpt, quant(ignore=["down_proj", "model.layers.1.self_attn.k_proj", "lm_head"]))
    names = {lin.name for lin in plan.linears}
    assert not any(n.endswith("down_proj") for n in names)
    assert "model.layers.1.self_attn.k_proj" not in names
    assert "model.layers.0.self_attn.k_proj" in names
    assert len(names) == 2 * 7 - 2 - 1
    # The ignored weights (and the ignored linear's bias) are plain tensors of their layer.
    assert "model.layers.0.mlp.down_proj.weight" in plan.layer_tensors[0]
    assert "model.layers.1.mlp.down_proj.weight" in plan.layer_tensors[1]
    assert "model.layers.1.self_attn.k_proj.weight" in plan.layer_tensors[1]
    assert "model.layers.1.self_attn.k_proj.bias" in plan.layer_tensors[1]
    assert "model.layers.0.self_attn.k_proj.bias" not in plan.layer_tensors[0]

    owners = assign_owners(plan, ckpt, 2, "gptq")
    from dist_quant.pipeline import output_specs
    from dist_quant.quant.qparams import QuantArgs

    per_rank = output_specs(plan, owners, ckpt, QuantArgs(4, 32))
    specs = {s.name: s for r in per_rank for s in r}
    for i in (0, 1):
        w = f"model.layers.{i}.mlp.down_proj.weight"
        assert specs[w].dtype == "F32" and specs[w].shape == (64, 128)
        assert f"model.layers.{i}.mlp.down_proj.weight_packed" not in specs
        assert f"model.layers.{i}.mlp.up_proj.weight_packed" in specs
        assert f"model.layers.{i}.mlp.up_proj.weight" not in specs
    assert specs["lm_head.weight"].dtype == "F32"
    assert specs["model.layers.1.self_attn.k_proj.weight"].dtype == "F32"
    assert specs["model.layers.1.self_attn.k_proj.bias"].dtype == "F32"


def test_tied_embeddings_detected(tmp_path):
    plan = inspect_model(Checkpoint(build_checkpoint(tmp_path / "m", layers=1, tied=True)), quant())
    assert plan.tied_embeddings
    assert "lm_head.weight" not in plan.global_tensors
    assert set(plan.global_tensors) == {"model.embed_tokens.weight", "model.norm.weight"}
