"""Ascend msModelSlim description format (MindIE, vLLM-Ascend).

``quant_model_description.json`` maps every tensor name to its type (``W8A8``,
``W8A8_DYNAMIC``, ``W8A16`` or ``FLOAT``) and holds ``model_quant_type`` and ``version``;
the tensors are in ``quant_model_weights-0000i-of-0000N.safetensors`` with the index
``quant_model_weights.safetensors.index.json`` (written rank by rank through the planned
streaming writer, like every other format).

Per quantized linear ``X`` (weights int8 per output channel, ``w = (q - offset) · scale``):

* W8A8 (static activations): ``X.weight`` int8 [out, in], ``X.input_scale`` and
  ``X.input_offset`` ([1], the model dtype; ``x_q = clamp(round(x / input_scale +
  input_offset))``), ``X.deq_scale`` = input_scale · weight_scale per output channel ([out],
  fp32 for bf16/fp32 models; the fp32 bits reinterpreted as int64 for fp16 models),
  ``X.quant_bias`` int32 = round(bias / deq_scale − Σ_k W_q[:, k] · input_offset), so that
  ``y = deq_scale · (x_q · W_qᵀ + quant_bias)``; also ``X.weight_scale``/``X.weight_offset``
  [out, 1] fp32 (vLLM-Ascend's W8A8 method declares them). ``X.bias`` stays FLOAT.
* W8A8_DYNAMIC: ``X.weight`` int8, ``X.weight_scale`` [out, 1], ``X.weight_offset`` [out, 1]
  (fp32); activations are quantized per token at run time.
* W8A16: ``X.weight`` int8, ``X.weight_scale``, ``X.weight_offset`` ([out, groups], fp32).
"""
from __future__ import annotations

import torch

from ..quant.activations import ActQuantArgs, StaticActParams
from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec

PREFIX = "quant_model_weights"
INDEX = "quant_model_weights.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
VERSION = "1.0.0"


def quant_type(args: QuantArgs, act: ActQuantArgs | None) -> str:
    if act is None:
        return "W8A16"
    return "W8A8_DYNAMIC" if act.dynamic else "W8A8"


def deq_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """input_scale · weight_scale per output channel (fp32), or its bits as int64 for fp16 models."""
    deq = (input_scale.float().reshape(1) * weight_scale.float().reshape(-1)).to(torch.float32)
    if model_dtype == torch.float16:
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


def pack_linear(name: str, result: QuantResult, args: QuantArgs, act: ActQuantArgs | None,
                act_params: StaticActParams | None, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = {"weight": result.q.to(torch.int8),
           "weight_scale": result.scale.float(),
           "weight_offset": result.zero.float()}
    if act is not None and not act.dynamic:
        assert act_params is not None, f"{name}: static activation parameters missing"
        model_dtype = args.scale_dtype
        input_scale = act_params.scale.to(model_dtype).reshape(1)
        input_offset = act_params.zero.to(model_dtype).reshape(1)
        deq = deq_scale(input_scale, result.scale, model_dtype)
        out.update(input_scale=input_scale, input_offset=input_offset, deq_scale=deq,
                   quant_bias=quant_bias(result.q, act_params.zero, deq_scale_value(deq), bias))
    if bias is not None:
        out["bias"] = bias
    return {f"{name}.{key}": value.contiguous() for key, value in out.items()}


def linear_specs(name: str, out_features: int, in_features: int, args: QuantArgs, act: ActQuantArgs | None,
                 bias: TensorSpec | None) -> list[TensorSpec]:
    groups = args.groups(in_features)
    specs = [TensorSpec(f"{name}.weight", "I8", (out_features, in_features)),
             TensorSpec(f"{name}.weight_scale", "F32", (out_features, groups)),
             TensorSpec(f"{name}.weight_offset", "F32", (out_features, groups))]
    if act is not None and not act.dynamic:
        md = TensorSpec.dtype_of(args.scale_dtype)
        specs += [TensorSpec(f"{name}.input_scale", md, (1,)), TensorSpec(f"{name}.input_offset", md, (1,)),
                  TensorSpec(f"{name}.deq_scale", "I64" if args.scale_dtype == torch.float16 else "F32",
                             (out_features,)),
                  TensorSpec(f"{name}.quant_bias", "I32", (out_features,))]
    if bias is not None:
        specs.append(bias)
    return specs


def description(weight_map: dict[str, str], quantized: dict[str, str], model_type: str) -> dict:
    """Every tensor typed: a quantized linear's tensors get its type (its bias stays FLOAT),
    everything else FLOAT."""
    desc: dict[str, str] = {"model_quant_type": model_type, "version": VERSION}
    for tensor in sorted(weight_map):
        module, _, leaf = tensor.rpartition(".")
        desc[tensor] = quantized[module] if module in quantized and leaf != "bias" else "FLOAT"
    return desc
