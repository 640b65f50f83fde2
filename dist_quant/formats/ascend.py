"""Ascend msModelSlim description format (MindIE, vLLM-Ascend).

``quant_model_description.json`` maps every tensor name to its type (``W8A8``,
``W8A8_DYNAMIC``, ``W8A16`` or ``FLOAT``) and holds ``model_quant_type`` and ``version``;
the tensors are in ``quant_model_weights-0000i-of-0000N.safetensors`` with the index
``quant_model_weights.safetensors.index.json`` (written rank by rank through the planned
streaming writer, like every other format).

What vLLM-Ascend's loaders declare (``vllm_ascend/quantization/methods/``; ``params_dtype`` is
the serving dtype, ``output.dtype``), and what we write for a quantized linear ``X``:

* W8A8 (static activations; ``w8a8_static.py``, ``AscendW8A8LinearMethod``): ``X.weight`` int8
  [out, in]; ``X.input_scale`` [1] params_dtype and ``X.input_offset`` [1] (int8 in the loader;
  we store the integer in params_dtype, as msModelSlim does, which copies exactly);
  ``x_q = clamp(round(x / input_scale + input_offset))``; ``X.deq_scale`` [out] =
  input_scale · weight_scale, float32 when serving in bfloat16, the float32 bits as int64 when
  serving in float16 (``get_perchannel_param``; no deq_scale exists for float32 serving);
  ``X.quant_bias`` int32 [out] = round(bias / deq_scale − Σ_k W_q[:, k] · input_offset), so that
  ``y = deq_scale · (x_q · W_qᵀ + quant_bias)``; ``X.weight_scale`` / ``X.weight_offset``
  [out, 1] params_dtype. ``X.bias`` stays FLOAT.
* W8A8_DYNAMIC (``w8a8_dynamic.py``, ``AscendW8A8DynamicLinearMethod`` and
  ``AscendW8A8DynamicFusedMoEMethod``): ``X.weight`` int8, ``X.weight_scale`` and
  ``X.weight_offset`` [out, 1] params_dtype; activations per token at run time
  (``npu_dynamic_quant``: max|x| / 127). Symmetric weights only (the offset is not applied).
* W8A16 (``w8a16.py``, ``AscendW8A16LinearMethod``): ``X.weight`` int8, ``X.weight_scale`` and
  ``X.weight_offset`` [out, 1] params_dtype; CANN's ``npu_weight_quant_batchmatmul`` computes
  ``w = (q + weight_offset) · weight_scale``, so ``weight_offset = −zero`` of our
  ``w = (q − zero) · scale``. One scale per output channel only (refused with groups).

MoE: vLLM-Ascend's ``AscendModelSlimConfig.get_quant_method`` looks the fused expert layer up
as ``<prefix>.experts.weight`` unless the model type's ``packed_modules_model_mapping`` entry
(``modelslim_config.py``) lists ``experts`` (qwen3_moe does; qwen2_moe and mixtral do not), so
the description also types that fused key for those models.

W4A8_DYNAMIC (MoE models only; ``quant=w4a8 quant.group_size=-1``): the routed experts are
msModelSlim's ``W4A8_DYNAMIC`` (``AscendW4A8DynamicFusedMoEMethod``, ``methods/w4a8.py``, the
msModelSlim path of ``get_weight`` / ``get_dynamic_quant_param_modelslim`` /
``process_weights_after_loading_modelslim``), every other quantized linear ``W8A8_DYNAMIC``
(formats/registry.py ``AscendW4A8``). Per routed expert linear ``X`` [out, in]:

* ``X.weight`` int8 [out / 2, in]: two int4 values a byte, packed along the output dimension,
  output channel 2r in the low nibble and 2r + 1 in the high one (msModelSlim
  ``save/utils/pack.py``, ``w4a8_pack_int4``: transpose, ``_pack_int4`` pairs neighbours of the
  last dimension, ``(q[2r+1] << 4) | (q[2r] & 0x0F)``, transpose back);
* ``X.weight_scale`` float32 [out, 1] (``w = q · scale``) and ``X.weight_offset`` float32 zeros
  [out, 1] (``save/ascendv1.py``, ``AscendV1Saver.on_w4a8_dynamic``);
* ``X.scale_bias`` float32 = ``8 · Σ_k q[o, k] · scale[o]`` (``process_scale(prefix, q · scale, 16)``):
  [out, 1] for gate/up; [out, 16] for down, column j summing input columns
  [j · in/16, (j+1) · in/16), so that a tensor-parallel rank's ``16 // tp`` columns
  (``w2_scale_bias [E, H, 16 // tp_size]``, loaded as a GROUP scale sharded along the input
  dimension) are the partial sum of its own input columns; the loader sums them
  (``transpose(1, 2).sum(axis=1)``).

The description holds ``group_size: 0`` (per channel: the method raises for ``group_size > 0``)
and ``model_quant_type: W8A8_DYNAMIC`` (msModelSlim's ``QUANT_TYPE_PRIORITY`` hides W4A8_DYNAMIC
from the model type); config.json gets what the DeepSeek-V3 adapter writes
(``model/deepseek_v3/model_adapter.py``, ``ascendv1_save_postprocess``): ``quantize:
w8a8_dynamic``, ``moe_quantize: w4a8_dynamic`` and, for MLA models, ``mla_quantize``
(``w8a8_dynamic``, the MLA linears' type; msModelSlim says ``w8a8`` for its static-W8A8 attention
with a KV cache). No ``mtp_quantize``: our MTP layers stay float.
"""
from __future__ import annotations

