"""``quant.kv_cache=fp8`` for multi-head latent attention (DeepSeek-V3 layout, tiny random model:
a dense layer, an MoE layer, an MTP layer): vLLM caches one latent per token,
``kv_a_layernorm(kv_c) ‖ k_pe`` with ``k_pe`` after RoPE, with one scale
(``concat_and_cache_mla(kv_c_normed, k_pe, …, scale=k_scale)``).

The stored scale is re-derived here independently: the output's own weights dequantized into the
float model (tests/moe_reference.py), the latent taken by this test's hooks on transformers'
modules (``kv_a_layernorm``'s output; the rotated k_pe as the model's RoPE function returns it,
and once more rotated here by vLLM's GPT-J rule from ``kv_a_proj_with_mqa``'s output), each
layer measured with the layers before it caching the fp8 latent. Layer 0's rope rows are scaled
up so that its maximum is the rotated k_pe's (layer 1: the normed latent's), so both parts and
"after RoPE" are exercised. Also: the hidden states the pipeline propagated equal that model
with the fp8 latent; the config's kv_cache_scheme; the names vLLM's loader maps to its MLA
attention; the refusals; 2 ranks = 1 rank."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

import server_loaders as sl  # noqa: E402
from moe_jobs import finish, run_inprocess, start_ranks  # noqa: E402
from moe_reference import load_fake_quant  # noqa: E402
from reference import assert_layers_match_model, read_tensors  # noqa: E402
from tiny import corpus_text  # noqa: E402
from tiny_deepseek import make_tiny_deepseek  # noqa: E402

N, L, B = 8, 32, 4
LAYERS = 2
FP8_MAX = 448.0
ROPE_BOOST = 6.0  # layer 0's k_pe rows of kv_a_proj_with_mqa, scaled: its maximum is the rotated k_pe's
MODULE = "transformers.models.deepseek_v3.modeling_deepseek_v3"


W4 = ("quant=rtn_w4a16", "quant.group_size=16")


def _args(root: Path, *extra: str, preset=W4) -> list[str]:
    return [f"calib.path={root / 'calib.txt'}", f"calib.num_samples={N}", f"calib.seq_len={L}",
            f"calib.batch_size={B}", *preset, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla_kv")
    (root / "calib.txt").write_text(corpus_text(30_000), encoding="utf-8")
    model = make_tiny_deepseek(root / "ds", layers=LAYERS, experts=4, n_group=2, topk_group=1, mtp=1)
    cfg = json.loads((model / "config.json").read_text())
    t = load_file(str(model / "model.safetensors"))
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    t[name][cfg["kv_lora_rank"]:] *= ROPE_BOOST
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    return SimpleNamespace(root=root, model=model, cfg=cfg, runs={})


def job(env, key, *extra, capture=True):
    if key not in env.runs:
        env.runs[key] = run_inprocess(env.model, env.root / f"out_{key}", _args(env.root, *extra), capture=capture)
    return env.runs[key]


# -- the independent reference ------------------------------------------------------------------------

def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The published rule: E4M3 cast of clamp(x / s, ±448), times s."""
    s = scale.float()
    return ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).to(x.dtype)


