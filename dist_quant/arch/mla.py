"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) run stage by stage, each linear's
statistics taken on its true input in the one-pass order, with the weights of the linears
before it already quantized:

    h  = input_layernorm(x)
    attn_in   q_a_proj, kv_a_proj_with_mqa  (or q_proj, kv_a_proj_with_mqa)  ← h
    q_b       q_b_proj                       ← q_a_layernorm(q_a_proj(h))
    kv_b      kv_b_proj                      ← kv_a_layernorm(kv_a_proj_with_mqa(h)[..., :kv_lora_rank])
    attn_out  o_proj                         ← attention(q, k, v) (o_proj's input)
    x ← x + o_proj(·)

The attention itself is transformers' ``DeepseekV3Attention`` (rotary layout, softmax scale
with the YaRN mscale, head split), called with ``o_proj`` replaced by identity. Every stage
input is recomputed from the layer input ``x`` (never from the previous stage's input, which a
W8A8 job has already fake-quantized): ``seen(name, x)`` is what the linear ``name`` (relative
to the layer) sees of its input, int8 fake-quantized in W8A8 jobs; it is applied with forward
pre-hooks on the attention's input-side linears, as a W8A8 kernel quantizes its own input.
"""
from __future__ import annotations

import contextlib

import torch

from ..layer_forward import StageOps, _without

INPUT_SIDE = ("q_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj")


@contextlib.contextmanager
def _seen_hooks(attn, seen):
    if seen is None:
        yield
        return
    handles = []
    for short in INPUT_SIDE:
        module = getattr(attn, short, None)
        if module is not None:
            name = "self_attn." + short
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: (seen(name, args[0]), *args[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def mla_stage_ops(layer, position_embeddings, seen=None) -> list[StageOps]:
    """The attention stages' ops (``attn_in``, [``q_b``], ``kv_b``, ``attn_out``)."""
    attn = layer.self_attn
    norm = layer.input_layernorm
    rank = attn.kv_lora_rank

    def q_latent(x: torch.Tensor) -> torch.Tensor:
        with _seen_hooks(attn, seen):
            return attn.q_a_layernorm(attn.q_a_proj(norm(x)))

    def kv_latent(x: torch.Tensor) -> torch.Tensor:
        with _seen_hooks(attn, seen):
            return attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(norm(x))[..., :rank])

    def attn_core(x: torch.Tensor) -> torch.Tensor:
        with _seen_hooks(attn, seen):
            return _without(attn, "o_proj", lambda: attn(hidden_states=norm(x),
                                                         position_embeddings=position_embeddings,
                                                         attention_mask=None)[0])

    ops = [StageOps(lambda x, _: norm(x), None)]
    if attn.q_lora_rank is not None:
        ops.append(StageOps(lambda x, _: q_latent(x), None))
    ops += [StageOps(lambda x, _: kv_latent(x), None),
            StageOps(lambda x, _: attn_core(x), lambda x, a: x + attn.o_proj(a))]
    return ops
