"""What the server's KV cache holds for an attention, as data (``ArchSpec.kv_layout``): where
dist_quant takes it in the model's forward, which maximum makes its scales, who writes them
under which names, and which ``quant.kv_cache_strategy`` / ``output.format`` the servers read
for it (the others are refused before any work: dist_quant/servability.py builds one refusal
per entry from :data:`KV_LAYOUTS`).

* ``mha``: K after RoPE and V per KV head (Llama, Qwen, Mistral and the MoE families;
  dist_quant/kvcache.py). compressed-tensors names ``<attn>.k_scale`` / ``<attn>.v_scale``
  (vLLM ``maybe_remap_kv_scale_name``: ``.{k,v}_scale`` → ``.attn.{k,v}_scale``); Ascend C8.
* ``mla``: the latent ``kv_a_layernorm(kv_c) ‖ k_pe`` (after RoPE), one row per token and one
  scale (DeepSeek-V3, Kimi-K2; dist_quant/kvcache_mla.py), written as equal
  ``<attn>.k_proj.k_scale`` / ``<attn>.v_proj.v_scale``: the only names vLLM's
  ``maybe_remap_kv_scale_name`` sends to the MLA attention
  (``\\.self_attn\\.([kv])_proj\\.([kv])_scale$`` → ``.self_attn.mla_attn.mla_attn.\\2_scale``
  when the model has ``mla_attn`` parameters; the default ``.{k,v}_scale`` → ``.attn.{k,v}_scale``
  names no MLA parameter, so ``self_attn.k_scale`` would be dropped with "k_scale is not loaded").
* ``mla`` with ``output.format=ascend`` (:data:`MLA_FA`, the layout's ``variants``): vLLM-Ascend's
  FAKQuant (dist_quant/formats/fa_quant.py): the latent's nope part ``kv_a_layernorm(kv_c)`` int8
  with one scale (``k_pe`` stays in the serving dtype), and a per-head scale of the absorbed
  query ``q_nope · W_UK`` that the server loads but does not read. Its "K" is that query (per
  head, never fake-quantized) and its "V" the latent (dist_quant/kvcache_mla.py,
  :func:`~dist_quant.kvcache_mla.fa_handling`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import kvcache, kvcache_mla


@dataclass(frozen=True)
class KVLayout:
    name: str
    owner: str  # the linear (relative to the attention) whose owner rank writes the scales
    ct_leaves: tuple[str, str]  # compressed-tensors K and V scale names, relative to the attention
    dims: Callable[[dict], tuple[int, int]]  # config.json → (scale heads, channels per head)
    handling: Callable  # context manager (attn, handler(a, b) -> (a, b)): the cached pair in the forward
    measure: Callable  # (a, b, mask) -> (K max |x| [heads], V max |x| [heads]), float32
    strategies: tuple[str, ...]  # quant.kv_cache_strategy values the servers read
    formats: tuple[str, ...]  # output.format values that can carry it
    refusal: str = ""  # why the other strategies / formats are refused (one line)
    source: str = ""  # the server code that says so
    scales: Optional[Callable] = None  # (amax [2, heads], KVCacheArgs) -> (K scale, V scale); None: kvcache.scales
    fake_quantized: tuple[bool, bool] = (True, True)  # which of the pair the served cache quantizes
    variants: tuple[tuple[str, "KVLayout"], ...] = ()  # (output.format, the layout that format serves)
    ascend_form: str = ""  # output.format=ascend's tensors: "C8" (formats/kv_cache.py), "FAKQuant" (fa_quant.py)

    def ct_names(self, attn: str) -> tuple[str, str]:
        return tuple(f"{attn}.{leaf}" for leaf in self.ct_leaves)

    def for_format(self, fmt: str) -> "KVLayout":
        """The layout as ``output.format`` ``fmt``'s server caches it (itself unless a variant)."""
        return dict(self.variants).get(fmt, self)

    def accepts(self, strategy: str, fmt: str) -> bool:
        return fmt in self.formats and strategy in self.for_format(fmt).strategies


def _head_amax(key, value, mask):
    return kvcache.masked_head_amax(key, mask), kvcache.masked_head_amax(value, mask)


MHA = KVLayout(
    name="mha", owner="k_proj", ct_leaves=("k_scale", "v_scale"), dims=kvcache.head_dims,
    handling=kvcache.handling, measure=_head_amax, strategies=kvcache.STRATEGIES,
    formats=("compressed-tensors", "ascend"), ascend_form="C8")

MLA_FA = KVLayout(
    name="mla", owner="kv_a_proj_with_mqa", ct_leaves=("k_proj.k_scale", "v_proj.v_scale"),
    dims=kvcache_mla.fa_dims, handling=kvcache_mla.fa_handling, measure=kvcache_mla.fa_amax,
    strategies=("tensor",), formats=("ascend",), scales=kvcache_mla.fa_scales, fake_quantized=(False, True),
    ascend_form="FAKQuant",
    source="vllm_ascend/quantization/methods/kv_c8.py AscendFAQuantAttentionMethod; "
           "vllm_ascend/quantization/modelslim_config.py get_kv_quant_dtype")

MLA = KVLayout(
    name="mla", owner="kv_a_proj_with_mqa", ct_leaves=("k_proj.k_scale", "v_proj.v_scale"),
    dims=kvcache_mla.latent_dims, handling=kvcache_mla.handling, measure=kvcache_mla.latent_amax,
    strategies=("tensor",), formats=("compressed-tensors", "ascend"), variants=(("ascend", MLA_FA),),
    refusal="multi-head latent attention (DeepSeek-V3, Kimi-K2) caches one latent per token with one scale "
            "(no heads to scale one by one): use quant.kv_cache_strategy=tensor, with quant.kv_cache=fp8 and "
            "output.format=compressed-tensors (vLLM: kv_a_layernorm output ‖ rotated k_pe, one k_scale) or "
            "quant.kv_cache=int8 and output.format=ascend (vLLM-Ascend FAKQuant: kv_a_layernorm output int8 with "
            "fa_k.scale, k_pe unquantized)",
    source="vLLM MLA backends' do_kv_cache_update: ops.concat_and_cache_mla(kv_c_normed, k_pe, kv_cache, "
           "slot_mapping, kv_cache_dtype, scale=k_scale); vllm_ascend/quantization/methods/kv_c8.py "
           "AscendFAQuantAttentionMethod; vllm_ascend/quantization/modelslim_config.py get_kv_quant_dtype; "
           "vllm_ascend/attention/mla_v1.py _forward_decode (dequant_scale_key=fak_descale_float)")

KV_LAYOUTS: dict[str, KVLayout] = {layout.name: layout for layout in (MHA, MLA)}
