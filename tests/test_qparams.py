"""Quantization parameters vs an independent, row-by-row reference of the documented formulas."""
from __future__ import annotations

import math

import pytest
import torch

from dist_quant.quant.qparams import (
    QuantArgs,
    QuantResult,
    compute_qparams,
    dequantize,
    expand_groups,
    fake_quantize,
    quantize,
)

EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------
# Independent reference (scalar, one row at a time)
# ----------------------------------------------------------------------------------------
def ref_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def ref_row_params(row: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """Scale and zero of one float32 row, straight from the compressed-tensors formulas."""
    qmin, qmax = ref_range(bits)
    row = row.float()
    if symmetric:
        amax = row.abs().max()
        scale = amax / ((qmax - qmin) / 2)
        lo = None
    else:
        lo = torch.clamp(row.min(), max=0.0)
        hi = torch.clamp(row.max(), min=0.0)
        scale = (hi - lo) / (qmax - qmin)
    if scale < EPS32:  # degenerate row (all zero): smallest positive float32 step
        scale = torch.tensor(EPS32, dtype=torch.float32)
    scale = scale.to(scale_dtype).float()
    assert scale > 0
    if symmetric:
        zero = 0.0
    else:
        zero = float(min(max(qmin - torch.round(lo / scale).item(), qmin), qmax))
    return float(scale), zero


def ref_fake_quant_row(row: torch.Tensor, scale: float, zero: float, bits: int) -> torch.Tensor:
    qmin, qmax = ref_range(bits)
    r = row.double()
    q = torch.clamp(torch.round(r / scale) + zero, qmin, qmax)
    return (q - zero) * scale


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def make_matrix(kind: str, rows: int = 16, cols: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if kind == "random":
        return w
    if kind == "adversarial":
        w[0] = 0.0  # all-zero row
        w[1] = 0.37  # constant positive row
        w[2] = -2.5  # constant negative row
        w[3, 17] = 1.0e4  # one huge positive outlier
        w[4, 100] = -3.0e4  # one huge negative outlier
        w[5] = w[5].abs() + 0.5  # strictly positive row (asym: lo clamps to 0)
        w[6] = -(w[6].abs() + 0.5)  # strictly negative row
        w[7] = w[7] * 1e-9  # tiny values, below float32 eps
        w[8, :64] = 0.0  # half-zero row (zero group when grouped)
        w[9] = w[9] * 1e5  # large magnitude
        w[10, ::2] = 1.0  # exact ties at the extreme
        w[10, 1::2] = -1.0
        return w
    raise ValueError(kind)


ALL_ARGS = [
    (bits, gs, sym, sdt)
    for bits in (4, 8)
    for gs in (-1, 32, 128)
    for sym in (True, False)
    for sdt in (torch.float32, torch.bfloat16)
]


def _id(p):
    bits, gs, sym, sdt = p
    return f"b{bits}-g{gs}-{'sym' if sym else 'asym'}-{str(sdt).split('.')[-1]}"


def grouped_rows(w: torch.Tensor, gs: int) -> torch.Tensor:
    """[rows, cols] → [rows * groups, group_size] (each group becomes one row)."""
    cols = w.shape[1] if gs == -1 else gs
    return w.reshape(w.shape[0], -1, cols).reshape(-1, cols)


# ----------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("p", ALL_ARGS, ids=_id)
def test_params_match_reference(p, kind):
    bits, gs, sym, sdt = p
    args = QuantArgs(bits=bits, group_size=gs, symmetric=sym, scale_dtype=sdt)
    w = grouped_rows(make_matrix(kind), gs)
    scale, zero = compute_qparams(w, args)
    assert scale.shape == (w.shape[0], 1) and zero.shape == (w.shape[0], 1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    for r in range(w.shape[0]):
        s_ref, z_ref = ref_row_params(w[r], bits, sym, sdt)
        assert scale[r, 0].item() == pytest.approx(s_ref, rel=1e-6, abs=0), (r, w[r, :4])
        assert zero[r, 0].item() == z_ref, r
    if sym:
        assert (zero == 0).all()
    qmin, qmax = ref_range(bits)
    assert ((zero >= qmin) & (zero <= qmax) & (zero == torch.round(zero))).all()


@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("p", ALL_ARGS, ids=_id)
def test_quantize_range_and_error(p, kind):
    bits, gs, sym, sdt = p
    qmin, qmax = ref_range(bits)
    args = QuantArgs(bits=bits, group_size=gs, symmetric=sym, scale_dtype=sdt)
    w = grouped_rows(make_matrix(kind), gs)
    scale, zero = compute_qparams(w, args)
    q = quantize(w, scale, zero, args)
    # integers, in range
    assert torch.isfinite(q).all()
    assert (q == torch.round(q)).all()
    assert q.min() >= qmin and q.max() <= qmax
    # quantize matches clamp(round(w / s) + z) computed independently
    t = w.double() / scale.double()
    q_ref = torch.clamp(torch.round(t) + zero.double(), qmin, qmax)
    differs = q.double() != q_ref
    near_tie = ((t - t.floor()) - 0.5).abs() < 1e-5  # e.g. ±max|w| lands on ±(qmax-qmin)/2
    assert (q.double() - q_ref).abs().max() <= 1
    assert not (differs & ~near_tie).any()
    # round trip: error ≤ scale/2 wherever w lies inside the representable range
    w_hat = dequantize(q, scale, zero)
    assert torch.allclose(w_hat, fake_quantize(w, scale, zero, args))
    err = (w_hat.double() - w.double()).abs()
    t = w.double() / scale.double() + zero.double()
    in_range = (t >= qmin - 0.5 - 1e-4) & (t <= qmax + 0.5 + 1e-4)
    bound = scale.double() * (0.5 + 1e-4) + 1e-30
    bad = in_range & (err > bound)
    assert not bad.any(), (err - bound)[bad][:5]
    # min/max scales cover every group: with float32 scales everything is in range
    if sdt == torch.float32:
        assert in_range.all()
    else:  # bf16 rounding can shrink the scale by at most 2^-8 relative
        step_slack = (qmax - qmin) * 2.0 ** -8
        assert (err <= scale.double() * (0.5 + step_slack) + 1e-30).all()
    # all-zero groups reconstruct exactly to zero
    zero_rows = (w == 0).all(dim=1)
    assert (w_hat[zero_rows] == 0).all()


@pytest.mark.parametrize("p", ALL_ARGS, ids=_id)
def test_scales_representable_in_scale_dtype(p):
    bits, gs, sym, sdt = p
    for kind in ("random", "adversarial"):
        w = grouped_rows(make_matrix(kind, seed=3), gs)
        for mse in (False, True):
            a = QuantArgs(bits=bits, group_size=gs, symmetric=sym, scale_dtype=sdt, mse=mse)
            s, _ = compute_qparams(w, a)
            assert s.dtype == torch.float32
            assert torch.equal(s.to(sdt).float(), s)
            assert (s > 0).all() and torch.isfinite(s).all()


def test_constant_and_zero_rows_exact():
    """Degenerate rows: exact reconstruction for constant rows, zeros stay zeros."""
    w = torch.tensor([[0.0] * 8, [0.75] * 8, [-3.0] * 8, [1e-3] * 8])
    for bits in (4, 8):
        for sym in (True, False):
            for sdt in (torch.float32, torch.bfloat16):
                args = QuantArgs(bits=bits, group_size=-1, symmetric=sym, scale_dtype=sdt)
                s, z = compute_qparams(w, args)
                w_hat = fake_quantize(w, s, z, args)
                assert (w_hat[0] == 0).all()
                # a constant row sits exactly on the grid end (asym) or within scale/2 (sym)
                err = (w_hat - w).abs()
                assert (err <= s * (0.5 + 1e-4)).all()
                if not sym and sdt == torch.float32:
                    assert torch.allclose(w_hat[1:], w[1:], rtol=1e-6, atol=0)


def test_outlier_dominates_scale():
    w = torch.zeros(1, 64)
    w[0, 5] = 1.0e4
    w[0, 6:] = torch.linspace(-1, 1, 58)
    args = QuantArgs(bits=4, group_size=-1, symmetric=True)
    s, _ = compute_qparams(w, args)
    assert s.item() == pytest.approx(1.0e4 / 7.5, rel=1e-6)
    q = quantize(w, s, torch.zeros_like(s), args)
    assert q[0, 5] == 7  # 7.5 rounds to 8 and clamps to qmax
    assert (q[0, 6:] == 0).all()  # everything small collapses to zero


@pytest.mark.parametrize("p", ALL_ARGS, ids=_id)
def test_mse_never_worse_than_minmax(p):
    bits, gs, sym, sdt = p
    qmin, qmax = ref_range(bits)
    improved = 0
    for kind in ("random", "adversarial"):
        w = grouped_rows(make_matrix(kind, seed=7), gs)
        a_mm = QuantArgs(bits=bits, group_size=gs, symmetric=sym, scale_dtype=sdt)
        a_mse = QuantArgs(bits=bits, group_size=gs, symmetric=sym, scale_dtype=sdt, mse=True)
        s_mm, z_mm = compute_qparams(w, a_mm)
        s_mse, z_mse = compute_qparams(w, a_mse)
        assert ((z_mse >= qmin) & (z_mse <= qmax)).all()
        for r in range(w.shape[0]):
            e_mm = (ref_fake_quant_row(w[r], s_mm[r, 0].item(), z_mm[r, 0].item(), bits)
                    - w[r].double()).abs().pow(2.4).sum().item()
            e_mse = (ref_fake_quant_row(w[r], s_mse[r, 0].item(), z_mse[r, 0].item(), bits)
                     - w[r].double()).abs().pow(2.4).sum().item()
            assert e_mse <= e_mm * (1 + 1e-5) + 1e-30, (r, e_mse, e_mm)
            improved += e_mse < e_mm * (1 - 1e-3)
    if bits == 4:  # on Gaussian data clipping helps at 4 bits for at least some rows
        assert improved > 0


def test_quant_result_dequantize_grouped():
    g = torch.Generator().manual_seed(11)
    out_f, in_f, gs = 4, 64, 16
    q = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = torch.rand(out_f, in_f // gs, generator=g) + 0.1
    zero = torch.randint(-8, 8, (out_f, in_f // gs), generator=g, dtype=torch.int8)
    args = QuantArgs(bits=4, group_size=gs, symmetric=False)
    w_hat = QuantResult(q=q, scale=scale, zero=zero).dequantize(args)
    ref = torch.empty(out_f, in_f)
    for r in range(out_f):
        for c in range(in_f):
            ref[r, c] = (float(q[r, c]) - float(zero[r, c // gs])) * float(scale[r, c // gs])
    assert torch.allclose(w_hat, ref, rtol=1e-6, atol=0)
    assert torch.equal(expand_groups(scale, args, in_f)[:, gs], scale[:, 1])
    assert QuantArgs(bits=4, group_size=gs).groups(in_f) == in_f // gs
    assert QuantArgs(bits=4, group_size=-1).groups(in_f) == 1
    assert (QuantArgs(bits=8, group_size=-1).qmin, QuantArgs(bits=8, group_size=-1).qmax) == (-128, 127)
    assert math.isclose(QuantArgs(bits=4, group_size=-1).qmax, 7)
