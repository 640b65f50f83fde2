"""``quant.kv_cache=int8 output.format=ascend`` for multi-head latent attention (DeepSeek-V3 layout,
tiny random model: a dense layer, an MoE layer, an MTP layer): vLLM-Ascend's FAKQuant
(vllm_ascend/quantization/methods/kv_c8.py ``AscendFAQuantAttentionMethod``; msModelSlim's FA3
writer, save/ascendv1.py ``_save_activation_per_head``).

The stored scales are re-derived here independently, on the output's own W8A8_DYNAMIC weights
dequantized into the float model with per-token int8 inputs (tests/moe_reference.py), by this
test's hooks: ``fa_k`` / ``fa_v`` from ``kv_a_layernorm``'s output only (vLLM-Ascend caches the
nope part int8 and keeps ``k_pe`` in the serving dtype; layer 0's rope rows are scaled up so that
its k_pe is larger than the latent, which would change a scale that included it), ``fa_q`` from
``q_b_proj``'s output times each head's ``W_UK`` (msModelSlim's DeepSeek-V3 adapter observes
``q_nope @ q_absorb``), each layer measured with the layers before it caching the int8 latent.
Also: the hidden states the pipeline propagated are that model's (int8 latent, float k_pe); the
description entries; what vLLM-Ascend's loader builds from them at TP 1 and 2
(tests/server_loaders.py ``ascend_fa_load``); the refusals; 2 ranks = 1 rank."""
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
from moe_reference import QLinear, emulate_dynamic_activations, load_fake_quant  # noqa: E402
from reference import assert_layers_match_model, read_tensors  # noqa: E402
from tiny import corpus_text  # noqa: E402
from tiny_deepseek import make_tiny_deepseek  # noqa: E402

N, L, B = 8, 32, 4
LAYERS = 2
ROPE_BOOST = 6.0  # layer 0's k_pe rows of kv_a_proj_with_mqa, scaled: its k_pe outgrows the latent
PRESET = ("quant=w8a8", "quant.weight_solver=rtn", "quant.act_dynamic=true", "output.format=ascend",
          "output.dtype=bfloat16")
FA = [f"model.layers.{i}.self_attn.{b}.{leaf}" for i in range(LAYERS) for b in ("fa_q", "fa_k", "fa_v")
      for leaf in ("scale", "offset")]


