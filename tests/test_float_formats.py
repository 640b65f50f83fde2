"""FP8 (per channel / per tensor / 128×128 blocks) and W4AFP8 outputs on tiny models, against
independent references: torch's own float8_e4m3fn casts for the activation and weight rules,
a plain per-column GPTQ loop on the FP8 grid, the compressed-tensors presets for the config,
transformers' own loader (FP8 ``float-quantized``; it cannot build W4AFP8 layers, so that one is
read by this file's own unpacker), the vLLM loader tables (tests/server_loaders.py), refusals
before any work, and 2 gloo ranks giving the same bytes as 1."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port, run_main
from reference import E2M1, F8, e2m1_table_decode, fp8_cast, unpack_int32
from server_loaders import check_complete, layer_modules, load, vllm_nvfp4, vllm_w8a8_fp8, vllm_wna16
from tiny import corpus_text, make_tiny_model

from dist_quant.algorithms.gptq import GPTQParams, gptq_quantize
from dist_quant.algorithms.rtn import rtn_quantize
from dist_quant.config import ConfigError, QuantConfig
from dist_quant.fakequant import load_fake_quant_model, read_tensors
from dist_quant.quant import floatgrid as fg
from dist_quant.quant.qparams import QuantArgs

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["calib.num_samples=8", "calib.seq_len=32", "calib.batch_size=4", "runtime.threads=1"]
PRESETS = {"fp8_dynamic": "FP8_DYNAMIC", "fp8_static": "FP8", "fp8_block": "FP8_BLOCK", "w4afp8": "W4AFP8",
           "nvfp4": "NVFP4", "nvfp4a16": "NVFP4A16"}

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("float_formats")
    calib = base / "calib.txt"
    calib.write_text(corpus_text(60_000))
    return {"base": base, "calib": calib,
            # every linear a multiple of 128 (k/v: 4 heads × 32): what block FP8 and W4AFP8 need
            "m128": make_tiny_model(base / "m128", hidden=128, intermediate=256, heads=4, kv_heads=4),
            "m64": make_tiny_model(base / "m64", layers=1)}


def argv(env, model: str, out: Path, *extra: str) -> list[str]:
    return [f"model.path={env[model]}", f"calib.path={env['calib']}", *CALIB, f"output.dir={out}",
            f"runtime.run_dir={out}.run", *extra]


def quantize(env, name: str, *extra: str, model: str = "m128") -> Path:
    out = env["base"] / "out" / name
    if not out.exists():
        code, _, err = run_main(argv(env, model, out, *extra))
        assert code == 0, err[-3000:]
    return out


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# -- the rules, against torch's casts ------------------------------------------------------------

def test_fp8_activation_rules_match_torch_casts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g) * torch.logspace(-3, 2, 256)
    x[2] = 0.0  # an all-zero token: the floor scale, zeros out
    got = fg.fake_quant_fp8_dynamic(x)
    for r in range(5):
        s = max(float(x[r].abs().max()) / 448, 1 / (448 * 512))
        assert torch.equal(got[r], fp8_cast(x[r] / s) * s), r
    grouped = fg.fake_quant_fp8_dynamic(x, 128)
    for r in range(5):
        for k in range(2):
            seg = x[r, k * 128:(k + 1) * 128]
            s = max(float(seg.abs().max()) / 448, 1 / (448 * 512))
            assert torch.equal(grouped[r, k * 128:(k + 1) * 128], fp8_cast(seg / s) * s)
    scale = fg.fp8_static_scale(5.0)  # static: values beyond 5 saturate at 448·s, never NaN
    st = fg.fake_quant_fp8_static(x, scale)
    assert not torch.isnan(st).any() and float(st.abs().max()) == pytest.approx(448 * float(scale))
    assert torch.equal(st, fp8_cast(x / float(scale)) * float(scale))


@pytest.mark.parametrize("strategy", ["channel", "tensor", "block"])
def test_rtn_fp8_codes_are_torch_casts_of_w_over_the_published_scale(strategy):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 384, generator=g) * 0.05
    args = QuantArgs(8, 128 if strategy == "block" else -1, grid="fp8", fp8_strategy=strategy)
    res = rtn_quantize(w, args)
    per = torch.empty_like(w)  # the scale of every element, by the rule, loop by loop
    for i in range(0, 256, 128 if strategy == "block" else 1):
        for j in range(0, 384, 128 if strategy == "block" else 384):
            blk = w[i:i + 128, j:j + 128] if strategy == "block" else w[i:i + 1]
            amax = w.abs().max() if strategy == "tensor" else blk.abs().max()
            if strategy == "block":
                per[i:i + 128, j:j + 128] = amax / 448
            else:
                per[i] = amax / 448
    assert torch.equal(res.q.view(F8).float(), fp8_cast(w / per))
    assert torch.equal(res.dequantize(args), fp8_cast(w / per) * per)


def plain_gptq_fp8(w, h, scale_per_elem, damp=0.01):
    """GPTQ written out column by column (no lazy blocks, no activation order) on the FP8 grid."""
    w = w.clone().double()
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for i in range(w.shape[1]):
        s = scale_per_elem[:, i].double()
        q[:, i] = fp8_cast((w[:, i] / s).float()).double()
        err = (w[:, i] - q[:, i] * s) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    return q


@pytest.mark.parametrize("strategy", ["channel", "block"])
def test_gptq_on_the_fp8_grid_follows_the_plain_loop_and_beats_rtn(strategy):
    g = torch.Generator().manual_seed(2)
    n = 256
    x = torch.randn(2048, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(128, n, generator=g) * 0.05
    args = QuantArgs(8, 128 if strategy == "block" else -1, grid="fp8", fp8_strategy=strategy)
    res = gptq_quantize(w, h, args, GPTQParams(act_order=False, block_size=64))
    per = fg.expand_fp8_scale(fg.fp8_scale(w, strategy), tuple(w.shape), strategy)
    ref = plain_gptq_fp8(w, h, per)
    same = (res.q.view(F8).float().double() == ref).float().mean()
    assert same > 0.995, same  # float64 vs float32 arithmetic: a few ties fall the other way
    assert torch.equal(res.scale.repeat_interleave(args.columns_per_group(n), 1)
                       if strategy == "block" else res.scale.expand(-1, n), per)

    def loss(w_hat):
        d = (w_hat - w).double()
        return float(torch.einsum("oi,ij,oj->", d, h.double(), d))

    rtn = rtn_quantize(w, args)
    assert loss(res.dequantize(args)) < 0.8 * loss(rtn.dequantize(args))
    ordered = gptq_quantize(w, h, args, GPTQParams(act_order=True))  # group-aware order keeps blocks whole
    assert loss(ordered.dequantize(args)) < loss(rtn.dequantize(args))


def test_config_checks_name_the_bad_key():
    cases = [
        (dict(weight_type="fp8", bits=4, group_size=-1, act_bits=8, act_type="fp8", act_dynamic=True), "quant.bits=4"),
        (dict(weight_type="fp8", bits=8, group_size=-1, weight_strategy="block", act_bits=8, act_type="fp8",
              act_dynamic=True), "quant.group_size=-1"),
        (dict(weight_type="fp8", bits=8, group_size=128, weight_strategy="block", act_bits=8, act_type="fp8",
              act_dynamic=False), "quant.act_dynamic=False"),
        (dict(weight_type="fp8", bits=8, group_size=-1, act_bits=8, act_type="int"), "quant.weight_type='fp8'"),
        (dict(bits=4, group_size=64, act_bits=8, act_type="fp8", act_dynamic=True), "quant.act_type='fp8'"),
        (dict(weight_type="fp4"), "quant.weight_type='fp4'"),
        (dict(weight_type="nvfp4", bits=4, group_size=32), "quant.weight_type='nvfp4'"),
        (dict(weight_type="nvfp4", bits=4, group_size=16, act_bits=8, act_type="fp8", act_dynamic=True),
         "quant.act_bits=8"),
    ]
    for kwargs, key in cases:
        with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
            QuantConfig(**kwargs)
    QuantConfig(weight_type="fp8", bits=8, group_size=128, weight_strategy="block", act_bits=8, act_type="fp8",
                act_dynamic=True)  # FP8_BLOCK is valid


# -- end to end -------------------------------------------------------------------------------------

def read_scales(t: dict, mod: str, shape, strategy: str) -> torch.Tensor:
    """This file's reading of the published rule: the scale of every weight element."""
    s = t[mod + ".weight_scale"].float()
    out_f, in_f = shape
    if strategy == "tensor":
        assert s.shape == (1,)
        return s.reshape(1, 1).expand(out_f, in_f)
    if strategy == "channel":
        assert s.shape == (out_f, 1)
        return s.expand(out_f, in_f)
    assert s.shape == (math.ceil(out_f / 128), math.ceil(in_f / 128))
    return torch.kron(s, torch.ones(128, 128))[:out_f, :in_f]


