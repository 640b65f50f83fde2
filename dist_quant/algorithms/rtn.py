"""Round-to-nearest weight quantization (group-wise or per-channel; integer or FP8 grid)."""
from __future__ import annotations

import torch

from ..quant import floatgrid as fg
from ..quant.qparams import QuantArgs, QuantResult, compute_qparams, expand_groups, quantize


def rtn_quantize(w: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None,
                 clip: torch.Tensor | None = None) -> QuantResult:
    """Quantize ``w`` [out, in] group by group with scales from each group's own range
    (times ``clip`` [out, groups] when given: AWQ's searched clipping ratios; FP8 / NVFP4 grid:
    ``scale``, float32 [out, groups], the fixed scales; default ``w``'s own)."""
    if args.grid != "int":
        return rtn_grid(w, args, scale)
    out_f, in_f = w.shape
    cols = args.columns_per_group(in_f)
    groups = w.float().reshape(out_f, in_f // cols, cols).reshape(-1, cols)
    scale, zero = compute_qparams(groups, args, None if clip is None else clip.reshape(-1, 1))
    q = quantize(groups, scale, zero, args)
    return QuantResult(
        q=q.reshape(out_f, in_f).to(torch.int8),
        scale=scale.reshape(out_f, -1),
        zero=zero.reshape(out_f, -1).to(torch.int8),
    )


def rtn_grid(w: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None) -> QuantResult:
    """Round to the nearest value of the float grid (E4M3 saturating / E2M1, ties to even) with
    one fixed scale per row and group: ``q = grid(w / scale)``."""
    if scale is None:
        scale = fg.grid_scales(w, args.grid, args.fp8_strategy)
    per_col = expand_groups(fg.nvfp4_safe(scale.float()), args, w.shape[1])
    values = fg.GRID_ROUND[args.grid](w.float() / per_col)
    return QuantResult(q=fg.GRID_CODES[args.grid](values), scale=scale.float().clone(),
                       zero=torch.zeros(scale.shape, dtype=torch.int8, device=w.device))
