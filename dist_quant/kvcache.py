"""KV-cache quantization (``quant.kv_cache=fp8|int8``, ``quant.kv_cache_strategy=tensor|head``):
static K and V scales per attention layer, calibrated on what the server caches: the keys
after RoPE (and after Qwen3's k_norm) and the values, as the attention function receives them.

Capture: transformers 5 attention modules call the attention function named by
``config._attn_implementation`` through ``ALL_ATTENTION_FUNCTIONS`` with ``(module, query,
key, value, mask, ...)``, key/value ``[batch, kv_heads, seq, head_dim]`` after RoPE. We
register one function, :data:`IMPL`, that hands K and V to a per-module handler (record the
maxima, or fake-quantize them) and then runs the implementation that was configured (SDPA).

Scales (symmetric, no zero point; pure functions below):

* fp8 (E4M3, the form vLLM's ``--kv-cache-dtype fp8`` uses): ``scale = max|x| / 448``,
  cached value ``fp8(clamp(x / scale, ±448)) · scale``;
* int8 (Ascend C8, vLLM-Ascend ``AscendC8AttentionBackendImpl._quantize_kv_to_int8``):
  ``scale = max|x| / 127``, cached value ``clamp(round(x / scale), −128, 127) · scale``;

``max|x|`` over every real (non-padding) token of every rank (MAX-reduced through ``Comm``),
over all heads (``tensor``) or per KV head (``head``). The scale is rounded to the dtype the
server keeps it in before it is used (float32 in vLLM; the serving dtype in vLLM-Ascend).
The layer's attention output (o_proj's input, the next layers' inputs) is then computed with
the fake-quantized K and V, so everything after is calibrated on the served cache.

:func:`calibrate` / :func:`applied` are written over the architecture's KV layout
(``ArchSpec.kv_layout``, dist_quant/kv_layout.py): the capture above is the ``mha`` layout's;
multi-head latent attention caches one latent per token with one scale
(dist_quant/kvcache_mla.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

IMPL = "dist_quant_kv"  # the attention implementation name registered with transformers
KINDS = {"fp8": float(torch.finfo(torch.float8_e4m3fn).max), "int8": 127.0}  # kind → largest code
STRATEGIES = ("tensor", "head")


@dataclass(frozen=True)
class KVCacheArgs:
    kind: str  # "fp8" | "int8"
    per_head: bool  # quant.kv_cache_strategy=head
    scale_dtype: torch.dtype = torch.float32  # what the server keeps the scale in

    @property
    def qmax(self) -> float:
        return KINDS[self.kind]


def masked_head_amax(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """max |x| per head over the real tokens: ``x`` [B, H, L, D], ``mask`` [B, L] (nonzero = real)
    → float32 [H]."""
    a = x.detach().float().abs()
    if mask is not None:
        a = a * (mask.to(a.device) != 0)[:, None, :, None]
    return a.amax(dim=(0, 2, 3))


def scales(amax: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """Scales from the reduced maxima [H]: [H] (per head) or [1], float32 holding values exact in
    ``args.scale_dtype``; a zero maximum gets the smallest normal scale (all codes 0)."""
    a = amax.float() if args.per_head else amax.float().amax().reshape(1)
    s = (a / args.qmax).clamp(max=torch.finfo(args.scale_dtype).max).to(args.scale_dtype).float()
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(args.scale_dtype).tiny))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, args: KVCacheArgs) -> torch.Tensor:
    """What the cache gives back for ``x`` [B, H, L, D] with ``scale`` [H] or [1]."""
    s = scale.to(x.device, torch.float32).reshape(1, -1, 1, 1)
    y = x.float() / s
    if args.kind == "fp8":
        y = y.clamp(-args.qmax, args.qmax).to(torch.float8_e4m3fn).float()
    else:
        y = y.round().clamp(-args.qmax - 1, args.qmax)
    return (y * s).to(x.dtype)


# -- the attention function ------------------------------------------------------------------------

def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    handler, base = module._dist_quant_kv
    key, value = handler(key, value)
    return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL, _attention)


@contextlib.contextmanager
def handling(attn, handler):
    """Run ``attn``'s forwards with ``handler(key, value) -> (key, value)`` between RoPE and the
    attention implementation the model is configured with."""
    _register()
    config = attn.config  # shared by every layer of a model: contexts may nest (one per layer)
    previous = config._attn_implementation
    if previous != IMPL:
        config._dist_quant_kv_base = previous
    attn._dist_quant_kv = (handler, config._dist_quant_kv_base)
    config._attn_implementation = IMPL
    try:
        yield
    finally:
        config._attn_implementation = previous
        del attn._dist_quant_kv


class _Seen(Exception):
    """Stops a recording forward once K and V were seen (nothing after them is needed)."""


def calibrate(ctx, attn, hs: list[torch.Tensor], mask) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K and V scales of this layer from the normed inputs ``hs`` (one per batch; the linears
    computing the cached tensors already quantized), MAX-reduced over ranks; the owner writes
    them. What is cached, where it is taken and how it is measured is the architecture's
    ``kv_layout`` (dist_quant/kv_layout.py: K/V per head here, MLA's latent in
    dist_quant/kvcache_mla.py). None when the job leaves the KV cache alone."""
    args = ctx.job.kv
    if args is None:
        return None
    layout = layout_of(ctx)
    amax = torch.zeros(2, layout.dims(ctx.config)[0], device=ctx.device)
    for h, m in zip(hs, ctx.masks):
        def record(a, b, m=m):
            k, v = layout.measure(a, b, m)
            amax[0] = torch.maximum(amax[0], k)
            amax[1] = torch.maximum(amax[1], v)
            raise _Seen
        with ctx.phase("kv_calib"), layout.handling(attn, record), contextlib.suppress(_Seen):
            attn(hidden_states=h, position_embeddings=ctx.pos_emb, attention_mask=mask)
    with ctx.phase("reduce"):
        amax = ctx.comm.all_reduce(amax, "max")
    k_scale, v_scale = (layout.scales(amax, args) if layout.scales is not None
                        else (scales(amax[0], args), scales(amax[1], args)))
    prefix = ctx.fqn(ctx.arch.attn)
    if owner(ctx.job.owners, prefix, layout.owner) == ctx.comm.rank:
        with ctx.phase("write"):
            for name, tensor in ctx.job.fmt.pack_kv(prefix, layout, k_scale, v_scale, ctx.config).items():
                ctx.job.writer.add(name, tensor)
    return k_scale, v_scale


