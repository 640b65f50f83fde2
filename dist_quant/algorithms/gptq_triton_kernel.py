"""The Triton kernel of :mod:`gptq_triton` (this module imports triton; import it lazily)."""
import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    # exact: |x| − floor(|x|) is exact for |x| ≥ 0 (Sterbenz above 1), r/2 is exact
    a = tl.abs(x)
    r = tl.floor(a)
    f = a - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)
    return tl.where(x < 0, -r, r)


@triton.jit
def segment(W, Q, E, U, S, Z, rows_total, length, stride_w, su0, su1, qmin, qmax,
            LP: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < rows_total
    ks = tl.arange(0, LP)
    kmask = ks < length
    tile = tl.load(W + ks[:, None] * stride_w + rows[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0)
    s = tl.load(S + rows, mask=rmask, other=1.0)
    z = tl.load(Z + rows, mask=rmask, other=0.0)
    for i in range(length):
        w = tl.sum(tl.where(ks[:, None] == i, tile, 0.0), axis=0)
        q = _round_half_even(tl.div_rn(w, s)) + z  # IEEE division, as torch's (``/`` may be approximate)
        q = tl.minimum(tl.maximum(q, qmin), qmax)
        e = tl.div_rn(w - (q - z) * s, tl.load(U + i * (su0 + su1)))
        tl.store(Q + i * stride_w + rows, q, mask=rmask)
        tl.store(E + i * stride_w + rows, e, mask=rmask)
        u = tl.load(U + i * su0 + ks * su1, mask=kmask & (ks > i), other=0.0)
        tile = tile - u[:, None] * e[None, :]
