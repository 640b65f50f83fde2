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

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..quant import floatgrid as fg
from ..quant.qparams import QuantArgs, QuantResult, compute_qparams
from . import gptq_numba, gptq_triton
from .factor import inverse_upper_factor_
from .rtn import rtn_quantize


@dataclass(frozen=True)
class GPTQParams:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    damp_retries: int = 5  # each retry multiplies the dampening by 10
    workers: int = 1  # threads running the column loop on row chunks (any count: the same bits)
    kernel: str = "auto"  # integer-grid column loop: auto / torch / triton (gptq_triton.use_kernel)


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
    and dtype, overwritten) by one Cholesky and one triangular inverse of the reversed matrix,
    in place (:func:`factor.inverse_upper_factor_`: temporaries of at most a quarter of ``h``).
    Returns ``(U, λ)`` with ``U`` a view of ``work``, or ``(None, λ)`` when every attempt failed."""
    mean_diag = float(torch.diag(h).mean())
    lam = damp
    for attempt in range(retries + 1):
        lam = damp * 10**attempt
        upper = inverse_upper_factor_(h, work, lam * mean_diag)
        if upper is not None and _finite(work):
            return upper, lam
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
                   work: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   clip: torch.Tensor | None = None) -> QuantResult:
    """:func:`gptq_quantize` on a float32 Hessian ``h`` used as scratch: it is permuted in place
    and restored before returning (bit for bit: only copies and a reverted diagonal). ``work``
    (same shape, overwritten; allocated when ``None``) receives the inverse factor, so the
    solve holds at most these two Hessian-sized float32 buffers (see ``stats.HessianStat.take``).
    FP8 grid (``args.grid == "fp8"``): the scales are fixed before the solve, ``scale`` float32
    [out, groups] (default: ``w``'s own, :func:`floatgrid.fp8_row_scales`), and every column is
    rounded to the E4M3 grid of its scale instead of the integers.
    ``clip`` [out, groups]: clipping ratios chosen beforehand (AWQ, algorithms/awq.py): each
    group's scale comes from the range of its error-updated weights times its ratio."""
    if args.grid != "int" and scale is None:
        scale = fg.grid_scales(w, args.grid, args.fp8_strategy)
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
        result = rtn_quantize(w, args, scale, clip)
        result.fallback = f"Hessian not positive definite even with damp={lam:g}; used RTN"
        return result
    W = w.detach().float().index_select(1, perm)  # the one working copy, in solve order
    W[:, dead[perm]] = 0.0
    den = _denominator_meanwhile(w, h, params)
    result, loss = _column_loop(W, upper, perm, args, params, scale, clip)
    mean_diag = float((diag.sum() + dead.sum()) / n)  # of the Hessian factorized (dead inputs set to 1)
    result.err_rows = _undamped_error(loss, w, dead, result, args, lam * mean_diag)
    if den is not None:
        result.den_rows = den.result()
    return result


def _denominator_meanwhile(w: torch.Tensor, h: torch.Tensor, params: GPTQParams) -> Future | None:
    """``(W H Wᵀ)_rr`` (the report's output-error denominator, ``stats.output_error_rows``) in a
    thread while the column loop runs, when the solve has more than one worker: the loop is a
    long chain of small ops that keeps one core busy (the MSE search's row parts excepted), the
    denominator one GEMM per row block that needs only ``w`` and ``h``, which nothing changes
    from here on (``h`` is back in input order, ``w`` is read only). None: one worker, the
    caller computes it afterwards."""
    if params.workers < 2:
        return None
    from ..stats import output_error_rows

    pool = ThreadPoolExecutor(1, thread_name_prefix="gptq-den")
    try:
        return pool.submit(lambda: output_error_rows(w, None, h)[1])
    finally:
        pool.shutdown(wait=False)


def _undamped_error(loss: torch.Tensor, w: torch.Tensor, dead: torch.Tensor, result: QuantResult,
                    args: QuantArgs, lam_abs: float) -> torch.Tensor:
    """``(ΔW H ΔWᵀ)_rr`` per row from the column loop's errors, without a GEMM.

    The loop's errors ``E`` (``e_j = (w_j − ŵ_j) / U_jj`` on the error-updated weights) satisfy
    ``W − Ŵ = E U`` with ``UᵀU = (H + λI)⁻¹``, so ``ΔW (H + λI) ΔWᵀ = E U (H + λI) Uᵀ Eᵀ = E Eᵀ``:
    the row sums of ``e²`` (``loss``) are the damped output error. The damping's share
    ``λ ‖ΔW_r‖²`` is taken off (dead inputs, whose weights the loop zeroed, contribute nothing:
    their ``H`` rows are zero). Row blocks of ``stats.ERROR_ROWS``: no float copy of the weight."""
    from ..stats import ERROR_ROWS

    live = ~dead
    out = loss.clone()
    for a in range(0, w.shape[0], ERROR_ROWS):
        b = min(a + ERROR_ROWS, w.shape[0])
        part = QuantResult(result.q[a:b], result.scale[a:b], result.zero[a:b])
        d = (w[a:b].float() - part.dequantize(args))[:, live]
        out[a:b] -= lam_abs * (d * d).sum(dim=1, dtype=torch.float64)
    return out.clamp_(min=0.0)


def column_kernel(kernel: str, device: torch.device) -> str:
    """The integer-grid column loop ``quant.kernel`` selects on ``device``: ``triton`` (CUDA),
    ``numba`` (CPU) or ``torch``; ``auto`` takes the compiled one where it runs and passed its check."""
    if gptq_triton.use_kernel(kernel, device):
        return "triton"
    if gptq_numba.use_kernel(kernel, device):
        return "numba"
    return "torch"


MIN_CHUNK_ROWS_COMPILED = 128  # the numba loop's: one call per sub-block and chunk, so 2 threads pay off early
MIN_CHUNK_ROWS = 1024  # a thread's share of the rows: with fewer, the per-op overhead of two threads
# costs more than it saves (bench/bench_solve.py, 2 idle cores: 3072 rows 0.169 s → 0.123 s with 2
# workers, but 1536 rows 0.084 → 0.091 s, 960 rows 0.066 → 0.078 s, 576 rows 0.042 → 0.067 s)


def _column_loop(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, args: QuantArgs,
                 params: GPTQParams, fixed: torch.Tensor | None = None,
                 clip: torch.Tensor | None = None) -> tuple[QuantResult, torch.Tensor]:
    """The GPTQ recursion on ``W`` (columns in solve order, overwritten), and the float64 row
    sums of its squared errors ``e²`` (see :func:`_undamped_error`). Rows are independent
    given ``U``, so with ``params.workers > 1`` row chunks run in that many threads at once
    (torch ops release the GIL): every element is computed exactly as in one pass, so the
    result is the same bits for any number of workers, and no OpenMP team is woken per op."""
    rows = W.shape[0]
    n_chunks = max(1, min(params.workers, rows // MIN_CHUNK_ROWS))
    if fixed is not None:  # FP8 grid: fixed scales, one row each, split with the rows
        def run(c, s, k, pool=None):
            return quantize_columns_grid(c, U, perm, args, params.block_size, s)
    else:  # ``k``: AWQ's clipping ratios of these rows (or None)
        loop = column_kernel(params.kernel, W.device)
        if loop == "triton":
            n_chunks = 1  # one launch covers every row
        elif loop == "numba":  # no per-op dispatch: small row chunks pay off
            n_chunks = max(1, min(params.workers, rows // MIN_CHUNK_ROWS_COMPILED))

        def run(c, s, k, pool=None):
            return quantize_columns(c, U, perm, args, params.block_size, k, pool, loop)
    if n_chunks == 1 and params.workers > 1 and args.mse and fixed is None:
        # too few rows to split the loop, but the MSE scale search of each group is heavy
        # arithmetic on [rows, group] (20 ratios): its rows go to the idle workers
        with ThreadPoolExecutor(params.workers, thread_name_prefix="gptq-mse") as pool:
            Q, scale, zero, loss = run(W, fixed, clip, pool)
    elif n_chunks == 1:
        Q, scale, zero, loss = run(W, fixed, clip)
    else:
        chunks = W.tensor_split(n_chunks, dim=0)  # row views: each thread updates its own rows
        fixed_chunks = fixed.tensor_split(n_chunks, dim=0) if fixed is not None else [None] * n_chunks
        clips = clip.tensor_split(n_chunks, dim=0) if clip is not None else [None] * n_chunks
        with ThreadPoolExecutor(n_chunks, thread_name_prefix="gptq") as pool:
            parts = list(pool.map(run, chunks, fixed_chunks, clips))
        Q, scale, zero, loss = (torch.cat(t) for t in zip(*parts))
    inverse = torch.argsort(perm)
    q = fg.GRID_CODES[args.grid](Q[:, inverse]) if fixed is not None else Q[:, inverse].to(torch.int8)
    return QuantResult(q=q, scale=scale, zero=zero.to(torch.int8)), loss


MIN_SEARCH_ROWS = 64  # a worker's share of the rows in a split MSE scale search


def _qparams(w: torch.Tensor, args: QuantArgs, clip: torch.Tensor | None,
             pool: ThreadPoolExecutor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_qparams` of ``w``'s rows, split over ``pool``'s threads when given (rows
    are independent and every op is elementwise or a per-row reduction: the same bits)."""
    parts = 0 if pool is None else min(pool._max_workers, w.shape[0] // MIN_SEARCH_ROWS)
    if parts < 2:
        return compute_qparams(w, args, clip)
    clips = clip.tensor_split(parts) if clip is not None else [None] * parts
    done = list(pool.map(lambda a, k: compute_qparams(a, args, k), w.tensor_split(parts), clips))
    return torch.cat([s for s, _ in done]), torch.cat([z for _, z in done])


SUB_BLOCK = 16  # columns whose errors reach the rest of their lazy block as one GEMM


def lazy_block_loop(W: torch.Tensor, U: torch.Tensor, block: int, cols: int, start_group, quantize_col
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ recursion shared by every grid, on ``W`` [out, n] (columns in solve order,
    updated in place) with ``U`` the upper Cholesky factor of the permuted inverse Hessian.

    Lazy blocks of ``block`` columns (Frantar et al., Alg. 1), each worked on transposed (one
    contiguous row per column), in two levels: a column's error goes at once to the later
    columns of its sub-block of :data:`SUB_BLOCK` (``w[j] −= U[i,j]·err``), and a sub-block's
    errors reach the rest of the block as one GEMM, the block's the rest of ``W`` as another.
    A group starts at a sub-block's first column (the sub-block divides the group), after
    every earlier error has been applied. ``start_group(g, rows)`` is called at the first
    column of group ``g`` (``cols`` columns; ``rows`` [cols, out]: its error-updated columns);
    ``quantize_col(col, q, err)`` writes the column's grid value into ``q`` and ``col −
    dequantized`` into ``err``. Returns the grid values (solve order) and the float64 row
    sums of the squared errors ``e = err / U[i,i]`` (the damped output error, see
    :func:`_undamped_error`)."""
    sub = math.gcd(cols, SUB_BLOCK)

    def within(Wt, Qt, Et, U1, i1) -> None:
        b = Wt.shape[0]
        diag = U1.diagonal().tolist()
        for j1 in range(0, b, sub):
            j2 = min(j1 + sub, b)
            for i in range(j1, j2):
                if (i1 + i) % cols == 0:
                    start_group((i1 + i) // cols, Wt[i:i + cols])
                col, q, err = Wt[i], Qt[i], Et[i]
                quantize_col(col, q, err)
                err.div_(diag[i])
                if i + 1 < j2:
                    Wt[i + 1:j2].sub_(U1[i, i + 1:j2, None] * err)
            if j2 < b:
                Wt[j2:].sub_(U1[j1:j2, j2:].T @ Et[j1:j2])

    return _lazy_blocks(W, U, block, within)


def _lazy_blocks(W: torch.Tensor, U: torch.Tensor, block: int, within) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer level shared by both column loops: each lazy block of ``W`` transposed into
    ``Wt`` [b, out] (column i of the block is the row ``Wt[i]``), ``within(Wt, Qt, Et, U1, i1)``
    fills its grid values ``Qt`` and scaled errors ``Et``, and the block's errors reach the
    rest of ``W`` as one GEMM. Returns the grid values and the float64 row sums of ``Et²``."""
    out_f, n = W.shape
    Q = torch.empty_like(W)
    loss = torch.zeros(out_f, dtype=torch.float64, device=W.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        Wt = W[:, i1:i2].T.contiguous()
        Qt = torch.empty_like(Wt)
        Et = torch.empty_like(Wt)
        within(Wt, Qt, Et, U[i1:i2, i1:i2], i1)
        Q[:, i1:i2] = Qt.T
        loss += (Et * Et).sum(dim=0, dtype=torch.float64)
        if i2 < n:
            W[:, i2:] -= Et.T.contiguous() @ U[i1:i2, i2:]
    return Q, loss


def fused_block_loop(W: torch.Tensor, U: torch.Tensor, block: int, cols: int, start_group, segment,
                     longest: int = gptq_triton.MAX_SEGMENT) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lazy_block_loop` with each run of columns that shares a group (at most
    ``longest`` of them) done by one call ``segment(Wt, Qt, Et, U1)`` on the block's
    transposed rows ``a:b`` (``gptq_triton.quantize_segment_``, ``gptq_numba.segment_``: the
    recursion inside the run, errors already divided by ``U_ii``); the run's errors reach the
    rest of the block and of ``W`` as GEMMs. Same arguments and results as
    :func:`lazy_block_loop`; with ``longest`` its sub-block width the same float operations too."""
    def within(Wt, Qt, Et, U1, i1) -> None:
        b, a = Wt.shape[0], 0
        while a < b:
            if (i1 + a) % cols == 0:
                start_group((i1 + a) // cols, Wt[a:a + cols])
            end = min(b, a + longest, a + cols - (i1 + a) % cols)
            segment(Wt[a:end], Qt[a:end], Et[a:end], U1[a:end, a:end])
            if end < b:
                Wt[end:].sub_(U1[a:end, end:].T @ Et[a:end])
            a = end

    return _lazy_blocks(W, U, block, within)


def _block_width(args: QuantArgs, cols: int, block_size: int) -> int:
    return max(cols, block_size // cols * cols) if args.group_size != -1 else block_size


def quantize_columns(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, args: QuantArgs,
                     block_size: int, clip: torch.Tensor | None = None,
                     pool: ThreadPoolExecutor | None = None, loop: str = "torch"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`lazy_block_loop` on the integer grid: ``q = clamp(round(w/s) + z)``, ``err = w −
    (q − z)·s``, with each group's scale and zero chosen from its error-updated weights when the
    loop reaches it (``clip``: AWQ's ratios; ``pool``: threads for the MSE search's rows).
    ``loop``: ``torch`` ops per column, ``triton``: each group's run of columns in one launch,
    ``numba``: each sub-block in one compiled call (both :func:`fused_block_loop`).
    Returns the integers (solve order), the per-group scale and zero (checkpoint order) and the
    row sums of ``e²``."""
    out_f, n = W.shape
    cols = args.columns_per_group(n)
    grouped = args.group_size != -1
    qmin, qmax = args.qmin, args.qmax
    scale = torch.zeros(out_f, n // cols, device=W.device)
    zero = torch.zeros(out_f, n // cols, device=W.device)
    group_of = (perm[::cols] // cols).tolist()
    cur = {}

    def start_group(k: int, rows: torch.Tensor) -> None:
        g = group_of[k]
        if grouped:
            s, z = _qparams(rows.T, args, None if clip is None else clip[:, g:g + 1], pool)
        else:  # per channel: the whole row, before any column is quantized
            s, z = _qparams(W, args, None if clip is None else clip[:, :1], pool)
        scale[:, g:g + 1], zero[:, g:g + 1] = s, z
        cur["s"], cur["z"] = s[:, 0].contiguous(), z[:, 0].contiguous()

    def quantize_col(col, q, err) -> None:
        s = cur["s"]
        torch.div(col, s, out=q)
        q.round_()
        if args.symmetric:  # zero == 0: adding and subtracting it changes no value
            q.clamp_(qmin, qmax)
            torch.mul(q, s, out=err)
        else:
            z = cur["z"]
            q.add_(z).clamp_(qmin, qmax)
            torch.sub(q, z, out=err).mul_(s)
        torch.sub(col, err, out=err)

    def segment(Wt, Qt, Et, U1) -> None:
        gptq_triton.quantize_segment_(Wt, Qt, Et, U1, cur["s"], cur["z"].float(), qmin, qmax)

    def compiled(Wt, Qt, Et, U1) -> None:
        gptq_numba.segment_(Wt, Qt, Et, U1, cur["s"], None if args.symmetric else cur["z"], qmin, qmax)

    width = _block_width(args, cols, block_size)
    if loop == "triton":
        Q, loss = fused_block_loop(W, U, width, cols, start_group, segment)
    elif loop == "numba":  # sub-blocks as lazy_block_loop's: the same bits
        Q, loss = fused_block_loop(W, U, width, cols, start_group, compiled, math.gcd(cols, SUB_BLOCK))
    else:
        Q, loss = lazy_block_loop(W, U, width, cols, start_group, quantize_col)
    return Q, scale, zero, loss


def quantize_columns_grid(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, args: QuantArgs,
                          block_size: int, scale: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`lazy_block_loop` on a float grid (``args.grid``: FP8 E4M3, NVFP4 E2M1) with fixed
    scales ``scale`` [out, groups] (checkpoint group order): ``q = grid(w / s)`` (nearest, ties
    even), ``err = w − q·s``. Returns the grid values (float, solve order), the scales, zeros
    (all 0) and the row sums of ``e²``."""
    out_f, n = W.shape
    cols = args.columns_per_group(n)
    group_of = (perm[::cols] // cols).tolist() if args.group_size != -1 else [0]
    scale = scale.float()
    div = fg.nvfp4_safe(scale)  # an all-zero NVFP4 group has scale 0: its values round to 0
    rnd = fg.GRID_ROUND[args.grid]
    cur = {}

    def start_group(k: int, rows: torch.Tensor) -> None:
        g = group_of[k]
        cur["s"], cur["d"] = scale[:, g].contiguous(), div[:, g].contiguous()

    def quantize_col(col, q, err) -> None:
        q.copy_(rnd(col / cur["d"]))
        torch.mul(q, cur["s"], out=err)
        torch.sub(col, err, out=err)

    Q, loss = lazy_block_loop(W, U, block_size, cols, start_group, quantize_col)
    return Q, scale.clone(), torch.zeros(scale.shape, device=W.device), loss
