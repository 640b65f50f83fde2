"""Flex smooth (msModelSlim anti-outlier method m6):

    s = (A^α / W^β).clamp(min=1e-5)

with A_j the per-channel max |x| and W_j the column max of |W| over the linears that share
the input. When α and β are not given they are searched on a two-stage grid: α ∈ {0,
0.05, …, 1} with β = 1 − α, then β over the same grid with α fixed. The score of a
candidate is the relative error of the int8 product

    ‖Q(x/s)·Q(W·s)ᵀ − x·Wᵀ‖ / ‖x·Wᵀ‖,

a ratio of sums over tokens: :func:`candidate_errors` returns the numerator's partial sum
over the tokens it is given (one rank's), and the caller SUM-reduces before comparing.
Ties go to the later grid point (msModelSlim compares with ``<=``).

Pure tensor functions; the distributed reduction is the ``evaluate`` callable's business.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..quant.qparams import QuantArgs
from .rtn import rtn_quantize
from .smoothquant import SCALE_MIN

GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))

Candidate = tuple[float, float]  # (alpha, beta)


def flex_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    a = act_absmax.float().clamp(min=0)
    w = weight_absmax.float().clamp(min=SCALE_MIN)
    return (a.pow(alpha) / w.pow(beta)).clamp(min=SCALE_MIN)


def candidate_errors(x: torch.Tensor, weight: torch.Tensor, scales: Callable[[float, float], torch.Tensor],
                     candidates: Sequence[Candidate], act_fake_quant: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     weight_args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial sums over the tokens ``x`` [T, in] of the consumers ``weight`` [out, in]:
    ``num[c] = Σ‖Q(x/s_c)·Q(W·s_c)ᵀ − x·Wᵀ‖²`` (float64 [C]) and ``den = Σ‖x·Wᵀ‖²``.

    ``scales(α, β)`` gives s over the input channels; ``act_fake_quant(x/s, s)`` is the
    activation quantizer (static ranges depend on s); weights are quantized per output
    channel with ``weight_args`` (RTN)."""
    x = x.float()
    w = weight.float()
    num = torch.zeros(len(candidates), dtype=torch.float64)
    if x.shape[0] == 0:
        return num, torch.zeros((), dtype=torch.float64)
    ref = x @ w.T
    den = ref.double().pow(2).sum()
    for c, (alpha, beta) in enumerate(candidates):
        s = scales(alpha, beta).to(x.device)
        xq = act_fake_quant(x / s, s)
        wq = rtn_quantize(w * s, weight_args).dequantize(weight_args)
        num[c] = (xq @ wq.T - ref).double().pow(2).sum()
    return num, den


def two_stage_search(evaluate: Callable[[Sequence[Candidate]], torch.Tensor], alpha: float | None = None,
                     grid: Sequence[float] = GRID) -> tuple[float, float, float]:
    """``evaluate(candidates)`` → the global relative errors of the candidates. Returns
    ``(alpha, beta, error)``. With ``alpha`` given only the β stage runs."""
    best_err = float("inf")
    if alpha is None:
        stage1 = [(a, round(1.0 - a, 2)) for a in grid]
        errs = evaluate(stage1).tolist()
        best = 0
        for i, e in enumerate(errs):
            if e <= best_err:
                best_err, best = e, i
        alpha, beta = stage1[best]
    else:
        beta = round(1.0 - alpha, 2)  # kept only if every β candidate scores NaN
    stage2 = [(alpha, b) for b in grid]
    errs = evaluate(stage2).tolist()
    for (a, b), e in zip(stage2, errs):
        if e <= best_err:
            best_err, beta = e, b
    return float(alpha), float(beta), float(best_err)
