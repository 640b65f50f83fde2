"""The layer program of a Llama-style decoder layer (llama, qwen2, qwen3, mistral, and the
attention half of the MoE families), over the stage API (dist_quant/stage.py):

    x → input_layernorm → q/k/v → attention → o_proj (+x) → post_attention_layernorm
      → gate/up → act(gate)·up → down_proj (+x)

Each group of linears is quantized where its true input appears, and the forward goes on
with the quantized weights (one pass per layer). Attention is the model's own module
(GQA, rotary, qwen3's q_norm/k_norm, biases, partial rotary all stay transformers' code),
run with ``o_proj`` replaced by identity to get ``o_proj``'s input.
"""
from __future__ import annotations

import torch

from .. import kvcache


def attention(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The attention half: quantizes the ``attn_in`` and ``attn_out`` stages; returns the
    residual stream after attention (``xs`` is updated in place)."""
    arch = ctx.arch
    attn = ctx.module(arch.attn)
    norm = ctx.module(arch.input_norm)

    mask = attention_mask(ctx, xs[0].shape[1] if xs else 0)
    kv = None  # the KV-cache scales once calibrated (quant.kv_cache; dist_quant/kvcache.py)

    def core(h):  # attention up to o_proj's input (K and V as the quantized cache returns them)
        with kvcache.applied(attn, kv, ctx.job.kv, kvcache.layout_of(ctx)):
            return ctx.input_of(attn, "o_proj", hidden_states=h, position_embeddings=ctx.pos_emb, attention_mask=mask)

    hs = ctx.quantize("attn_in", lambda: (norm(x) for x in xs), downstream=lambda hs: [core(h) for h in hs])
    kv = kvcache.calibrate(ctx, attn, hs, mask)
    return residual_stage(ctx, xs, hs, core, "attn_out", attn.o_proj)


def residual_stage(ctx, xs: list[torch.Tensor], hs: list[torch.Tensor], core, stage: str,
                   out) -> list[torch.Tensor]:
    """The closing stage of a residual branch: ``core(h)`` for each batch of ``hs`` (the
    branch's normed inputs; the list is emptied as soon as those are computed, so its
    activations are freed before the solve), quantize ``stage`` on them, then
    ``xs[j] += out(y)`` in place (each old batch is freed as it is replaced). When the stage's
    inputs exceed ``runtime.activation_budget`` (``ctx.streams``) they are never all held:
    each batch's ``core(h)`` is computed for the statistics, then again for the forward with the
    solved weights (``hs`` is kept meanwhile); the output is the same."""
    if ctx.streams(stage, hs):
        ctx.quantize(stage, lambda: (core(h) for h in hs), stream=True)
        with ctx.phase("propagate"):
            for j, h in enumerate(hs):
                xs[j] = xs[j] + out(core(h))
        hs.clear()
        return xs
    with ctx.phase("propagate"):
        a = ctx.hold(core(h) for h in hs)  # host-held batch by batch when the job offloads (offload.py)
    hs.clear()
    a = ctx.quantize(stage, a)
    with ctx.phase("propagate"):
        for j, y in enumerate(a):
            xs[j] = xs[j] + out(y)
    return xs


def attention_mask(ctx, seq_len: int) -> torch.Tensor | None:
    """None (causal attention, what SDPA does by itself) unless the layer has a sliding
    window shorter than the samples: then a boolean ``[1, 1, L, L]`` mask, True where query
    ``i`` sees key ``j``: ``j <= i`` and ``i - j < window`` (transformers' sliding-window
    rule; SDPA ignores ``sliding_window`` when it is given no mask). Padding is at the end
    of a sample, so causal masking alone keeps it away from real tokens."""
    window = ctx.arch.sliding_window(ctx.index, ctx.config)
    if window is None or window >= seq_len:
        return None
    i = torch.arange(seq_len, device=ctx.device)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]


def mlp(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The dense MLP half: quantizes ``mlp_in`` (gate/up) and ``mlp_out`` (down)."""
    arch = ctx.arch
    block = ctx.module(arch.mlp)
    norm = ctx.module(arch.post_attn_norm)

    def core(h):  # act(gate(h)) · up(h): down_proj's input
        return ctx.input_of(block, "down_proj", h)

    hs = ctx.quantize("mlp_in", lambda: (norm(x) for x in xs), downstream=lambda hs: [core(h) for h in hs])
    return residual_stage(ctx, xs, hs, core, "mlp_out", block.down_proj)


def program(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One dense decoder layer."""
    return mlp(ctx, attention(ctx, xs))
