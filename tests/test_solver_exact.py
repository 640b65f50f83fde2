"""The fast solver paths against the straightforward loops they replace, bit for bit.

``compute_qparams`` evaluates all MSE clipping ratios (and all rows) in one pass of tensor
ops, and the GPTQ column loop works on transposed blocks with a fixed handful of ops per
column. Both must give exactly what the plain per-ratio loop and the plain column loop
(written out here, from the documented rules) give: same integers, same scales, same zeros.
"""
from __future__ import annotations

import math

import pytest
import torch

from dist_quant.algorithms.gptq import (SUB_BLOCK, GPTQParams, column_order, gptq_quantize, inverse_cholesky,
                                        quantize_columns)
from dist_quant.quant.qparams import QuantArgs, compute_qparams
from dist_quant.solver_threads import solve_workers


pytestmark = pytest.mark.usefixtures("single_thread")  # solver bits as on one thread (tests/conftest.py)


# -- references ------------------------------------------------------------------------------
def ref_range_params(lo, hi, args: QuantArgs):
    """Scale/zero from a range: symmetric ``max|·| / ((qmax − qmin)/2)``, else ``(hi − lo)/(qmax − qmin)``,
    clamped to float32 eps and the scale dtype's max, rounded to the scale dtype."""
    if args.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((args.qmax - args.qmin) / 2)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / (args.qmax - args.qmin)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps, max=torch.finfo(args.scale_dtype).max)
    scale = scale.to(args.scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(args.scale_dtype).tiny))
    zero = torch.zeros_like(scale) if args.symmetric else (args.qmin - torch.round(lo / scale)).clamp(
        args.qmin, args.qmax)
    return scale, zero


def ref_fake(w, scale, zero, args):
    q = (torch.round(w / scale) + zero).clamp(args.qmin, args.qmax)
    return (q - zero) * scale