def layout_of(ctx):
    """The job's KV layout: the architecture's, as the output format's server caches it
    (``KVLayout.for_format``: MLA on vLLM-Ascend is FAKQuant, kv_layout.MLA_FA)."""
    fmt = getattr(ctx.job, "fmt", None)  # None: a job without an output format (a float forward)
    return ctx.arch.kv_layout if fmt is None else ctx.arch.kv_layout.for_format(fmt.name)


@contextlib.contextmanager
def applied(attn, kv: tuple[torch.Tensor, torch.Tensor] | None, args: KVCacheArgs | None, layout):
    """Forwards of ``attn`` with the cached pair fake-quantized by the calibrated scales ``kv``
    at the ``layout``'s site (K and V here, MLA's latent and rotated k_pe with their one scale,
    or FAKQuant's latent alone: ``layout.fake_quantized``, kv_layout.py)."""
    if kv is None:
        yield
        return
    quantized = tuple((lambda x, s=s: fake_quant(x, s, args)) if q else (lambda x: x)
                      for s, q in zip(kv, layout.fake_quantized))
    with layout.handling(attn, lambda a, b: (quantized[0](a), quantized[1](b))):
        yield


def owner(owners, attn_prefix: str, linear: str = "k_proj") -> int:
    """The rank writing a layer's KV-cache scales: the owner of ``linear`` (the layout's
    ``owner``: k_proj, or MLA's kv_a_proj_with_mqa; rank 0 if unplanned)."""
    return owners.owner.get(f"{attn_prefix}.{linear}", 0)


def head_dims(config: dict) -> tuple[int, int]:
    """(KV heads, head_dim) of a checkpoint's config.json."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return kv, config.get("head_dim") or config["hidden_size"] // heads