def gptj_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """vLLM's DeepSeek rotary (``get_rope(..., is_neox_style=False)``): channel pairs (2i, 2i+1)
    rotated by ``pos · theta^(-2i/d)``, positions 0..L-1. ``x`` [B, L, d]."""
    d, n = x.shape[-1], x.shape[-2]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def masked_amax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max |x| over the real tokens; ``x`` [B, L, d] or [B, 1, L, d], ``mask`` [B, L]."""
    x = x.reshape(mask.shape[0], mask.shape[1], -1)
    return (x.detach().abs() * (mask != 0)[:, :, None]).amax().float()


class LatentReference:
    """This test's view of the cached latent in a transformers DeepseekV3 model: a pre-hook on each
    attention tells which layer runs; ``kv_a_layernorm``'s output is the normed latent; the model's
    RoPE functions (patched in its module) return the rotated k_pe; ``kv_a_proj_with_mqa``'s output
    gives the k_pe before RoPE. Layer ``record`` has its maxima taken (real tokens: ``mask``);
    layers in ``scales`` get both parts fake-quantized to fp8 with their one scale."""

    def __init__(self, model, monkeypatch):
        import importlib

        mod = importlib.import_module(MODULE)
        self.scales, self.record, self.mask, self.amax, self.current = {}, None, None, {}, None
        self.rank = model.config.kv_lora_rank
        for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave"):
            monkeypatch.setattr(mod, name, self._rope(getattr(mod, name)))
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "current", i))
            attn.kv_a_layernorm.register_forward_hook(self._normed)
            attn.kv_a_proj_with_mqa.register_forward_hook(self._compressed)

    def _rope(self, original):
        def rope(q, k, cos, sin, *a, **kw):
            q, k = original(q, k, cos, sin, *a, **kw)
            if self.current == self.record:
                self.amax["rope"] = masked_amax(k, self.mask)
            if self.current in self.scales:
                k = fp8_fake_quant(k, self.scales[self.current])
            return q, k
        return rope

    def _normed(self, module, args, out):
        if self.current == self.record:
            self.amax["nope"] = masked_amax(out, self.mask)
        return fp8_fake_quant(out, self.scales[self.current]) if self.current in self.scales else out

    def _compressed(self, module, args, out):
        if self.current == self.record:
            self.amax["k_pe"] = out[..., self.rank:].detach().clone()

    def maxima(self, model, ids, mask, layer: int) -> dict:
        self.record, self.mask, self.amax = layer, mask, {}
        with torch.no_grad():
            model(ids)
        self.record = None
        return self.amax


def rederive(model, ref: LatentReference, calib) -> list[dict]:
    """Per layer the maxima and the scale max(|normed latent|, |rotated k_pe|) / 448, each layer
    measured with the layers before caching the fp8 latent (the scales derived here)."""
    out = []
    for i in range(LAYERS):
        m = ref.maxima(model, calib.input_ids, calib.mask, i)
        m["scale"] = (torch.maximum(m["nope"], m["rope"]) / FP8_MAX).reshape(1)
        ref.scales[i] = m["scale"]
        out.append(m)
    return out


# -- tests -------------------------------------------------------------------------------------------

def test_latent_scale_rederived_and_written_where_vllm_reads_it(env, monkeypatch):
    run = job(env, "fp8", "quant.kv_cache=fp8")
    qc = json.loads((run.out / "config.json").read_text())["quantization_config"]
    s = qc["kv_cache_scheme"]
    assert (s["type"], s["num_bits"], s["strategy"], s["dynamic"], s["symmetric"]) == \
        ("float", 8, "tensor", False, True)
    from compressed_tensors.quantization import QuantizationConfig
    assert QuantizationConfig.model_validate(qc).kv_cache_scheme.strategy == "tensor"

    t = read_tensors(run.out)
    kv = sorted(n for n in t if n.endswith(("k_scale", "v_scale")))
    assert kv == sorted(f"model.layers.{i}.self_attn.{p}_proj.{p}_scale" for i in range(LAYERS) for p in "kv")

    model, _ = load_fake_quant(env.model, run.out, attn="sdpa")
    ref = LatentReference(model, monkeypatch)
    expected = rederive(model, ref, run.calib)
    theta = float(env.cfg.get("rope_theta") or (env.cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    params = sl.vllm_mla_kv_params(LAYERS)
    for i, m in enumerate(expected):
        k, v = t[f"model.layers.{i}.self_attn.k_proj.k_scale"], t[f"model.layers.{i}.self_attn.v_proj.v_scale"]
        assert k.dtype == v.dtype == torch.float32 and k.shape == v.shape == (1,)
        assert torch.equal(k, v)  # one latent, one scale
        torch.testing.assert_close(k, m["scale"], rtol=1e-5, atol=0)
        # the rotated k_pe as vLLM's rotary computes it on kv_a_proj_with_mqa's output: the same maximum
        vllm_rope = masked_amax(gptj_rope(m["k_pe"], theta), run.calib.mask)
        torch.testing.assert_close(vllm_rope, m["rope"], rtol=1e-5, atol=0)
        # vLLM's loader sends exactly these names to the MLA attention's k_scale / v_scale
        for p in "kv":
            name = f"model.layers.{i}.self_attn.{p}_proj.{p}_scale"
            want = f"model.layers.{i}.self_attn.mla_attn.mla_attn.{p}_scale"
            assert sl.vllm_remap_kv_scale_name(name, params) == want
            assert sl.vllm_remap_kv_scale_name(f"model.layers.{i}.self_attn.{p}_scale", params) is None  # dropped
    # layer 0: the rotated k_pe makes the maximum, and before RoPE it would be another one; layer 1:
    # the normed latent makes it (both parts are in the one scale)
    assert expected[0]["rope"] > 1.05 * expected[0]["nope"]
    pre = masked_amax(expected[0]["k_pe"], run.calib.mask)
    assert abs(pre - expected[0]["rope"]) > 1e-3 * expected[0]["rope"]
    assert expected[1]["nope"] > 1.05 * expected[1]["rope"]

    # the pipeline carried on with the latent as the fp8 cache gives it back
    assert_layers_match_model(model, run.calib.input_ids, [run.xs[i] for i in range(LAYERS)], atol=1e-4)
    ref.scales = {}
    with pytest.raises(AssertionError):  # ... which differs from the float cache by more than that
        assert_layers_match_model(model, run.calib.input_ids, [run.xs[i] for i in range(LAYERS)], atol=1e-4)


def test_only_the_scales_are_added(env):
    """RTN weights do not depend on the activations: the KV cache adds its scales and changes no
    other tensor (the MTP layer, written through, gets none)."""
    a = read_tensors(job(env, "fp8", "quant.kv_cache=fp8").out)
    b = read_tensors(job(env, "plain", capture=False).out)
    assert set(a) - set(b) == {f"model.layers.{i}.self_attn.{p}_proj.{p}_scale" for i in range(LAYERS) for p in "kv"}
    assert set(b) <= set(a) and all(torch.equal(a[n], b[n]) for n in b)
    qc_a = json.loads((job(env, "fp8").out / "config.json").read_text())["quantization_config"]
    qc_b = json.loads((job(env, "plain").out / "config.json").read_text())["quantization_config"]
    assert qc_b.get("kv_cache_scheme") is None and qc_a["kv_cache_scheme"] is not None
    def rest(qc):
        return {k: v for k, v in qc.items() if k != "kv_cache_scheme"}
    assert rest(qc_a) == rest(qc_b)


def test_transformers_loads_it_with_a_float_cache(env):
    """transformers' DeepseekV3 has no k_proj / v_proj: the scales are unexpected keys, and the
    attention (it takes ``cache``, not ``past_key_value(s)``) gets no compressed-tensors KV hook: the
    logits are the fake-quant model's with a float cache."""
    from transformers import AutoModelForCausalLM

    run = job(env, "fp8", "quant.kv_cache=fp8")
    loaded, info = AutoModelForCausalLM.from_pretrained(str(run.out), dtype=torch.float32, attn_implementation="sdpa",
                                                        output_loading_info=True)
    scales = {f"model.layers.{i}.self_attn.{p}_proj.{p}_scale" for i in range(LAYERS) for p in "kv"}
    assert scales <= set(info["unexpected_keys"]) and not info["missing_keys"]
    ref, _ = load_fake_quant(env.model, run.out, attn="sdpa")
    ids = run.calib.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=2e-4, rtol=1e-4)


