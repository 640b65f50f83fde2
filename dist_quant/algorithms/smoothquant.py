"""SmoothQuant (Xiao et al., 2022): per input channel j,

    s_j = max|X_j|^α / max|W_j|^(1-α)

where max|W_j| is the column maximum over every linear that reads X. Then X ← X/s and
W ← W·s (1/s folded into the preceding norm or linear), so the product is unchanged and
activation outliers move into the weights. Pure tensor function.
"""
from __future__ import annotations

import torch

SCALE_MIN = 1e-5  # as msModelSlim: s.clamp(min=1e-5)


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``act_absmax`` [in] (MAX-reduced over all ranks' tokens), ``weight_absmax`` [in]."""
    a = act_absmax.float().clamp(min=0)
    w = weight_absmax.float().clamp(min=SCALE_MIN)  # an all-zero column must not give s = inf
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=SCALE_MIN)
