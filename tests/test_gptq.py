"""GPTQ vs the textbook OBQ/GPTQ recursion (explicit inverse Hessian, float64, no blocking)."""
from __future__ import annotations

import pytest
import torch

from dist_quant.algorithms.gptq import GPTQParams, column_order, gptq_quantize
from dist_quant.algorithms.rtn import rtn_quantize
from dist_quant.quant.qparams import QuantArgs

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These are many small sequential ops: intra-op threads only add overhead (and stall
    badly on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------
def ref_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """Per-row (scale, zero) for a [rows, cols] float64 block, documented min/max formulas."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale = w.abs().amax(dim=1) / ((qmax - qmin) / 2)
        lo = None
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.clamp(min=EPS32).to(scale_dtype).double()
    if symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


TIE_TOL = 1e-4  # in quantization steps


def ref_gptq(W, H, bits, group_size, symmetric, damp=0.01, scale_dtype=torch.float32,
             follow=None):
    """Straightforward GPTQ: quantize column j, spread its error with the explicit inverse
    Hessian, then eliminate j from the inverse. Returns (q, scales, zeros, w_hat, n_forced)
    in the given column order (groups = consecutive columns).

    ``follow`` (integers of the implementation under test, same column order) is used only
    to break *exact rounding ties*: where ``w/scale`` is within ``TIE_TOL`` steps of ``k + ½``
    both neighbours are correct, and float32 vs float64 decides which one comes out (e.g.
    symmetric ``-max|w|/scale = -7.5`` exactly). Without it one tie flips the error that is
    fed forward and the rest of that row drifts apart from the reference. Everywhere else
    the reference rounds on its own; ``n_forced`` counts the followed ties other than the
    structural symmetric ones at a group's extreme."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    W = W.double().clone()
    H = H.double().clone()
    out_f, n = W.shape
    for j in range(n):  # dead inputs: no signal, weight irrelevant → zero it
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    mean_diag = sum(H[j, j].item() for j in range(n)) / n
    Hinv = torch.linalg.inv(H + damp * mean_diag * torch.eye(n, dtype=torch.float64))
    cols = n if group_size == -1 else group_size
    Q = torch.zeros(out_f, n, dtype=torch.float64)
    W_hat = torch.zeros(out_f, n, dtype=torch.float64)
    scales = torch.zeros(out_f, n // cols, dtype=torch.float64)
    zeros = torch.zeros(out_f, n // cols, dtype=torch.float64)
    n_forced = 0
    for j in range(n):
        if j % cols == 0:
            s, z = ref_params(W[:, j:j + cols], bits, symmetric, scale_dtype)
            scales[:, j // cols], zeros[:, j // cols] = s, z
        t = W[:, j] / s
        q = (torch.round(t) + z).clamp(qmin, qmax)
        if follow is not None:
            near_tie = ((t - torch.floor(t)) - 0.5).abs() < TIE_TOL
            lo_c = (torch.floor(t) + z).clamp(qmin, qmax)
            hi_c = (torch.ceil(t) + z).clamp(qmin, qmax)
            f = follow[:, j].double()
            take = near_tie & ((f == lo_c) | (f == hi_c)) & (f != q)
            q = torch.where(take, f, q)
            # structural tie (not counted): symmetric ±max|w| of a fresh group is ±(qmax-qmin)/2
            structural = (j % cols == 0) & symmetric & ((t.abs() - (qmax - qmin) / 2).abs() < TIE_TOL)
            n_forced += int((take & ~structural).sum())
        w_hat = (q - z) * s
        Q[:, j], W_hat[:, j] = q, w_hat
        err = (W[:, j] - w_hat) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q, scales, zeros, W_hat, n_forced


def ref_group_aware_order(diag: torch.Tensor, group_size: int) -> list[int]:
    """Groups by descending total diagonal, columns by descending diagonal inside each."""
    d = diag.tolist()
    n = len(d)
    groups = list(range(n // group_size))
    groups.sort(key=lambda g: -sum(d[g * group_size:(g + 1) * group_size]))
    order = []
    for g in groups:
        members = list(range(g * group_size, (g + 1) * group_size))
        members.sort(key=lambda c: -d[c])
        order += members
    return order


# ----------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------
def make_problem(seed: int, out_f: int = 64, in_f: int = 128, n_samples: int = 512,
                 correlated: bool = True):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n_samples, in_f, generator=g, dtype=torch.float64)
    if correlated:
        A = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / in_f ** 0.5
        A += torch.eye(in_f, dtype=torch.float64)
        X = Z @ A
    else:
        X = Z
    X = X * (0.5 + torch.rand(in_f, generator=g, dtype=torch.float64))  # distinct diagonal
    H = 2 * X.T @ X / n_samples
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    return W.float(), H.float()


def proxy_loss(W, W_hat, H) -> float:
    d = (W_hat.double() - W.double())
    return float(((d @ H.double()) * d).sum())


def run_reference(res, W, H, bits, group_size, symmetric, perm=None, **kw):
    """Reference on the problem permuted by ``perm`` (processing order), mapped back to the
    original column order and original group numbering."""
    n = W.shape[1]
    perm = torch.arange(n) if perm is None else torch.as_tensor(perm)
    follow = res.q.double()[:, perm]
    q_p, s_p, z_p, w_hat_p, n_forced = ref_gptq(W[:, perm], H[perm][:, perm], bits, group_size,
                                                symmetric, follow=follow, **kw)
    assert n_forced <= max(4, 5e-4 * q_p.numel()), f"{n_forced} ties followed: not just ties"
    q_ref, w_hat_ref = torch.empty_like(q_p), torch.empty_like(w_hat_p)
    q_ref[:, perm], w_hat_ref[:, perm] = q_p, w_hat_p
    cols = n if group_size == -1 else group_size
    s_ref, z_ref = torch.empty_like(s_p), torch.empty_like(z_p)
    for k in range(n // cols):  # processed group k holds original group perm[k*cols] // cols
        g = int(perm[k * cols]) // cols
        s_ref[:, g], z_ref[:, g] = s_p[:, k], z_p[:, k]
    return q_ref, s_ref, z_ref, w_hat_ref


def assert_matches_reference(res, q_ref, s_ref, z_ref):
    q = res.q.double()
    diff = (q - q_ref).abs()
    assert diff.max() <= 1, f"max |Δq| = {diff.max()}"
    match = (diff == 0).double().mean().item()
    assert match >= 0.999, f"only {match:.5f} of integers match"
    assert torch.allclose(res.scale.double(), s_ref, rtol=1e-5, atol=0), \
        (res.scale.double() / s_ref - 1).abs().max()
    assert torch.equal(res.zero.double(), z_ref) or \
        ((res.zero.double() - z_ref).abs() <= 1).all() and (res.zero.double() != z_ref).double().mean() < 1e-3


SETTINGS = [
    (bits, gs, sym, bs)
    for bits in (4, 8)
    for gs in (-1, 32, 64)
    for sym in (True, False)
    for bs in (32, 128)
]


def _id(p):
    bits, gs, sym, bs = p
    return f"b{bits}-g{gs}-{'sym' if sym else 'asym'}-blk{bs}"


# ----------------------------------------------------------------------------------------
# Equivalence with the reference
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", SETTINGS, ids=_id)
def test_no_act_order_matches_reference(p):
    bits, gs, sym, bs = p
    W, H = make_problem(seed=bits + gs + 3 * sym + bs, in_f=256)
    args = QuantArgs(bits=bits, group_size=gs, symmetric=sym)
    res = gptq_quantize(W, H, args, GPTQParams(block_size=bs, act_order=False))
    assert res.fallback is None
    q_ref, s_ref, z_ref, _ = run_reference(res, W, H, bits, gs, sym)
    assert_matches_reference(res, q_ref, s_ref, z_ref)


def test_no_act_order_bf16_scales_and_damp():
    W, H = make_problem(seed=5)
    args = QuantArgs(bits=4, group_size=32, symmetric=False, scale_dtype=torch.bfloat16)
    res = gptq_quantize(W, H, args, GPTQParams(block_size=64, act_order=False, damp=0.1))
    q_ref, s_ref, z_ref, _ = run_reference(res, W, H, 4, 32, False, damp=0.1,
                                           scale_dtype=torch.bfloat16)
    assert torch.equal(res.scale.to(torch.bfloat16).float(), res.scale)
    diff = (res.q.double() - q_ref).abs()
    assert diff.max() <= 1 and (diff == 0).double().mean() >= 0.999
    # bf16 rounding of nearly equal float32/float64 values may land one bf16 ulp apart
    assert torch.allclose(res.scale.double(), s_ref, rtol=2 ** -7, atol=0)
    assert (res.scale.double() == s_ref).double().mean() > 0.99


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_per_channel_matches_permuted_reference(bits, sym):
    W, H = make_problem(seed=11 + bits + sym, in_f=128)
    args = QuantArgs(bits=bits, group_size=-1, symmetric=sym)
    res = gptq_quantize(W, H, args, GPTQParams(block_size=32, act_order=True))
    assert res.fallback is None
    perm = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(column_order(torch.diag(H).double(), args, True), perm)
    q_ref, s_ref, z_ref, _ = run_reference(res, W, H, bits, -1, sym, perm=perm)
    assert_matches_reference(res, q_ref, s_ref, z_ref)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gs", [16, 32])
def test_act_order_groups_are_group_aware(gs, sym):
    bits = 4
    W, H = make_problem(seed=21 + gs + sym, in_f=128)
    n = W.shape[1]
    args = QuantArgs(bits=bits, group_size=gs, symmetric=sym)
    diag = torch.diag(H)

    perm = column_order(diag, args, True)
    assert sorted(perm.tolist()) == list(range(n))
    assert perm.tolist() == ref_group_aware_order(diag, gs)
    for k in range(n // gs):  # every processed group is exactly one original group
        orig_groups = {c // gs for c in perm[k * gs:(k + 1) * gs].tolist()}
        assert len(orig_groups) == 1
    assert not torch.equal(perm, torch.arange(n))  # the test actually reorders something

    res = gptq_quantize(W, H, args, GPTQParams(block_size=64, act_order=True))
    assert res.fallback is None
    assert res.scale.shape == (W.shape[0], n // gs)

    p = ref_group_aware_order(diag, gs)
    q_ref, s_ref, z_ref, w_hat_ref = run_reference(res, W, H, bits, gs, sym, perm=p)
    assert_matches_reference(res, q_ref, s_ref, z_ref)
    # the checkpoint needs no g_idx: plain group-wise dequantization reproduces the solver's ŵ
    w_hat = res.dequantize(args).double()
    close = (w_hat - w_hat_ref).abs() <= 1e-6 + 1e-5 * w_hat_ref.abs()
    assert close.double().mean() >= 0.999


# ----------------------------------------------------------------------------------------
# Quality: GPTQ beats RTN on its own objective
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gs", [-1, 32])
def test_gptq_proxy_loss_below_rtn(gs, sym, act_order):
    g = torch.Generator().manual_seed(100 + gs + sym)
    in_f, out_f, n = 128, 96, 1024
    Z = torch.randn(n, in_f, generator=g)
    A = torch.randn(in_f, in_f, generator=g)
    X = Z @ A
    H = 2 * X.T @ X / n
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    args = QuantArgs(bits=4, group_size=gs, symmetric=sym)
    res = gptq_quantize(W, H, args, GPTQParams(act_order=act_order, block_size=32))
    assert res.fallback is None
    loss_gptq = proxy_loss(W, res.dequantize(args), H)
    loss_rtn = proxy_loss(W, rtn_quantize(W, args).dequantize(args), H)
    assert loss_gptq < 0.8 * loss_rtn, (loss_gptq, loss_rtn)


# ----------------------------------------------------------------------------------------
# Numerical safety
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("gs", [-1, 32])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_dead_inputs_give_zero_weights(sym, gs, act_order):
    g = torch.Generator().manual_seed(7)
    in_f, out_f, n = 128, 32, 256
    X = torch.randn(n, in_f, generator=g)
    dead = [0, 5, 77, 127]
    X[:, dead] = 0.0
    H = 2 * X.T @ X / n
    assert (torch.diag(H)[dead] == 0).all()
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    W[:, 5] = 10.0  # a large weight on a dead input must not leak into the scales
    args = QuantArgs(bits=4, group_size=gs, symmetric=sym)
    res = gptq_quantize(W, H, args, GPTQParams(act_order=act_order, block_size=32))
    assert res.fallback is None
    w_hat = res.dequantize(args)
    assert torch.isfinite(res.scale).all() and torch.isfinite(w_hat).all()
    assert (w_hat[:, dead] == 0).all()
    assert res.scale.max() < 0.1  # the 10.0 on the dead input did not set any scale
    if not act_order:
        q_ref, s_ref, z_ref, _ = run_reference(res, W, H, 4, gs, sym)
        assert_matches_reference(res, q_ref, s_ref, z_ref)


def test_all_inputs_dead():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    H = torch.zeros(64, 64)
    for sym in (True, False):
        args = QuantArgs(bits=4, group_size=32, symmetric=sym)
        res = gptq_quantize(W, H, args, GPTQParams())
        assert torch.isfinite(res.scale).all()
        assert (res.dequantize(args) == 0).all()


@pytest.mark.parametrize("gs", [-1, 32])
def test_indefinite_hessian_falls_back_to_rtn(gs):
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    H = -torch.eye(64)
    args = QuantArgs(bits=4, group_size=gs, symmetric=False)
    res = gptq_quantize(W, H, args, GPTQParams())
    assert res.fallback is not None and "RTN" in res.fallback
    assert torch.isfinite(res.scale).all() and torch.isfinite(res.dequantize(args)).all()
    rtn = rtn_quantize(W, args)
    assert torch.equal(res.q, rtn.q) and torch.equal(res.scale, rtn.scale) and torch.equal(res.zero, rtn.zero)


def test_nan_hessian_falls_back():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    _, H = make_problem(seed=3, in_f=64)
    H[3, 4] = H[4, 3] = float("nan")
    args = QuantArgs(bits=4, group_size=32)
    res = gptq_quantize(W, H, args, GPTQParams())
    assert res.fallback is not None
    assert torch.isfinite(res.dequantize(args)).all()


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
def test_rank_deficient_hessian_succeeds_with_damping(act_order):
    g = torch.Generator().manual_seed(9)
    in_f, out_f, n = 128, 32, 16  # 16 samples: rank(H) = 16 ≪ 128
    X = torch.randn(n, in_f, generator=g, dtype=torch.float64)
    H = (2 * X.T @ X / n).float()
    assert torch.linalg.matrix_rank(H.double(), hermitian=True, rtol=1e-5) <= n
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    args = QuantArgs(bits=4, group_size=32, symmetric=True)
    res = gptq_quantize(W, H, args, GPTQParams(act_order=act_order, block_size=32))
    assert res.fallback is None
    w_hat = res.dequantize(args)
    assert torch.isfinite(w_hat).all() and torch.isfinite(res.scale).all()
    assert proxy_loss(W, w_hat, H) < proxy_loss(W, rtn_quantize(W, args).dequantize(args), H)
    if not act_order:
        q_ref, s_ref, z_ref, _ = run_reference(res, W, H, 4, 32, True)
        assert_matches_reference(res, q_ref, s_ref, z_ref)


def test_input_not_mutated_and_dtypes():
    W, H = make_problem(seed=4)
    W16 = W.to(torch.bfloat16)
    W_before, H_before = W16.clone(), H.clone()
    args = QuantArgs(bits=4, group_size=32, scale_dtype=torch.bfloat16)
    res = gptq_quantize(W16, H, args, GPTQParams())
    assert torch.equal(W16, W_before) and torch.equal(H, H_before)
    assert res.q.dtype == torch.int8 and res.zero.dtype == torch.int8
    assert res.scale.dtype == torch.float32 and res.q.shape == W.shape
    assert res.q.min() >= -8 and res.q.max() <= 7
