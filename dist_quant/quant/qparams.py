"""Integer quantization parameters and (de)quantization: pure tensor functions.

Conventions follow compressed-tensors: integers are signed, ``q ∈ [-2^(b-1), 2^(b-1)-1]``;
``w ≈ (q - zero) · scale``; symmetric schemes have ``zero == 0`` and
``scale = max|w| / ((qmax - qmin) / 2)``. Scales are rounded to ``scale_dtype`` (the
checkpoint's dtype) before use, so the stored scale is exactly the one the solver used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantArgs:
    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float32
    mse: bool = False  # search a clipping ratio per group instead of plain min/max

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def columns_per_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs):
    if args.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / ((args.qmax - args.qmin) / 2)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / (args.qmax - args.qmin)
    finfo = torch.finfo(args.scale_dtype)  # keep the stored scale finite (float16 tops out at 65504)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps, max=finfo.max)
    scale = scale.to(args.scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(args.scale_dtype).tiny))
    if args.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (args.qmin - torch.round(lo / scale)).clamp(args.qmin, args.qmax)
    return scale, zero


def compute_qparams(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` ([rows, cols] → [rows, 1] each)."""
    w = w.float()
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if not args.mse:
        return _params_from_range(lo, hi, args)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zero = _params_from_range(lo, hi, args)
    for step in range(0, 20):  # shrink the range by up to 40 % (GPTQ reference: grid 100, maxshrink .8)
        ratio = 1.0 - 0.02 * step
        scale, zero = _params_from_range(lo * ratio, hi * ratio, args)
        err = (fake_quantize(w, scale, zero, args) - w).abs().pow(2.4).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integers ``clamp(round(w / scale) + zero)`` (float tensor holding integers)."""
    return (torch.round(w / scale) + zero).clamp(args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, args), scale, zero)


def expand_groups(t: torch.Tensor, args: QuantArgs, in_features: int) -> torch.Tensor:
    """[out, groups] per-group values → [out, in] per-column values."""
    return t.repeat_interleave(args.columns_per_group(in_features), dim=1)


@dataclass
class QuantResult:
    """A quantized linear weight: ``w_hat = (q - zero) · scale`` group-wise."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out, groups] (values representable in args.scale_dtype)
    zero: torch.Tensor  # int8 [out, groups]; zeros when symmetric
    fallback: str | None = None  # set when the solver fell back (e.g. GPTQ → RTN), with why

    def split(self, rows: list[int]) -> list["QuantResult"]:
        """Per-module results of a row-stacked solve."""
        return [QuantResult(q, s, z, self.fallback) for q, s, z in
                zip(self.q.split(rows), self.scale.split(rows), self.zero.split(rows))]

    def dequantize(self, args: QuantArgs) -> torch.Tensor:
        n = self.q.shape[1]
        return dequantize(self.q.float(), expand_groups(self.scale, args, n),
                          expand_groups(self.zero.float(), args, n))
