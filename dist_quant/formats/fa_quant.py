"""vLLM-Ascend's KV-cache quantization for multi-head latent attention (DeepSeek-V3, Kimi-K2):
msModelSlim's "FA3" / ``FAKQuant`` tensors and description entries, as pure functions of the
calibrated scales (``quant.kv_cache=int8 output.format=ascend`` on the ``mla`` layout: its ascend
variant ``MLA_FA``, dist_quant/kv_layout.py; the capture is dist_quant/kvcache_mla.py).

What the server reads (vllm-project/vllm-ascend, snapshot 182b75e):

* ``quantization/modelslim_config.py``: ``_add_kvcache_quant_metadata`` enables it when the
  description has a non-empty ``"fa_quant_type"`` and takes the layers from the keys containing
  ``fa_k.scale``; ``get_quant_type_for_layer`` (attention) returns ``fa_quant_type``, and
  ``"FAKQuant"`` is the attention scheme registered by ``methods/kv_c8.py``
  (``@register_scheme("FAKQuant", "attention") AscendFAQuantAttentionMethod``);
  ``get_cache_scale_mapper`` renames ``<attn>.fa_{q,k,v}.{scale,offset}`` to
  ``<attn>.mla_attn.mla_attn.fa_{q,k,v}.{scale,offset}``.
* ``methods/kv_c8.py`` ``AscendFAQuantAttentionMethod.create_weights``: ``fa_q.scale``
  ``[num_heads / tp, 1]`` (default dtype), ``fa_k.scale`` / ``fa_v.scale`` ``[num_kv_heads, 1]``
  (MLA: one), offsets the same shapes in int8; ``_fa_quant_weight_loader`` fills a one-value
  parameter from a one-value tensor and otherwise narrows dim 0 by the TP rank (``fa_q``: the
  checkpoint holds all ``num_heads`` rows). ``process_weights_after_loading``: ``fa_k.scale`` is
  the latent's dequantization scale (``fak_descale``), ``quant_kscale = 1 / fa_k.scale`` repeated
  over ``kv_lora_rank``.
* ``attention/mla_v1.py`` / ``device/device_op.py`` (decode, ``fa_quant_layer``): the cache's
  nope part, ``kv_a_layernorm(kv_c)`` ``[kv_lora_rank]``, is stored int8 (A2/A3; fp8 E4M3 on A5)
  as ``x · quant_kscale`` (``npu_mla_prolog_v2(..., quant_scale_ckv=quant_kscale)``), the rope part
  ``k_pe`` stays in the model dtype (``get_kv_quant_dtype``: "For MLA models like deepseek, we only
  quantify K cache"), and ``npu_fused_infer_attention_score_v2`` dequantizes with
  ``dequant_scale_key = dequant_scale_value = fak_descale_float`` (scale only: the offset is read
  by the PD-transfer path only, ``mooncake_layerwise_connector.py`` ``npu_quantize(keys,
  1/scale, fak_offset)``, so it must be 0). The query is quantized per token at run time
  (``query_quant_mode=3``, ``dequant_scale_query`` from ``npu_mla_prolog_v2``): ``fa_q`` and
  ``fa_v`` are loaded and never read.

What msModelSlim writes (Ascend/msmodelslim, snapshot 3de0a3c): ``model/deepseek_v3/
model_adapter.py`` ``inject_fa3_placeholders`` observes ``fa_q`` on the absorbed query
``q_nope @ W_UK`` (``kv_b_proj.weight.view(H, nope + v, rank)[:, :nope]``) per head, and ``fa_k`` /
``fa_v`` on ``kv_a_layernorm(kv_c)`` (one head); ``processor/quant/fa3/processor.py`` makes INT8
per-head symmetric parameters; ``save/ascendv1.py`` ``_save_activation_per_head`` writes
``<attn>.fa_X.scale`` float32 ``[H, 1]`` and a zero int8 ``fa_X.offset`` of the same shape, both
typed ``"FAQuant"``, ``update_fa_quant_type`` writes ``<attn>.quant_type`` (``"INT8"`` when Q, K
and V are INT8 static) and ``update_global_fa_quant_type("FAKQuant")`` sets ``fa_quant_type``.
"""
from __future__ import annotations

import torch

from ..tensorspec import TensorSpec

FA_QUANT_TYPE = "FAKQuant"  # description "fa_quant_type": vLLM-Ascend's attention scheme name
TENSOR_TYPE = "FAQuant"  # the description type of every fa_* tensor
BRANCHES = ("fa_q", "fa_k", "fa_v")


def names(attn: str) -> list[str]:
    return [f"{attn}.{b}.{leaf}" for b in BRANCHES for leaf in ("scale", "offset")]


def _rows(branch: str, num_heads: int) -> int:
    return num_heads if branch == "fa_q" else 1  # MLA: one KV head


def specs(attn: str, num_heads: int) -> list[TensorSpec]:
    """What :func:`tensors` writes for one attention (``num_heads``: the model's, all ranks)."""
    out = []
    for b in BRANCHES:
        shape = (_rows(b, num_heads), 1)
        out += [TensorSpec(f"{attn}.{b}.scale", "F32", shape), TensorSpec(f"{attn}.{b}.offset", "I8", shape)]
    return out


def tensors(attn: str, q_scale: torch.Tensor, latent_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """``q_scale`` [num_heads]: the absorbed query's per-head scales; ``latent_scale`` [1]: the
    scale of ``kv_a_layernorm(kv_c)`` (the cached nope part only, not ``k_pe``), both
    ``max|x| / 127`` (dist_quant/kvcache_mla.py ``fa_scales``) → the six tensors, float32 scales
    (as msModelSlim writes them; exact in the serving dtype the loader casts to) and zero int8
    offsets. ``fa_v`` is ``fa_k``: msModelSlim observes the same tensor for both."""
    per = {"fa_q": q_scale.reshape(-1), "fa_k": latent_scale.reshape(1), "fa_v": latent_scale.reshape(1)}
    out = {}
    for b in BRANCHES:
        s = per[b].float().reshape(-1, 1).contiguous()
        out[f"{attn}.{b}.scale"] = s
        out[f"{attn}.{b}.offset"] = torch.zeros_like(s, dtype=torch.int8)
    return out


def description(attn: str) -> dict[str, str]:
    """The per-attention description entries (msModelSlim ``_save_activation_per_head`` /
    ``update_fa_quant_type``)."""
    return {**{n: TENSOR_TYPE for n in names(attn)}, f"{attn}.quant_type": "INT8"}


def global_description() -> dict[str, str]:
    return {"fa_quant_type": FA_QUANT_TYPE}


def is_fa(name: str) -> bool:
    """An ``<attn>.fa_{q,k,v}.{scale,offset}`` tensor."""
    parts = name.rsplit(".", 2)
    return len(parts) == 3 and parts[1] in BRANCHES and parts[2] in ("scale", "offset")

