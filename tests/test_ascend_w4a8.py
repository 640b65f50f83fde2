"""``quant=w4a8 output.format=ascend quant.group_size=-1`` for MoE models (qwen3_moe, deepseek_v3,
glm4_moe): msModelSlim W4A8_DYNAMIC routed experts, every other quantized linear W8A8_DYNAMIC,
read back here with our own unpacker (nothing of dist_quant's writer is used to read):

* the int4 pairs (output channel 2r in the low nibble of row r), float32 per-channel scales, zero
  offsets and ``scale_bias`` = 8 · Σ_k q · scale as msModelSlim's ``process_scale`` computes it ([out, 1]
  for gate/up; [out, 16] input blocks for down, whose tensor-parallel column slices are the partial
  sums of each rank's input columns);
* dequantized (q · scale) with per-token int8 activations emulated in front of every quantized linear,
  the output reproduces the hidden states the run propagated, layer by layer;
* the description types, ``group_size`` 0, ``model_quant_type`` W8A8_DYNAMIC, config.json's
  ``quantize`` / ``moe_quantize`` / ``mla_quantize``; DeepSeek's kv_b_proj and the MTP layer FLOAT;
* vLLM-Ascend's parameter tables (tests/server_loaders.py) filled exactly, and its msModelSlim and
  compressed-tensors W4A8 loader paths giving the kernel the same int4 bytes and biases;
* dense models and quant.group_size != -1 refused in one line before any work; 2 ranks write the
  1-rank output bit-identically.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

import server_loaders as sl  # noqa: E402
from helpers import free_ports, make_job  # noqa: E402
from moe_jobs import run_inprocess  # noqa: E402
from moe_reference import QLinear, emulate_dynamic_activations, load_fake_quant  # noqa: E402
from reference import assert_layers_match_model, read_tensors  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402
from tiny_deepseek import make_tiny_deepseek  # noqa: E402
from tiny_moe import make_tiny_moe  # noqa: E402

EXPERTS = 4
NUM_SAMPLES, SEQ_LEN, BATCH = 8, 32, 4
W4A8 = ["quant=w4a8", "quant.group_size=-1", "output.format=ascend"]
SPLITS = 16  # msModelSlim process_scale(name, bias, 16)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_glm4_moe import make_tiny_glm4_moe

    root = tmp_path_factory.mktemp("ascend_w4a8")
    calib = root / "calib.txt"
    calib.write_text(corpus_text(30_000), encoding="utf-8")
    models = {"qwen3_moe": make_tiny_moe(root / "qwen3_moe", "qwen3_moe", layers=2, experts=EXPERTS),
              "deepseek_v3": make_tiny_deepseek(root / "ds", layers=2, experts=EXPERTS, mtp=1, n_group=2,
                                                topk_group=1),
              "glm4_moe": make_tiny_glm4_moe(root / "glm")}
    two = make_job("two", models["qwen3_moe"], root / "two", root / "two.run", calib, "w4a8",
                   tuple(W4A8[1:]) + (f"calib.batch_size={BATCH}",), nproc=2, port=free_ports(1)[0],
                   num_samples=NUM_SAMPLES, seq_len=SEQ_LEN).start()
    args = [f"calib.path={calib}", f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}",
            f"calib.batch_size={BATCH}"]
    try:
        one = {arch: run_inprocess(m, root / f"out_{arch}", args, *W4A8, capture=True) for arch, m in models.items()}
    finally:
        two.wait()
    return SimpleNamespace(root=root, calib=calib, models=models, one=one, two=two, args=args)


# -- our own reader ---------------------------------------------------------------------------------

def unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in], two's-complement nibbles, low nibble = even output channel → int64 [out, in]."""
    b = packed.to(torch.int64) & 0xFF
    lo, hi = b & 0x0F, b >> 4
    q = torch.empty(2 * packed.shape[0], packed.shape[1], dtype=torch.int64)
    q[0::2] = torch.where(lo >= 8, lo - 16, lo)
    q[1::2] = torch.where(hi >= 8, hi - 16, hi)
    return q


