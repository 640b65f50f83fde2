"""The output error GPTQ reports without a GEMM (``QuantResult.err_rows``, the sum of its
squared column errors less the damping's share) against ``‖X(W−Ŵ)ᵀ‖²`` computed from the
inputs themselves, per row: integer groups, per channel, the FP8 and NVFP4 grids, a dead
input, and a singular Hessian (fewer tokens than inputs: only the dampening makes it definite)."""
from __future__ import annotations

import pytest
import torch

from dist_quant.algorithms.gptq import GPTQParams, gptq_quantize
from dist_quant.quant.qparams import QuantArgs
from dist_quant.stats import quantized_output_error

pytestmark = pytest.mark.usefixtures("single_thread")


def problem(rank_deficient: bool = False):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 128, generator=g) * 0.02
    x = torch.randn(1024, 128, generator=g) * (10 ** (torch.rand(128, generator=g) * 2 - 1))
    x[:, 7] = 0.0  # a dead input
    if rank_deficient:  # 40 tokens for 128 inputs: H is singular before damping
        x = x[:40]
    return w, x, (2.0 / x.shape[0]) * (x.T.double() @ x.double()).float()


@pytest.mark.parametrize("grid,group", [("int", 64), ("int", -1), ("fp8", -1), ("nvfp4", 16)])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_err_rows_equal_the_output_error_on_the_inputs(grid, group, rank_deficient):
    w, x, h = problem(rank_deficient)
    args = QuantArgs(bits=4, group_size=group, symmetric=True, scale_dtype=torch.bfloat16, mse=grid == "int", grid=grid)
    r = gptq_quantize(w, h, args, GPTQParams(damp=0.01))
    assert r.err_rows is not None and r.err_rows.dtype == torch.float64
    x64 = x.double()
    ref = (2.0 / x.shape[0]) * (x64 @ (w.double() - r.dequantize(args).double()).T).pow(2).sum(dim=0)
    assert torch.allclose(r.err_rows, ref, rtol=1e-4, atol=1e-12)
    num, den = quantized_output_error(w, r, args, h)
    assert num == pytest.approx(float(ref.sum()), rel=1e-5)
    assert den == pytest.approx(float((2.0 / x.shape[0]) * (x64 @ w.double().T).pow(2).sum()), rel=1e-5)
    parts = r.split([40, 56])  # a stacked solve's modules keep their rows' errors
    assert torch.equal(torch.cat([p.err_rows for p in parts]), r.err_rows)


@pytest.mark.parametrize("workers", [1, 2])
def test_denominator_computed_during_the_loop_when_a_core_is_idle(workers):
    """With two workers the denominator ``(W H Wᵀ)_rr`` is computed in a thread while the
    column loop runs (``den_rows``); it is the output energy of the float weights on the inputs,
    and the integers do not depend on it."""
    w, x, h = problem()
    args = QuantArgs(bits=4, group_size=64, symmetric=True, scale_dtype=torch.bfloat16, mse=True)
    r = gptq_quantize(w, h, args, GPTQParams(damp=0.01, workers=workers))
    ref = (2.0 / x.shape[0]) * (x.double() @ w.double().T).pow(2).sum(dim=0)
    if workers == 1:
        assert r.den_rows is None
    else:
        assert r.den_rows is not None and torch.allclose(r.den_rows, ref, rtol=1e-5)
        parts = r.split([40, 56])
        assert torch.equal(torch.cat([p.den_rows for p in parts]), r.den_rows)
    one = gptq_quantize(w, h, args, GPTQParams(damp=0.01, workers=1))
    assert torch.equal(r.q, one.q) and torch.equal(r.scale, one.scale)
    assert quantized_output_error(w, r, args, h)[1] == pytest.approx(float(ref.sum()), rel=1e-5)
