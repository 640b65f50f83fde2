"""RTN vs a naive loop over rows and groups."""
from __future__ import annotations

import pytest
import torch

from dist_quant.algorithms.rtn import rtn_quantize
from dist_quant.quant.qparams import QuantArgs

EPS32 = torch.finfo(torch.float32).eps


def ref_group(vals: list[float], bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """(integers, scale, zero) of one group, from the documented formulas."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    v = torch.tensor(vals, dtype=torch.float32)
    if symmetric:
        scale = v.abs().max() / ((qmax - qmin) / 2)
    else:
        lo, hi = min(v.min().item(), 0.0), max(v.max().item(), 0.0)
        scale = (torch.tensor(hi) - torch.tensor(lo)) / (qmax - qmin)
    scale = float(torch.tensor(max(float(scale), EPS32)).to(scale_dtype).float())
    zero = 0 if symmetric else int(min(max(qmin - round_half_even(lo / scale), qmin), qmax))
    q = [int(min(max(round_half_even(x / scale) + zero, qmin), qmax)) for x in v.tolist()]
    return q, scale, zero


def round_half_even(x: float) -> int:
    return int(round(x))  # Python's round() is half-to-even, like torch.round


def ref_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype):
    out_f, in_f = w.shape
    cols = in_f if group_size == -1 else group_size
    w_hat = torch.zeros(out_f, in_f, dtype=torch.float64)
    q_all = torch.zeros(out_f, in_f, dtype=torch.int64)
    scales = torch.zeros(out_f, in_f // cols, dtype=torch.float64)
    zeros = torch.zeros(out_f, in_f // cols, dtype=torch.int64)
    for r in range(out_f):
        for g in range(in_f // cols):
            vals = w[r, g * cols:(g + 1) * cols].tolist()
            q, s, z = ref_group(vals, bits, symmetric, scale_dtype)
            scales[r, g], zeros[r, g] = s, z
            for k, qi in enumerate(q):
                q_all[r, g * cols + k] = qi
                w_hat[r, g * cols + k] = (qi - z) * s
    return w_hat, q_all, scales, zeros


def make_weight(seed: int, out_f: int = 24, in_f: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[0] = 0.0
    w[1, :32] = 0.02
    w[2, 40] = 5.0
    w[3] = w[3].abs()
    w[4] = -w[4].abs()
    return w


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_matches_naive_loop(bits, group_size, symmetric, scale_dtype):
    w = make_weight(seed=bits * 100 + group_size + 7)
    args = QuantArgs(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    res = rtn_quantize(w, args)
    w_hat_ref, q_ref, s_ref, z_ref = ref_rtn(w, bits, group_size, symmetric, scale_dtype)

    n_groups = 1 if group_size == -1 else w.shape[1] // group_size
    assert res.q.dtype == torch.int8 and res.q.shape == w.shape
    assert res.scale.shape == (w.shape[0], n_groups) and res.zero.shape == (w.shape[0], n_groups)
    assert res.fallback is None
    assert torch.allclose(res.scale.double(), s_ref, rtol=1e-6, atol=0)
    assert torch.equal(res.zero.long(), z_ref)
    if scale_dtype == torch.bfloat16:
        assert torch.equal(res.scale.to(torch.bfloat16).float(), res.scale)

    # integers: identical except at exact .5 ties where float32 vs float64 division may differ
    diff = (res.q.long() - q_ref).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() <= 0.01, (diff > 0).sum()

    w_hat = res.dequantize(args)
    assert w_hat.dtype == torch.float32
    scale_cols = s_ref.repeat_interleave(w.shape[1] // n_groups, dim=1)
    tol = scale_cols * 1.0001 * diff + 1e-6 * w_hat_ref.abs() + 1e-12
    assert ((w_hat.double() - w_hat_ref).abs() <= tol).all()
    # error never larger than the quantizer's half step (plus bf16 scale-rounding slack)
    slack = 0.5 + ((2 ** bits - 1) * 2.0 ** -8 if scale_dtype == torch.bfloat16 else 1e-4)
    assert ((w_hat.double() - w.double()).abs() <= scale_cols * slack).all()
    assert (w_hat[0] == 0).all()


def test_rtn_input_dtypes_and_no_mutation():
    w = make_weight(seed=1).to(torch.bfloat16)
    w_before = w.clone()
    args = QuantArgs(bits=4, group_size=32, symmetric=False, scale_dtype=torch.bfloat16)
    res = rtn_quantize(w, args)
    assert torch.equal(w, w_before)
    w_hat_ref, _, _, _ = ref_rtn(w.float(), 4, 32, False, torch.bfloat16)
    diff = (res.dequantize(args).double() - w_hat_ref).abs()
    assert (diff > 1e-7).float().mean() < 0.01
