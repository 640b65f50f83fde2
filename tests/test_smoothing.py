"""Smoothing (dist_quant/smoothing.py, algorithms/smoothquant.py, algorithms/flex_smooth.py):
folding is function-preserving for every pair type (GQA v→o included, bf16 norms
included), the scale formulas and the two-stage search against independent references,
and the configuration errors."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.algorithms.flex_smooth import GRID, candidate_errors, flex_scales, two_stage_search  # noqa: E402
from dist_quant.algorithms.smoothquant import smoothquant_scales  # noqa: E402
from dist_quant.arch import get_arch  # noqa: E402
from dist_quant.checkpoint import Checkpoint  # noqa: E402
from dist_quant.config import ConfigError  # noqa: E402
from dist_quant.layer_forward import build_skeleton, dense_stage_ops, load_layer, unload_layer  # noqa: E402
from dist_quant.pipeline import LayerRecord  # noqa: E402
from dist_quant.plan import inspect_model  # noqa: E402
from dist_quant.quant.activations import (ActQuantArgs, fake_quant_dynamic, fake_quant_static,  # noqa: E402
                                          static_params)
from dist_quant.quant.qparams import QuantArgs  # noqa: E402
from dist_quant.runtime import Comm, RankInfo  # noqa: E402
from dist_quant.settings import load_config  # noqa: E402
from dist_quant.smoothing import Heads, W8A8Stages, pattern_matches  # noqa: E402

PAIRS = {
    "norm_qkv": "input_layernorm->q_proj/k_proj/v_proj",
    "ov": "self_attn.v_proj->o_proj",
    "norm_mlp": "post_attention_layernorm->gate_proj/up_proj",
    "up_down": "mlp.up_proj->down_proj",
}
CONSUMER = {"norm_qkv": "self_attn.k_proj", "ov": "self_attn.o_proj", "norm_mlp": "mlp.gate_proj",
            "up_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import make_tiny_model

    return {
        "llama": make_tiny_model(tmp_path_factory.mktemp("llama"), arch="llama", layers=1),
        "qwen2": make_tiny_model(tmp_path_factory.mktemp("qwen2"), arch="qwen2", layers=1),  # q/k/v biases
        "llama_bf16": make_tiny_model(tmp_path_factory.mktemp("llamabf"), arch="llama", layers=1,
                                      dtype=torch.bfloat16),
    }


def phase(_name):
    return contextlib.nullcontext()


def run_layer(path: Path, overrides_cfg: list[str], smooth: bool):
    """The pipeline's stage chain for layer 0 of a tiny model, with W8A8Stages.prepare
    smoothing (activations left float) when ``smooth``; no weight quantization."""
    cfg = load_config([f"model.path={path}", *overrides_cfg])
    ckpt = Checkpoint(path)
    plan = inspect_model(ckpt, cfg.quant)
    arch = get_arch(ckpt.config["model_type"])
    skel = build_skeleton(str(path), torch.float32, torch.device("cpu"))
    layer = load_layer(skel, ckpt, arch, 0, torch.device("cpu"))
    torch.manual_seed(1)
    x = torch.randn(2, 24, ckpt.config["hidden_size"]) * 2
    x[:, :, 3] *= 20  # an outlier channel
    pos = torch.arange(x.shape[1])[None]
    pos_emb = tuple(t.to(torch.float32) for t in skel.rotary(x, pos))
    overrides: dict[str, torch.Tensor] = {}
    stages = W8A8Stages(cfg, Comm(RankInfo(), torch.device("cpu"), "gloo"), plan, ckpt, torch.device("cpu"),
                        QuantArgs(8, -1, True), None, overrides)
    record = LayerRecord(0)
    with torch.no_grad():
        ops = dense_stage_ops(layer, arch, pos_emb)
        xs, masks, prev = [x], [torch.ones(x.shape[:2], dtype=torch.bool)], [None]
        for k, (stage, op) in enumerate(zip(arch.stages, ops)):
            inputs = [op.make_input(a, p) for a, p in zip(xs, prev)]
            if smooth:
                linears = [lin for lin in plan.layer_linears(0) if lin.stage == stage.name]
                inputs = stages.prepare(layer, 0, k, ops, xs, prev, inputs, masks, linears, record, phase)
            if op.advance is not None:
                xs = [op.advance(a, i) for a, i in zip(xs, inputs)]
            prev = inputs
    unload_layer(layer)
    return xs[0], record, overrides


CASES = ([("llama", only) for only in (*PAIRS, "all")]
         + [("qwen2", "ov"), ("qwen2", "all")]  # qwen2: q/k/v biases (the v bias is folded)
         + [("llama_bf16", "norm_qkv"), ("llama_bf16", "norm_mlp")])  # bf16 norms: rounding compensated


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronization
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model, only", CASES)
def test_smoothing_alone_leaves_the_layer_output_unchanged(models, model, only):
    disable = [] if only == "all" else [CONSUMER[p] for p in PAIRS if p != only]
    common = ["quant=smoothquant_w8a8", "quant.alpha=0.5", f"quant.disable_anti_names={disable}"]
    ref, _, _ = run_layer(models[model], common, smooth=False)
    out, record, overrides = run_layer(models[model], common, smooth=True)
    chosen = {name.split("model.layers.0.", 1)[1]: v for name, v in record.smoothing.items()}
    expected = set(PAIRS.values()) if only == "all" else {PAIRS[only]}
    assert set(chosen) == expected
    for v in chosen.values():  # the scales are far from 1: the test would see a wrong fold
        assert v["scale_max"] / v["scale_min"] > 2 and v["alpha"] == 0.5
    tol = 3e-5 * ref.abs().max()
    assert (out - ref).abs().max() <= tol, f"{model}/{only}: smoothing changed the layer output"
    if only in ("norm_qkv", "all"):
        stored = overrides["model.layers.0.input_layernorm.weight"]
        assert stored.dtype == (torch.bfloat16 if model == "llama_bf16" else torch.float32)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_awq_folding_alone_leaves_the_layer_output_unchanged(models, model):
    """AWQ's scales (searched on the weight-quantized output error) folded into the same pairs:
    the float layer computes the same function."""
    common = ["quant=awq_w4a16", "quant.group_size=32"]
    ref, _, _ = run_layer(models[model], common, smooth=False)
    out, record, _ = run_layer(models[model], common, smooth=True)
    chosen = {name.split("model.layers.0.", 1)[1]: v for name, v in record.smoothing.items()}
    assert set(chosen) == set(PAIRS.values())
    for v in chosen.values():  # scales away from 1 (alpha = 0 with duo scaling is 1 / w_mean): a wrong fold shows
        assert v["searched"] and v["scale_max"] / v["scale_min"] > 1.1, v
    assert max(v["scale_max"] / v["scale_min"] for v in chosen.values()) > 1.5
    assert (out - ref).abs().max() <= 3e-5 * ref.abs().max(), f"{model}: AWQ folding changed the layer output"


def test_gqa_scales_are_shared_within_kv_groups(models):
    out, record, overrides = run_layer(models["qwen2"], ["quant=smoothquant_w8a8",
                                       "quant.disable_anti_names=[k_proj,gate_proj,down_proj]"], smooth=True)
    ckpt = Checkpoint(models["qwen2"])
    h = Heads.from_config(ckpt.config)
    assert (h.heads, h.kv_heads) == (4, 2)
    w_o = ckpt.get("model.layers.0.self_attn.o_proj.weight").float()
    s_o = overrides["model.layers.0.self_attn.o_proj.weight"][0] / w_o[0]  # column scales of o_proj
    s_v = ckpt.get("model.layers.0.self_attn.v_proj.weight").float()[:, 0] / \
        overrides["model.layers.0.self_attn.v_proj.weight"][:, 0]
    per_head = s_o.reshape(h.heads, h.head_dim)
    for head in range(h.heads):  # head h reads kv group h // (heads / kv_heads)
        g = head // h.group
        torch.testing.assert_close(per_head[head], s_v.reshape(h.kv_heads, h.head_dim)[g], rtol=1e-5, atol=0)
    b = ckpt.get("model.layers.0.self_attn.v_proj.bias").float()
    torch.testing.assert_close(overrides["model.layers.0.self_attn.v_proj.bias"], b / s_v, rtol=1e-5, atol=1e-7)


def test_scale_formulas():
    a = torch.tensor([4.0, 0.0, 1.0, 9.0])
    w = torch.tensor([1.0, 2.0, 0.0, 0.25])
    sq = smoothquant_scales(a, w, 0.5)
    expect = torch.tensor([2.0, 1e-5, 1.0 / (1e-5) ** 0.5, 6.0])  # zero weight column → clamped, not inf
    torch.testing.assert_close(sq, expect)
    fl = flex_scales(a, w, 0.8, 0.3)
    torch.testing.assert_close(fl, (a ** 0.8 / w.clamp(min=1e-5) ** 0.3).clamp(min=1e-5))
    torch.testing.assert_close(flex_scales(a, w, 0.5, 0.5), sq)


def test_candidate_error_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    x[:, 2] *= 30
    w = torch.randn(24, 16, generator=g)
    a, wm = x.abs().amax(0), w.abs().amax(0)
    args = QuantArgs(8, -1, True)
    act = ActQuantArgs(dynamic=False)
    lo, hi = x.amin(0), x.amax(0)

    def act_fq(xs, s):
        return fake_quant_static(xs, static_params((lo / s).min(), (hi / s).max(), act))

    num, den = candidate_errors(x, w, lambda al, be: flex_scales(a, wm, al, be), [(0.7, 0.2)], act_fq, args)
    # independent: explicit int8 quantization of x/s (per tensor, asymmetric) and W·s (per row, symmetric)
    s = (a ** 0.7 / wm ** 0.2).clamp(min=1e-5)
    xs, ws = x / s, w * s
    lo_t, hi_t = min(xs.min().item(), 0.0), max(xs.max().item(), 0.0)
    sc = (hi_t - lo_t) / 255
    zp = -128 - round(lo_t / sc)
    xq = (torch.round(xs / sc + zp).clamp(-128, 127) - zp) * sc
    wsc = ws.abs().amax(1, keepdim=True) / 127.5
    wq = torch.round(ws / wsc).clamp(-128, 127) * wsc
    ref = x @ w.T
    torch.testing.assert_close(num[0], ((xq @ wq.T - ref) ** 2).sum().double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(den, (ref ** 2).sum().double(), rtol=1e-5, atol=0)
    # smoothing the outlier channel must beat no smoothing (alpha = 0, beta = 0: s = 1)
    both, _ = candidate_errors(x, w, lambda al, be: flex_scales(a, wm, al, be), [(0.0, 0.0), (0.7, 0.2)],
                               act_fq, args)
    assert both[1] < both[0]


def test_two_stage_search_grid_and_ties():
    calls = []

    def evaluate(cands):
        calls.append(list(cands))
        # minimum at alpha = 0.6 on the first stage, then beta = 0.25 (ties resolved to the later point)
        return torch.tensor([abs(a - 0.6) + abs(b - 0.25) * (len(calls) == 2) + (0.0 if len(calls) == 2 else 0.0)
                             for a, b in cands])

    alpha, beta, err = two_stage_search(evaluate)
    assert len(calls) == 2 and len(calls[0]) == len(GRID) == 21
    assert calls[0][0] == (0.0, 1.0) and calls[0][-1] == (1.0, 0.0)
    assert all(b == round(1 - a, 2) for a, b in calls[0])
    assert alpha == 0.6 and all(a == 0.6 for a, _ in calls[1]) and [b for _, b in calls[1]] == list(GRID)
    assert beta == 0.25 and err == 0.0
    # alpha given: only the beta stage
    calls.clear()
    alpha, beta, _ = two_stage_search(lambda c: torch.tensor([abs(b - 0.4) for _, b in c]), alpha=0.3)
    assert (alpha, beta) == (0.3, 0.4)
    # ties: the later candidate wins, as msModelSlim's `<=`
    alpha, beta, _ = two_stage_search(lambda c: torch.zeros(len(c)))
    assert (alpha, beta) == (1.0, 1.0)


def test_activation_quantizers():
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.25, -0.75]])
    p = static_params(-1.0, 2.0, ActQuantArgs(dynamic=False))
    assert torch.isclose(p.scale, torch.tensor([3.0 / 255])) and p.zero.item() == -128 + 85
    assert (fake_quant_static(x, p) - x).abs().max() <= p.scale / 2 + 1e-7
    d = fake_quant_dynamic(x)
    assert (d - x).abs().max() <= 2.0 / 127 / 2 + 1e-7
    # the servers' per-token scale (vLLM scaled_int8_quant, SGLang per_token_quant_int8, CANN
    # npu_dynamic_quant): max|x| / 127, so each token's largest value is code ±127, reproduced exactly
    g = torch.Generator().manual_seed(3)
    y = torch.randn(64, 96, generator=g) * torch.linspace(0.1, 4, 96)
    sc = y.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(fake_quant_dynamic(y), torch.round(y / sc).clamp(-128, 127) * sc)
    assert not torch.equal(fake_quant_dynamic(y), fake_quant_dynamic(y, 127.5))
    assert torch.equal(fake_quant_dynamic(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_disable_anti_names_patterns():
    fqn = "model.layers.12.self_attn.o_proj"
    for pattern in ("self_attn.o_proj", "o_proj", fqn, "model.layers.1?.self_attn.o_proj", "*o_proj"):
        assert pattern_matches(pattern, fqn), pattern
    for pattern in ("k_proj", "model.layers.1.self_attn.o_proj", "layers.1?.mlp.*"):
        assert not pattern_matches(pattern, fqn), pattern


@pytest.mark.parametrize("overrides, key", [
    (["quant=flexsmooth_w8a8", "quant.alpha=1.5"], "quant.alpha=1.5"),
    (["quant=flexsmooth_w8a8", "quant.alpha=-0.1"], "quant.alpha=-0.1"),
    (["quant=flexsmooth_w8a8", "quant.alpha=0.5", "quant.beta=2"], "quant.beta=2.0"),
    (["quant=flexsmooth_w8a8", "quant.beta=0.3"], "quant.beta=0.3"),
    (["quant=smoothquant_w8a8", "quant.beta=0.3"], "quant.beta=0.3"),
    (["quant=w8a8", "quant.alpha=0.3"], "quant.alpha=0.3"),
    (["quant=flexsmooth_w8a8", "quant.smooth=awq"], "quant.smooth='awq'"),
    (["quant=flexsmooth_w8a8", "quant.weight_solver=hqq"], "quant.weight_solver='hqq'"),
    (["quant=flexsmooth_w8a8", "quant.group_size=64"], "quant.act_bits=8"),
    (["quant=gptq_w4a16", "quant.smooth=flex_smooth"], "quant.smooth='flex_smooth'"),
    (["quant=flexsmooth_w8a8", "quant.search_tokens=0"], "quant.search_tokens=0"),
    (["quant=flexsmooth_w8a8", "quant.act_bits=4"], "quant.act_bits=4"),
    (["quant=flexsmooth_w8a8", "output.format=gguf"], "output.format='gguf'"),
    (["quant=flexsmooth_w8a8", "quant.alpha=high"], "quant.alpha"),
])
def test_bad_values_are_config_errors_naming_the_value(overrides, key):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides)
    assert key in str(exc.value)


def test_presets_and_weight_solver():
    flex = load_config(["quant=flexsmooth_w8a8"]).quant
    assert (flex.smooth, flex.alpha, flex.beta, flex.act_bits, flex.act_dynamic) == ("flex_smooth", None, None, 8, False)
    assert flex.disable_anti_names == ["self_attn.o_proj"] and flex.method == "gptq"
    sq = load_config(["quant=smoothquant_w8a8", "quant.weight_solver=rtn", "quant.act_dynamic=true"]).quant
    assert (sq.smooth, sq.alpha, sq.method, sq.act_dynamic) == ("smoothquant", 0.5, "rtn", True)
    plain = load_config(["quant=w8a8"]).quant
    assert plain.smooth == "none" and plain.act_bits == 8 and (plain.bits, plain.group_size) == (8, -1)
    given = load_config(["quant=flexsmooth_w8a8", "quant.alpha=0.8", "quant.beta=0.7"]).quant
    assert (given.alpha, given.beta) == (0.8, 0.7)
    assert load_config(["quant=gptq_w8a16", "output.format=ascend"]).output.format == "ascend"


def test_static_fake_quant_matches_compressed_tensors_on_ties():
    """Ties (x/scale exactly k + 0.5) and a nonzero zero point: the same rounding as
    compressed-tensors' fake quantization (zero point added before rounding)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    p = static_params(-0.9, 3.1, ActQuantArgs(dynamic=False))
    assert p.zero.item() % 2 == 1  # an odd zero point: round(v) + zero != round(v + zero) at ties
    k = torch.arange(-200, 200, dtype=torch.float32)
    x = torch.cat([(k + 0.5) * p.scale, torch.randn(1000) * 2]).reshape(4, -1)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor", dynamic=False)
    ref = fake_quantize(x, p.scale, p.zero.to(torch.int8), args)
    assert torch.equal(fake_quant_static(x, p), ref)
