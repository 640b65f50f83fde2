"""Contract tests: every output format × model family against the parameters the servers'
loaders create (tests/server_loaders.py, copied from vLLM / SGLang / vLLM-Ascend loader code
and cited there). Each job's layer-0 tensors are placed the way the servers' weight loaders
place them (q/k/v and gate/up stacked into one fused linear, routed experts into the fused
``w13_*`` / ``w2_*`` parameters of ``make_expert_params_mapping``); the test fails where a
loader would raise (unknown name, shape mismatch), where a cast would lose bits, where a
parameter would stay uninitialised, or where shards sharing one parameter (q/k/v's input
scale) disagree. vLLM-Ascend's description lookup is replayed too (the fused expert key), and
the values are checked against what the kernels compute (CANN's antiquant ``(q + offset) ·
scale``, the int64 deq_scale encoding).

Families: dense llama, qwen2 (q/k/v biases); MoE qwen2_moe (shared expert), qwen3_moe, mixtral.
Formats: compressed-tensors W4A16 (sym / asym), W8A16, W8A8 static / dynamic, FP8 dynamic (channel)
/ static (tensor; block FP8 and W4AFP8 need 128-multiples: tests/test_float_formats.py); ascend W8A8,
W8A8_DYNAMIC, W8A16. The two combinations no server loads are refused up front (tested).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_main
from server_loaders import (LoadError, ascend_quant_type, ascend_w8a8_dynamic, ascend_w8a8_dynamic_moe,
                            ascend_w8a8_static, check_complete, layer_modules, load, vllm_w8a8_fp8,
                            vllm_w8a8_fp8_moe, vllm_w8a8_int8, vllm_w8a8_int8_moe, vllm_wna16, vllm_wna16_moe)
from tiny import corpus_text, make_tiny_model
from tiny_moe import make_tiny_moe

from dist_quant.fakequant import read_tensors

CALIB = ["calib.num_samples=4", "calib.seq_len=32", "calib.batch_size=4", "runtime.threads=1"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# name → (format, preset overrides, scheme key); scheme keys select the loader tables below
JOBS = {
    "ct_w4": ("compressed-tensors", ["quant=rtn_w4a16", "quant.group_size=32"], "wna16"),
    "ct_w4_asym": ("compressed-tensors", ["quant=rtn_w4a16", "quant.group_size=32", "quant.symmetric=false"], "wna16"),
    "ct_w8": ("compressed-tensors", ["quant=rtn_w8a16"], "wna16"),
    "ct_w8a8_static": ("compressed-tensors", ["quant=w8a8", "quant.weight_solver=rtn"], "w8a8"),
    "ct_w8a8_dynamic": ("compressed-tensors", ["quant=w8a8", "quant.weight_solver=rtn", "quant.act_dynamic=true"],
                        "w8a8"),
    "ct_fp8_dynamic": ("compressed-tensors", ["quant=fp8_dynamic"], "fp8"),
    "ct_fp8_static_gptq": ("compressed-tensors", ["quant=fp8_static", "quant.weight_solver=gptq"], "fp8"),
    "asc_w8a8_bf16": ("ascend", ["quant=w8a8", "quant.weight_solver=rtn", "output.dtype=bfloat16"], "asc_static"),
    "asc_w8a8_fp16": ("ascend", ["quant=w8a8", "quant.weight_solver=rtn", "output.dtype=float16"], "asc_static"),
    "asc_w8a8_dynamic": ("ascend", ["quant=w8a8", "quant.weight_solver=rtn", "quant.act_dynamic=true",
                                    "output.dtype=bfloat16"], "asc_dynamic"),
    "asc_w8a16_asym": ("ascend", ["quant=rtn_w8a16", "quant.symmetric=false", "output.dtype=float16"], "asc_dynamic"),
}
DENSE_JOBS = list(JOBS)
MOE_JOBS = ["ct_w4", "ct_w8", "ct_w8a8_dynamic", "asc_w8a8_dynamic", "ct_fp8_dynamic"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("contracts")
    calib = base / "calib.txt"
    calib.write_text(corpus_text(60_000))
    m = {"base": base, "calib": calib,
         "llama": make_tiny_model(base / "llama", arch="llama", layers=1),
         "qwen2": make_tiny_model(base / "qwen2", arch="qwen2", layers=1)}
    for arch in ("qwen2_moe", "qwen3_moe", "mixtral"):
        m[arch] = make_tiny_moe(base / arch, arch, layers=1, vocab=256)
    return m


def quantize(models, family: str, job: str) -> Path:
    fmt, extra, _ = JOBS[job]
    out = models["base"] / "out" / f"{family}-{job}"
    if not out.exists():
        code, _, err = run_main([f"model.path={models[family]}", f"calib.path={models['calib']}", *CALIB,
                                 f"output.dir={out}", f"runtime.run_dir={out}.run", f"output.format={fmt}", *extra])
        assert code == 0, err[-2000:]
    return out


def tables(job: str, out: Path):
    """(linear(out, in), moe(E, H, I)) parameter tables of the server that loads ``job``."""
    _, extra, scheme = JOBS[job]
    config = json.loads((out / "config.json").read_text())
    pd = DTYPES[config["torch_dtype"]]
    if scheme == "wna16":
        w = config["quantization_config"]["config_groups"]["group_0"]["weights"]
        bits, group, sym = w["num_bits"], w["group_size"] or -1, w["symmetric"]
        return (lambda o, i: vllm_wna16(o, i, bits, group, sym, pd),
                lambda e, h, i: vllm_wna16_moe(e, h, i, bits, group, pd), pd)
    if scheme == "w8a8":
        inp = config["quantization_config"]["config_groups"]["group_0"]["input_activations"]
        return (lambda o, i: vllm_w8a8_int8(o, i, not inp["dynamic"], pd),
                lambda e, h, i: vllm_w8a8_int8_moe(e, h, i, pd), pd)
    if scheme == "fp8":
        group = config["quantization_config"]["config_groups"]["group_0"]
        strategy, static = group["weights"]["strategy"], not group["input_activations"]["dynamic"]
        return (lambda o, i: vllm_w8a8_fp8(o, i, strategy, static),
                lambda e, h, i: vllm_w8a8_fp8_moe(e, h, i, strategy), pd)
    if scheme == "asc_static":
        return (lambda o, i: ascend_w8a8_static(o, i, pd), None, pd)
    return (lambda o, i: ascend_w8a8_dynamic(o, i, pd), lambda e, h, i: ascend_w8a8_dynamic_moe(e, h, i, pd), pd)


def layer0(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith("model.layers.0.")}


def contract(models, family: str, job: str):
    out = quantize(models, family, job)
    fmt = JOBS[job][0]
    config = json.loads((out / "config.json").read_text())
    tensors = layer0(read_tensors(out, "quant_model_weights.safetensors.index.json" if fmt == "ascend"
                                  else "model.safetensors.index.json"))
    linear, moe, pd = tables(job, out)
    has_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    modules = layer_modules(config, 0, linear, moe, has_bias, pd)
    loaded = load(modules, tensors)
    check_complete(modules, loaded)
    # everything else in the layer is what the servers keep in float: norms and the routers
    left = sorted(set(tensors) - loaded.consumed)
    assert all(k.endswith(("layernorm.weight", "mlp.gate.weight", "block_sparse_moe.gate.weight",
                           "shared_expert_gate.weight", "q_norm.weight", "k_norm.weight")) for k in left), left
    return out, config, tensors, modules, loaded


@pytest.mark.parametrize("job", DENSE_JOBS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_outputs_fill_the_servers_parameters(models, family, job):
    out, config, tensors, modules, loaded = contract(models, family, job)
    names = {m.name for m in modules}
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= names
    if job == "ct_w8a8_static":  # q, k and v share one float32 input scale (checked in load) and zero point
        scales = [tensors[f"model.layers.0.self_attn.{p}_proj.input_scale"] for p in "qkv"]
        assert all(s.dtype == torch.float32 for s in scales) and torch.equal(scales[0], scales[2])
    if JOBS[job][0] == "ascend":
        check_ascend(out, config, tensors, modules, job)


@pytest.mark.parametrize("job", MOE_JOBS)
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_moe_outputs_fill_the_fused_expert_parameters(models, family, job):
    out, config, tensors, modules, loaded = contract(models, family, job)
    moe = next(m for m in modules if m.kind == "moe")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert moe.name == f"model.layers.0.{block}.experts"
    # expert 1's up projection is the second half of w13 in expert slot 1 (make_expert_params_mapping: w3)
    up = f"model.layers.0.{block}.experts.1.{'w3' if family == 'mixtral' else 'up_proj'}"
    key = "weight_packed" if JOBS[job][2] == "wna16" else "weight"
    w13 = loaded.values[f"{moe.name}.w13_{key}"][1]
    src = tensors[f"{up}.{key}"].double()
    half = w13.shape[-1] // 2 if JOBS[job][2] == "wna16" else w13.shape[0] // 2
    got = w13[:, half:].t() if JOBS[job][2] == "wna16" else w13[half:]
    assert torch.equal(got, src)
    if JOBS[job][0] == "ascend":
        check_ascend(out, config, tensors, modules, job)


def check_ascend(out: Path, config: dict, tensors, modules, job: str) -> None:
    desc = json.loads((out / "quant_model_description.json").read_text())
    kind = desc["model_quant_type"]
    for m in modules:  # the type vLLM-Ascend looks up for each server module (fused MoE key included)
        assert ascend_quant_type(desc, m.name, config["model_type"], m.kind) == kind, m.name
    for name in [k[: -len(".weight_offset")] for k in tensors if k.endswith(".weight_offset")]:
        q, off, sc = (tensors[f"{name}.{s}"].double() for s in ("weight", "weight_offset", "weight_scale"))
        src = source_weight(out, name)
        err = ((q + off) * sc - src).abs()  # CANN antiquant: (q + offset) · scale; RTN: within half a step,
        inner = (q > -128) & (q < 127)  # a full step at the clamped codes (scale rounded to the serving dtype)
        assert bool((err[inner] <= (sc * 0.501).expand_as(err)[inner] + 1e-7).all()), name
        assert bool((err <= sc * 1.001 + 1e-7).all()), name
        if job == "asc_w8a16_asym":  # the other sign would be visibly wrong
            assert bool(off.abs().max() > 0) and bool((((q - off) * sc - src).abs() > 2 * sc).any())
    if "deq_scale" in " ".join(tensors):
        name = "model.layers.0.self_attn.q_proj"
        deq = tensors[f"{name}.deq_scale"]
        assert deq.dtype == (torch.int64 if config["torch_dtype"] == "float16" else torch.float32)
        value = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq
        want = (tensors[f"{name}.input_scale"].float() * tensors[f"{name}.weight_scale"].float().reshape(-1))
        assert torch.equal(value, want)


_SOURCES: dict[str, dict[str, torch.Tensor]] = {}


def source_weight(out: Path, name: str) -> torch.Tensor:
    model_dir = Path(json.loads((out / "quant_report.json").read_text())["model"])
    if str(model_dir) not in _SOURCES:
        _SOURCES[str(model_dir)] = read_tensors(model_dir, "model.safetensors.index.json")
    return _SOURCES[str(model_dir)][name + ".weight"].double()


def test_loader_emulation_catches_what_a_server_refuses(models):
    """The placement rules are not vacuous: a wrong dtype, a missing shard, disagreeing q/k/v
    input scales and the fused-key lookup vLLM-Ascend does for mixtral all fail."""
    out = quantize(models, "llama", "ct_w8a8_static")
    config = json.loads((out / "config.json").read_text())
    tensors = layer0(read_tensors(out, "model.safetensors.index.json"))
    linear, moe, pd = tables("ct_w8a8_static", out)
    modules = layer_modules(config, 0, linear, moe, False, pd)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.input_scale"] = bad["model.layers.0.self_attn.k_proj.input_scale"] * 2
    with pytest.raises(LoadError, match="different values"):
        load(modules, bad)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.q_proj.input_scale"] = bad["model.layers.0.self_attn.q_proj.input_scale"].bfloat16()
    with pytest.raises(LoadError, match="dtype"):
        load(modules, bad)
    bad = {k: v for k, v in tensors.items() if not k.startswith("model.layers.0.self_attn.v_proj.")}
    with pytest.raises(LoadError, match="never loaded"):
        check_complete(modules, load(modules, bad))
    asc = quantize(models, "mixtral", "asc_w8a8_dynamic")
    desc = json.loads((asc / "quant_model_description.json").read_text())
    del desc["model.layers.0.block_sparse_moe.experts.weight"]
    with pytest.raises(KeyError):
        ascend_quant_type(desc, "model.layers.0.block_sparse_moe.experts", "mixtral", "moe")


@pytest.mark.parametrize("family, fmt, extra, why", [
    ("qwen3_moe", "compressed-tensors", ["quant=rtn_w4a16", "quant.group_size=32", "quant.symmetric=false"],
     "Only symmetric quantization is supported for MoE"),
    ("mixtral", "ascend", ["quant=rtn_w8a16"], "no W8A16 MoE scheme"),
    ("llama", "ascend", ["quant=rtn_w8a16", "quant.group_size=32"], "one weight_scale/weight_offset per output"),
])
def test_unservable_outputs_are_refused_up_front(models, tmp_path, family, fmt, extra, why):
    out = tmp_path / "out"
    code, _, err = run_main([f"model.path={models[family]}", f"calib.path={models['calib']}", *CALIB,
                             f"output.dir={out}", f"runtime.run_dir={tmp_path / 'run'}", f"output.format={fmt}",
                             *extra])
    assert code == 2 and why in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
