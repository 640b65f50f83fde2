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


PERMUTE_CHUNK = 256  # rows / columns moved per step by permute_symmetric_


def permute_symmetric_(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``h ← h[perm][:, perm]`` in place for a symmetric ``h``, with chunk-sized temporaries
    only: first every row's columns (``M = H[:, perm]``), then, because the result ``P`` is
    symmetric, ``P = Mᵀ[:, perm]``, i.e. column block ``[a, b)`` of ``P`` is ``M[perm, a:b]``
    (reads and writes only columns ``a..b``)."""
    n = h.shape[0]
    for a in range(0, n, PERMUTE_CHUNK):
        b = min(a + PERMUTE_CHUNK, n)
        h[a:b] = h[a:b].index_select(1, perm)
    for a in range(0, n, PERMUTE_CHUNK):
        b = min(a + PERMUTE_CHUNK, n)
        h[:, a:b] = h[:, a:b].index_select(0, perm)
    return h


def inverse_cholesky_(h: torch.Tensor, work: torch.Tensor, damp: float,
                      retries: int) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU``), raising λ tenfold on failure.

    ``h`` is left as it was; the factor is computed in ``work`` (a buffer of ``h``'s shape
    and dtype, overwritten): damped copy → Cholesky → inverse → Cholesky, all in place (LAPACK
    works on the Fortran-ordered view ``work.mT``), so no other ``n × n`` buffer is allocated.
    Returns ``(U, λ)`` with ``U`` a view of ``work``, or ``(None, λ)`` when every attempt failed."""
    mean_diag = torch.diag(h).mean()
    f = work.mT  # Fortran-contiguous: LAPACK's layout, so the out= calls below need no copy
    info = torch.empty((), dtype=torch.int32, device=h.device)
    lam = damp
    for attempt in range(retries + 1):
        lam = damp * 10**attempt
        work.copy_(h)
        work.diagonal().add_(lam * mean_diag)
        torch.linalg.cholesky_ex(f, out=(f, info))
        if int(info) != 0:
            continue
        torch.cholesky_inverse(f, out=f)
        torch.linalg.cholesky_ex(f, upper=True, out=(f, info))
        if int(info) == 0 and _finite(work):
            return f, lam
    return None, lam


def _finite(t: torch.Tensor) -> bool:
    """``isfinite(t).all()`` row block by row block (no ``n × n`` boolean temporary)."""
    return all(bool(torch.isfinite(t[a:a + PERMUTE_CHUNK]).all()) for a in range(0, t.shape[0], PERMUTE_CHUNK))


def inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor | None, float]:
    """Out-of-place :func:`inverse_cholesky_` (``h`` untouched, one new buffer)."""
    return inverse_cholesky_(h, torch.empty_like(h), damp, retries)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, params: GPTQParams) -> QuantResult:
    """Quantize ``w`` [out, in] minimizing ``tr(ΔW H ΔWᵀ)``; returns integers in original column order.
    ``hessian`` is not modified (it is copied once; see :func:`gptq_quantize_`)."""
    h = hessian.detach().to(torch.float32, copy=True)
    return gptq_quantize_(w, h, args, params)


def gptq_quantize_(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, params: GPTQParams,
                   work: torch.Tensor | None = None) -> QuantResult:
    """:func:`gptq_quantize` on a float32 Hessian ``h`` used as scratch: it is permuted in place
    and restored before returning (bit for bit: only copies and a reverted diagonal). ``work``
    (same shape, overwritten; allocated when ``None``) receives the inverse factor, so the
    solve holds at most these two Hessian-sized float32 buffers (see ``stats.HessianStat.take``)."""
    if h.dtype != torch.float32 or not h.is_contiguous():
        raise ValueError(f"gptq_quantize_ needs a contiguous float32 Hessian, got {h.dtype}")
    out_f, n = w.shape
    diag = torch.diag(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    perm = column_order(torch.diag(h), args, params.act_order)
    permuted = not torch.equal(perm, torch.arange(n, device=perm.device))
    if permuted:
        permute_symmetric_(h, perm)
    try:
        upper, lam = inverse_cholesky_(h, work if work is not None else torch.empty_like(h),
                                       params.damp, params.damp_retries)
    finally:
        if permuted:
            permute_symmetric_(h, torch.argsort(perm))
        h[dead, dead] = 0.0
    if upper is None:
        result = rtn_quantize(w, args)
        result.fallback = f"Hessian not positive definite even with damp={lam:g}; used RTN"
        return result
    W = w.detach().float().index_select(1, perm)  # the one working copy, in solve order
    W[:, dead[perm]] = 0.0
    return _column_loop(W, upper, perm, args, params)


def _column_loop(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, args: QuantArgs,
                 params: GPTQParams) -> QuantResult:
    """The lazy-batch GPTQ recursion on ``W`` (columns in solve order, overwritten)."""
    out_f, n = W.shape
    cols = args.columns_per_group(n)
    grouped = args.group_size != -1
    scale = torch.zeros(out_f, n // cols, device=W.device)
    zero = torch.zeros(out_f, n // cols, device=W.device)
    if not grouped:
        s, z = compute_qparams(W, args)
        scale[:, :1], zero[:, :1] = s, z
    cur_s, cur_z = scale[:, :1], zero[:, :1]
    block = max(cols, params.block_size // cols * cols) if grouped else params.block_size
    Q = torch.empty(out_f, n, dtype=torch.int8, device=W.device)

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
        Q[:, i1:i2] = Q1.to(torch.int8)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inverse = torch.argsort(perm)
    del W
    return QuantResult(q=Q[:, inverse], scale=scale, zero=zero.to(torch.int8))
