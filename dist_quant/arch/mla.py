"""The layer program of DeepSeek-V3 / R1 / V3.1 and Kimi-K2 (``DeepseekV3ForCausalLM``) over the
stage API (dist_quant/stage.py): multi-head latent attention (MLA), then the dense MLP
(arch/dense.py) in the first ``first_k_dense_replace`` layers or the MoE block
(arch/moe_block.py: shared experts, the model's own sigmoid group-limited router, routed
experts on their owners).

Each linear's statistics are taken on its true input in the one-pass order, with every linear
before it already quantized::

    h = input_layernorm(x)
    attn_in   q_a_proj, kv_a_proj_with_mqa  (or q_proj, kv_a_proj_with_mqa)  ← h
    q_b       q_b_proj                       ← q_a_layernorm(q_a_proj(h))
    kv_b      kv_b_proj                      ← kv_a_layernorm(kv_a_proj_with_mqa(h)[..., :kv_lora_rank])
    (quant.kv_cache: the latent's scale, kvcache.calibrate with the MLA layout, kv_layout.py)
    attn_out  o_proj                         ← attention(q, k, v), the latent fake-quantized
    x ← x + o_proj(·)

The attention itself is transformers' ``DeepseekV3Attention`` (rotary layout, YaRN softmax
scale, head split), run with ``o_proj`` replaced by identity. Inside it, ``q_b_proj`` and
``kv_b_proj`` see their inputs through ``ctx.act`` (forward pre-hooks: int8 fake-quantized in
W8A8 jobs), as a W8A8 kernel quantizes its own input (``kv_b_proj`` unquantized where the plan makes it
weight-only: ``ArchSpec.absorbed``, NVFP4 W4A4); ``q_a_proj`` / ``kv_a_proj_with_mqa`` get
``attn_in``'s inputs as ``ctx.quantize`` returns them (already as they see them).

With ``quant.kv_cache=fp8`` the cached latent ``kv_a_layernorm(kv_c) ‖ k_pe`` (after RoPE) is
measured once ``kv_a_proj_with_mqa`` is quantized (after the ``kv_b`` stage, which reads the
float latent as vLLM's prefill does), and ``o_proj``'s input is then computed with the latent
fake-quantized by its one scale before ``kv_b_proj`` expands it (the decode path: vLLM reads the
fp8 latent back from the cache, dist_quant/kvcache_mla.py). With ``quant.kv_cache=int8`` and
``output.format=ascend`` (vLLM-Ascend FAKQuant, the layout's ascend variant) only the normed latent
is fake-quantized (int8, one scale; k_pe stays float) and the absorbed query's per-head maxima
are measured too (``fa_q``, loaded by the server but not read).
"""
from __future__ import annotations

import contextlib

import torch

from .. import kvcache
from . import dense, moe_block

INNER = ("q_b_proj", "kv_b_proj")  # linears called inside the attention module on computed inputs


@contextlib.contextmanager
def _inputs_as_seen(ctx, attn):
    handles = []
    for short in INNER:
        module = getattr(attn, short, None)
        if module is not None:
            name = "self_attn." + short
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: (ctx.act(name, args[0]), *args[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The MLA half: quantizes ``attn_in``, ``q_b``, ``kv_b`` and ``attn_out``; returns the
    residual stream after attention (``xs`` updated in place)."""
    attn = ctx.module("self_attn")
    norm = ctx.module("input_layernorm")
    rank = attn.kv_lora_rank
    kv = None  # the latent's KV-cache scales once calibrated (quant.kv_cache)

    def core(h):  # attention up to o_proj's input (the latent as the quantized cache returns it)
        with _inputs_as_seen(ctx, attn), kvcache.applied(attn, kv, ctx.job.kv, kvcache.layout_of(ctx)):
            return ctx.input_of(attn, "o_proj", hidden_states=h, position_embeddings=ctx.pos_emb, attention_mask=None)

    hs = ctx.quantize("attn_in", lambda: [norm(x) for x in xs])
    if attn.q_lora_rank is not None:
        ctx.quantize("q_b", lambda: [attn.q_a_layernorm(attn.q_a_proj(h)) for h in hs])
    ctx.quantize("kv_b", lambda: [attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(h)[..., :rank]) for h in hs])
    with _inputs_as_seen(ctx, attn):  # q_b_proj's input as its kernel sees it (FAKQuant measures the query)
        kv = kvcache.calibrate(ctx, attn, hs, None)
    return dense.residual_stage(ctx, xs, hs, core, "attn_out", attn.o_proj)


def program(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One DeepSeek-V3 decoder layer."""
    xs = attention(ctx, xs)
    if ctx.arch.moe.is_sparse(ctx.index, ctx.config):
        return moe_block.sparse_mlp(ctx, xs)
    return dense.mlp(ctx, xs)
