"""The default solver path, GPTQ with ``quant.observer=mse``, against a brute-force
reference of the documented grid: for every group, shrink the range by each ratio
1.00, 0.98, …, 0.62 (20 ratios), quantize, score ``Σ |ŵ − w|^2.4`` and keep the best
ratio (the larger ratio on an exact tie). The reference is written here from that
description: its own scale formula, its own error sum in float64, and for GPTQ its own
textbook recursion (explicit inverse Hessian, float64, no lazy blocks) that picks each
group's scale by the brute-force search on the error-updated weights."""
from __future__ import annotations

import pytest
import torch

from dist_quant.algorithms.gptq import GPTQParams, gptq_quantize
from dist_quant.quant.qparams import QuantArgs, compute_qparams

RATIOS = [1.0 - 0.02 * k for k in range(20)]  # 1.00 … 0.62
EPS32 = torch.finfo(torch.float32).eps
NEAR_TIE = 1e-4  # relative gap between two ratios' errors below which float32 may pick either


pytestmark = pytest.mark.usefixtures("single_thread")  # solver bits as on one thread (tests/conftest.py)


def candidates(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype, norm: float = 2.4) -> list[tuple]:
    """For each ratio: (scale, zero, error) per row of ``w`` [rows, cols]. Scales from the
    documented range formulas on ``ratio ×`` the row's min/max (computed in ``w``'s dtype),
    rounded to ``scale_dtype``; the error in float64."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo_all, hi_all = w.amin(dim=1), w.amax(dim=1)
    out = []
    for r in RATIOS:
        lo, hi = lo_all * r, hi_all * r
        if symmetric:
            scale = torch.maximum(lo.abs(), hi.abs()) / ((qmax - qmin) / 2)
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = (hi - lo) / (qmax - qmin)
        scale = scale.clamp(min=EPS32).to(scale_dtype).to(w.dtype)
        zero = torch.zeros_like(scale) if symmetric else (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        q = (torch.round(w / scale[:, None]) + zero[:, None]).clamp(qmin, qmax)
        err = ((q - zero[:, None]) * scale[:, None] - w).double().abs().pow(norm).sum(dim=1)
        out.append((scale, zero, err))
    return out


def brute_force(w, bits, symmetric, scale_dtype, follow_scale=None, norm: float = 2.4):
    """Best ratio per row. ``follow_scale`` (the implementation's scales): where the
    implementation's scale is another ratio's whose error is within ``NEAR_TIE`` of the
    best, take it (float32 vs float64 rounding decides near-ties); returns the count."""
    cands = candidates(w, bits, symmetric, scale_dtype, norm)
    errs = torch.stack([c[2] for c in cands])  # [ratios, rows]
    best = torch.argmin(errs, dim=0)  # first minimum: the larger ratio on an exact tie
    followed = 0
    if follow_scale is not None:
        scales = torch.stack([c[0] for c in cands]).double()
        for row in range(w.shape[0]):
            k = int(best[row])
            if scales[k, row] == follow_scale[row]:
                continue
            hits = [j for j in range(len(RATIOS)) if scales[j, row] == follow_scale[row]
                    and errs[j, row] <= errs[k, row] * (1 + NEAR_TIE)]
            if hits:
                best[row] = hits[0]
                followed += 1
    rows = torch.arange(w.shape[0])
    scale = torch.stack([c[0] for c in cands])[best, rows]
    zero = torch.stack([c[1] for c in cands])[best, rows]
    return scale, zero, best, followed


# -- the observer alone: exact ----------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_observer_is_the_brute_force_grid(symmetric, scale_dtype, bits):
    g = torch.Generator().manual_seed(bits * 7 + symmetric)
    w = torch.randn(256, 64, generator=g) * 0.05
    w[::5, 3] *= 12  # outliers: the search must clip these rows' ranges
    w[1::7] += 0.03  # off-centre rows for the asymmetric case
    args = QuantArgs(bits=bits, group_size=64, symmetric=symmetric, scale_dtype=scale_dtype, mse=True)
    scale, zero = compute_qparams(w, args)
    ref_scale, ref_zero, best, followed = brute_force(w, bits, symmetric, scale_dtype, scale[:, 0].double())
    assert followed <= 2, f"{followed} rows differ from the brute force beyond ties"
    assert torch.equal(scale[:, 0], ref_scale.float())
    assert torch.equal(zero[:, 0], ref_zero.float())
    if bits == 4:  # at 4 bits the search shrinks a good share of ranges (at 8 bits min/max is mostly best)
        assert (best > 0).float().mean() > 0.2


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_norm_2_is_the_squared_error_brute_force(symmetric):
    """``quant.mse_norm=2``: the search scores Σ (ŵ − w)² (a square, not log2/exp2), and the
    choice is the brute force's under that norm; the two norms disagree on some rows."""
    g = torch.Generator().manual_seed(11 + symmetric)
    w = torch.randn(256, 64, generator=g) * 0.05
    w[::5, 3] *= 12
    w[1::7] += 0.03
    args = QuantArgs(bits=4, group_size=64, symmetric=symmetric, scale_dtype=torch.bfloat16, mse=True, mse_norm=2.0)
    scale, zero = compute_qparams(w, args)
    ref_scale, ref_zero, _, followed = brute_force(w, 4, symmetric, torch.bfloat16, scale[:, 0].double(), norm=2.0)
    assert followed <= 2
    assert torch.equal(scale[:, 0], ref_scale.float()) and torch.equal(zero[:, 0], ref_zero.float())
    default, _ = compute_qparams(w, QuantArgs(4, 64, symmetric, torch.bfloat16, mse=True))
    assert not torch.equal(default, scale)


def test_mse_norm_is_a_validated_key():
    from dist_quant.config import ConfigError
    from dist_quant.settings import load_config

    assert load_config(["quant.mse_norm=2"]).quant.mse_norm == 2.0
    with pytest.raises(ConfigError, match="quant.mse_norm"):
        load_config(["quant.mse_norm=0.5"])


# -- GPTQ with the MSE observer vs a textbook recursion using the brute force --------------------
def problem(seed: int, out_f=48, in_f=128, samples=384):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_f, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(in_f, dtype=torch.float64) + torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
             / in_f ** 0.5)
    x *= 0.5 + torch.rand(in_f, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / samples
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[::6, 5] *= 10
    return w, h.float()


def ref_gptq_mse(w, h, bits, group, symmetric, scale_dtype, impl, perm, damp=0.01):
    """Column by column in ``perm`` order (groups contiguous in it); each group's scale by
    the brute force on the error-updated weights; ties in rounding (|frac − ½| < 1e-4 steps)
    and near-ties between ratios follow ``impl``. Returns q, scale, zero in original
    numbering and the number of followed choices."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    W = w.double()[:, perm].clone()
    H = h.double()[perm][:, perm]
    out_f, n = W.shape
    hinv = torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64))
    fq = impl.q.double()[:, perm]
    Q = torch.zeros_like(W)
    scales = torch.zeros(out_f, n // group, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    followed = 0
    for j in range(n):
        if j % group == 0:
            g_orig = int(perm[j]) // group
            s, z, _, f = brute_force(W[:, j:j + group], bits, symmetric, scale_dtype,
                                     impl.scale[:, g_orig].double())
            followed += f
            scales[:, g_orig], zeros[:, g_orig] = s, z
        t = W[:, j] / s
        q = (torch.round(t) + z).clamp(qmin, qmax)
        tie = ((t - torch.floor(t)) - 0.5).abs() < 1e-4
        q = torch.where(tie & ((fq[:, j] - q).abs() == 1), fq[:, j], q)
        Q[:, j] = q
        err = (W[:, j] - (q - z) * s) / hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, hinv[j, j + 1:])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    q_orig = torch.empty_like(Q)
    q_orig[:, perm] = Q
    return q_orig, scales, zeros, followed


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_mse_observer_matches_brute_force_reference(act_order, symmetric):
    w, h = problem(seed=3 + act_order + 2 * symmetric)
    group = 32
    args = QuantArgs(bits=4, group_size=group, symmetric=symmetric, scale_dtype=torch.bfloat16, mse=True)
    res = gptq_quantize(w, h, args, GPTQParams(damp=0.01, block_size=64, act_order=act_order))
    assert res.fallback is None
    n = w.shape[1]
    if act_order:  # group-aware: groups by total diagonal, columns by diagonal inside (stable)
        d = torch.diag(h.double()).tolist()
        groups = sorted(range(n // group), key=lambda g: -sum(d[g * group:(g + 1) * group]))
        perm = torch.tensor([c for g in groups for c in sorted(range(g * group, (g + 1) * group),
                                                                key=lambda c: -d[c])])
    else:
        perm = torch.arange(n)
    q, scale, zero, followed = ref_gptq_mse(w, h, 4, group, symmetric, torch.bfloat16, res, perm)
    assert followed <= 3, f"{followed} group scales differ from the brute force beyond near-ties"
    assert torch.equal(res.scale.double(), scale)
    assert torch.equal(res.zero.double(), zero)
    same = (res.q.double() == q).double().mean().item()
    assert same >= 0.999 and (res.q.double() - q).abs().max() <= 1, same
    # and the search mattered: plain min/max scales differ in a good share of groups
    plain = gptq_quantize(w, h, QuantArgs(bits=4, group_size=group, symmetric=symmetric,
                                          scale_dtype=torch.bfloat16), GPTQParams(act_order=act_order))
    assert (plain.scale != res.scale).float().mean() > 0.2
