"""MoE models through the whole job on one rank (``dist_quant.__main__.main`` in this
process), checked against an independent fake-quant reference (tests/moe_reference.py):

* the hidden states the layer loop propagates equal the transformers model whose linears
  (experts included) carry the dequantized output weights: true routing, top-k
  normalization as the model does, the shared expert with its sigmoid gate;
* the report's routed tokens per expert equal the reference router's counts;
* ``calib.all_experts=true`` gives every expert the statistics of every token without
  changing what is propagated;
* transformers loads the output and its logits equal the fake-quant reference;
* experts under ``calib.min_expert_tokens`` get the logged fallback (RTN, or all-token
  statistics), also an expert routed no token at all; never NaN.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_jobs import run_inprocess  # noqa: E402
from moe_reference import load_fake_quant, quantized_linears, router_counts  # noqa: E402
from reference import assert_layers_match_model, read_tensors  # noqa: E402
from tiny import corpus_text  # noqa: E402
from tiny_moe import MOE_ARCHS, make_tiny_moe  # noqa: E402

NUM_SAMPLES, SEQ_LEN, BATCH = 16, 64, 4
TOKENS = NUM_SAMPLES * SEQ_LEN
EXPERTS = {"qwen2_moe": 4, "qwen3_moe": 6, "mixtral": 5}
ATOL = 1e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    (root / "calib.txt").write_text(corpus_text(40_000), encoding="utf-8")
    models = {}
    for arch in MOE_ARCHS:
        models[arch] = make_tiny_moe(root / f"m_{arch}", arch, layers=2, experts=EXPERTS[arch])
    return SimpleNamespace(root=root, models=models, runs={})


def _calib_args(root: Path) -> list[str]:
    return ["quant.group_size=32", f"calib.path={root / 'calib.txt'}", f"calib.num_samples={NUM_SAMPLES}",
            f"calib.seq_len={SEQ_LEN}", f"calib.batch_size={BATCH}"]


def job(env, key, arch, *extra, capture=True):
    if (key, arch) not in env.runs:
        out = env.root / f"out_{key}_{arch}"
        args = _calib_args(env.root)
        if any(e.startswith("quant=") and "w8" in e for e in extra):  # 8-bit presets: per-channel weights
            args.remove("quant.group_size=32")
        env.runs[(key, arch)] = run_inprocess(env.models[arch], out, args, *extra, capture=capture)
    return env.runs[(key, arch)]


def check_propagation(env, arch, run):
    """Hidden states after each layer = the fake-quant transformers model's."""
    model, _ = load_fake_quant(env.models[arch], run.out)
    assert run.calib.mask.all()
    assert_layers_match_model(model, run.calib.input_ids, run.xs, ATOL, label=f"{arch} ")
    return model


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_propagation_and_coverage_follow_the_models_routing(env, arch):
    run = job(env, "gptq", arch)
    model = check_propagation(env, arch, run)
    counts = router_counts(model, run.calib.input_ids)
    section = run.report["moe"]
    assert [layer["layer"] for layer in section["layers"]] == [0, 1]
    for layer in section["layers"]:
        assert layer["tokens_per_expert"] == counts[layer["layer"]].tolist()
        assert sum(layer["tokens_per_expert"]) == TOKENS * 2  # top-2
        assert layer["experts_by_rank"] == {"0": list(range(EXPERTS[arch]))}
        assert layer["tokens_moved"] == 0  # one rank: nothing crosses ranks
        for e, routed in enumerate(layer["tokens_per_expert"]):
            for lin, info in run.report["layers"][layer["layer"]]["modules"].items():
                if f".experts.{e}." in lin:
                    assert info["routed_tokens"] == routed
                    if not layer["fallbacks"].get(str(e)):
                        assert info["tokens"] == routed and info["statistics"] == "routed_tokens"
    assert "MoE coverage:" in run.log and "layer 1 experts: routed tokens per expert min" in run.log


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_all_experts_statistics_do_not_change_propagation(env, arch):
    run = job(env, "all_experts", arch, "calib.all_experts=true")
    check_propagation(env, arch, run)  # still the routed model, with this run's weights
    base = job(env, "gptq", arch)
    layer0 = run.report["moe"]["layers"][0]
    assert layer0["tokens_per_expert"] == base.report["moe"]["layers"][0]["tokens_per_expert"]
    for layer in run.report["layers"]:
        for lin, info in layer["modules"].items():
            if info.get("expert") is not None:
                assert info["tokens"] == TOKENS and info["statistics"] == "all_tokens", lin
    # Layer 0's experts now see all tokens: different GPTQ solutions than with routed tokens.
    a, b = read_tensors(run.out), read_tensors(base.out)
    experts0 = [n for n in a if ".layers.0." in n and ".experts." in n and n.endswith("weight_packed")]
    assert any(not torch.equal(a[n], b[n]) for n in experts0)
    attn0 = [n for n in a if ".layers.0.self_attn." in n]
    assert all(torch.equal(a[n], b[n]) for n in attn0)  # upstream of the experts: unchanged


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_transformers_loads_output_with_fake_quant_logits(env, arch):
    from transformers import AutoModelForCausalLM

    run = job(env, "gptq", arch)
    loaded, info = AutoModelForCausalLM.from_pretrained(str(run.out), dtype=torch.float32,
                                                        attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref, replaced = load_fake_quant(env.models[arch], run.out)
    assert sum(".experts." in n for n in replaced) == 2 * 3 * EXPERTS[arch]
    floatm = AutoModelForCausalLM.from_pretrained(str(env.models[arch]), dtype=torch.float32,
                                                  attn_implementation="eager")
    torch.manual_seed(1)
    ids = torch.randint(0, floatm.config.vocab_size, (2, 40))
    with torch.no_grad():
        got, want, fp = loaded(ids).logits, ref(ids).logits, floatm(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert 0 < (got - fp).norm() / fp.norm() < 0.5  # quantized, and still the same model
    qc = json.loads((run.out / "config.json").read_text())["quantization_config"]
    router = "block_sparse_moe.gate" if arch == "mixtral" else "mlp.gate"
    assert {f"model.layers.{i}.{router}" for i in range(2)} <= set(qc["ignore"])
    out = read_tensors(run.out)
    for i in range(2):  # router kept float, under its checkpoint name
        name = f"model.layers.{i}.{router}.weight"
        assert out[name].dtype == torch.float32 and out[name].shape == (EXPERTS[arch], 64)


def test_w8_rtn_per_channel_loads(env):
    from transformers import AutoModelForCausalLM

    run = job(env, "rtn_w8", "qwen2_moe", "quant=rtn_w8a16", capture=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(run.out), dtype=torch.float32, attn_implementation="eager")
    ref, _ = load_fake_quant(env.models["qwen2_moe"], run.out)
    ids = torch.arange(48).reshape(2, 24) * 7 % loaded.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=2e-4, rtol=1e-4)
    src = read_tensors(env.models["qwen2_moe"])
    for name, ql in quantized_linears(read_tensors(run.out), 8).items():
        assert ql.scale.shape[1] == 1  # one scale per output channel
        assert torch.equal(ql.q, independent_rtn(src[name + ".weight"], 8, -1)), name


def independent_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric RTN from the documented formulas: scale = max|w| / ((qmax - qmin) / 2)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    cols = w.shape[1] if group == -1 else group
    g = w.float().reshape(w.shape[0], -1, cols)
    scale = (g.abs().amax(dim=2, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    return torch.clamp(torch.round(g / scale), qmin, qmax).reshape(w.shape).long()


def test_fallback_rtn_below_min_tokens(env):
    # min/max scales, as the independent RTN reference computes them (the preset's default is mse)
    run = job(env, "fb_rtn", "qwen3_moe", "calib.min_expert_tokens=1000000", "calib.expert_fallback=rtn",
              "quant.observer=minmax")
    check_propagation(env, "qwen3_moe", run)
    src = read_tensors(env.models["qwen3_moe"])
    out = quantized_linears(read_tensors(run.out), 4)
    for layer in run.report["moe"]["layers"]:
        assert layer["fallbacks"] == {str(e): "rtn" for e in range(EXPERTS["qwen3_moe"])}
    experts = [n for n in out if ".experts." in n]
    assert len(experts) == 2 * 3 * EXPERTS["qwen3_moe"]
    for name in experts:
        assert torch.equal(out[name].q, independent_rtn(src[name + ".weight"], 4, 32)), name
    # the other linears are still GPTQ (differ from RTN somewhere)
    assert any(not torch.equal(out[n].q, independent_rtn(src[n + ".weight"], 4, 32)) for n in out
               if ".self_attn." in n)
    for e in range(EXPERTS["qwen3_moe"]):
        assert f"model.layers.1.mlp.experts.{e}:" in run.log and "expert_fallback=rtn" in run.log
    assert run.report["moe"]["fallbacks"] == 2 * EXPERTS["qwen3_moe"]
    assert "MoE fallback: layer 1 expert 5" in run.log


def test_fallback_all_tokens_below_min_tokens(env):
    run = job(env, "fb_all", "mixtral", "calib.min_expert_tokens=1000000")
    check_propagation(env, "mixtral", run)
    for layer in run.report["layers"]:
        for lin, info in layer["modules"].items():
            if info.get("expert") is not None:
                assert info["expert_fallback"] == "all_tokens" and info["tokens"] == TOKENS, lin
                assert math.isfinite(info["rel_output_error"])
    assert "expert_fallback=all_tokens: statistics of all 1024 calibration tokens" in run.log


def _never_expert_zero(self, hidden_states):
    """The qwen2_moe router with expert 0 masked out (so it receives no token)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight)
    logits[:, 0] = float("-inf")
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top /= top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), idx


@pytest.mark.parametrize("fallback", ["rtn", "all_tokens"])
def test_expert_routed_no_token_is_never_skipped(env, monkeypatch, fallback):
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    monkeypatch.setattr(modeling_qwen2_moe.Qwen2MoeTopKRouter, "forward", _never_expert_zero)
    run = job(env, f"zero_{fallback}", "qwen2_moe", "calib.min_expert_tokens=0",
              f"calib.expert_fallback={fallback}", "quant.observer=minmax")
    check_propagation(env, "qwen2_moe", run)  # the reference uses the same masked router
    for layer in run.report["moe"]["layers"]:
        assert layer["tokens_per_expert"][0] == 0
        assert layer["fallbacks"] == {"0": fallback}  # min_expert_tokens=0 still catches 0 tokens
    out = read_tensors(run.out)
    assert all(torch.isfinite(t).all() for t in out.values() if t.is_floating_point())
    mods = run.report["layers"][0]["modules"]
    gate = mods["model.layers.0.mlp.experts.0.gate_proj"]
    assert math.isfinite(gate["rel_output_error"])
    if fallback == "rtn":
        assert gate["tokens"] == 0 and gate["statistics"] == "weights"  # error measured on the weights
        src = read_tensors(env.models["qwen2_moe"])
        q = quantized_linears(out, 4)["model.layers.0.mlp.experts.0.down_proj"].q
        assert torch.equal(q, independent_rtn(src["model.layers.0.mlp.experts.0.down_proj.weight"], 4, 32))
    else:
        assert gate["tokens"] == TOKENS and gate["statistics"] == "all_tokens"
    assert "model.layers.0.mlp.experts.0: 0 routed tokens < calib.min_expert_tokens=1" in run.log


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_quantized_router_routes_with_its_quantized_weights(env, arch):
    """quant.moe_ignore=[]: router (and shared_expert_gate) quantized in stage moe_in, before
    routing; propagation then follows the quantized router (the fake-quant reference's)."""
    run = job(env, "router_q", arch, "quant.moe_ignore=[]")
    model = check_propagation(env, arch, run)
    counts = router_counts(model, run.calib.input_ids)
    for layer in run.report["moe"]["layers"]:
        assert layer["tokens_per_expert"] == counts[layer["layer"]].tolist()
    out = quantized_linears(read_tensors(run.out), 4)
    router = "block_sparse_moe.gate" if arch == "mixtral" else "mlp.gate"
    assert {f"model.layers.{i}.{router}" for i in range(2)} <= set(out)
    if arch == "qwen2_moe":
        assert out["model.layers.0.mlp.shared_expert_gate"].q.shape == (1, 64)
    assert "transformers 5 cannot load a quantized router" in run.log


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_w8a8_dynamic_activations_through_the_moe_block(env, arch):
    """W8A8 (int8 per-channel weights, dynamic per-token int8 activations; SmoothQuant on the
    attention): every quantized linear — shared expert and routed experts included — sees
    int8 activations in the statistics and the propagation, the router sees float ones.
    The propagated hidden states equal our own reference: the output checkpoint dequantized
    (int-quantized experts included) with per-token int8 activations emulated in front of
    every quantized linear. transformers 5.23 cannot load int-quantized experts (docs/moe.md)."""
    run = job(env, "w8a8", arch, "quant=smoothquant_w8a8", "quant.act_dynamic=true")
    from moe_reference import emulate_dynamic_activations

    out = read_tensors(run.out)
    quantized = set(quantized_linears(out, 8))
    assert sum(".experts." in n for n in quantized) == 2 * 3 * EXPERTS[arch]
    for name in quantized:
        assert out[name + ".weight"].dtype == torch.int8 and out[name + ".weight_scale"].shape[1] == 1
        assert name + ".input_scale" not in out  # dynamic: nothing stored
    router = "block_sparse_moe.gate" if arch == "mixtral" else "mlp.gate"
    assert out[f"model.layers.0.{router}.weight"].dtype == torch.float32
    src = read_tensors(env.models[arch])
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(out[norm], src[norm])  # smoothing folded into the attention's norm
    assert torch.equal(out["model.layers.0.post_attention_layernorm.weight"],
                       src["model.layers.0.post_attention_layernorm.weight"])  # the MoE block is not smoothed
    # sdpa, as the layer loop: int8 rounding of activations turns last-bit differences of
    # another attention kernel into whole steps (eager vs sdpa differ by ~1e-3 here)
    model, _ = load_fake_quant(env.models[arch], run.out, attn="sdpa")
    emulate_dynamic_activations(model, quantized)
    assert_layers_match_model(model, run.calib.input_ids, run.xs, 1e-5, label=f"{arch} ", rtol=1e-5)
    qc = json.loads((run.out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is True


def test_w8a8_static_activations_refused_for_moe(env):
    from dist_quant.config import ConfigError
    from dist_quant.settings import load_config
    from dist_quant.run import prepare

    cfg = load_config([f"model.path={env.models['qwen3_moe']}", "quant=w8a8"])
    with pytest.raises(ConfigError, match="act_dynamic=true"):
        prepare(cfg, str(env.models["qwen3_moe"]), 1)


def test_ascend_w8a8_dynamic_describes_every_expert(env):
    """output.format=ascend: msModelSlim description with one entry per expert tensor under
    the checkpoint's names (W8A8_DYNAMIC), the router FLOAT."""
    run = job(env, "ascend", "mixtral", "quant=w8a8", "quant.act_dynamic=true", "output.format=ascend",
              capture=False)
    desc = json.loads((run.out / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"
    for i in range(2):
        assert desc[f"model.layers.{i}.block_sparse_moe.gate.weight"] == "FLOAT"
        for e in range(EXPERTS["mixtral"]):
            for w in ("w1", "w2", "w3"):
                for t in ("weight", "weight_scale", "weight_offset"):
                    assert desc[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.{t}"] == "W8A8_DYNAMIC"
