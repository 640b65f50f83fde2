"""Checks of the fused GPTQ kernel (dist_quant/algorithms/gptq_triton.py) run by
tests/test_gptq_triton.py in a subprocess with ``TRITON_INTERPRET=1`` (Triton's interpreter
runs the kernel on CPU tensors; it must be set before triton is imported, hence the process).

    TRITON_INTERPRET=1 python tests/gptq_triton_checks.py segment|rounding|solve
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_quant.algorithms import gptq_triton as gt  # noqa: E402
from dist_quant.algorithms.gptq import GPTQParams, gptq_quantize  # noqa: E402
from dist_quant.quant.qparams import QuantArgs  # noqa: E402


def _upper_factor(n: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T + n * torch.eye(n, dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def segment() -> None:
    """The kernel is the column recursion: bit for bit the torch reference (the same float
    operations in the same order), for lengths below, at and between powers of two, row
    counts that do not fill the last program, symmetric and asymmetric grids, and a factor
    block that is a strided view (as the solver passes it)."""
    g = torch.Generator().manual_seed(0)
    clamped = inside = 0
    for length, rows, asym, transposed in [(37, 100, False, False), (128, 70, True, True), (64, 130, True, False),
                                           (1, 5, False, True), (16, 33, False, False)]:
        wt = torch.randn(length, rows, generator=g)
        u = _upper_factor(length, g)
        if transposed:  # the solver's factor can be a transposed view: rows not contiguous
            u = u.T.contiguous().T
        s = torch.rand(rows, generator=g) * 0.3 + 0.05
        z = torch.randint(0, 16, (rows,), generator=g).float() if asym else torch.zeros(rows)
        qmin, qmax = (0, 15) if asym else (-8, 7)
        got_q, got_e, want_q, want_e = (torch.empty_like(wt) for _ in range(4))
        before = wt.clone()
        gt.quantize_segment_(wt, got_q, got_e, u, s, z, qmin, qmax)
        gt.reference_segment_(wt, want_q, want_e, u, s, z, qmin, qmax)
        assert torch.equal(wt, before), "the kernel wrote into its input"
        assert torch.equal(got_q, want_q), (length, rows, asym)
        assert torch.equal(got_e, want_e), (length, rows, asym, (got_e - want_e).abs().max())
        assert ((got_q >= qmin) & (got_q <= qmax)).all()
        edge = (got_q == qmin) | (got_q == qmax)
        clamped, inside = clamped + int(edge.sum()), inside + int((~edge).sum())
    assert clamped > 0 and inside > 0, "the data exercised neither or only the clamp"


def rounding() -> None:
    """Round half to even exactly as torch.round, at ties, just below ties, at 2**23 and
    beyond, negative values and zero (U = I and s = 1: q = clamp(round(w)))."""
    vals = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 1.4999999, 2.5000002,
                         8388607.5, 8388608.0, 16777216.0, 1e10, -1e10, 0.0, -0.0, 3.2, -7.7, 1e-30])
    n = vals.numel()
    wt = vals[:, None].repeat(1, 3).contiguous()
    q, e = torch.empty_like(wt), torch.empty_like(wt)
    big = float(2 ** 40)
    gt.quantize_segment_(wt, q, e, torch.eye(n), torch.ones(3), torch.zeros(3), -big, big)
    want = torch.round(vals)
    assert torch.equal(q[:, 0], want + 0.0), (q[:, 0], want)


def solve() -> None:
    """A whole GPTQ solve with quant.kernel=triton against the torch loop: the kernel walks each
    group's columns in one recursion where the torch loop sends sub-block errors by GEMMs, so
    the floats may differ in the last bits; integers and output error must not move."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(72, 320, generator=g) * 0.02
    x = torch.randn(2048, 320, generator=g) * (10 ** (torch.rand(320, generator=g) * 2 - 1))
    h = (2.0 / 2048) * (x.T @ x)
    cases = [QuantArgs(bits=4, group_size=64, symmetric=True, mse=True),
             QuantArgs(bits=4, group_size=32, symmetric=False),
             QuantArgs(bits=4, group_size=-1, symmetric=True),  # per channel: 128-column segments
             QuantArgs(bits=8, group_size=160, symmetric=True)]  # a group wider than a segment
    for args in cases:
        for act_order in (True, False):
            p = GPTQParams(kernel="torch", act_order=act_order)
            a = gptq_quantize(w, h, args, p)
            b = gptq_quantize(w, h, args, replace(p, kernel="triton"))
            same = (a.q == b.q).float().mean().item()
            assert same >= 0.999, (args, act_order, same)
            torch.testing.assert_close(b.scale, a.scale, rtol=1e-5, atol=0)
            err = [float(torch.einsum("ij,jk,ik->", d, h, d)) for d in (w - a.dequantize(args), w - b.dequantize(args))]
            assert abs(err[1] - err[0]) <= 1e-4 * err[0], (args, act_order, err)
            torch.testing.assert_close(b.err_rows, a.err_rows, rtol=1e-4, atol=1e-12)


if __name__ == "__main__":
    assert gt.interpreted(), "run with TRITON_INTERPRET=1"
    {"segment": segment, "rounding": rounding, "solve": solve}[sys.argv[1]]()
    print("ok", sys.argv[1])