def ref_qparams(w, args: QuantArgs):
    """One ratio at a time: 1.00, 0.98, …, 0.62; keep the first with the smallest Σ|err|^2.4."""
    w = w.float()
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    best_s, best_z = ref_range_params(lo, hi, args)
    if not args.mse:
        return best_s, best_z
    best_err = torch.full_like(lo, float("inf"))
    for step in range(20):
        ratio = 1.0 - 0.02 * step
        s, z = ref_range_params(lo * ratio, hi * ratio, args)
        err = (ref_fake(w, s, z, args) - w).abs().pow(2.4).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def ref_columns(W, U, perm, args: QuantArgs, block_size: int):
    """The plain lazy-block GPTQ loop (Frantar et al., Alg. 1), one column at a time, with the
    implementation's two levels of lazy updates (sub-blocks of ``SUB_BLOCK`` columns in a block)."""
    W = W.clone()
    out_f, n = W.shape
    cols = args.columns_per_group(n)
    grouped = args.group_size != -1
    scale = torch.zeros(out_f, n // cols)
    zero = torch.zeros(out_f, n // cols)
    cur_s, cur_z = ref_qparams(W, args) if not grouped else (None, None)
    if not grouped:
        scale[:, :1], zero[:, :1] = cur_s, cur_z
    block = max(cols, block_size // cols * cols) if grouped else block_size
    sub = math.gcd(cols, SUB_BLOCK)  # a column's error goes at once to the rest of its sub-block only
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if grouped and (i1 + i) % cols == 0:
                cur_s, cur_z = ref_qparams(W1[:, i:i + cols], args)
                g = int(perm[i1 + i]) // cols
                scale[:, g:g + 1], zero[:, g:g + 1] = cur_s, cur_z
            col = W1[:, i:i + 1]
            q = (torch.round(col / cur_s) + cur_z).clamp(args.qmin, args.qmax)
            Q[:, i1 + i:i1 + i + 1] = q
            err = (col - (q - cur_z) * cur_s) / U1[i, i]
            j2 = min((i // sub + 1) * sub, i2 - i1)  # end of the sub-block
            W1[:, i:j2] -= err * U1[i:i + 1, i:j2]
            Err1[:, i:i + 1] = err
            if i + 1 == j2 and j2 < i2 - i1:  # the sub-block's errors reach the rest of the block
                j1 = j2 - sub
                W1[:, j2:] -= (U1[j1:j2, j2:].T @ Err1[:, j1:j2].T.contiguous()).T
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q, scale, zero


# -- problems ---------------------------------------------------------------------------------
def weights(rows, cols, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02 + offset
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 10.0  # outliers: clipping pays off on some rows
    return w


def hessian(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) * (10 ** (torch.rand(n, generator=g) * 2 - 1))
    return (2.0 / x.shape[0]) * (x.T.double() @ x.double())


ARGS = [(bits, sym, sdt) for bits in (4, 8) for sym in (True, False)
        for sdt in (torch.bfloat16, torch.float16, torch.float32)]


@pytest.mark.parametrize("bits,sym,sdt", ARGS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mse", [True, False])
def test_qparams_match_per_ratio_loop(bits, sym, sdt, mse):
    args = QuantArgs(bits=bits, group_size=64, symmetric=sym, scale_dtype=sdt, mse=mse)
    for seed, (rows, cols) in enumerate([(300, 64), (7, 5), (40, 1536), (3000, 32)]):
        w = weights(rows, cols, seed, offset=0.0 if sym else 0.01)
        views = (w, torch.cat([w, w], dim=1)[:, :cols], w.T.contiguous().T)  # contiguous, sliced, transposed
        for v in views:
            s, z = compute_qparams(v, args)
            rs, rz = ref_qparams(v, args)
            assert torch.equal(s, rs) and torch.equal(z, rz)
    if mse and bits == 4:  # the search did pick shrunk ranges somewhere (else this test proves little)
        mm = QuantArgs(bits=bits, group_size=64, symmetric=sym, scale_dtype=sdt)
        assert (compute_qparams(w, args)[0] != compute_qparams(w, mm)[0]).any()


def test_qparams_degenerate_rows():
    """Zero, constant, and huge rows: the searched parameters equal the loop's."""
    w = torch.tensor([[0.0] * 8, [0.75] * 8, [-3.0] * 8, [1e-3] * 8, [3e38, -3e38] * 4])
    for sym in (True, False):
        for sdt in (torch.bfloat16, torch.float16):
            args = QuantArgs(bits=4, group_size=-1, symmetric=sym, scale_dtype=sdt, mse=True)
            s, z = compute_qparams(w, args)
            rs, rz = ref_qparams(w, args)
            assert torch.equal(s, rs) and torch.equal(z, rz)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,block", [(64, 128), (-1, 128), (32, 48), (128, 64)])
@pytest.mark.parametrize("mse", [True, False])
def test_column_loop_matches_plain_loop(sym, group_size, block, mse):
    out_f, n = 96, 256
    args = QuantArgs(bits=4, group_size=group_size, symmetric=sym, scale_dtype=torch.bfloat16, mse=mse)
    W = weights(out_f, n, 11, offset=0.0 if sym else 0.01)
    H = hessian(n, 12)
    perm = column_order(torch.diag(H), args, act_order=True)
    upper, _ = inverse_cholesky(H[perm][:, perm], 0.01, 0)
    U = upper.float()
    Wp = W[:, perm]
    q, s, z, _ = quantize_columns(Wp.clone(), U, perm, args, block)
    rq, rs, rz = ref_columns(Wp, U, perm, args, block)
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)
    assert GPTQParams().block_size == 128


@pytest.mark.parametrize("workers", [2, 3, 8])
@pytest.mark.parametrize("group_size", [64, -1])
def test_workers_give_the_same_bits(workers, group_size, monkeypatch):
    """Row chunks in threads: the same integers, scales and zeros as one pass (and the
    reference loop), including chunks of unequal size."""
    import dist_quant.algorithms.gptq as gptq_mod

    monkeypatch.setattr(gptq_mod, "MIN_CHUNK_ROWS", 64)  # 389 rows: several chunks
    args = QuantArgs(bits=4, group_size=group_size, symmetric=True, scale_dtype=torch.bfloat16, mse=True)
    W, H = weights(389, 256, 21), hessian(256, 22)
    one = gptq_quantize(W, H, args, GPTQParams(block_size=64))
    many = gptq_quantize(W, H, args, GPTQParams(block_size=64, workers=workers))
    assert torch.equal(one.q, many.q) and torch.equal(one.scale, many.scale) and torch.equal(one.zero, many.zero)
    perm = column_order(torch.diag(H), args, act_order=True)
    U = inverse_cholesky(H[perm][:, perm], 0.01, 0)[0].float()
    rq, rs, rz = ref_columns(W[:, perm], U, perm, args, 64)
    assert torch.equal(many.q, rq[:, torch.argsort(perm)].to(torch.int8)) and torch.equal(many.scale, rs)


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("group_size", [64, -1])
def test_mse_search_rows_over_workers_give_the_same_bits(workers, group_size):
    """Too few rows to split the column loop (389 < 2 x 1024): the workers take the rows of each
    group's MSE search instead (gptq._qparams) -- the same integers, scales and zeros."""
    import dist_quant.algorithms.gptq as gptq_mod

    assert 389 < 2 * gptq_mod.MIN_CHUNK_ROWS and 389 // gptq_mod.MIN_SEARCH_ROWS >= workers
    args = QuantArgs(bits=4, group_size=group_size, symmetric=False, scale_dtype=torch.bfloat16, mse=True)
    W, H = weights(389, 256, 31, offset=0.01), hessian(256, 32)
    one = gptq_quantize(W, H, args, GPTQParams(block_size=64))
    many = gptq_quantize(W, H, args, GPTQParams(block_size=64, workers=workers))
    assert torch.equal(one.q, many.q) and torch.equal(one.scale, many.scale) and torch.equal(one.zero, many.zero)
    assert torch.equal(one.err_rows, many.err_rows)


@pytest.mark.parametrize("threads,rank,local,solvers,expected", [
    (1, 0, 2, {0, 1}, 1),  # 2 ranks on 2 cores, both solving: one core each
    (1, 0, 2, {0}, 2),  # the other rank waits for our broadcast: its core is ours
    (2, 0, 1, {0}, 2),  # 1 rank with 2 threads
    (1, 3, 2, {0, 3}, 2),  # rank 0 solves on the other node: rank 2 (our neighbour) waits
    (1, 2, 2, {0, 1, 2, 3}, 1),
    (4, 1, 4, {0, 1, 2, 3}, 4),
    (1, 5, 8, {5}, 8),
])
def test_solve_workers(threads, rank, local, solvers, expected):
    assert solve_workers(threads, rank, local, solvers) == expected
