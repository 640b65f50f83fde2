"""compressed-tensors FP8 (``format: float-quantized``) and W4AFP8 (``pack-quantized`` int4
weights with FP8 input activations), with the compressed-tensors library's preset schemes
(``FP8_DYNAMIC``, ``FP8``, ``FP8_BLOCK``, ``W4AFP8``) for the config and its float compressor for
the weights.

Per FP8 linear (vLLM ``CompressedTensorsW8A8Fp8.create_weights``: ``create_fp8_weight_parameter``,
``create_fp8_scale_parameter``, ``create_fp8_input_scale``): ``weight`` float8_e4m3fn [out, in];
``weight_scale`` float32: channel [out, 1], tensor [1], block [ceil(out/128), ceil(in/128)];
static activations add ``input_scale`` float32 [1]. The weight is ``fp8 · scale`` per element.
W4AFP8 (vLLM ``CompressedTensorsW4A8Fp8.create_weights``): ``weight_packed`` int32 [out, in/8],
``weight_scale`` in the serving dtype [out, in/128], ``weight_shape`` int64 [2], as W4A16.
"""
from __future__ import annotations

import torch
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

from ..config import FP8_BLOCK, ConfigError
from ..quant import floatgrid as fg
from ..quant.activations import ActQuantArgs, StaticActParams
from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec
from .compressed_tensors import config_entry

FORMAT = "float-quantized"
PRESETS = {("channel", True): "FP8_DYNAMIC", ("tensor", False): "FP8", ("block", True): "FP8_BLOCK"}


def scheme(args: QuantArgs, act: ActQuantArgs) -> QuantizationScheme:
    """The job's scheme: for the three FP8 presets and W4AFP8 exactly the compressed-tensors
    presets (``FP8_DYNAMIC``, ``FP8``, ``FP8_BLOCK``, ``W4AFP8``; tested); other combinations of
    quant.weight_strategy and quant.act_dynamic are built from the same parts."""
    if args.grid != "fp8":
        return preset_name_to_scheme("W4AFP8", ["Linear"])
    key = (args.fp8_strategy, act.dynamic)
    if key in PRESETS:
        return preset_name_to_scheme(PRESETS[key], ["Linear"])
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=args.fp8_strategy, dynamic=False)
    if act.dynamic:
        inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    else:
        inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False,
                                  observer="static_minmax")
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def quantization_config(args: QuantArgs, act: ActQuantArgs | None, ignore: list[str]) -> dict:
    if args.grid == "nvfp4":
        return nvfp4_quantization_config(act, ignore)
    fmt = FORMAT if args.grid == "fp8" else "pack-quantized"
    return config_entry(scheme(args, act), fmt, ignore)


def compress_linear(name: str, result: QuantResult, args: QuantArgs, act: ActQuantArgs,
                    act_params: StaticActParams | None) -> dict[str, torch.Tensor]:
    """``weight`` (E4M3), ``weight_scale`` (float32), and ``input_scale`` for static activations.
    The library's float compressor re-derives the FP8 codes from the dequantized weight and the
    stored scale; they must be the solve's."""
    strategy = args.fp8_strategy
    scale = fg.collapse_row_scales(result.scale, strategy)
    rows = result.scale.shape[0]
    if strategy == "block" and not torch.equal(scale.repeat_interleave(FP8_BLOCK, 0)[:rows], result.scale):
        raise AssertionError(f"{name}: block scales differ inside a 128-row block")
    if strategy == "tensor" and not bool((result.scale == scale).all()):
        raise AssertionError(f"{name}: per-tensor scales differ between rows")
    weight = fg.fp8_from_bits(result.q)
    state = {"weight": result.dequantize(args), "weight_scale": scale.reshape(-1, 1) if strategy == "channel" else scale}
    out = FloatQuantizationCompressor.compress(state, scheme(args, act))
    if not torch.equal(out["weight"].view(torch.int8), result.q):
        raise AssertionError(f"{name}: compressed-tensors FP8 re-quantization differs from the solve")
    out = {"weight": weight, "weight_scale": scale.float()}
    if not act.dynamic:
        assert act_params is not None, f"{name}: static activation parameters missing"
        out["input_scale"] = act_params.scale.to(torch.float32).reshape(1)
    return {f"{name}.{key}": value.contiguous() for key, value in out.items()}


def scale_shape(out_features: int, in_features: int, strategy: str) -> tuple[int, ...]:
    if strategy == "tensor":
        return (1,)
    if strategy == "block":
        return (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))
    return (out_features, 1)


def linear_specs(name: str, out_features: int, in_features: int, args: QuantArgs,
                 act: ActQuantArgs) -> list[TensorSpec]:
    specs = [TensorSpec(f"{name}.weight", "F8_E4M3", (out_features, in_features)),
             TensorSpec(f"{name}.weight_scale", "F32", scale_shape(out_features, in_features, args.fp8_strategy))]
    if not act.dynamic:
        specs.append(TensorSpec(f"{name}.input_scale", "F32", (1,)))
    return specs


