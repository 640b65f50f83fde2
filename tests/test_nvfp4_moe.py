"""NVFP4 (``quant=nvfp4``, W4A4) and NVFP4A16 routed experts (qwen2_moe, qwen3_moe, mixtral),
written as compressed-tensors ``nvfp4-pack-quantized`` per-expert tensors that vLLM's
``CompressedTensorsW4A4Nvfp4MoEMethod`` loads (tests/server_loaders.py, ``vllm_nvfp4_moe``):

* the reader of tests/reference.py (``nvfp4_decode``, no dist_quant code) decodes every expert's ``weight_packed`` (E2M1 codes,
  two a byte, the even column in the low nibble, bit 3 the sign) times ``weight_scale / weight_global_scale``
  per group of 16 — compressed-tensors' NVFP4 rule (``dequantize``: ``scale / global_scale``), as
  tests/test_float_formats.py reads the dense NVFP4 linears — and matches the fake-quant weights; RTN
  experts also match the published rule recomputed from the float checkpoint (gate and up: one global
  scale ``448 · 6 / max(|gate|, |up|)``);
* the vLLM fused-MoE table is filled exactly (names, dtypes, shapes), gate/up global scales agree per
  expert, and the input global scales (W4A4) are one value per layer for gate/up and one for down;
* 2 gloo ranks write the same tensors as 1 (the MAX-reduced input global scales, GPTQ solves).

DeepSeek-V3 / Kimi-K2 (MLA, kv_b_proj weight-only): tests/test_nvfp4_deepseek.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port, run_main
from reference import F8, nvfp4_decode, nvfp4_rtn_reference, read_tensors
from server_loaders import check_complete, layer_modules, load, vllm_nvfp4, vllm_nvfp4_moe
from tiny import corpus_text
from tiny_moe import MOE_ARCHS, make_tiny_moe

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["calib.num_samples=8", "calib.seq_len=32", "calib.batch_size=4", "runtime.threads=1",
         "calib.min_expert_tokens=1"]
EXPERTS = 4

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("nvfp4_moe")
    calib = base / "calib.txt"
    calib.write_text(corpus_text(30_000))
    models = {a: make_tiny_moe(base / a, a, layers=2, experts=EXPERTS, vocab=256) for a in MOE_ARCHS}
    return {"base": base, "calib": calib, **models}


def argv(env, model: str, out: Path, *extra: str) -> list[str]:
    return [f"model.path={env[model]}", f"calib.path={env['calib']}", *CALIB, f"output.dir={out}",
            f"runtime.run_dir={out}.run", *extra]


def quantize(env, arch: str, name: str, *extra: str) -> Path:
    out = env["base"] / "out" / f"{arch}-{name}"
    if not out.exists():
        code, _, err = run_main(argv(env, arch, out, *extra))
        assert code == 0, err[-3000:]
    return out


def experts(config: dict, layer: int):
    """(gate, up, down) checkpoint prefixes of every routed expert of ``layer``."""
    if config["model_type"] == "mixtral":
        block, names = f"model.layers.{layer}.block_sparse_moe.experts", ("w1", "w3", "w2")
    else:
        block, names = f"model.layers.{layer}.mlp.experts", ("gate_proj", "up_proj", "down_proj")
    return [tuple(f"{block}.{e}.{n}" for n in names) for e in range(EXPERTS)]


CASES = [(a, "nvfp4", "rtn") for a in MOE_ARCHS] + [(a, "nvfp4a16", "rtn") for a in MOE_ARCHS] + \
        [("qwen3_moe", "nvfp4", "gptq")]


@pytest.mark.parametrize("arch,preset,solver", CASES)
def test_nvfp4_experts_by_an_independent_reader_and_the_vllm_table(env, arch, preset, solver):
    from compressed_tensors.quantization import preset_name_to_scheme

    from dist_quant.fakequant import _linear_plan_ct  # the fake-quant weights, compared below

    out = quantize(env, arch, f"{preset}-{solver}", f"quant={preset}", f"quant.weight_solver={solver}")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"
    want = preset_name_to_scheme(preset.upper(), ["Linear"]).model_dump(mode="json")
    group = qc["config_groups"]["group_0"]
    assert group["weights"] == want["weights"] and group.get("input_activations") == want.get("input_activations")
    t = read_tensors(out)
    src = read_tensors(env[arch])
    plan = _linear_plan_ct({k: v for k, v in t.items()}, config)
    w4a4 = preset == "nvfp4"
    for layer in range(config["num_hidden_layers"]):
        igs = {"w13": set(), "w2": set()}
        for gate, up, down in experts(config, layer):
            for mod in (gate, up, down):
                assert t[mod + ".weight_global_scale"].dtype == torch.float32
                assert t[mod + ".weight_scale"].dtype == F8
                w_hat = nvfp4_decode(t, mod)
                assert torch.equal(plan[mod][0].float(), w_hat), mod
            # gate and up: one global scale per expert (vLLM keeps w13_weight_global_scale[:, 0])
            assert torch.equal(t[gate + ".weight_global_scale"], t[up + ".weight_global_scale"])
            if solver == "rtn":
                amax = max(float(src[gate + ".weight"].abs().max()), float(src[up + ".weight"].abs().max()))
                assert float(t[gate + ".weight_global_scale"]) == pytest.approx(448 * 6 / amax, rel=1e-6)
                a_down = float(src[down + ".weight"].abs().max())
                assert float(t[down + ".weight_global_scale"]) == pytest.approx(448 * 6 / a_down, rel=1e-6)
                for mod in (gate, up, down):
                    ref = nvfp4_rtn_reference(src[mod + ".weight"], t[mod + ".weight_global_scale"])
                    assert torch.equal(nvfp4_decode(t, mod), ref), mod
            if w4a4:
                for mod in (gate, up, down):
                    v = t[mod + ".input_global_scale"]
                    assert v.dtype == torch.float32 and v.shape == (1,) and bool(torch.isfinite(v).all()) and float(v) > 0
                igs["w13"].update(float(t[m + ".input_global_scale"]) for m in (gate, up))
                igs["w2"].add(float(t[down + ".input_global_scale"]))
            else:
                assert not any(k.endswith("input_global_scale") for k in t if k.startswith(gate.rsplit(".", 2)[0]))
        if w4a4:  # one value per layer: vLLM's FlashInfer backends take the max over experts anyway
            assert len(igs["w13"]) == 1 and len(igs["w2"]) == 1, igs

    modules = layer_modules(config, 0, lambda o, i: vllm_nvfp4(o, i, w4a4),
                            lambda e, h, i: vllm_nvfp4_moe(e, h, i, w4a4),
                            "model.layers.0.self_attn.q_proj.bias" in t, torch.float32)
    layer0 = {k: v for k, v in t.items() if k.startswith("model.layers.0.")}
    loaded = load(modules, layer0)
    check_complete(modules, loaded)
    moe = next(m for m in modules if m.kind == "moe")
    gs = loaded.values[f"{moe.name}.w13_weight_global_scale"]
    assert torch.equal(gs[:, 0], gs[:, 1])  # no "w1_weight_global_scale must match" warning in vLLM
    if w4a4:
        a13 = loaded.values[f"{moe.name}.w13_input_global_scale"]
        assert torch.equal(a13[:, 0], a13[:, 1]) and bool((a13 == a13[0, 0]).all())
    # every quantized tensor of layer 0 went somewhere (norms and the float router stay as they are)
    left = {k for k in layer0 if k not in loaded.consumed}
    assert all(k.endswith(("layernorm.weight", "_norm.weight", "mlp.gate.weight", "block_sparse_moe.gate.weight",
                           "shared_expert_gate.weight")) for k in left), left


def test_two_ranks_write_the_same_tensors_as_one(env):
    extra = ("quant=nvfp4", "quant.weight_solver=gptq")
    one = quantize(env, "qwen2_moe", "nvfp4-gptq", *extra)
    two = env["base"] / "out" / "qwen2_moe-nvfp4-gptq-2ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_quant",
           *argv(env, "qwen2_moe", two, *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    t1, t2 = read_tensors(one), read_tensors(two)
    assert t1.keys() == t2.keys()
    for name in t1:
        a, b = t1[name], t2[name]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == F8 else a,
                                                  b.view(torch.uint8) if b.dtype == F8 else b), name
    files = json.loads((two / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(files.values())) >= 2  # both ranks wrote part files
    report = json.loads((two / "quant_report.json").read_text())  # the report still works: tokens moved
    assert report["world_size"] == 2 and report["moe"]["sparse_layers"] == 2 and report["moe"]["tokens_moved_per_layer"] > 0


def test_dry_run_plans_nvfp4_experts(env, tmp_path):
    out = tmp_path / "dry"
    code, stdout, err = run_main(argv(env, "mixtral", out, "quant=nvfp4", "dry_run=true", "runtime.world_size=2"))
    assert code == 0, err[-2000:]
    assert not out.exists()