def test_two_ranks_write_the_one_rank_output(env):
    one = job(env, "fp8", "quant.kv_cache=fp8")
    two = finish(start_ranks(env.model, env.root / "out_fp8_w2", _args(env.root, "quant.kv_cache=fp8"), 2,
                             env.root / "trace_w2"))
    assert two.rc == 0, two.stderr[-4000:]
    a, b = read_tensors(one.out), read_tensors(two.out)
    assert set(a) == set(b)
    differ = [n for n in a if not (a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]))]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    assert json.loads((one.out / "config.json").read_text()) == json.loads((two.out / "config.json").read_text())


ASCEND = ("quant=w8a8", "quant.act_dynamic=true", "output.format=ascend", "output.dtype=bfloat16")


@pytest.mark.parametrize("preset, extra, match", [
    (W4, ["quant.kv_cache=fp8", "quant.kv_cache_strategy=head"], "quant.kv_cache_strategy='head'"),
    (ASCEND, ["quant.kv_cache=int8", "quant.kv_cache_strategy=head"], "quant.kv_cache_strategy='head'"),
    (W4, ["quant.kv_cache=int8"], "quant.kv_cache='int8'"),  # vLLM's cache is fp8 (config check, any model)
])
def test_refused_in_one_line_before_work(env, capsys, preset, extra, match):
    from dist_quant.__main__ import main

    out = env.root / "refused"
    argv = [f"model.path={env.model}", *_args(env.root, *extra, preset=preset), f"output.dir={out}",
            f"runtime.run_dir={out}.run"]
    assert main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], errors
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_vllm_serving_caveat_is_printed(env):
    from dist_quant.servability import VLLM, Job, check

    j = Job("compressed-tensors", "W4A16", 16, True, "float32", "deepseek_v3", True, kv_cache="fp8", kv_layout="mla")
    found = check(j, [], [])
    notes = [f.rule for f in found[VLLM] if "mla_attn.mla_attn" in f.rule.why]
    assert len(notes) == 1 and notes[0].effect == "serves, but not exactly the calibrated model"
    assert not any("mla_attn" in f.rule.why for f in check(Job("compressed-tensors", "W4A16", 16, True, "float32",
                                                                "llama", kv_cache="fp8"), [], [])[VLLM])