def check_float_shapes(cfg, plan) -> None:
    """NVFP4: inputs in groups of 16. Block FP8: vLLM's ``validate_fp8_block_shape`` (fp8_utils.py) needs every fused part's
    output size (q/k/v, gate/up: the checkpoint's linears) and the input size to be multiples of
    the 128×128 block; refused up front, one line, naming the first linear that fails."""
    q = cfg.quant
    if q.weight_type == "nvfp4":  # groups of 16 along the input
        bad = [lin for lin in plan.linears if lin.in_features % fg.NVFP4_GROUP]
        if bad:
            raise ConfigError(f"quant.weight_type='nvfp4': {bad[0].name} has {bad[0].in_features} input features, "
                              f"not a multiple of the NVFP4 group of {fg.NVFP4_GROUP} ({len(bad)} linear(s)); "
                              "leave them in float with quant.ignore or use a W4A16 preset")
        return
    if q.weight_type != "fp8" or q.weight_strategy != "block":
        return
    bad = [lin for lin in plan.linears if lin.out_features % FP8_BLOCK or lin.in_features % FP8_BLOCK]
    if bad:
        lin = bad[0]
        raise ConfigError(f"quant.weight_strategy='block': {lin.name} is [{lin.out_features}, {lin.in_features}] "
                          f"and {len(bad)} linear(s) are not multiples of {FP8_BLOCK} in both sizes, which vLLM's "
                          "block FP8 loader requires (validate_fp8_block_shape); use quant=fp8_dynamic")


# -- NVFP4 (``nvfp4-pack-quantized``; vLLM CompressedTensorsW4A4Fp4 / CompressedTensorsW4A16Fp4) --------
NVFP4_FORMAT = "nvfp4-pack-quantized"


def nvfp4_preset(act: ActQuantArgs | None) -> str:
    return "NVFP4" if act is not None else "NVFP4A16"


def nvfp4_quantization_config(act: ActQuantArgs | None, ignore: list[str], weight_only: list[str] = ()) -> dict:
    """group_0: the job's preset for every ``Linear``; ``weight_only``: targets of the linears written
    NVFP4A16 in a W4A4 job (MLA ``kv_b_proj``, dist_quant/plan.py ``absorbed_weight_only``), a second
    group with no ``input_activations``: vLLM's ``_get_scheme_from_parts`` then builds
    ``CompressedTensorsW4A4Fp4(use_a16=True)`` for them (compressed_tensors.py)."""
    more = [preset_name_to_scheme("NVFP4A16", list(weight_only))] if weight_only else []
    return config_entry(preset_name_to_scheme(nvfp4_preset(act), ["Linear"]), NVFP4_FORMAT, ignore, more)


def compress_nvfp4(name: str, result: QuantResult, args: QuantArgs, act: ActQuantArgs | None,
                   act_params: StaticActParams | None) -> dict[str, torch.Tensor]:
    """``weight_packed`` uint8 [out, in/2] (two E2M1 codes a byte, the even column low),
    ``weight_scale`` float8_e4m3fn [out, in/16], ``weight_global_scale`` float32 [1] (shared by
    the fused parts), W4A4: ``input_global_scale`` float32 [1]. The weight is
    ``e2m1 · weight_scale / weight_global_scale`` per group of 16."""
    from compressed_tensors.compressors import NVFP4PackedCompressor

    gs = result.global_scale.float().reshape(1)
    group = fg.fp8_group_scales(result.scale, gs)
    if not torch.equal(group.float() / gs, result.scale):
        raise AssertionError(f"{name}: NVFP4 group scales are not E4M3 values over the global scale")
    codes = result.q.view(torch.uint8)
    state = {"weight": result.dequantize(args), "weight_scale": group.float(), "weight_global_scale": gs}
    lib = NVFP4PackedCompressor.compress(state, preset_name_to_scheme(nvfp4_preset(act), ["Linear"]))
    packed = fg.pack_e2m1(codes)
    lib_codes = fg.unpack_e2m1(lib["weight_packed"])
    if not torch.equal(fg.e2m1_values(lib_codes), fg.e2m1_values(codes)):  # the library may write -0
        raise AssertionError(f"{name}: compressed-tensors NVFP4 packing differs from the solve")
    out = {"weight_packed": packed, "weight_scale": group, "weight_global_scale": gs}
    if act is not None:
        assert act_params is not None, f"{name}: NVFP4 input global scale missing"
        out["input_global_scale"] = act_params.scale.to(torch.float32).reshape(1)
    return {f"{name}.{key}": value.contiguous() for key, value in out.items()}


def nvfp4_specs(name: str, out_features: int, in_features: int, act: ActQuantArgs | None) -> list[TensorSpec]:
    specs = [TensorSpec(f"{name}.weight_packed", "U8", (out_features, in_features // 2)),
             TensorSpec(f"{name}.weight_scale", "F8_E4M3", (out_features, in_features // fg.NVFP4_GROUP)),
             TensorSpec(f"{name}.weight_global_scale", "F32", (1,))]
    if act is not None:
        specs.append(TensorSpec(f"{name}.input_global_scale", "F32", (1,)))
    return specs