import re

import torch

from ..quant.activations import ActQuantArgs, StaticActParams
from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec

PREFIX = "quant_model_weights"
INDEX = "quant_model_weights.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
VERSION = "1.0.0"
W4A8 = "W4A8_DYNAMIC"
SCALE_BIAS_SPLITS = 16  # msModelSlim process_scale(prefix, bias, 16): down projections' scale_bias columns
DOWN_LEAVES = ("down_proj", "w2")  # the expert's second projection (msModelSlim process_scale's name test)

# model types whose vLLM-Ascend packed-modules mapping has an "experts" entry (modelslim_config.py,
# packed_modules_model_mapping): their fused experts are looked up by the per-expert shard keys
EXPERTS_MAPPED = frozenset({"qwen3_moe", "qwen3_5_moe", "qwen3_next", "qwen3_vl_moe", "qwen3_omni_moe",
                            "deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "glm4_moe"})
_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")


def quant_type(args: QuantArgs, act: ActQuantArgs | None) -> str:
    if act is None:
        return "W8A16"
    return "W8A8_DYNAMIC" if act.dynamic else "W8A8"


def deq_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor, serve_dtype: torch.dtype) -> torch.Tensor:
    """input_scale · weight_scale per output channel (fp32), or its bits as int64 when served in fp16."""
    deq = (input_scale.float().reshape(1) * weight_scale.float().reshape(-1)).to(torch.float32)
    if serve_dtype == torch.float16:
        return deq.view(torch.int32).to(torch.int64)
    return deq


def deq_scale_value(stored: torch.Tensor) -> torch.Tensor:
    """The fp32 value of a stored deq_scale (undoes the int64 encoding)."""
    if stored.dtype == torch.int64:
        return stored.to(torch.int32).view(torch.float32)
    return stored.float()


def quant_bias(q: torch.Tensor, input_offset: torch.Tensor, deq: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """round(bias / deq_scale − Σ_k W_q[:, k] · input_offset), int32 [out]."""
    correction = q.double().sum(dim=1) * float(input_offset.reshape(-1)[0])
    b = bias.double().reshape(-1) / deq.double() if bias is not None else torch.zeros_like(correction)
    return torch.round(b - correction).to(torch.int32)


def weight_offset(result: QuantResult) -> torch.Tensor:
    """CANN's antiquant offset: ``w = (q + offset) · scale``, i.e. ``−zero``, [out, 1]."""
    z = result.zero.float().reshape(result.zero.shape[0], -1)
    return torch.zeros_like(z) - z  # 0 − z: +0.0, not −0.0, for symmetric weights


def pack_linear(name: str, result: QuantResult, args: QuantArgs, act: ActQuantArgs | None,
                act_params: StaticActParams | None, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    serve = args.scale_dtype
    if result.scale.shape[1] != 1:
        raise AssertionError(f"{name}: the Ascend format has one scale per output channel")
    out = {"weight": result.q.to(torch.int8),
           "weight_scale": result.scale.to(serve),
           "weight_offset": weight_offset(result).to(serve)}
    if act is not None and not act.dynamic:
        assert act_params is not None, f"{name}: static activation parameters missing"
        input_scale = act_params.scale.to(serve).reshape(1)
        input_offset = act_params.zero.to(serve).reshape(1)
        deq = deq_scale(input_scale, result.scale, serve)
        out.update(input_scale=input_scale, input_offset=input_offset, deq_scale=deq,
                   quant_bias=quant_bias(result.q, act_params.zero, deq_scale_value(deq), bias))
    if bias is not None:
        out["bias"] = bias
    return {f"{name}.{key}": value.contiguous() for key, value in out.items()}


def linear_specs(name: str, out_features: int, in_features: int, args: QuantArgs, act: ActQuantArgs | None,
                 bias: TensorSpec | None) -> list[TensorSpec]:
    sd = TensorSpec.dtype_of(args.scale_dtype)
    specs = [TensorSpec(f"{name}.weight", "I8", (out_features, in_features)),
             TensorSpec(f"{name}.weight_scale", sd, (out_features, 1)),
             TensorSpec(f"{name}.weight_offset", sd, (out_features, 1))]
    if act is not None and not act.dynamic:
        specs += [TensorSpec(f"{name}.input_scale", sd, (1,)), TensorSpec(f"{name}.input_offset", sd, (1,)),
                  TensorSpec(f"{name}.deq_scale", "I64" if args.scale_dtype == torch.float16 else "F32",
                             (out_features,)),
                  TensorSpec(f"{name}.quant_bias", "I32", (out_features,))]
    if bias is not None:
        specs.append(bias)
    return specs


def fused_expert_keys(quantized: dict[str, str], model_type: str) -> dict[str, str]:
    """``<layer>.<block>.experts.weight`` → type, for model types vLLM-Ascend looks up that way."""
    if model_type in EXPERTS_MAPPED:
        return {}
    out: dict[str, str] = {}
    for module, kind in quantized.items():
        m = _EXPERT.match(module)
        if m:
            out.setdefault(m.group(1) + ".weight", kind)
    return out


def description(weight_map: dict[str, str], quantized: dict[str, str], quant_kind: str,
                model_type: str = "", extra: dict | None = None) -> dict:
    """Every tensor typed: a quantized linear's tensors get its type (its bias stays FLOAT),
    everything else FLOAT; plus the fused expert keys vLLM-Ascend looks up (see the module doc)
    and ``extra`` top-level keys (W4A8: ``group_size``)."""
    desc: dict = {"model_quant_type": quant_kind, "version": VERSION, **(extra or {})}
    for tensor in sorted(weight_map):
        module, _, leaf = tensor.rpartition(".")
        desc[tensor] = quantized[module] if module in quantized and leaf != "bias" else "FLOAT"
    for key, kind in sorted(fused_expert_keys(quantized, model_type).items()):
        desc.setdefault(key, kind)
    return desc


# -- W4A8_DYNAMIC routed experts (see the module doc) ------------------------------------------------

def pack_int4_pairs(q: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] → int8 [out / 2, in]: output channel 2r in the low nibble of row r,
    2r + 1 in the high nibble (msModelSlim ``w4a8_pack_int4``)."""
    if q.shape[0] % 2:
        raise AssertionError(f"W4A8_DYNAMIC packs output channels in pairs; got {q.shape[0]} rows")
    v = q.to(torch.int32)
    byte = ((v[1::2] & 0x0F) << 4) | (v[0::2] & 0x0F)  # 0 … 255
    return byte.to(torch.uint8).view(torch.int8)


def scale_bias(q: torch.Tensor, scale: torch.Tensor, down: bool) -> torch.Tensor:
    """``8 · Σ_k q[o, k] · scale[o]`` float32: [out, 1], or for a down projection [out, 16] with
    column j over input columns [j · in/16, (j+1) · in/16) (msModelSlim ``process_scale``). The
    integer sums are exact; one rounding to float32."""
    out, n = q.shape
    splits = SCALE_BIAS_SPLITS if down else 1
    if n % splits:
        raise AssertionError(f"W4A8_DYNAMIC scale_bias splits {n} input columns into {splits}")
    sums = q.to(torch.int64).reshape(out, splits, n // splits).sum(dim=2)
    return (8.0 * sums.double() * scale.double().reshape(out, 1)).to(torch.float32)


def is_down(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in DOWN_LEAVES


def w4a8_pack(name: str, result: QuantResult) -> dict[str, torch.Tensor]:
    if result.scale.shape[1] != 1:
        raise AssertionError(f"{name}: W4A8_DYNAMIC has one scale per output channel")
    scale = result.scale.to(torch.float32)
    out = {"weight": pack_int4_pairs(result.q),
           "weight_scale": scale,
           "weight_offset": weight_offset(result).to(torch.float32),
           "scale_bias": scale_bias(result.q, scale, is_down(name))}
    return {f"{name}.{key}": value.contiguous() for key, value in out.items()}


def w4a8_specs(name: str, out_features: int, in_features: int) -> list[TensorSpec]:
    splits = SCALE_BIAS_SPLITS if is_down(name) else 1
    return [TensorSpec(f"{name}.weight", "I8", (out_features // 2, in_features)),
            TensorSpec(f"{name}.weight_scale", "F32", (out_features, 1)),
            TensorSpec(f"{name}.weight_offset", "F32", (out_features, 1)),
            TensorSpec(f"{name}.scale_bias", "F32", (out_features, splits))]


def is_expert(name: str) -> bool:
    return _EXPERT.match(name) is not None


def w4a8_config(mla: bool) -> dict[str, str]:
    """config.json keys of a W4A8 output (msModelSlim DeepSeek-V3 adapter, ``ascendv1_save_postprocess``;
    vLLM-Ascend reads ``moe_quantize`` / ``quantize`` in ``AscendConfig._is_megamoe_supported_by_config``)."""
    keys = {"quantize": "w8a8_dynamic", "moe_quantize": "w4a8_dynamic"}
    if mla:
        # the type of the MLA linears written: W8A8_DYNAMIC (msModelSlim's w4a8c8 writes them static
        # W8A8 and says "w8a8"; dist_quant's are dynamic with a KV cache too)
        keys["mla_quantize"] = "w8a8_dynamic"
    return keys
