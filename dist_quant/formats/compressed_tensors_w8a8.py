"""compressed-tensors W8A8 and W4A8 (``format: int-quantized``), produced with the compressed-tensors
library: its ``QuantizationArgs``/``QuantizationScheme`` models for the config and its
int (naive) quantization compressor for the weights.

W4A8 (int4 weights per channel or per group, symmetric; dynamic per-token int8 activations) is
vLLM's ``CompressedTensorsW4A8Int`` (``_is_dynamic_token_w4a8_int``, an activation-quantization
format): ``weight`` int8 [out, in] holding one int4 value each (no packing) and ``weight_scale``
[out, groups] in params_dtype; no zero point.

Per linear: ``weight`` int8 [out, in], ``weight_scale`` [out, 1] (int8 per-channel
symmetric; the serving dtype, which vLLM copies into its float32 parameter exactly); static
activations add ``input_scale`` float32 [1] (vLLM's and SGLang's ``input_scale`` parameters are
float32: the calibrated scale is kept at that precision, not rounded to bf16 first) and
``input_zero_point`` int8 [1] (per-tensor asymmetric; vLLM's ``input_zero_point`` is int8);
dynamic per-token activations store nothing (scale = max|x| / 127 at run time).
"""
from __future__ import annotations

import torch
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from .compressed_tensors import config_entry
from ..quant.activations import ActQuantArgs, StaticActParams
from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec

FORMAT = "int-quantized"


def scheme(act: ActQuantArgs, args: QuantArgs | None = None) -> QuantizationScheme:
    bits, group = (args.bits, args.group_size) if args is not None else (8, -1)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel" if group == -1 else "group",
                               group_size=None if group == -1 else group, dynamic=False)
    if act.dynamic:
        inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    else:
        inputs = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor", dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def quantization_config(act: ActQuantArgs, ignore: list[str], args: QuantArgs | None = None) -> dict:
    return config_entry(scheme(act, args), FORMAT, ignore)


def compress_linear(name: str, result: QuantResult, args: QuantArgs, act: ActQuantArgs,
                    act_params: StaticActParams | None) -> dict[str, torch.Tensor]:
    state = {"weight": result.dequantize(args), "weight_scale": result.scale}
    out = IntQuantizationCompressor.compress(state, scheme(act, args))
    if not torch.equal(out["weight"], result.q):  # the compressor re-derives the integers
        raise AssertionError(f"{name}: compressed-tensors re-quantization differs from the solve")
    out["weight_scale"] = result.scale.to(args.scale_dtype)
    if not act.dynamic:
        assert act_params is not None, f"{name}: static activation parameters missing"
        out["input_scale"] = act_params.scale.to(torch.float32).reshape(1)
        out["input_zero_point"] = act_params.zero.to(torch.int8).reshape(1)
    return {f"{name}.{key}": value.contiguous() for key, value in out.items()}


def linear_specs(name: str, out_features: int, in_features: int, args: QuantArgs,
                 act: ActQuantArgs) -> list[TensorSpec]:
    sd = TensorSpec.dtype_of(args.scale_dtype)
    specs = [TensorSpec(f"{name}.weight", "I8", (out_features, in_features)),
             TensorSpec(f"{name}.weight_scale", sd, (out_features, args.groups(in_features)))]
    if not act.dynamic:
        specs += [TensorSpec(f"{name}.input_scale", "F32", (1,)), TensorSpec(f"{name}.input_zero_point", "I8", (1,))]
    return specs
