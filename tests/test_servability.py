"""The servability rules (dist_quant/servability.py) on published model shapes, against
expectations worked out here from the kernels' limits; the refusals; the warnings in the dry
run and at the start of a run; and docs/servers.md's table against the rules."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import run_main
from dist_quant.config import ConfigError
from dist_quant.servability import (ASCEND, HF, SERVERS, SGLANG, VLLM, Job, check, refuse, served_shapes,
                                    warnings)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "servers.md"


def dense_layer(hidden, inter, heads, kv, head_dim=None, layers=1):
    hd = head_dim or hidden // heads
    out = []
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj", heads * hd, hidden), (p + "self_attn.k_proj", kv * hd, hidden),
                (p + "self_attn.v_proj", kv * hd, hidden), (p + "self_attn.o_proj", hidden, heads * hd),
                (p + "mlp.gate_proj", inter, hidden), (p + "mlp.up_proj", inter, hidden),
                (p + "mlp.down_proj", hidden, inter)]
    return out


def moe_layer(hidden, inter, experts, block="mlp", names=("gate_proj", "up_proj", "down_proj")):
    out = dense_layer(hidden, 0, 8, 8)[:4]
    for e in range(experts):
        g, u, d = (f"model.layers.0.{block}.experts.{e}.{n}" for n in names)
        out += [(g, inter, hidden), (u, inter, hidden), (d, hidden, inter)]
    return out


def job(fmt="compressed-tensors", scheme="W4A16", group=128, sym=True, dtype="bfloat16", moe=False):
    return Job(fmt, scheme, group, sym, dtype, "qwen2_moe" if moe else "llama", moe)


def cannot(found, server):
    return [f for f in found[server] if f.rule.effect == "cannot serve"]


def test_smollm2_w4a16_marlin_limits():
    # SmolLM2-135M: hidden 576 (not a multiple of Marlin's 128-wide K tile), 9 heads / 3 kv of 64,
    # intermediate 1536: q/k/v fused 960 x 576, o 576 x 576, gate/up 3072 x 576 fail; down 576 x 1536 fits
    dense, moe = served_shapes(dense_layer(576, 1536, 9, 3, layers=30))
    assert len(dense) == 4 * 30 and not moe
    qkv = next(d for d in dense if d.name == "model.layers.0.self_attn.qkv_proj")
    assert (qkv.out_features, qkv.in_features) == (9 * 64 + 2 * 3 * 64, 576)
    found = check(job(group=64), dense, moe)
    (f,) = cannot(found, SGLANG)  # SGLang pads nothing
    assert len(f.where) == 3 * 30 and not any("down_proj" in w for w in f.where)
    assert not cannot(found, VLLM)  # vLLM >= v0.24.0 zero-pads Marlin's tiles ...
    (f,) = [f for f in found[VLLM] if f.rule.effect == "needs v0.24.0 or newer for"]  # ... older ones cannot
    assert len(f.where) == 3 * 30 and not any("down_proj" in w for w in f.where)
    assert not cannot(found, HF)
    assert cannot(found, ASCEND)  # no compressed-tensors W4A16 linear scheme on Ascend at all
    lines = warnings(job(group=64), dense, moe)
    assert any("SGLang (CUDA) cannot serve 90 linear(s)" in line for line in lines)
    assert any("vLLM (CUDA) needs v0.24.0 or newer for 90 linear(s)" in line for line in lines)
    assert lines[-1].startswith("servability: servable by vLLM (CUDA), transformers (CPU)")


def test_llama7b_shapes_fit_marlin_but_not_every_group_size():
    dense, moe = served_shapes(dense_layer(4096, 11008, 32, 32))
    assert not cannot(check(job(group=128), dense, moe), VLLM)
    assert not cannot(check(job(group=-1, scheme="W8A16"), dense, moe), VLLM)
    for server in (VLLM, SGLANG):  # Marlin: group sizes -1, 32, 64, 128 (padding does not change that)
        (f,) = cannot(check(job(group=256), dense, moe), server)
        assert len(f.where) == 4


@pytest.mark.parametrize("inter, group, sglang, vllm_new, vllm_old", [
    (1408, 128, True, True, True),  # Qwen1.5-MoE-A2.7B experts: Marlin MoE
    (96, 32, True, True, True),  # Marlin MoE refuses (96 % 64), the Triton WNA16 MoE method takes groups
    (96, -1, False, True, False),  # ... but asserts strategy "group"; vLLM >= v0.25.0 pads Marlin MoE's tiles
    (2000, 32, False, False, False),  # hidden 2040 % 128 != 0: no Marlin MoE; 2000 % 32: ... (below)
])
def test_moe_marlin_or_triton(inter, group, sglang, vllm_new, vllm_old):
    hidden = 2040 if inter == 2000 else 2048
    dense, moe = served_shapes(moe_layer(hidden, inter, 4))
    assert [(m.name, m.hidden, m.intermediate) for m in moe] == [("model.layers.0.mlp.experts", hidden, inter)]
    scheme = "W4A16" if group != -1 else "W8A16"
    if inter == 2000:  # Triton needs groups; per-channel experts off Marlin's shapes have no kernel anywhere
        group, scheme = -1, "W8A16"
    found = check(job(group=group, moe=True, scheme=scheme), dense, moe)

    def expert_findings(server, effect="cannot serve"):
        return [f for f in found[server] if f.rule.effect == effect and any("experts" in w for w in f.where)]

    assert (not expert_findings(SGLANG)) is sglang
    assert (not expert_findings(VLLM)) is vllm_new
    assert (not expert_findings(VLLM) and not expert_findings(VLLM, "needs v0.25.0 or newer for")) is vllm_old


def test_mixtral_expert_names_are_fused():
    dense, moe = served_shapes(moe_layer(4096, 14336, 8, "block_sparse_moe", ("w1", "w3", "w2")))
    assert [(m.name, m.hidden, m.intermediate) for m in moe] == [("model.layers.0.block_sparse_moe.experts",
                                                                  4096, 14336)]


@pytest.mark.parametrize("j, servers", [
    (job(scheme="W8A8", group=-1), {VLLM, HF}),  # static asymmetric activations: vLLM's azp kernels only
    (job(scheme="W8A8_DYNAMIC", group=-1), {VLLM, SGLANG, ASCEND, HF}),
    (job(scheme="W8A8_DYNAMIC", group=-1, moe=True), {VLLM, ASCEND}),  # SGLang: NPU only; transformers: no int8 experts
    (job(scheme="W8A16", group=-1, sym=False), {VLLM, HF}),  # vLLM only on Hopper (Machete); Marlin: no uint8 zp
    (job("ascend", "W8A8", -1, dtype="bfloat16"), {ASCEND}),
    (job("ascend", "W8A8", -1, dtype="float32"), set()),  # no deq_scale parameter for float32 serving
    (job("ascend", "W8A16", -1, sym=False, dtype="float16"), {ASCEND}),
    (job(scheme="W4A8_DYNAMIC", group=128), {HF}),  # vLLM: CPU kernel only; SGLang / Ascend: MoE only
    (job("ascend", "W4A8_DYNAMIC", -1, moe=True), {ASCEND}),  # msModelSlim W4A8_DYNAMIC experts
])
def test_which_server_serves_which_scheme(j, servers):
    dense, moe = served_shapes(moe_layer(4096, 1408, 2) if j.moe else dense_layer(4096, 11008, 32, 8))
    found = check(j, dense, moe)
    assert {s for s in SERVERS if not cannot(found, s)} == servers


@pytest.mark.parametrize("hidden, inter, fails", [(4096, 1408, False), (4100, 1408, True), (4096, 1410, True)])
def test_ascend_w4a8_experts_need_int32_views_of_the_packed_bytes(hidden, inter, fails):
    """_pack_to_int32 on the transposed packed experts: w13 [H, I] bytes (I % 4), w2 [I, H/2] (H % 8)."""
    dense, moe = served_shapes(moe_layer(hidden, inter, 2))
    found = [f for f in check(job("ascend", "W4A8_DYNAMIC", -1, moe=True), dense, moe)[ASCEND]
             if "_pack_to_int32" in f.rule.why]
    assert bool(found) == fails and all(f.where for f in found)


def test_transformers_dynamic_activations_differ_from_the_kernels():
    dense, moe = served_shapes(dense_layer(4096, 11008, 32, 8))
    found = check(job(scheme="W8A8_DYNAMIC", group=-1), dense, moe)
    assert not cannot(found, HF) and any("127.5" in f.rule.why for f in found[HF])


@pytest.mark.parametrize("j, match", [
    (job(sym=False, moe=True), "Only symmetric quantization is supported for MoE"),
    (job(scheme="W8A16", group=-1, sym=False, moe=True), "Only symmetric"),
    (job("ascend", "W8A16", -1, moe=True), "no W8A16 MoE scheme"),
    (job("ascend", "W4A8_DYNAMIC", -1), "registers W4A8_DYNAMIC for MoE experts only"),
    (Job("compressed-tensors", "W4A16", 128, True, "bfloat16", "deepseek_v3", True, kv_cache="fp8",
         kv_strategy="head", kv_layout="mla"), "quant.kv_cache='fp8' with quant.kv_cache_strategy='head'"),
    (Job("ascend", "W8A8_DYNAMIC", -1, True, "bfloat16", "deepseek_v3", True, kv_cache="int8", kv_strategy="head",
         kv_layout="mla"), "quant.kv_cache='int8' with quant.kv_cache_strategy='head'"),
    (Job("ascend", "W4A16", 128, True, "bfloat16", "deepseek_v3", True, kv_cache="int8", kv_layout="mla"),
     "npu_mla_prolog_v2"),  # FAKQuant's decode prolog needs int8 (W8A8) attention linears
])
def test_refusals(j, match):
    with pytest.raises(ConfigError, match=match):
        refuse(j)


@pytest.mark.parametrize("j", [job(moe=True), job(sym=False), job("ascend", "W8A8_DYNAMIC", -1, moe=True),
                               Job("compressed-tensors", "W4A16", 128, True, "bfloat16", "deepseek_v3", True,
                                   kv_cache="fp8", kv_layout="mla"),
                               Job("ascend", "W8A8_DYNAMIC", -1, True, "bfloat16", "llama", kv_cache="int8",
                                   kv_strategy="head"),
                               job("ascend", "W4A8_DYNAMIC", -1, moe=True),
                               *(Job("ascend", scheme, -1, True, "bfloat16", "deepseek_v3", True, kv_cache="int8",
                                     kv_layout="mla") for scheme in ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC"))])
def test_no_refusal_where_a_server_loads_it(j):
    refuse(j)


def test_dry_run_and_run_start_print_servability(tiny_model, calib_file, tmp_path):
    model = tiny_model(arch="llama", layers=1)  # hidden 64: below Marlin's K tile
    base = [f"model.path={model}", f"calib.path={calib_file}", "calib.num_samples=4", "calib.seq_len=32",
            "calib.batch_size=4", "quant=rtn_w4a16", "quant.group_size=32", f"runtime.run_dir={tmp_path / 'run'}"]
    code, out, err = run_main([*base, "dry_run=true", "runtime.world_size=2"])
    assert code == 0
    text = out + err
    assert "warning: servability: SGLang (CUDA) cannot serve" in text
    assert "warning: servability: vLLM (CUDA) needs v0.24.0 or newer for" in text
    assert "servable by vLLM (CUDA), transformers (CPU)" in text
    code, out, err = run_main([*base, f"output.dir={tmp_path / 'out'}", "runtime.threads=1"])
    assert code == 0
    assert "servability: SGLang (CUDA) cannot serve" in out + err + (
        tmp_path / "run" / "rank0.log").read_text()


# -- docs/servers.md's table is the rules' verdict ---------------------------------------------------

ROWS = {  # table row label → the job it describes (Marlin-friendly shapes, so only scheme support counts)
    "compressed-tensors W4A16 / W8A16, dense": job(),
    "compressed-tensors W4A16 / W8A16, MoE": job(moe=True),
    "compressed-tensors W8A8 static, dense": job(scheme="W8A8", group=-1),
    "compressed-tensors W8A8 dynamic, dense": job(scheme="W8A8_DYNAMIC", group=-1),
    "compressed-tensors W8A8 dynamic, MoE": job(scheme="W8A8_DYNAMIC", group=-1, moe=True),
    "compressed-tensors FP8_DYNAMIC / FP8 (static), dense": job(scheme="FP8_DYNAMIC", group=-1),
    "compressed-tensors FP8_BLOCK, dense": job(scheme="FP8_BLOCK", group=128),
    "compressed-tensors FP8_DYNAMIC / FP8_BLOCK, MoE": job(scheme="FP8_DYNAMIC", group=-1, moe=True),
    "compressed-tensors W4AFP8, dense and MoE": job(scheme="W4AFP8", group=128, moe=True),
    "compressed-tensors NVFP4A16 / NVFP4, dense": job(scheme="NVFP4", group=16),
    "compressed-tensors NVFP4A16 / NVFP4, MoE": job(scheme="NVFP4", group=16, moe=True),
    "compressed-tensors NVFP4A16 / NVFP4, DeepSeek-V3 / Kimi-K2 (MLA)":
        Job("compressed-tensors", "NVFP4", 16, True, "bfloat16", "deepseek_v3", True),
    "ascend W8A8, dense": job("ascend", "W8A8", -1),
    "ascend W8A8_DYNAMIC, dense and MoE": job("ascend", "W8A8_DYNAMIC", -1, moe=True),
    "ascend W8A16, dense": job("ascend", "W8A16", -1, sym=False),
    "compressed-tensors W4A8 dynamic, dense": job(scheme="W4A8_DYNAMIC", group=-1),
    "ascend W4A8_DYNAMIC (`quant=w4a8 output.format=ascend quant.group_size=-1`), MoE":
        job("ascend", "W4A8_DYNAMIC", -1, moe=True),
}


def test_docs_table_matches_the_rules():
    text = DOCS.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| output |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert columns == list(SERVERS)
    seen = set()
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" inside a cell
        if cells and cells[0] in ROWS:
            j = ROWS[cells[0]]
            dense, moe = served_shapes(moe_layer(4096, 1408, 2) if j.moe else dense_layer(4096, 11008, 32, 8))
            found = check(j, dense, moe)
            for server, cell in zip(SERVERS, cells[1:]):
                ok = not cannot(found, server)
                assert re.match(r"yes\b" if ok else r"no\b", cell), (cells[0], server, cell)
            seen.add(cells[0])
    assert seen == set(ROWS)
