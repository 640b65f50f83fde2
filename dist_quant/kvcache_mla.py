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

vLLM-Ascend (FAKQuant, ``output.format=ascend``; dist_quant/formats/fa_quant.py) caches only the
nope part ``kv_nope`` in int8 with one scale (``k_pe`` stays in the serving dtype), and loads a
per-head scale of the absorbed query ``q_nope · W_UK`` that msModelSlim calibrates (its
DeepSeek-V3 adapter, ``inject_fa3_placeholders``). :func:`fa_handling` hands the handler
``(AbsorbedQuery, kv_nope)`` at the same site: the query is taken from ``q_b_proj`` (or
``q_proj``) output by a forward hook and only measured (:meth:`AbsorbedQuery.head_amax`, one head
at a time); ``kv_nope`` comes back as the cache returns it, ``k_rot`` is passed through.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from .kvcache import masked_head_amax, scales

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


# -- vLLM-Ascend FAKQuant (the ``mla`` layout's ascend variant, kv_layout.MLA_FA) --------------------

class AbsorbedQuery:
    """The absorbed query of one forward, ``q_nope [B, H, L, nope] @ W_UK[h]`` (``kv_b_proj.weight``
    viewed ``[H, nope + v, rank]``, first ``nope`` rows), measured without building it whole."""

    def __init__(self, q_nope: torch.Tensor, kv_b_weight: torch.Tensor, nope: int):
        self.q_nope, self.nope = q_nope, nope
        self.w_uk = kv_b_weight.view(q_nope.shape[1], -1, kv_b_weight.shape[-1])[:, :nope, :]

    def head_amax(self, mask) -> torch.Tensor:
        """max |q_nope · W_UK| per head over the real tokens, float32 [H]."""
        return torch.cat([masked_head_amax(torch.matmul(self.q_nope[:, h:h + 1].float(), self.w_uk[h].float()),
                                           mask) for h in range(self.q_nope.shape[1])])


@contextlib.contextmanager
def fa_handling(attn, handler):
    """Run ``attn``'s forwards with ``handler(AbsorbedQuery, kv_nope) -> (_, kv_nope)`` before
    ``kv_b_proj`` expands the latent (``k_rot`` unchanged: vLLM-Ascend keeps it unquantized)."""
    q_linear = attn.q_b_proj if attn.q_lora_rank is not None else attn.q_proj
    seen = {}
    hook = q_linear.register_forward_hook(lambda mod, args, out: seen.__setitem__("q", out))

    def fa(kv_nope, k_rot):
        q = seen.pop("q")
        b, length = q.shape[:2]
        q_nope = q.view(b, length, attn.num_heads, attn.qk_head_dim)[..., :attn.qk_nope_head_dim].transpose(1, 2)
        _, kv_nope = handler(AbsorbedQuery(q_nope, attn.kv_b_proj.weight, attn.qk_nope_head_dim), kv_nope)
        return kv_nope, k_rot

    try:
        with handling(attn, fa):
            yield
    finally:
        hook.remove()


def fa_amax(query: AbsorbedQuery, kv_nope: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |absorbed query| per head [H], max |kv_nope| [1]), float32."""
    return query.head_amax(mask), masked_head_amax(kv_nope, mask)


def fa_scales(amax: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(fa_q scales [H], the latent's one scale [1]) from the reduced maxima [2, H] (row 1: the
    latent's maximum, broadcast), rounded to ``args.scale_dtype`` as :func:`kvcache.scales`."""
    return (scales(amax[0], dataclasses.replace(args, per_head=True)),
            scales(amax[1], dataclasses.replace(args, per_head=False)))


def fa_dims(config: dict) -> tuple[int, int]:
    """(num_attention_heads, kv_lora_rank): the query's heads, the latent's cached channels."""
    return int(config["num_attention_heads"]), int(config["kv_lora_rank"])
