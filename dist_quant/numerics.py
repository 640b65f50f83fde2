"""Numerical guards around the solves: no NaN or Inf, no out-of-range integer and no
non-positive scale reaches a part file (the writer also refuses non-finite float tensors)."""
from __future__ import annotations

import torch

from .checkpoint import CheckpointError
from .quant.qparams import QuantArgs, QuantResult


class NumericalError(RuntimeError):
    """A solve produced values that must not be written."""


def check_weight(name: str, w: torch.Tensor) -> None:
    """The checkpoint's float weight of ``name`` must be finite (bad input otherwise)."""
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise CheckpointError(f"{name}.weight in the checkpoint holds {bad} NaN/Inf value(s); "
                              "refusing to quantize it")


def check_result(name: str, result: QuantResult, args: QuantArgs) -> None:
    q, scale, zero = result.q, result.scale, result.zero
    if args.grid == "nvfp4" and q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise NumericalError(f"{name}: E2M1 codes outside 0..15")
    if args.grid == "nvfp4":
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: scale 0 is exact
    if args.grid == "fp8" and q.numel() and bool(((q == 127) | (q == -1)).any()):  # E4M3 NaN: S.1111.111
        raise NumericalError(f"{name}: NaN FP8 weight codes")
    if args.grid == "int" and q.numel() and (int(q.min()) < args.qmin or int(q.max()) > args.qmax):
        raise NumericalError(f"{name}: integers outside [{args.qmin}, {args.qmax}] "
                             f"(min {int(q.min())}, max {int(q.max())})")
    if not torch.isfinite(scale).all() or not (scale > 0).all():
        raise NumericalError(f"{name}: non-finite or non-positive quantization scale")
    if not torch.isfinite(scale.to(args.scale_dtype).float()).all():
        raise NumericalError(f"{name}: a scale overflows {args.scale_dtype}")
    if zero.numel() and (int(zero.min()) < args.qmin or int(zero.max()) > args.qmax):
        raise NumericalError(f"{name}: zero point outside [{args.qmin}, {args.qmax}]")
