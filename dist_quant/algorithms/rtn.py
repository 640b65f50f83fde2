"""Round-to-nearest weight quantization (group-wise or per-channel; integer or FP8 grid)."""
from __future__ import annotations

import torch

from ..quant import floatgrid as fg
from ..quant.qparams import QuantArgs, QuantResult, compute_qparams, expand_groups, quantize


def rtn_quantize(w: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None) -> QuantResult:
    """Quantize ``w`` [out, in] group by group with scales from each group's own range
    (FP8 grid: ``scale``, float32 [out, groups], the fixed scales; default ``w``'s own)."""
    if args.grid == "fp8":
        return rtn_fp8(w, args, scale)
    out_f, in_f = w.shape
    cols = args.columns_per_group(in_f)
    groups = w.float().reshape(out_f, in_f // cols, cols).reshape(-1, cols)
    scale, zero = compute_qparams(groups, args)
    q = quantize(groups, scale, zero, args)
    return QuantResult(
        q=q.reshape(out_f, in_f).to(torch.int8),
        scale=scale.reshape(out_f, -1),
        zero=zero.reshape(out_f, -1).to(torch.int8),
    )


def rtn_fp8(w: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None) -> QuantResult:
    """``q = e4m3(w / scale)`` (saturating, round to nearest even) with one scale per row and group."""
    if scale is None:
        scale = fg.fp8_row_scales(w, args.fp8_strategy)
    per_col = expand_groups(scale, args, w.shape[1])
    return QuantResult(q=fg.fp8_bits(w.float() / per_col), scale=scale.float().clone(),
                       zero=torch.zeros(scale.shape, dtype=torch.int8, device=w.device))