def ids_for(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return torch.tensor(tok(corpus_text(200_000)[150_000:])["input_ids"][: 2 * 40]).reshape(2, 40)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("preset,solver", [("fp8_dynamic", "rtn"), ("fp8_static", "gptq"),
                                           ("fp8_block", "rtn"), ("fp8_block", "gptq")])
def test_fp8_outputs_load_in_transformers_and_match_the_published_rule(env, preset, solver):
    from compressed_tensors.quantization import preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    out = quantize(env, f"{preset}-{solver}", f"quant={preset}", f"quant.weight_solver={solver}")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    want = preset_name_to_scheme(PRESETS[preset], ["Linear"]).model_dump(mode="json")
    group = qc["config_groups"]["group_0"]
    assert group["weights"] == want["weights"] and group["input_activations"] == want["input_activations"]
    strategy = group["weights"]["strategy"]

    t = read_tensors(out, "model.safetensors.index.json")
    src = read_tensors(env["m128"], "model.safetensors.index.json")
    mods = sorted(k[: -len(".weight")] for k, v in t.items() if k.endswith(".weight") and v.dtype == F8)
    assert len(mods) == 2 * 7
    for mod in mods:
        q = t[mod + ".weight"]
        per = read_scales(t, mod, q.shape, strategy)
        assert t[mod + ".weight_scale"].dtype == torch.float32
        if solver == "rtn":  # the codes are torch's cast of w / (max|w| / 448) over the rule's span
            w = src[mod + ".weight"].float()
            assert torch.equal(per, fg.expand_fp8_scale(fg.fp8_scale(w, strategy), tuple(w.shape), strategy))
            assert torch.equal(q.float(), fp8_cast(w / per))
    if strategy == "tensor":  # fused parts share one weight scale and one input scale
        for names in (["q", "k", "v"], ["gate", "up"]):
            kind = "self_attn" if names[0] == "q" else "mlp"
            for key in ("weight_scale", "input_scale"):
                vals = {float(t[f"model.layers.0.{kind}.{n}_proj.{key}"]) for n in names}
                assert len(vals) == 1, (names, key, vals)

    ids = ids_for(out)
    served = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    got = logits(served, ids)
    ref_model = load_fake_quant_model(out)
    for mod in mods:  # our reader's weights are the published rule's
        w_hat = t[mod + ".weight"].float() * read_scales(t, mod, t[mod + ".weight"].shape, strategy)
        assert torch.equal(ref_model.get_submodule(mod).weight.detach(), w_hat)
    ref = logits(ref_model, ids)
    assert rel(got, ref) < 1e-5  # transformers runs exactly the fake-quant model
    for module in ref_model.modules():
        module._forward_pre_hooks.clear()
    assert rel(got, logits(ref_model, ids)) > 1e-4, "transformers did not quantize the activations"
    fp = logits(AutoModelForCausalLM.from_pretrained(str(env["m128"]), dtype=torch.float32), ids)
    assert rel(got, fp) < 0.2  # a sanity bound: E4M3 keeps 3 mantissa bits (weights and inputs)

    config = json.loads((out / "config.json").read_text())
    modules = layer_modules(config, 0, lambda o, i: vllm_w8a8_fp8(o, i, strategy, not group["input_activations"]
                                                                  ["dynamic"]), None, False, torch.float32)
    layer0 = {k: v for k, v in t.items() if k.startswith("model.layers.0.")}
    loaded = load(modules, layer0)
    check_complete(modules, loaded)


def test_w4afp8_output_by_an_independent_reader_and_vllm_tables(env):
    from compressed_tensors.quantization import preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    out = quantize(env, "w4afp8", "quant=w4afp8")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "pack-quantized"
    want = preset_name_to_scheme("W4AFP8", ["Linear"]).model_dump(mode="json")
    group = qc["config_groups"]["group_0"]
    assert group["weights"] == want["weights"] and group["input_activations"] == want["input_activations"]
    t = read_tensors(out, "model.safetensors.index.json")

    # this file's reader: unpack, scale per group of 128, FP8 per-token activations by torch casts
    model = AutoModelForCausalLM.from_pretrained(str(env["m128"]), dtype=torch.float32).eval()
    mods = sorted(k[: -len(".weight_packed")] for k in t if k.endswith(".weight_packed"))
    assert len(mods) == 14

    def fp8_tokens(module, args):
        x = args[0]
        s = (x.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
        return (fp8_cast(x / s) * s, *args[1:])

    for mod in mods:
        out_f, in_f = t[mod + ".weight_shape"].tolist()
        q = unpack_int32(t[mod + ".weight_packed"], 4, in_f).float()
        scale = t[mod + ".weight_scale"].float()
        assert scale.shape == (out_f, in_f // 128)
        lin = model.get_submodule(mod)
        with torch.no_grad():
            lin.weight.copy_(q * scale.repeat_interleave(128, dim=1))
        lin.register_forward_pre_hook(fp8_tokens)
    ids = ids_for(out)
    mine = logits(model, ids)
    theirs = logits(load_fake_quant_model(out), ids)
    assert rel(mine, theirs) < 1e-6
    fp = logits(AutoModelForCausalLM.from_pretrained(str(env["m128"]), dtype=torch.float32), ids)
    assert 1e-3 < rel(mine, fp) < 0.6  # int4 weights of a random tiny model: a sanity bound only

    modules = layer_modules(config, 0, lambda o, i: vllm_wna16(o, i, 4, 128, True, torch.float32), None, False,
                            torch.float32)
    check_complete(modules, load(modules, {k: v for k, v in t.items() if k.startswith("model.layers.0.")}))


def test_unservable_float_jobs_are_refused_before_any_work(env, tmp_path):
    from tiny_moe import make_tiny_moe

    moe = make_tiny_moe(tmp_path / "moe", "qwen3_moe", layers=1, vocab=256)
    cases = [("m64", ["quant=fp8_block"], "multiples of 128"),
             ("m64", ["quant=fp8_dynamic", "output.format=ascend"], "output.format='ascend'"),
             ("moe", ["quant=fp8_static"], "quant.act_dynamic=false")]  # NVFP4 MoE: tests/test_nvfp4_moe.py
    env = {**env, "moe": moe}
    for model, extra, why in cases:
        out = tmp_path / f"out-{model}-{len(extra)}"
        code, _, err = run_main(argv(env, model, out, *extra))
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert code != 0 and len(lines) == 1 and why in lines[0], err[-2000:]
        assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize("preset", ["fp8_static", "nvfp4"])
def test_two_ranks_write_the_same_output_as_one(env, preset):
    extra = (f"quant={preset}", "quant.weight_solver=gptq")
    one = quantize(env, f"{preset}-gptq", *extra)
    two = env["base"] / "out" / f"{preset}-gptq-2ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_quant",
           *argv(env, "m128", two, *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    t1 = read_tensors(one, "model.safetensors.index.json")
    t2 = read_tensors(two, "model.safetensors.index.json")
    assert t1.keys() == t2.keys()
    for name in t1:  # the MAX-reduced input (global) scales and the GPTQ solves: the same bytes
        a, b = t1[name], t2[name]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == F8 else a,
                                                  b.view(torch.uint8) if b.dtype == F8 else b), name
    files2 = json.loads((two / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(files2.values())) >= 2  # both ranks wrote part files


@pytest.mark.parametrize("preset,solver", [("nvfp4a16", "rtn"), ("nvfp4a16", "gptq"), ("nvfp4", "rtn")])
def test_nvfp4_outputs_against_the_published_rule_transformers_and_vllm_tables(env, preset, solver):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from transformers import AutoModelForCausalLM

    out = quantize(env, f"{preset}-{solver}", f"quant={preset}", f"quant.weight_solver={solver}")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"
    want = preset_name_to_scheme(PRESETS[preset], ["Linear"]).model_dump(mode="json")
    group = qc["config_groups"]["group_0"]
    assert group["weights"] == want["weights"] and group.get("input_activations") == want.get("input_activations")
    t = read_tensors(out, "model.safetensors.index.json")
    src = read_tensors(env["m128"], "model.safetensors.index.json")
    mods = sorted(k[: -len(".weight_packed")] for k in t if k.endswith(".weight_packed"))
    assert len(mods) == 14
    ref_model = load_fake_quant_model(out)
    for mod in mods:
        gs = t[mod + ".weight_global_scale"]
        assert gs.dtype == torch.float32 and t[mod + ".weight_scale"].dtype == F8
        w_hat = e2m1_table_decode(t[mod + ".weight_packed"]) * (
            t[mod + ".weight_scale"].float() / gs).repeat_interleave(16, dim=1)
        assert torch.equal(ref_model.get_submodule(mod).weight.detach(), w_hat)
        if solver == "rtn":  # group scale fp8(amax / 6 · gs); gs = 448 · 6 / amax of the fused parts
            part = mod.rsplit(".", 1)[1]
            fused = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(part)
            names = ([mod.replace(part, n) for n in ("q_proj", "k_proj", "v_proj")] if fused == "qkv" else
                     [mod.replace(part, n) for n in ("gate_proj", "up_proj")] if fused == "gu" else [mod])
            amax = max(float(src[n + ".weight"].abs().max()) for n in names)
            assert float(gs) == pytest.approx(448 * 6 / amax, rel=1e-6)
            w = src[mod + ".weight"].float()
            s = fp8_cast(w.reshape(w.shape[0], -1, 16).abs().amax(-1) / 6 * gs)
            assert torch.equal(t[mod + ".weight_scale"].float(), s)

    # transformers decompresses NVFP4 to bfloat16 (a float32 model fails its matmul): compare in bfloat16
    ids = ids_for(out)
    served = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    got = logits(served, ids)
    for mod in mods:
        assert torch.equal(served.get_submodule(mod).weight.float(),
                           ref_model.get_submodule(mod).weight.detach().bfloat16().float())
    if preset == "nvfp4a16":
        assert rel(got, logits(load_fake_quant_model(out, dtype=torch.bfloat16), ids)) < 1e-5
    else:  # activations: compressed-tensors' own NVFP4 input rule (float32) is ours, element for element
        lin = served.get_submodule(mods[0]).float()
        x = torch.randn(3, 7, lin.in_features, generator=torch.Generator().manual_seed(3)) * 0.3
        theirs = forward_quantize(lin, x, "input", lin.quantization_scheme.input_activations)
        igs = t[mods[0] + ".input_global_scale"]
        assert torch.equal(theirs, fg.fake_quant_nvfp4(x, igs))
        v = x.reshape(3, 7, -1, 16)  # and the rule by hand: local fp8 scale per 16, E2M1 by the table
        eff = fp8_cast(v.abs().amax(-1, keepdim=True) / 6 * float(igs)) / float(igs)
        r = v / torch.where(eff > 0, eff, torch.ones_like(eff))
        grid = torch.tensor(E2M1 + [-e for e in E2M1])
        nearest = grid[(r.clamp(-6, 6)[..., None] - grid).abs().argmin(-1)]  # ties: checked in test_floatgrid
        assert (nearest * eff).reshape(x.shape).sub(theirs).abs().max() <= 0.5 * eff.max()
    fp = logits(AutoModelForCausalLM.from_pretrained(str(env["m128"]), dtype=torch.float32), ids)
    assert rel(logits(ref_model, ids), fp) < 0.6  # sanity bound (4-bit float weights, random tiny model)

    w4a4 = preset == "nvfp4"
    modules = layer_modules(config, 0, lambda o, i: vllm_nvfp4(o, i, w4a4), None, False, torch.float32)
    check_complete(modules, load(modules, {k: v for k, v in t.items() if k.startswith("model.layers.0.")}))
