"""KV-cache quantization end to end (tiny GQA llama, 4 heads / 2 KV heads): the stored K and V
scales re-derived independently (the output's own weights in a float model, K and V taken by this
test's attention function after RoPE, the layers before already caching quantized K/V), the
servers' loader contracts (vLLM k_scale/v_scale; vLLM-Ascend C8), 2 ranks = 1 rank, and the
refusals. Multi-head latent attention (DeepSeek-V3 / Kimi-K2): tests/test_mla_kv_cache.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

import server_loaders as sl  # noqa: E402
from dist_quant.__main__ import main  # noqa: E402
from dist_quant.fakequant import read_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, L, B = 8, 48, 4
CALIB = [f"calib.num_samples={N}", f"calib.seq_len={L}", f"calib.batch_size={B}"]
W4 = ["quant=rtn_w4a16", "quant.group_size=32"]
FP8_MAX, REF_IMPL = 448.0, "kv_test_reference"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tiny import corpus_text, make_tiny_model

    base = tmp_path_factory.mktemp("kv")
    calib = base / "calib.txt"
    calib.write_text(corpus_text(60_000))
    return {"base": base, "calib": calib, "llama": make_tiny_model(base / "llama", layers=2)}


def overrides(env, out: Path, extra) -> list[str]:
    return [f"model.path={env['llama']}", f"calib.path={env['calib']}", *CALIB, f"output.dir={out}",
            f"runtime.run_dir={out}.run", "runtime.threads=1", *extra]


def quantize(env, name: str, *extra: str) -> Path:
    out = env["base"] / "out" / name
    if not out.exists():
        assert main(overrides(env, out, extra)) == 0
    return out


def quantize_2ranks(env, name: str, *extra: str) -> Path:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = env["base"] / "out" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "dist_quant", *overrides(env, out, extra)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def calibration(env):
    from transformers import AutoTokenizer

    from dist_quant.calibration import from_text
    from dist_quant.config import CalibConfig

    tok = AutoTokenizer.from_pretrained(str(env["llama"]))
    return from_text(env["calib"].read_text(), tok, CalibConfig(num_samples=N, seq_len=L), "calib")


# -- the independent reference ------------------------------------------------------------------------

def ref_fake_quant(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """The published rules: fp8 = E4M3 cast of clamp(x / s, ±448) times s; int8 = clamp(round(x / s)) · s."""
    s = scale.float().reshape(1, -1, 1, 1)
    if kind == "fp8":
        return ((x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * s).to(x.dtype)
    return (torch.clamp(torch.round(x / s), -128, 127) * s).to(x.dtype)


class KVReference:
    """This test's own attention function: K (after RoPE) and V as the attention receives them;
    layers listed in ``scales`` return their K/V fake-quantized, layer ``record`` has its per-head
    max |x| over the real tokens taken (``mask``)."""

    def __init__(self, kind: str):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.kind, self.scales, self.record, self.mask, self.amax = kind, {}, None, None, None
        self.pre_rope = None

        def attention(module, q, k, v, mask, **kw):
            i = module.layer_idx
            if i == self.record:
                real = (self.mask != 0)[:, None, :, None]
                self.amax = ((k.abs() * real).amax(dim=(0, 2, 3)), (v.abs() * real).amax(dim=(0, 2, 3)))
            if i in self.scales:
                k, v = (ref_fake_quant(t, s, self.kind) for t, s in zip((k, v), self.scales[i]))
            return sdpa_attention_forward(module, q, k, v, mask, **kw)

        AttentionInterface.register(REF_IMPL, attention)

    def maxima(self, model, ids, mask, layer: int):
        self.record, self.mask = layer, mask
        model.config._attn_implementation = REF_IMPL
        with torch.no_grad():
            model(ids)
        self.record = None
        return self.amax


def unpack_w4(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent reader of pack-quantized symmetric int4: eight 4-bit codes per int32 (code i in
    bits 4i..4i+3, stored as q + 8), ``w = q · weight_scale`` per group of columns."""
    out = {}
    for name, packed in t.items():
        if not name.endswith(".weight_packed"):
            continue
        m = name[: -len(".weight_packed")]
        rows, cols = (int(v) for v in t[m + ".weight_shape"])
        q = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(rows, -1)[:, :cols] - 8
        scale = t[m + ".weight_scale"].float()
        out[m + ".weight"] = q.float() * scale.repeat_interleave(cols // scale.shape[1], dim=1)
    return out


def float_model_with(env, weights: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(env["llama"]), dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    return model


def rederive(model, env, kind: str, per_head: bool, to_served) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_scale, v_scale), each layer measured with the layers before caching quantized K/V."""
    calib = calibration(env)
    ref = KVReference(kind)
    qmax = FP8_MAX if kind == "fp8" else 127.0
    out = []
    for i in range(model.config.num_hidden_layers):
        k_amax, v_amax = ref.maxima(model, calib.input_ids, calib.mask, i)
        pair = tuple(to_served((a if per_head else a.amax().reshape(1)) / qmax) for a in (k_amax, v_amax))
        ref.scales[i] = pair
        out.append(pair)
    return out


# -- tests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["head", "tensor"])
def test_fp8_scales_rederived_after_rope_and_vllm_contract(env, strategy):
    from transformers import AutoModelForCausalLM

    out = quantize(env, f"fp8-{strategy}", *W4, "quant.kv_cache=fp8", f"quant.kv_cache_strategy={strategy}")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = qc["kv_cache_scheme"]
    want = "attn_head" if strategy == "head" else "tensor"
    assert (scheme["type"], scheme["num_bits"], scheme["strategy"], scheme["dynamic"], scheme["symmetric"]) == \
        ("float", 8, want, False, True)
    # the compressed-tensors library validates the entry as its own model
    from compressed_tensors.quantization import QuantizationConfig
    assert QuantizationConfig.model_validate(qc).kv_cache_scheme.strategy == want

    # transformers loads the output (its weights); in transformers 5 the attention takes `cache`,
    # not `past_key_values`, so compressed-tensors 0.20 attaches no KV quantization: check that
    # the fact still holds (when it changes, this test should load the scales through it)
    served = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not hasattr(served.model.layers[0].self_attn, "k_scale")

    t = read_tensors(out, "model.safetensors.index.json")
    model = float_model_with(env, unpack_w4(t))
    calib = calibration(env)
    with torch.no_grad():  # the independent reader computes what transformers' own loader computes
        model.config._attn_implementation = "sdpa"
        torch.testing.assert_close(model(calib.input_ids[:2]).logits, served(calib.input_ids[:2]).logits,
                                   rtol=1e-4, atol=1e-4)
    expected = rederive(model, env, "fp8", strategy == "head", lambda s: s.float())
    kv_heads = 2
    params = sl.vllm_kv_cache(kv_heads, want)
    for i, (k_ref, v_ref) in enumerate(expected):
        for kind, ref in (("k", k_ref), ("v", v_ref)):
            name = f"model.layers.{i}.self_attn.{kind}_scale"
            stored = t[name]
            assert stored.dtype == torch.float32
            assert tuple(stored.shape) == ((kv_heads, 1, 1) if strategy == "head" else (1,))
            assert sl.vllm_kv_name(name) == f"model.layers.{i}.self_attn.attn.{kind}_scale"
            loaded = sl.vllm_kv_load(stored, params[f"{kind}_scale"])
            torch.testing.assert_close(loaded, ref, rtol=2e-6, atol=0)
    # K is taken after RoPE: the k_proj output (before RoPE) would give other scales
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(calib.input_ids))
        k_pre = model.model.layers[0].self_attn.k_proj(h).view(N, L, kv_heads, -1)
        k_pre = (k_pre.abs() * calib.mask[:, :, None, None]).amax(dim=(0, 1, 3)) / FP8_MAX
    k_pre = k_pre if strategy == "head" else k_pre.amax().reshape(1)
    assert (k_pre - expected[0][0]).abs().max() > 1e-3 * expected[0][0].max()

    # the quantized cache changes the model a little (fp8 K/V), not much
    ref = KVReference("fp8")
    ref.scales = {i: p for i, p in enumerate(expected)}
    ids = calib.input_ids[:2]
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        plain = model(ids).logits
        model.config._attn_implementation = REF_IMPL
        cached = model(ids).logits
    change = ((cached - plain).norm() / plain.norm()).item()
    assert 1e-6 < change < 0.05, change


def test_ascend_c8_scales_rederived_description_and_loader(env):
    out = quantize(env, "c8-head", "quant=rtn_w8a16", "output.format=ascend", "output.dtype=bfloat16",
                   "quant.kv_cache=int8", "quant.kv_cache_strategy=head")
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["kv_cache_type"] == "C8" and desc["kv_quant_type"] == "C8"
    t = read_tensors(out, "quant_model_weights.safetensors.index.json")
    kv_names = [n for n in t if n.endswith(("kv_cache_scale", "kv_cache_offset"))]
    assert len(kv_names) == 2 * 4 and all(desc[n] == "C8" for n in kv_names)
    kv_heads, head_dim = 2, 16
    loaded = sl.ascend_c8_load(desc, t, kv_heads, head_dim, torch.bfloat16)
    assert len(loaded) == 2 * 4

    # the W8A16 weights as CANN computes them: (q + weight_offset) · weight_scale
    weights = {}
    for name, kind in desc.items():
        if name.endswith(".weight") and kind == "W8A16":
            m = name[: -len(".weight")]
            weights[name] = (t[name].float() + t[m + ".weight_offset"].float()) * t[m + ".weight_scale"].float()
    model = float_model_with(env, weights)
    expected = rederive(model, env, "int8", True, lambda s: s.to(torch.bfloat16).float())
    for i, (k_ref, v_ref) in enumerate(expected):
        for kind, ref in (("k", k_ref), ("v", v_ref)):
            scale = loaded[f"model.layers.{i}.self_attn.attn.{kind}_cache_scale"]
            offset = loaded[f"model.layers.{i}.self_attn.attn.{kind}_cache_offset"]
            assert scale.dtype == torch.bfloat16 and scale.shape == (kv_heads * head_dim,)
            torch.testing.assert_close(scale.float(), ref.repeat_interleave(head_dim), rtol=0, atol=0)
            assert torch.count_nonzero(offset) == 0


def test_two_ranks_write_the_scales_one_rank_writes(env):
    one = quantize(env, "fp8-head", *W4, "quant.kv_cache=fp8", "quant.kv_cache_strategy=head")
    two = quantize_2ranks(env, "fp8-head-2ranks", *W4, "quant.kv_cache=fp8", "quant.kv_cache_strategy=head")
    a = read_tensors(one, "model.safetensors.index.json")
    b = read_tensors(two, "model.safetensors.index.json")
    assert a.keys() == b.keys()
    scales = [n for n in a if n.endswith(("k_scale", "v_scale"))]
    assert len(scales) == 4
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert json.loads((one / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] == \
        json.loads((two / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]


@pytest.mark.parametrize("extra, match", [
    ([*W4, "quant.kv_cache=int8"], "quant.kv_cache='int8': an int8 KV cache is Ascend's C8"),
    (["quant=w8a8", "output.format=ascend", "quant.kv_cache=fp8"], "quant.kv_cache='fp8': vLLM-Ascend's"),
    ([*W4, "quant.kv_cache=fp16"], "quant.kv_cache='fp16': expected null"),
    ([*W4, "quant.kv_cache=fp8", "quant.kv_cache_strategy=channel"], "quant.kv_cache_strategy='channel'"),
])
def test_bad_combinations_refused_in_one_line(env, capsys, extra, match):
    out = env["base"] / "out" / "refused"
    assert main(overrides(env, out, extra)) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], errors
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