def _args(root: Path, *extra: str, preset=PRESET) -> list[str]:
    return [f"calib.path={root / 'calib.txt'}", f"calib.num_samples={N}", f"calib.seq_len={L}",
            f"calib.batch_size={B}", *preset, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ascend_mla_kv")
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


def fak(env):
    return job(env, "fak", "quant.kv_cache=int8")


def read_ascend(out: Path):
    """The output's tensors, description and W8A8_DYNAMIC linears (int8 q, fp32 scale, offset 0)."""
    t = read_tensors(out)
    desc = json.loads((out / "quant_model_description.json").read_text())
    qlinears = {}
    for key, kind in desc.items():
        if key.endswith(".weight") and kind == "W8A8_DYNAMIC":
            mod = key[: -len(".weight")]
            assert torch.count_nonzero(t[mod + ".weight_offset"]) == 0, mod
            qlinears[mod] = QLinear(t[key].long(), t[mod + ".weight_scale"].float(), None)
    return t, desc, qlinears


# -- the independent reference ------------------------------------------------------------------------

def int8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The published rule (symmetric int8, offset 0): clamp(round(x / s), −128, 127) · s."""
    s = scale.float()
    return (torch.round(x.float() / s).clamp(-128, 127) * s).to(x.dtype)


def masked_amax(x: torch.Tensor, mask: torch.Tensor, dims) -> torch.Tensor:
    return (x.detach().float().abs() * mask).amax(dim=dims)


class FAReference:
    """Hooks on a transformers DeepseekV3 model: a pre-hook on each attention tells which layer
    runs; ``q_b_proj``'s output, split per head and absorbed with ``kv_b_proj``'s W_UK, gives the
    query's per-head maxima; ``kv_a_layernorm``'s output is the cached latent (maximum taken in layer
    ``record``; int8-fake-quantized with the scale of the layers in ``scales``)."""

    def __init__(self, model):
        c = model.config
        self.heads, self.nope = c.num_attention_heads, c.qk_nope_head_dim
        self.qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        self.scales, self.record, self.mask, self.amax, self.current = {}, None, None, {}, None
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "current", i))
            attn.q_b_proj.register_forward_hook(lambda m, a, out, attn=attn: self._query(attn, out))
            attn.kv_a_layernorm.register_forward_hook(self._latent)

    def _query(self, attn, out):
        if self.current != self.record:
            return
        b, n = out.shape[:2]
        q_nope = out.view(b, n, self.heads, self.qk)[..., :self.nope]  # [B, L, H, nope]
        w_uk = attn.kv_b_proj.weight.view(self.heads, -1, attn.kv_lora_rank)[:, :self.nope]  # [H, nope, rank]
        absorbed = torch.einsum("blhd,hdr->blhr", q_nope.double(), w_uk.double())
        self.amax["q"] = masked_amax(absorbed, self.mask[:, :, None, None], (0, 1, 3)).float()

    def _latent(self, module, args, out):
        if self.current == self.record:
            self.amax["latent"] = masked_amax(out, self.mask[:, :, None], (0, 1, 2)).float()
        return int8_fake_quant(out, self.scales[self.current]) if self.current in self.scales else out

    def maxima(self, model, ids, mask, layer: int) -> dict:
        self.record, self.mask, self.amax = layer, mask, {}
        with torch.no_grad():
            model(ids)
        self.record = None
        return self.amax


def reference_model(env, run):
    t, desc, ql = read_ascend(run.out)
    model, replaced = load_fake_quant(env.model, run.out, attn="sdpa", tensors=t, qlinears=ql)
    assert replaced == set(ql)
    emulate_dynamic_activations(model, set(ql))
    return model, t, desc


def rederive(model, ref: FAReference, calib, stored: dict) -> list[dict]:
    """Per layer the maxima, each layer measured with the layers before caching the int8 latent
    with their stored ``fa_k.scale``."""
    out = []
    for i in range(LAYERS):
        out.append(ref.maxima(model, calib.input_ids, calib.mask, i))
        ref.scales[i] = stored[f"model.layers.{i}.self_attn.fa_k.scale"].reshape(1)
    return out


def bf16_exact(x: torch.Tensor) -> bool:
    return torch.equal(x.to(torch.bfloat16).float(), x.float())


# -- tests -------------------------------------------------------------------------------------------

def test_scales_rederived_and_the_latent_alone_is_cached_int8(env):
    run = fak(env)
    model, t, desc = reference_model(env, run)
    ref = FAReference(model)
    expected = rederive(model, ref, run.calib, t)
    heads = env.cfg["num_attention_heads"]
    for i, m in enumerate(expected):
        attn = f"model.layers.{i}.self_attn"
        q, k, v = t[f"{attn}.fa_q.scale"], t[f"{attn}.fa_k.scale"], t[f"{attn}.fa_v.scale"]
        assert q.dtype == k.dtype == v.dtype == torch.float32  # as msModelSlim writes them
        assert q.shape == (heads, 1) and k.shape == v.shape == (1, 1)
        assert bf16_exact(q) and bf16_exact(k)  # rounded to the serving dtype the loader casts to
        assert torch.equal(k, v)  # msModelSlim observes the same latent for fa_k and fa_v
        # max |x| / 127, then rounded to bfloat16 (half an ulp: 2^-9 relative)
        torch.testing.assert_close(k.reshape(1), (m["latent"] / 127).reshape(1), rtol=2 ** -8, atol=0)
        torch.testing.assert_close(q.reshape(-1), m["q"] / 127, rtol=2 ** -8, atol=0)
        for b in ("fa_q", "fa_k", "fa_v"):
            off = t[f"{attn}.{b}.offset"]
            assert off.dtype == torch.int8 and off.shape == t[f"{attn}.{b}.scale"].shape
            assert torch.count_nonzero(off) == 0  # the decode attention dequantizes with the scale only
    # layer 0's rotated k_pe is larger than its latent: a scale over latent ‖ k_pe would be another one
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(run.calib.input_ids))
        k_pe = model.model.layers[0].self_attn.kv_a_proj_with_mqa(h)[..., env.cfg["kv_lora_rank"]:]
    assert k_pe.abs().max() > 1.5 * expected[0]["latent"].max()

    # the pipeline carried on with the int8 latent (k_pe float) ...
    assert_layers_match_model(model, run.calib.input_ids, [run.xs[i] for i in range(LAYERS)], atol=1e-5)
    ref.scales = {}
    with pytest.raises(AssertionError):  # ... which differs from the float cache by more than that
        assert_layers_match_model(model, run.calib.input_ids, [run.xs[i] for i in range(LAYERS)], atol=1e-5)


def test_description_and_config(env):
    run = fak(env)
    t, desc, _ = read_ascend(run.out)
    plain_out = job(env, "plain", capture=False).out
    p, pdesc, _ = read_ascend(plain_out)
    assert desc["fa_quant_type"] == "FAKQuant" and "kv_cache_type" not in desc and "kv_quant_type" not in desc
    assert set(t) - set(p) == set(FA)  # the scales are added, the MTP layer (2) gets none
    assert all(torch.equal(t[n], p[n]) for n in p)  # RTN weights and dynamic activations: nothing else changes
    for name in FA:
        assert desc[name] == "FAQuant", name
    for i in range(LAYERS):
        assert desc[f"model.layers.{i}.self_attn.quant_type"] == "INT8"  # msModelSlim update_fa_quant_type
    added = set(desc) - set(pdesc)
    assert added == set(FA) | {f"model.layers.{i}.self_attn.quant_type" for i in range(LAYERS)} | {"fa_quant_type"}
    assert all(desc[k] == pdesc[k] for k in pdesc)
    # the linear types vLLM-Ascend picks are unchanged by the attention entries
    for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert sl.ascend_quant_type(desc, f"model.layers.1.self_attn.{proj}", "deepseek_v3", "linear") == "W8A8_DYNAMIC"
    assert sl.ascend_quant_type(desc, "model.layers.1.self_attn.kv_b_proj", "deepseek_v3", "linear") == "FLOAT"
    assert json.loads((run.out / "config.json").read_text()) == json.loads((plain_out / "config.json").read_text())
    assert "servability: servable by vLLM-Ascend (ascend W8A8_DYNAMIC" in run.log


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_ascend_loader_contract(env, tp):
    run = fak(env)
    t, desc, _ = read_ascend(run.out)
    heads, rank = env.cfg["num_attention_heads"], env.cfg["kv_lora_rank"]
    for r in range(tp):
        loaded = sl.ascend_fa_load(desc, t, heads, rank, torch.bfloat16, tp=tp, rank=r)
        assert sorted(loaded) == [f"model.layers.{i}.self_attn.mla_attn.mla_attn" for i in range(LAYERS)]
        for i in range(LAYERS):
            got, attn = loaded[f"model.layers.{i}.self_attn.mla_attn.mla_attn"], f"model.layers.{i}.self_attn"
            rows = heads // tp
            assert torch.equal(got["fa_q.scale"].float(), t[f"{attn}.fa_q.scale"][r * rows:(r + 1) * rows])
            assert torch.equal(got["fak_descale_float"], t[f"{attn}.fa_k.scale"].reshape(1))
            assert got["quant_kscale"].shape == (1, rank)
            assert torch.equal(got["quant_kscale"], (1 / t[f"{attn}.fa_k.scale"].float()).reshape(1, 1).expand(1, rank))
            assert torch.count_nonzero(got["fak_offset"]) == 0
    with pytest.raises(sl.LoadError, match="fa_quant_type is empty"):
        sl.ascend_fa_load({k: v for k, v in desc.items() if k != "fa_quant_type"}, t, heads, rank, torch.bfloat16)


def test_two_ranks_write_the_one_rank_output(env):
    one = fak(env)
    two = finish(start_ranks(env.model, env.root / "out_fak_w2", _args(env.root, "quant.kv_cache=int8"), 2,
                             env.root / "trace_w2"))
    assert two.rc == 0, two.stderr[-4000:]
    a, b = read_tensors(one.out), read_tensors(two.out)
    assert set(a) == set(b) and set(FA) <= set(a)
    differ = [n for n in a if not (a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]))]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    for name in ("quant_model_description.json", "config.json"):
        assert json.loads((one.out / name).read_text()) == json.loads((two.out / name).read_text())


@pytest.mark.parametrize("preset, extra, match", [
    (PRESET, ["quant.kv_cache=int8", "quant.kv_cache_strategy=head"], "quant.kv_cache_strategy='head'"),
    (PRESET, ["quant.kv_cache=fp8"], "quant.kv_cache='fp8'"),  # vLLM-Ascend's cache is int8 (config check)
    (("quant=rtn_w4a16", "quant.group_size=16", "output.format=ascend", "output.dtype=bfloat16"),
     ["quant.kv_cache=int8"], "npu_mla_prolog_v2"),  # FAKQuant's decode prolog reads int8 weight scales
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


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_fa_capture_on_the_attention_module(q_lora_rank):
    """kvcache_mla.fa_handling on a bare DeepseekV3Attention (q_b_proj or, without q_lora_rank,
    q_proj): the absorbed query's per-head maxima and the latent's maximum equal this test's
    hooks; what the handler returns for the latent is what the attention goes on with."""
    from tiny_deepseek import deepseek_config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from dist_quant import kvcache_mla

    torch.manual_seed(0)
    cfg = deepseek_config(64, layers=1, q_lora_rank=q_lora_rank)
    attn = DeepseekV3Attention(cfg, 0).eval()
    h = torch.randn(2, 5, cfg.hidden_size)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pos = DeepseekV3RotaryEmbedding(cfg)(h, torch.arange(5)[None].expand(2, -1))
    q_linear = attn.q_b_proj if q_lora_rank is not None else attn.q_proj
    seen = {}
    q_linear.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out))
    attn.kv_a_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("latent", out))
    got = {}

    def record(query, kv_nope):
        got["q"], got["latent"] = kvcache_mla.fa_amax(query, kv_nope, mask)
        return query, kv_nope

    with torch.no_grad(), kvcache_mla.fa_handling(attn, record):
        plain = attn(hidden_states=h, position_embeddings=pos, attention_mask=None)[0]
    heads, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    q_nope = seen["q"].view(2, 5, heads, -1)[..., :nope]
    w_uk = attn.kv_b_proj.weight.view(heads, -1, cfg.kv_lora_rank)[:, :nope]
    absorbed = torch.einsum("blhd,hdr->blhr", q_nope.double(), w_uk.double())
    torch.testing.assert_close(got["q"], masked_amax(absorbed, mask[:, :, None, None], (0, 1, 3)).float(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(got["latent"], masked_amax(seen["latent"], mask[:, :, None], (0, 1, 2)).reshape(1),
                               rtol=0, atol=0)
    assert kvcache_mla.SITE not in vars(attn) and len(q_linear._forward_hooks) == 1  # only this test's hook left
    # what the handler returns for the latent is what kv_b_proj expands
    with torch.no_grad(), kvcache_mla.fa_handling(attn, lambda q, kv: (q, torch.zeros_like(kv))):
        zeroed = attn(hidden_states=h, position_embeddings=pos, attention_mask=None)[0]
    assert not torch.allclose(zeroed, plain)
