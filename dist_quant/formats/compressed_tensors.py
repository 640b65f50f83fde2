"""compressed-tensors output (what vLLM, SGLang and transformers load), produced with the
``compressed-tensors`` library: its schemes for ``quantization_config`` and its
compressor for the packed tensors."""
from __future__ import annotations

import math

import compressed_tensors
import torch
from compressed_tensors.compressors.pack_quantized.base import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec

FORMAT = "pack-quantized"


def scheme(args: QuantArgs, targets: list[str] | None = None) -> QuantizationScheme:
    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=args.symmetric,
        strategy="channel" if args.group_size == -1 else "group",
        group_size=None if args.group_size == -1 else args.group_size,
        dynamic=False,
    )
    return QuantizationScheme(targets=targets or ["Linear"], weights=weights)


def quantization_config(args: QuantArgs, ignore: list[str],
                        more: tuple[tuple[list[str], QuantArgs], ...] = ()) -> dict:
    """The ``quantization_config`` entry of config.json (as ModelCompressor writes it). ``more``:
    further config groups ``(targets, args)`` (fallback linears, dist_quant/fallback.py); their
    name targets win over group_0's class target ``Linear`` in vLLM, SGLang and compressed-tensors."""
    return config_entry(scheme(args), FORMAT, ignore, [scheme(a, t) for t, a in more])


def config_entry(one_scheme: QuantizationScheme, fmt: str, ignore: list[str],
                 more: list[QuantizationScheme] = ()) -> dict:
    """``quantization_config`` for one config group of ``one_scheme`` (and ``more`` groups)
    stored as ``fmt``."""
    groups = {f"group_{k}": s for k, s in enumerate([one_scheme, *more])}
    qc = QuantizationConfig(config_groups=groups, format=fmt,
                            quantization_status="compressed", ignore=list(ignore))
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude={"quant_method"}, mode="json"),
    }


def compress_linear(name: str, result: QuantResult, args: QuantArgs) -> dict[str, torch.Tensor]:
    """Packed tensors of one linear, named ``{name}.weight_packed`` etc.: the solver's integers
    packed by the library's own ``pack_to_int32`` (as ``PackedQuantizationCompressor.compress``
    packs the integers it gets by re-quantizing the dequantized weight with these scales; the
    integers are the same, so they are packed directly), the zero points packed along the
    output dim for asymmetric schemes (``PACK_ZP_STRATS``)."""
    in_features = result.q.shape[1]
    packed = {"weight_packed": pack_to_int32(result.q, args.bits),
              "weight_shape": torch.tensor(result.q.shape),
              "weight_scale": result.scale.to(args.scale_dtype)}
    if not args.symmetric:
        packed["weight_zero_point"] = pack_to_int32(result.zero, args.bits, packed_dim=0)
    assert packed["weight_packed"].shape[1] == math.ceil(in_features * args.bits / 32)
    return {f"{name}.{key}": value.contiguous() for key, value in packed.items()}


def linear_specs(name: str, out_features: int, in_features: int, args: QuantArgs) -> list[TensorSpec]:
    """The tensors :func:`compress_linear` will produce, known before any solve (for the writer plan)."""
    groups = args.groups(in_features)
    specs = [
        TensorSpec(f"{name}.weight_packed", "I32", (out_features, math.ceil(in_features * args.bits / 32))),
        TensorSpec(f"{name}.weight_scale", TensorSpec.dtype_of(args.scale_dtype), (out_features, groups)),
        TensorSpec(f"{name}.weight_shape", "I64", (2,)),
    ]
    if not args.symmetric:
        specs.append(TensorSpec(f"{name}.weight_zero_point", "I32",
                                (math.ceil(out_features * args.bits / 32), groups)))
    return specs