def read_ascend(out: Path):
    t = read_tensors(out)
    desc = json.loads((out / "quant_model_description.json").read_text())
    qlinears = {}
    for key, kind in desc.items():
        if not key.endswith(".weight") or kind == "FLOAT" or key not in t:
            continue
        mod = key[: -len(".weight")]
        scale, offset = t[mod + ".weight_scale"], t[mod + ".weight_offset"]
        assert torch.count_nonzero(offset) == 0, mod  # symmetric
        if kind == "W4A8_DYNAMIC":
            assert t[key].dtype == torch.int8 and scale.dtype == offset.dtype == torch.float32
            q = unpack_int4_pairs(t[key])
        else:
            assert kind == "W8A8_DYNAMIC", (key, kind)
            q = t[key].long()
        assert scale.shape == offset.shape == (q.shape[0], 1), mod
        qlinears[mod] = QLinear(q, scale.float(), None)
    return t, desc, qlinears


def process_scale(name: str, deq: torch.Tensor) -> torch.Tensor:
    """msModelSlim save/utils/pack.py ``process_scale(name, q · scale, 16)``, in float32 as it runs."""
    if name.endswith("down_proj"):
        out, n = deq.shape
        return (8 * deq.reshape(-1, n // SPLITS).sum(dim=1, keepdim=True)).reshape(out, -1)
    return 8 * deq.sum(dim=1, keepdim=True)


# -- the checks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_int4_pairs_scales_and_scale_bias_reproduce_the_run(env, arch):
    run = env.one[arch]
    t, desc, ql = read_ascend(run.out)
    experts = [n for n in ql if ".experts." in n and ".shared_experts." not in n]
    sparse = 2 if arch == "qwen3_moe" else 1  # deepseek / glm: layer 0 dense (first_k_dense_replace=1)
    assert len(experts) == sparse * EXPERTS * 3
    for name in experts:
        q, s = ql[name].q, ql[name].scale
        assert int(q.min()) >= -8 and int(q.max()) <= 7 and int(q.abs().max()) >= 7, name
        sb = t[name + ".scale_bias"]
        down = name.endswith("down_proj")
        assert sb.dtype == torch.float32 and sb.shape == (q.shape[0], SPLITS if down else 1), name
        torch.testing.assert_close(sb, process_scale(name, q.float() * s), rtol=1e-5, atol=1e-6)
        exact = 8 * q.double().sum(dim=1) * s.double().reshape(-1)
        torch.testing.assert_close(sb.double().sum(dim=1), exact, rtol=1e-6, atol=1e-6)
        if down:  # TP: rank r loads columns [r·16/tp, (r+1)·16/tp) = the sum over its input columns
            for tp in (2, 4):
                n = q.shape[1] // tp
                for r in range(tp):
                    part = 8 * q[:, r * n:(r + 1) * n].double().sum(dim=1) * s.double().reshape(-1)
                    got = sb[:, r * SPLITS // tp:(r + 1) * SPLITS // tp].double().sum(dim=1)
                    torch.testing.assert_close(got, part, rtol=1e-6, atol=1e-6)
    others = [n for n in ql if n not in experts]
    assert others
    for name in others:  # int8 per channel: the whole int8 range is used
        assert t[name + ".weight"].dtype == torch.int8 and int(ql[name].q.abs().max()) >= 100, name
        assert name + ".scale_bias" not in t
    # the dequantized output with per-token int8 activations = what the run propagated
    model, replaced = load_fake_quant(env.models[arch], run.out, attn="sdpa", tensors=t, qlinears=ql)
    assert replaced == set(ql)
    emulate_dynamic_activations(model, set(ql))
    assert run.calib.mask.all()
    assert_layers_match_model(model, run.calib.input_ids, run.xs, 1e-5, label=f"{arch} ")
    assert "servability: servable by vLLM-Ascend (ascend W4A8_DYNAMIC" in run.log


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_description_types_and_config_keys(env, arch):
    run = env.one[arch]
    t, desc, ql = read_ascend(run.out)
    assert (desc["model_quant_type"], desc["version"], desc["group_size"]) == ("W8A8_DYNAMIC", "1.0.0", 0)
    tensors = {k: v for k, v in desc.items() if k not in ("model_quant_type", "version", "group_size")}
    assert set(tensors) == set(t)  # every written tensor typed, nothing else (these model types map experts)
    for key, kind in tensors.items():
        mod, _, leaf = key.rpartition(".")
        routed = ".experts." in key and ".shared_experts." not in key
        if key.startswith("model.layers.2."):  # deepseek / glm: the MTP layer, written through
            assert kind == "FLOAT", key
        elif routed:
            assert kind == "W4A8_DYNAMIC" and leaf in ("weight", "weight_scale", "weight_offset", "scale_bias"), key
        elif mod in ql and leaf != "bias":  # a bias stays FLOAT (msModelSlim writes bias "FLOAT")
            assert kind == "W8A8_DYNAMIC" and leaf in ("weight", "weight_scale", "weight_offset"), key
        else:
            assert kind == "FLOAT", key
    attn = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj") if arch == "deepseek_v3" else \
        ("q_proj", "k_proj", "v_proj", "o_proj")
    for proj in attn:
        assert desc[f"model.layers.1.self_attn.{proj}.weight"] == "W8A8_DYNAMIC"
    if arch != "qwen3_moe":  # dense layer 0 and the shared experts: W8A8_DYNAMIC; MTP layer 2 FLOAT
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert desc[f"model.layers.0.mlp.{proj}.weight"] == "W8A8_DYNAMIC"
            assert desc[f"model.layers.1.mlp.shared_experts.{proj}.weight"] == "W8A8_DYNAMIC"
        mtp = [k for k in tensors if k.startswith("model.layers.2.")]
        assert mtp and all(tensors[k] == "FLOAT" for k in mtp)
    assert desc["model.layers.1.mlp.gate.weight"] == "FLOAT"  # the router
    config = json.loads((run.out / "config.json").read_text())
    assert (config["quantize"], config["moe_quantize"]) == ("w8a8_dynamic", "w4a8_dynamic")
    assert "quantization_config" not in config
    if arch == "deepseek_v3":
        assert config["mla_quantize"] == "w8a8_dynamic"
        for i in (0, 1):  # vLLM-Ascend's MLA asserts an unquantized kv_b_proj
            assert desc[f"model.layers.{i}.self_attn.kv_b_proj.weight"] == "FLOAT"
            assert t[f"model.layers.{i}.self_attn.kv_b_proj.weight"].is_floating_point()
    else:
        assert "mla_quantize" not in config
    kept = {row["name"]: row["to"] for row in run.report["fallback"]["linears"]}
    assert set(kept.values()) <= {"w8a8", "float"} and {n for n, to in kept.items() if to == "w8a8"} == \
        {n for n in ql if not (".experts." in n and ".shared_experts." not in n)}


def test_vllm_ascend_loader_tables_and_both_w4a8_paths_agree(env):
    """qwen3_moe layer 0 into vLLM-Ascend's parameters (AscendW8A8DynamicLinearMethod for attention,
    AscendW4A8DynamicFusedMoEMethod msModelSlim path for the experts), then its
    process_weights_after_loading_modelslim against the compressed-tensors path of the same method
    (process_weights_after_loading_compressed_tensors: int4 one a byte, packed there by
    _pack_int4_to_int8, scale_bias = 8 · Σ weight · scale): the kernel gets the same bytes and biases."""
    run = env.one["qwen3_moe"]
    t, desc, ql = read_ascend(run.out)
    config = json.loads((run.out / "config.json").read_text())
    pd = getattr(torch, config["torch_dtype"])
    modules = sl.layer_modules(config, 0, lambda o, i: sl.ascend_w8a8_dynamic(o, i, pd),
                               lambda e, h, i: sl.ascend_w4a8_dynamic_moe(e, h, i, pd), False, pd)
    for m in modules:
        kind = sl.ascend_quant_type(desc, m.name, "qwen3_moe", m.kind)
        assert kind == ("W4A8_DYNAMIC" if m.kind == "moe" else "W8A8_DYNAMIC"), m.name
    layer0 = {k: v for k, v in t.items() if k.startswith("model.layers.0.") and k.rsplit(".", 1)[0] in ql}
    loaded = sl.load(modules, layer0)
    sl.check_complete(modules, loaded)
    assert loaded.consumed == set(layer0)

    v = loaded.values
    block = "model.layers.0.mlp.experts"
    w13 = v[f"{block}.w13_weight"].to(torch.int64).transpose(1, 2)  # modelslim: transpose, then view as int32
    w2 = v[f"{block}.w2_weight"].to(torch.int64).transpose(1, 2)

    def ct_pack(q):  # _pack_int4_to_int8 on the transposed one-int4-a-byte weight
        pairs = q.reshape(*q.shape[:-1], -1, 2)
        return (((pairs[..., 1] << 4) | (pairs[..., 0] & 0x0F)) & 0xFF).to(torch.uint8).view(torch.int8).long()

    ql13 = torch.stack([torch.cat([ql[f"{block}.{e}.gate_proj"].q, ql[f"{block}.{e}.up_proj"].q]) for e in range(EXPERTS)])
    ql2 = torch.stack([ql[f"{block}.{e}.down_proj"].q for e in range(EXPERTS)])
    assert torch.equal(w13, ct_pack(ql13.transpose(1, 2)))
    assert torch.equal(w2, ct_pack(ql2.transpose(1, 2)))
    s13 = v[f"{block}.w13_weight_scale"]  # [E, 2I, 1]
    s2 = v[f"{block}.w2_weight_scale"]
    bias13 = v[f"{block}.w13_scale_bias"].transpose(1, 2).sum(dim=1)  # modelslim: transpose(1, 2).sum(axis=1)
    bias2 = v[f"{block}.w2_scale_bias"].transpose(1, 2).sum(dim=1)
    ct13 = 8 * (ql13.transpose(1, 2).double() * s13.transpose(1, 2)).sum(dim=1)  # update_bias_compressed_tensors
    ct2 = 8 * (ql2.transpose(1, 2).double() * s2.transpose(1, 2)).sum(dim=1)
    torch.testing.assert_close(bias13, ct13, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias2, ct2, rtol=1e-6, atol=1e-6)


def test_two_ranks_write_the_one_rank_output_bit_identically(env):
    two = env.two.check()
    one = env.one["qwen3_moe"].out
    a, b = read_tensors(one), read_tensors(two)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for f in ("quant_model_description.json", "config.json"):
        assert json.loads((one / f).read_text()) == json.loads((two / f).read_text())


@pytest.mark.parametrize("model, extra, match", [
    ("dense", [], "registers W4A8_DYNAMIC for MoE experts only"),
    ("qwen3_moe", ["quant.group_size=32"], "quant.group_size=32: vLLM-Ascend's W4A8_DYNAMIC MoE method takes "
                                           "per-channel weights only"),
    ("inter24", [], "down_proj [64x24]: msModelSlim's W4A8_DYNAMIC packs output channels in pairs and splits a "
                    "down projection's scale_bias into 16 equal input blocks"),
])
def test_refused_in_one_line_before_any_work(env, capsys, model, extra, match):
    from dist_quant.__main__ import main

    if model == "dense":
        path = make_tiny_model(env.root / "dense", arch="qwen2", layers=1)
    elif model == "inter24":  # 24 expert input columns do not split into 16 scale_bias blocks
        path = make_tiny_moe(env.root / "inter24", "qwen3_moe", layers=1, experts=EXPERTS, expert_intermediate=24)
    else:
        path = env.models[model]
    out = env.root / f"refused_{model}"
    argv = [f"model.path={path}", *env.args, f"output.dir={out}", f"runtime.run_dir={out}.run", *W4A8, *extra]
    assert main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], errors
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_packing_is_msmodelslims_int8_arithmetic_bit_for_bit():
    """formats/ascend.pack_int4_pairs against msModelSlim's w4a8_pack_int4 as it computes (int8
    tensors: transpose, pairs of the last dim, ``bitwise_left_shift(w1, 4) | (w0 & 0x0F)`` with int8
    wrap-around, transpose back), on every int4 value pair; and our unpacker inverts it."""
    from dist_quant.formats.ascend import pack_int4_pairs

    vals = torch.arange(-8, 8)
    pairs = torch.cartesian_prod(vals, vals).T.contiguous()  # [2, 256]: every (even, odd) output pair
    q = torch.cat([pairs, torch.randint(-8, 8, (6, 256))]).to(torch.int8)  # [out=8, in=256]
    w = q.transpose(-1, -2).contiguous().reshape(-1, 2)
    ref = torch.bitwise_or(torch.bitwise_left_shift(w[:, 1:], 4), w[:, :1] & 0b00001111)
    ref = ref.reshape(q.shape[1], q.shape[0] // 2).transpose(-1, -2).contiguous()
    got = pack_int4_pairs(q)
    assert got.dtype == torch.int8 and torch.equal(got, ref)
    assert torch.equal(unpack_int4_pairs(got), q.long())
