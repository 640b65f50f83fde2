"""Where a multi-head latent attention (MLA: DeepSeek-V3 / Kimi-K2) caches, and how dist_quant
sees it: the compressed latent, one row per token of ``kv_lora_rank + qk_rope_head_dim``
values, ``kv_a_layernorm(kv_c) ‖ k_pe`` with ``k_pe`` after RoPE, quantized with one scale.

vLLM: ``MLAAttention`` (vllm/model_executor/layers/attention/mla_attention.py) receives
``kv_c_normed`` and ``k_pe`` (after ``rotary_emb``) from ``MultiHeadLatentAttentionWrapper``
(vllm/model_executor/layers/mla.py); the backend's ``do_kv_cache_update`` writes them with
``ops.concat_and_cache_mla(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype,
scale=layer._k_scale)``: one ``k_scale`` for both parts (``v_scale`` is not used by the cache
write). The decode path reads the latent back (``fp8 · k_scale``) and runs ``kv_b_proj``'s
absorbed weights on it.

transformers 5 (``DeepseekV3Attention.forward``, models/deepseek_v3/modeling_deepseek_v3.py)
computes the same two tensors, ``kv_nope = kv_a_layernorm(...)`` ``[B, 1, L, kv_lora_rank]``
and ``k_rot`` ``[B, 1, L, qk_rope_head_dim]`` after ``apply_rotary_pos_emb(_interleave)``
(the interleaved variant permutes the rope channels, which changes no maximum), and hands
them to ``self.expand_kv(kv_nope, k_rot)`` (``kv_b_proj``, head split) right after the cache
update. :func:`handling` replaces ``expand_kv`` on the attention instance for the duration of
a context: the handler gets ``(kv_nope, k_rot)`` and returns them (fake-quantized, or raises
to stop a recording forward), then the model's own ``expand_kv`` runs on what it returned.
"""
from __future__ import annotations

import contextlib

import torch

from .kvcache import masked_head_amax

SITE = "expand_kv"  # the DeepseekV3Attention method that receives the cached latents


@contextlib.contextmanager
def handling(attn, handler):
    """Run ``attn``'s forwards with ``handler(kv_nope, k_rot) -> (kv_nope, k_rot)`` between the
    latent's RoPE and its expansion by ``kv_b_proj``."""
    original = getattr(type(attn), SITE, None)
    if original is None:
        raise RuntimeError(f"{type(attn).__name__} has no {SITE}(kv_nope, k_rot): the KV-cache capture of "
                           "dist_quant/kvcache_mla.py is written for transformers 5's DeepseekV3Attention")

    def expand(kv_nope, k_rot):
        kv_nope, k_rot = handler(kv_nope, k_rot)
        return original(attn, kv_nope, k_rot)

    setattr(attn, SITE, expand)  # the instance attribute shadows the class's method
    try:
        yield
    finally:
        delattr(attn, SITE)


def latent_amax(kv_nope: torch.Tensor, k_rot: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """max |kv_nope ‖ k_rot| over the real tokens, float32 ``[1]``, as the K and as the V maximum
    (one latent, one scale: both entries equal)."""
    m = torch.maximum(masked_head_amax(kv_nope, mask), masked_head_amax(k_rot, mask))
    return m, m


def latent_dims(config: dict) -> tuple[int, int]:
    """(1, kv_lora_rank + qk_rope_head_dim): one cached row per token, no heads."""
    return 1, int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"])
