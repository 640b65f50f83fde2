"""int8 activation quantization: static per-tensor (asymmetric, calibrated) or dynamic
per-token (symmetric, computed at run time). Pure tensor functions.

Conventions (compressed-tensors; Ascend's ``input_offset`` is the same zero point):
``q = clamp(round(x / scale + zero), -128, 127)``, ``x̂ = (q - zero) · scale``. The zero
point is added *before* rounding, as compressed-tensors' fake quantization and Ascend's
``x / input_scale + input_offset`` do: with round-half-to-even and float32 rounding of the
sum, ``round(v) + zero`` differs from it on rare ties, and one flipped step of a smoothed
outlier channel is visible in the output.

* static: ``scale = (hi - lo) / 255`` over the calibration range ``[lo, hi]`` (widened to
  contain 0), rounded to the dtype it is stored in; ``zero = -128 - round(lo / scale)``;
* dynamic: per token ``scale = max|x| / 127``, ``zero = 0``: what the serving kernels compute
  (vLLM's ``scaled_int8_quant`` / ``dynamic_scaled_int8_quant_kernel``, SGLang's
  ``per_token_quant_int8``, CANN's ``npu_dynamic_quant``), for every output format. (The
  compressed-tensors library's own ``calculate_qparams`` divides by 127.5, but no server runs
  it on activations: calibrating with it would calibrate a model that is not the served one.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import floatgrid as fg
from .qparams import QuantArgs, _params_from_range

QMIN, QMAX = -128, 127
TOKEN_DIVISOR = 127.0  # dynamic per-token scale = max|x| / TOKEN_DIVISOR (the servers' kernels)


@dataclass(frozen=True)
class ActQuantArgs:
    dynamic: bool
    scale_dtype: torch.dtype = torch.float32  # dtype the static input_scale is stored (and served) in
    token_divisor: float = TOKEN_DIVISOR  # dynamic: scale = max|x| / token_divisor
    grid: str = "int"  # "int" (int8, this module), "fp8" (E4M3) or "nvfp4" (E2M1): quant/floatgrid.py
    group: int = 0  # fp8 dynamic: 0 = per token; 128 = per token and group of 128 columns (block FP8)


@dataclass(frozen=True)
class StaticActParams:
    """A calibrated per-tensor quantizer: float tensors of shape [1] (zero holds an integer)."""

    scale: torch.Tensor
    zero: torch.Tensor


def static_params(lo: float | torch.Tensor, hi: float | torch.Tensor, args: ActQuantArgs) -> StaticActParams:
    """Asymmetric int8 parameters for the global range ``[lo, hi]`` (FP8: symmetric, the
    per-tensor ``scale = max(|lo|, |hi|) / 448``, zero 0; float32, vLLM's ``input_scale``)."""
    if args.grid == "nvfp4":  # NVFP4: the calibrated input global scale 448 · 6 / max|x| (float32 [1])
        amax = torch.maximum(torch.as_tensor(lo, dtype=torch.float32).abs(),
                             torch.as_tensor(hi, dtype=torch.float32).abs())
        return StaticActParams(fg.nvfp4_static_global_scale(amax), torch.zeros(1))
    if args.grid == "fp8":
        amax = torch.maximum(torch.as_tensor(lo, dtype=torch.float32).abs(),
                             torch.as_tensor(hi, dtype=torch.float32).abs())
        return StaticActParams(fg.fp8_static_scale(amax), torch.zeros(1))
    lo = torch.as_tensor(lo, dtype=torch.float32).reshape(1, 1)
    hi = torch.as_tensor(hi, dtype=torch.float32).reshape(1, 1)
    scale, zero = _params_from_range(lo, hi, QuantArgs(8, -1, symmetric=False, scale_dtype=args.scale_dtype))
    return StaticActParams(scale.reshape(1), zero.reshape(1))


def quantize_static(x: torch.Tensor, p: StaticActParams) -> torch.Tensor:
    """The int8 codes (as a float tensor holding integers)."""
    scale, zero = p.scale.to(x.device), p.zero.to(x.device)
    return torch.round(x.float() / scale + zero).clamp(QMIN, QMAX)


def fake_quant_static(x: torch.Tensor, p: StaticActParams) -> torch.Tensor:
    scale, zero = float(p.scale), float(p.zero)  # in-place chain: one temporary, not five
    q = x.float().div(scale).add_(zero).round_().clamp_(QMIN, QMAX).sub_(zero).mul_(scale)
    return q.to(x.dtype)


def dynamic_token_scale(x: torch.Tensor, divisor: float = TOKEN_DIVISOR) -> torch.Tensor:
    """Per-token (last dimension) symmetric scale, ``[..., 1]``."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = amax / divisor
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)


def fake_quant_dynamic(x: torch.Tensor, divisor: float = TOKEN_DIVISOR) -> torch.Tensor:
    scale = dynamic_token_scale(x, divisor)
    return x.float().div(scale).round_().clamp_(QMIN, QMAX).mul_(scale).to(x.dtype)


def fake_quant(x: torch.Tensor, args: ActQuantArgs, params: StaticActParams | None) -> torch.Tensor:
    """What a W8A8 linear sees of its input ``x`` (int8, or FP8 E4M3 with ``args.grid == "fp8"``)."""
    if args.grid == "nvfp4":  # local scales per token and group of 16, the calibrated global scale
        assert params is not None, "NVFP4 activations need a calibrated global scale"
        return fg.fake_quant_nvfp4(x, params.scale)
    if args.grid == "fp8":
        if args.dynamic:
            return fg.fake_quant_fp8_dynamic(x, args.group)
        assert params is not None, "static activation quantization needs calibrated parameters"
        return fg.fake_quant_fp8_static(x, params.scale)
    if args.dynamic:
        return fake_quant_dynamic(x, args.token_divisor)
    assert params is not None, "static activation quantization needs calibrated parameters"
    return fake_quant_static(x, params)
