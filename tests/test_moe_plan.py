"""MoE planning from checkpoint keys (dist_quant/plan.py + dist_quant/arch/moe.py): every
routed expert's matrices are 2-D linears under the checkpoint's own names, the router stays
float by default, experts are owned whole and spread ≤ ceil(E / N) per layer and rank, and
the writer plans each expert's tensors for its owner. Checkpoints are written by
transformers' ``save_pretrained`` (tests/tiny_moe.py); expected names come from its keys."""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.checkpoint import Checkpoint  # noqa: E402
from dist_quant.config import QuantConfig  # noqa: E402
from dist_quant.pipeline import output_specs  # noqa: E402
from dist_quant.plan import assign_owners, inspect_model  # noqa: E402
from dist_quant.run import quant_args  # noqa: E402
from tiny_moe import MOE_ARCHS, make_tiny_moe  # noqa: E402

EXPERTS = {"qwen2_moe": 4, "qwen3_moe": 6, "mixtral": 5}
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
ROUTER = {"qwen2_moe": "mlp.gate", "qwen3_moe": "mlp.gate", "mixtral": "block_sparse_moe.gate"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for arch in MOE_ARCHS:
        extra = {"mlp_only_layers": [1]} if arch == "qwen2_moe" else {}
        out[arch] = Checkpoint(make_tiny_moe(tmp_path_factory.mktemp(arch), arch, layers=3,
                                             experts=EXPERTS[arch], tokenizer=False, vocab=96, **extra))
    return out


def quant(**kw) -> QuantConfig:
    kw.setdefault("group_size", 32)
    return QuantConfig(**kw)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_is_a_linear_under_its_checkpoint_name(ckpts, arch):
    ckpt = ckpts[arch]
    plan = inspect_model(ckpt, quant())
    names = {lin.name for lin in plan.linears}
    expert_keys = [n for n in ckpt.tensors if EXPERT_KEY.match(n)]
    assert expert_keys and all(len(ckpt.tensors[n].shape) == 2 for n in expert_keys)
    assert {n[: -len(".weight")] for n in expert_keys} == {lin.name for lin in plan.linears
                                                            if lin.expert is not None}
    for lin in plan.linears:
        m = EXPERT_KEY.match(lin.name + ".weight")
        if m:
            assert lin.expert == int(m.group(3)) and lin.layer == int(m.group(1))
            assert lin.stage == ("expert_out" if m.group(4) in ("down_proj", "w2") else "expert_in")
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)  # nothing fused
    sparse = [0, 2] if arch == "qwen2_moe" else [0, 1, 2]
    for i in sparse:
        router = f"model.layers.{i}.{ROUTER[arch]}"
        assert router in plan.ignored and router not in names  # float by default
        assert router + ".weight" in plan.layer_tensors[i]  # written as it is
        n_exp = len({lin.expert for lin in plan.layer_linears(i) if lin.expert is not None})
        assert n_exp == EXPERTS[arch]
    if arch == "qwen2_moe":  # a dense layer inside an MoE model, and the shared expert
        assert {lin.name for lin in plan.layer_linears(1)} >= {f"model.layers.1.mlp.{p}" for p in
                                                               ("gate_proj", "up_proj", "down_proj")}
        assert not any(lin.expert is not None for lin in plan.layer_linears(1))
        shared = {lin.name: lin.stage for lin in plan.layer_linears(0) if "shared_expert." in lin.name}
        assert shared == {"model.layers.0.mlp.shared_expert.gate_proj": "moe_in",
                          "model.layers.0.mlp.shared_expert.up_proj": "moe_in",
                          "model.layers.0.mlp.shared_expert.down_proj": "shared_out"}
        assert "model.layers.0.mlp.shared_expert_gate" in plan.ignored
    # Every checkpoint tensor is either a quantized linear's weight or written as it is.
    covered = {lin.name + ".weight" for lin in plan.linears} | {n for g in plan.layer_tensors for n in g} \
        | set(plan.global_tensors) | {lin.name + ".bias" for lin in plan.linears if lin.has_bias}
    assert covered == set(ckpt.tensors)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_quantized_when_removed_from_moe_ignore(ckpts, arch):
    plan = inspect_model(ckpts[arch], quant(moe_ignore=[]))
    router = {lin.name: lin.stage for lin in plan.linears if lin.name.endswith(ROUTER[arch])}
    assert set(router.values()) == {"moe_in"} and len(router) == 3 - (arch == "qwen2_moe")
    assert plan.ignored == ()
    if arch == "qwen2_moe":
        assert any(lin.name.endswith("shared_expert_gate") and lin.out_features == 1 for lin in plan.linears)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_owned_whole_and_spread_evenly(ckpts, arch, world_size):
    ckpt = ckpts[arch]
    plan = inspect_model(ckpt, quant())
    owners = assign_owners(plan, ckpt, world_size, "gptq")
    assert owners == assign_owners(plan, ckpt, world_size, "gptq")  # deterministic
    per_expert: dict[tuple[int, int], set[int]] = {}
    for lin in plan.linears:
        if lin.expert is not None:
            per_expert.setdefault((lin.layer, lin.expert), set()).add(owners.owner[lin.name])
    assert all(len(r) == 1 for r in per_expert.values())  # gate, up, down on one rank
    e = EXPERTS[arch]
    for layer in {k[0] for k in per_expert}:
        count = [0] * world_size
        for (i, _), ranks in per_expert.items():
            if i == layer:
                count[next(iter(ranks))] += 1
        assert max(count) <= math.ceil(e / world_size) and min(count) >= e // world_size, count


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_writer_plans_expert_tensors_for_their_owners(ckpts, arch):
    from dist_quant.config import JobConfig

    ckpt = ckpts[arch]
    cfg = JobConfig(quant=quant())
    plan = inspect_model(ckpt, cfg.quant)
    owners = assign_owners(plan, ckpt, 2, "gptq")
    per_rank = output_specs(plan, owners, ckpt, quant_args(cfg, ckpt, plan))
    where = {spec.name: r for r, specs in enumerate(per_rank) for spec in specs}
    assert len(where) == sum(len(s) for s in per_rank)  # each tensor planned once
    for lin in plan.linears:
        for suffix in (".weight_packed", ".weight_scale", ".weight_shape"):
            assert where[lin.name + suffix] == owners.owner[lin.name]
    expert_tensors = [n for n in where if EXPERT_KEY.match(n.rsplit(".", 1)[0] + ".weight")]
    assert {where[n] for n in expert_tensors} == {0, 1}
    for name in ckpt.tensors:  # float tensors keep their checkpoint names (router included)
        if not name.endswith(".weight") or name[: -len(".weight")] not in {lin.name for lin in plan.linears}:
            assert name in where


@pytest.mark.parametrize("ignore", [["w2"], ["model.layers.0.block_sparse_moe.experts.1.w3"]])
def test_ignoring_part_of_a_routed_expert_is_refused(ckpts, ignore):
    from dist_quant.config import ConfigError

    with pytest.raises(ConfigError, match="routed expert"):
        inspect_model(ckpts["mixtral"], quant(ignore=["lm_head", *ignore]))
