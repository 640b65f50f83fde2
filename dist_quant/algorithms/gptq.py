"""GPTQ (Frantar et al., 2022): column-by-column quantization with error feedback
through the inverse-Hessian Cholesky factor, in lazy blocks.

Pure tensor function: ``gptq_quantize(W, H, args, params) -> QuantResult``. ``H`` is the
normalized Hessian ``2 Σ x xᵀ / n`` of the layer inputs (see ``stats.py``).

Activation order is *group-aware* when groups are used: groups are ordered by their
total Hessian diagonal and columns by their own diagonal inside each group, so every
group stays contiguous and the checkpoint needs no ``g_idx`` (GPTQModel's "GAR").
Group scales are chosen when the solver reaches the group, from the error-updated
weights, as in the reference implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.qparams import QuantArgs, QuantResult, compute_qparams, dequantize, quantize
from .rtn import rtn_quantize


@dataclass(frozen=True)
class GPTQParams:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    damp_retries: int = 5  # each retry multiplies the dampening by 10


def column_order(diag: torch.Tensor, args: QuantArgs, act_order: bool) -> torch.Tensor:
    """Permutation of input columns to process (identity without act-order)."""
    n = diag.numel()
    if not act_order:
        return torch.arange(n, device=diag.device)
    if args.group_size == -1:
        return torch.argsort(diag, descending=True, stable=True)
    cols = args.group_size
    per_group = diag.reshape(n // cols, cols)
    group_rank = torch.argsort(per_group.sum(dim=1), descending=True, stable=True)
    inner = torch.argsort(per_group, dim=1, descending=True, stable=True)
    return (group_rank[:, None] * cols + inner[group_rank]).reshape(-1)


def inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, raising λ tenfold on failure.

    Returns ``(None, λ)`` when every attempt failed (the caller falls back)."""
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        lam = damp * 10**attempt
        chol, info = torch.linalg.cholesky_ex(h + lam * mean_diag * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, lam
    return None, lam


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: GPTQParams) -> QuantResult:
    """Quantize ``w`` [out, in] minimizing ``tr(ΔW H ΔWᵀ)``; returns integers in original column order."""
    W = w.detach().float().clone()
    out_f, n = W.shape
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = column_order(torch.diag(H), args, params.act_order)
    W, H = W[:, perm], H[perm][:, perm]
    upper, lam = inverse_cholesky(H, params.damp, params.damp_retries)
    if upper is None:
        result = rtn_quantize(w, args)
        result.fallback = f"Hessian not positive definite even with damp={lam:g}; used RTN"
        return result
    U = upper.float()

    cols = args.columns_per_group(n)
    grouped = args.group_size != -1
    scale = torch.zeros(out_f, n // cols, device=W.device)
    zero = torch.zeros(out_f, n // cols, device=W.device)
    if not grouped:
        s, z = compute_qparams(W, args)
        scale[:, :1], zero[:, :1] = s, z
    cur_s, cur_z = scale[:, :1], zero[:, :1]
    block = max(cols, params.block_size // cols * cols) if grouped else params.block_size
    Q = torch.zeros_like(W)

    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if grouped and (i1 + i) % cols == 0:
                cur_s, cur_z = compute_qparams(W1[:, i:i + cols], args)
                g = int(perm[i1 + i]) // cols
                scale[:, g:g + 1], zero[:, g:g + 1] = cur_s, cur_z
            col = W1[:, i:i + 1]
            q = quantize(col, cur_s, cur_z, args)
            Q1[:, i:i + 1] = q
            err = (col - dequantize(q, cur_s, cur_z)) / U1[i, i]
            W1[:, i:] -= err * U1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inverse = torch.argsort(perm)
    return QuantResult(q=Q[:, inverse].to(torch.int8), scale=scale, zero=zero.to(torch.int8))
