"""Where the servers read KV-cache scales (the calibration is dist_quant/kvcache.py).

compressed-tensors (vLLM; ``quant.kv_cache=fp8``):

* ``quantization_config.kv_cache_scheme``: ``{num_bits: 8, type: float, strategy: tensor |
  attn_head, dynamic: false, symmetric: true}`` (compressed-tensors ``QuantizationArgs``; vLLM's
  ``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`` accepts 8-bit float, strategies
  tensor and attn_head, symmetric only);
* per attention ``<layer>.self_attn.k_scale`` / ``v_scale``, float32: ``[1]`` (tensor) or
  ``[kv_heads, 1, 1]`` (attn_head; what compressed-tensors' ``initialize_qparams`` creates and
  LLM-Compressor saves; vLLM's ``_tp_aware_loader`` flattens it to its ``[num_kv_heads]``
  parameter). vLLM's loaders rename ``self_attn.k_scale`` to the attention layer's
  ``self_attn.attn.k_scale`` (``maybe_remap_kv_scale_name``) and keep it in float32.
  Multi-head latent attention (DeepSeek-V3, Kimi-K2): one latent scale, written as equal
  ``self_attn.k_proj.k_scale`` / ``self_attn.v_proj.v_scale``, the names vLLM maps to
  ``self_attn.mla_attn.mla_attn.{k,v}_scale`` (the names are the layout's: dist_quant/kv_layout.py).

Ascend (msModelSlim C8; vLLM-Ascend ``AscendModelSlimConfig`` with ``kv_cache_type: C8``,
``get_cache_scale_mapper``, ``AscendC8KVCacheAttentionMethod``; ``quant.kv_cache=int8``):

* description: ``"kv_cache_type": "C8"``, ``"kv_quant_type": "C8"`` (msModelSlim
  ``ascendv1.py``, ``on_dynamic_cache``) and every KV tensor typed ``C8``;
* per attention ``<layer>.self_attn.k_proj.kv_cache_scale`` / ``kv_cache_offset`` and
  ``v_proj.kv_cache_scale`` / ``kv_cache_offset`` in the serving dtype (the loader's parameter
  dtype): ``[1]`` (tensor) or one value per channel ``[kv_heads · head_dim]`` (head: each head's
  scale over its channels; msModelSlim's own C8 is per channel, and
  ``AscendC8AttentionBackendImpl._prepare_c8_scales`` takes one value or
  ``kv_heads · head_dim``). Offsets are 0: the decode path dequantizes with the scale only.
"""
from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs

from ..kvcache import KVCacheArgs
from ..tensorspec import TensorSpec

C8 = "C8"
ASCEND_LEAVES = ("kv_cache_scale", "kv_cache_offset")


def ct_scheme(args: KVCacheArgs) -> dict:
    """``quantization_config.kv_cache_scheme``."""
    q = QuantizationArgs(num_bits=8, type="float", strategy="attn_head" if args.per_head else "tensor",
                         dynamic=False, symmetric=True)
    return q.model_dump(mode="json")


def _ct_shape(args: KVCacheArgs, kv_heads: int) -> tuple[int, ...]:
    return (kv_heads, 1, 1) if args.per_head else (1,)


def ct_specs(names: tuple[str, str], kv_heads: int, args: KVCacheArgs) -> list[TensorSpec]:
    """``names``: the K and V scale names (the layout's, dist_quant/kv_layout.py)."""
    shape = _ct_shape(args, kv_heads)
    return [TensorSpec(name, "F32", shape) for name in names]


def ct_tensors(names: tuple[str, str], k_scale: torch.Tensor, v_scale: torch.Tensor,
               args: KVCacheArgs) -> dict[str, torch.Tensor]:
    shape = _ct_shape(args, k_scale.numel())
    return {name: s.float().reshape(shape).contiguous() for name, s in zip(names, (k_scale, v_scale))}


def _asc_len(args: KVCacheArgs, kv_heads: int, head_dim: int) -> int:
    return kv_heads * head_dim if args.per_head else 1


def ascend_specs(attn: str, kv_heads: int, head_dim: int, args: KVCacheArgs) -> list[TensorSpec]:
    n, dt = _asc_len(args, kv_heads, head_dim), TensorSpec.dtype_of(args.scale_dtype)
    return [TensorSpec(f"{attn}.{p}_proj.{leaf}", dt, (n,)) for p in ("k", "v") for leaf in ASCEND_LEAVES]


def ascend_tensors(attn: str, k_scale: torch.Tensor, v_scale: torch.Tensor, head_dim: int,
                   args: KVCacheArgs) -> dict[str, torch.Tensor]:
    out = {}
    for p, s in (("k", k_scale), ("v", v_scale)):
        per_channel = s.float().repeat_interleave(head_dim) if args.per_head else s.float().reshape(1)
        out[f"{attn}.{p}_proj.kv_cache_scale"] = per_channel.to(args.scale_dtype).contiguous()
        out[f"{attn}.{p}_proj.kv_cache_offset"] = torch.zeros_like(per_channel, dtype=args.scale_dtype)
    return out


def is_ascend_kv(name: str) -> bool:
    return name.rpartition(".")[2] in ASCEND_LEAVES
