"""Smoothing pairs per architecture, as data.

A pair names a *producer* (a norm, or a linear whose output rows feed the consumers) and
the *consumer* linears that read its output. Smoothing divides the consumers' input
channels by ``s`` — folded into the producer: the norm's weight (and bias), or the
producer linear's output rows (and bias) — and multiplies the consumers' weight columns
by ``s``, so the float model computes the same function.

Kinds:

* ``norm``: norm → linears (input_layernorm → q/k/v; post_attention_layernorm → gate/up);
* ``ov``: v_proj → o_proj. o_proj's input channel ``h·d + j`` (head ``h``) comes from
  v_proj's output channel ``g·d + j`` of the head's kv group ``g = h // (heads/kv_heads)``,
  so the scale of a channel is shared by all heads of a group;
* ``linear``: up_proj → down_proj (``act(gate)·up`` is linear in up's output channels).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SmoothPair:
    kind: str  # "norm", "ov" or "linear"
    producer: str  # module name relative to the decoder layer
    consumers: tuple[str, ...]  # linear names relative to the decoder layer

    @property
    def name(self) -> str:
        return f"{self.producer}->{'/'.join(c.rsplit('.', 1)[-1] for c in self.consumers)}"


DENSE_PAIRS = (
    SmoothPair("norm", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothPair("ov", "self_attn.v_proj", ("self_attn.o_proj",)),
    SmoothPair("norm", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothPair("linear", "mlp.up_proj", ("mlp.down_proj",)),
)

SMOOTH_PAIRS: dict[str, tuple[SmoothPair, ...]] = {
    name: DENSE_PAIRS for name in ("llama", "qwen2", "qwen3", "mistral")
}
# MoE models: the attention pairs (the MoE block is not smoothed: its norm feeds the router and
# every expert, whose weights live on different ranks; see arch/moe_block.py)
SMOOTH_PAIRS.update({name: DENSE_PAIRS[:2] for name in ("qwen2_moe", "qwen3_moe", "mixtral", "glm4_moe")})


# MLA (DeepSeek-V3, Kimi-K2), dist_quant/arch/deepseek.py. Safe: each producer's output feeds
# exactly these consumers and the fold is exact — the input norm feeds q_a_proj (or q_proj) and
# kv_a_proj_with_mqa; q_a_layernorm feeds q_b_proj; kv_a_layernorm feeds kv_b_proj (on the first
# kv_lora_rank channels of kv_a_proj_with_mqa's output; the rope part goes to attention, unnormed).
# Not pairs: q_a_proj → q_b_proj and kv_a_proj_with_mqa → kv_b_proj (an RMSNorm between them is
# not per-channel linear). kv_b_proj's value rows → o_proj would be exact (one head's v channel
# per o_proj column, no grouped heads) but is not implemented. Dense layers (the first
# first_k_dense_replace) have the MLP pairs; MoE layers are not smoothed (as for the other MoEs).
MLA_PAIRS = (
    SmoothPair("norm", "input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
    SmoothPair("norm", "input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
    SmoothPair("norm", "self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
    SmoothPair("norm", "self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
)
SMOOTH_PAIRS.update({name: MLA_PAIRS + DENSE_PAIRS[2:] for name in ("deepseek_v3", "kimi_k2")})


# AWQ's clipping search skips the linears whose outputs meet in attention scores (AutoAWQ
# avoid_clipping: q_, k_ ...): short names, of every architecture.
NO_CLIP = ("q_proj", "k_proj", "q_a_proj", "q_b_proj")


def smooth_pairs(arch_name: str) -> tuple[SmoothPair, ...]:
    """The pairs of an architecture (none when it has no table: no smoothing)."""
    return SMOOTH_PAIRS.get(arch_name, ())
