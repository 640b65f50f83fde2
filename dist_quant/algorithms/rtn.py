"""Round-to-nearest weight quantization (group-wise or per-channel)."""
from __future__ import annotations

import torch

from ..quant.qparams import QuantArgs, QuantResult, compute_qparams, quantize


def rtn_quantize(w: torch.Tensor, args: QuantArgs, clip: torch.Tensor | None = None) -> QuantResult:
    """Quantize ``w`` [out, in] group by group with scales from each group's own range
    (times ``clip`` [out, groups] when given: AWQ's searched clipping ratios)."""
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
