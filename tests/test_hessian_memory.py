"""Hessian memory: float64 sums that do not depend on how batches are split over ranks,
the float32 Hessian and the solver's workspace carved out of that same buffer, the
in-place permutation and factorization, and the row split of wide linears in the plan."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_quant.algorithms.gptq import (GPTQParams, gptq_quantize, gptq_quantize_, inverse_cholesky_,
                                        permute_symmetric_)
from dist_quant.plan import MIN_PIECE_ROWS, LinearInfo, row_pieces
from dist_quant.quant.qparams import QuantArgs
from dist_quant.stats import HessianStat, relative_output_error


pytestmark = pytest.mark.usefixtures("single_thread")  # solver bits as on one thread (tests/conftest.py)


def _batches(n_batches=6, tokens=300, features=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, features, generator=g) * (1 + torch.arange(features) / 10) for _ in range(n_batches)]
    masks = [torch.rand(tokens, generator=g) > 0.2 for _ in range(n_batches)]
    return xs, masks


def test_sums_do_not_depend_on_the_split_and_match_float64(monkeypatch):
    import dist_quant.stats as stats

    monkeypatch.setattr(stats, "TOKEN_CHUNK", 128)  # several chunks per batch
    monkeypatch.setattr(stats, "HESSIAN_ROW_BLOCK", 40)  # several row blocks
    xs, masks = _batches()
    one = HessianStat(96, torch.device("cpu"))
    for x, m in zip(xs, masks):
        one.add(x, m)
    a, b = HessianStat(96, torch.device("cpu")), HessianStat(96, torch.device("cpu"))
    for x, m in zip(xs[:2], masks[:2]):
        a.add(x, m)
    for x, m in zip(xs[2:], masks[2:]):
        b.add(x, m)
    assert torch.equal(a.packed() + b.packed(), one.packed())  # "2 ranks" reduced = 1 rank, bit for bit
    real = torch.cat([x[m] for x, m in zip(xs, masks)]).double()
    ref = real.T @ real
    assert one.tokens() == real.shape[0]
    assert torch.allclose(one.sum, ref, rtol=1e-6, atol=1e-3)


def test_chunks_without_padding_are_not_gathered_and_sum_the_same(monkeypatch):
    """A chunk whose tokens are all real is used as it is (no gather copy); the sums are the
    same bits as with no mask, and a partly padded batch still counts only its real tokens."""
    import dist_quant.stats as stats

    monkeypatch.setattr(stats, "TOKEN_CHUNK", 100)
    xs, _ = _batches(n_batches=2, tokens=300)
    full = torch.ones(300, dtype=torch.bool)
    part = full.clone()
    part[250:] = False  # the last chunk padded, the first two not
    masked, plain, padded = (HessianStat(96, torch.device("cpu")) for _ in range(3))
    for x in xs:
        masked.add(x, full)
        plain.add(x, None)
    padded.add(xs[0], part)
    assert torch.equal(masked.packed(), plain.packed())
    real = xs[0][:250].double()
    assert padded.tokens() == 250
    assert torch.allclose(padded.sum, real.T @ real, rtol=1e-6, atol=1e-3)
    gathered = []
    real_getitem = torch.Tensor.__getitem__

    def spy(self, key):
        if isinstance(key, torch.Tensor) and key.dtype == torch.bool:
            gathered.append(int(key.sum()))
        return real_getitem(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", spy)
    HessianStat(96, torch.device("cpu")).add(xs[0], part)
    assert gathered == [50]  # only the padded chunk was gathered


def test_take_converts_in_place_and_hands_out_the_other_half():
    xs, masks = _batches(features=200)
    stat = HessianStat(200, torch.device("cpu"))
    for x, m in zip(xs, masks):
        stat.add(x, m)
    real = torch.cat([x[m] for x, m in zip(xs, masks)]).double()
    ref = 2 * real.T @ real / real.shape[0]
    base, nbytes = stat.flat.data_ptr(), stat.flat.numel() * 8
    rounded = (stat.sum * (2.0 / stat.tokens())).float()  # what the in-place conversion must produce
    h, work = stat.take()
    assert h.dtype == work.dtype == torch.float32 and h.shape == work.shape == (200, 200)
    assert h.is_contiguous() and work.is_contiguous()
    for t in (h, work):  # both inside the reduced float64 buffer: no new Hessian-sized allocation
        assert base <= t.data_ptr() and t.data_ptr() + t.numel() * 4 <= base + nbytes
    assert work.data_ptr() == h.data_ptr() + 200 * 200 * 4
    assert torch.equal(h, rounded)
    assert torch.allclose(h.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())  # float32 batch GEMMs


def test_permute_symmetric_in_place(monkeypatch):
    import dist_quant.algorithms.gptq as gptq

    monkeypatch.setattr(gptq, "PERMUTE_CHUNK", 7)
    x = torch.randn(50, 37)
    h = x.T @ x
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(1))
    expected = h[perm][:, perm]
    ptr = h.data_ptr()
    permute_symmetric_(h, perm)
    assert h.data_ptr() == ptr and torch.equal(h, expected)


def test_inverse_cholesky_in_place_matches_float64_and_keeps_h():
    x = torch.randn(400, 120, dtype=torch.float64)
    h64 = 2 * x.T @ x / 400
    h = h64.float()
    before = h.clone()
    work = torch.empty_like(h)
    upper, lam = inverse_cholesky_(h, work, 0.01, 3)
    assert lam == 0.01 and torch.equal(h, before)
    assert upper.data_ptr() == work.data_ptr()  # the factor lives in the workspace
    damped = h64 + 0.01 * torch.diag(h64).mean() * torch.eye(120, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.allclose(upper.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max())
    assert torch.allclose(upper.double().T @ upper.double() @ damped, torch.eye(120, dtype=torch.float64),
                          atol=1e-3)


@pytest.mark.parametrize("act_order", [True, False])
def test_in_place_solve_equals_the_pure_one_and_restores_h(act_order):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3, 128)
    x[:, 5] = 0  # a dead input
    h = 2 * x.T @ x / 512
    w = torch.randn(48, 128, generator=g)
    args = QuantArgs(bits=4, group_size=32, symmetric=True)
    params = GPTQParams(act_order=act_order, block_size=32)
    pure = gptq_quantize(w, h.double(), args, params)
    h32 = h.clone()
    work = torch.empty_like(h32)
    mine = gptq_quantize_(w, h32, args, params, work)
    assert torch.equal(h32, h)  # restored bit for bit (permutation and dead diagonal undone)
    assert torch.equal(pure.q, mine.q) and torch.equal(pure.scale, mine.scale)
    err = relative_output_error(w, mine.dequantize(args), h)
    xd = x.double()
    ref = ((xd @ (w.double() - mine.dequantize(args).double()).T) ** 2).sum() / ((xd @ w.double().T) ** 2).sum()
    assert err == pytest.approx(float(ref), rel=1e-4)


def test_solve_holds_no_second_hessian():
    """Peak resident memory of an in-place solve with n = 2048 (H = 16 MB): the working
    weight and chunk-sized temporaries only, well under one more Hessian."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc (Linux)")

    def kb(key):
        for line in status.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        pytest.skip(f"no {key}")

    n, m = 2048, 64
    x = torch.randn(4 * n, n)
    h = 2 * x.T @ x / x.shape[0]
    del x
    work = torch.empty_like(h)
    work.fill_(0)  # resident before the measurement
    w = torch.randn(m, n)
    args = QuantArgs(bits=4, group_size=128, symmetric=True)
    # warm-up on the same shapes: the first solve in a process also grows the heap and MKL's
    # workspaces (one-time, measured 8-30 MB depending on what ran before); the Hessian is
    # restored bit for bit, so the measured call solves the same problem
    gptq_quantize_(w.clone(), h, args, GPTQParams(block_size=128), work)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    except OSError:
        pytest.skip("cannot reset VmHWM")
    base = kb("VmRSS")
    gptq_quantize_(w, h, args, GPTQParams(block_size=128), work)
    extra = (kb("VmHWM") - base) * 1024
    assert extra < 0.5 * h.numel() * 4, extra / 1e6


def _lin(name, out_f, in_f, stage="mlp_out"):
    return LinearInfo(name, 0, stage, out_f, in_f, False)


def test_row_pieces_split_a_lone_wide_linear_over_idle_ranks():
    # cost per owner n²·(n/3 + m/k) with n/3 = 4778.7, m = 4096: k = 1, 2, 3, 4 → 8874.7, 6826.7,
    # 6144.0, 5802.7; the 4th piece saves only 5.6 % (< 10 %), so 3 owners
    down = _lin("down", 4096, 14336)
    assert row_pieces([down], 8, "gptq") == {"down": 3}
    assert row_pieces([down], 2, "gptq") == {"down": 2}
    assert row_pieces([down], 8, "rtn") == {"down": 1}  # nothing to share in an elementwise solve
    narrow = _lin("o", MIN_PIECE_ROWS * 2 - 1, 4096)
    assert row_pieces([narrow], 8, "gptq") == {"o": 1}  # pieces keep MIN_PIECE_ROWS rows
    # the factorization dominates a short, very wide linear: splitting would not pay
    assert row_pieces([_lin("w", 256, 65536)], 4, "gptq") == {"w": 1}
    qkv = [_lin("q", 4096, 4096, "attn_in"), _lin("k", 1024, 4096, "attn_in"), _lin("v", 1024, 4096, "attn_in")]
    k = row_pieces(qkv, 8, "gptq")
    assert sum(k.values()) <= 8 and k["q"] > 1 and k["q"] >= k["k"]


def test_assign_owners_puts_pieces_on_distinct_ranks(tmp_path):
    from types import SimpleNamespace

    from dist_quant.arch import get_arch
    from dist_quant.plan import ModelPlan, assign_owners

    arch = get_arch("llama")
    lins = (_lin("model.layers.0.mlp.down_proj", 1024, 4096), _lin("model.layers.0.mlp.gate_proj", 4096, 1024,
                                                                  "mlp_in"),
            _lin("model.layers.0.mlp.up_proj", 4096, 1024, "mlp_in"))
    plan = ModelPlan(arch, 1, lins, ((),), (), True)
    info = SimpleNamespace(nbytes=1)
    ckpt = SimpleNamespace(tensors={lin.name + ".weight": info for lin in lins})
    owners = assign_owners(plan, ckpt, 4, "gptq")
    # down: n/3 = 1365.3, m = 1024 → per-owner cost 2389.3, 1877.3, 1706.7 for k = 1, 2, 3: the third
    # owner saves 9.1 % (< 10 %), so 2 pieces
    pieces = owners.pieces(lins[0])
    assert len(pieces) == 2 and len({p[0] for p in pieces}) == 2
    assert [(p[1], p[2]) for p in pieces] == [(0, 512), (512, 1024)]
    assert owners.owner[lins[0].name] == pieces[0][0]
    for lin in lins[1:]:  # gate/up: 2 linears on 4 ranks, each split in 2
        assert len({p[0] for p in owners.pieces(lin)}) == len(owners.pieces(lin)) == 2
    assert set(owners.solvers(lins[1])).isdisjoint(owners.solvers(lins[2]))


def test_half_precision_gemm_is_only_taken_where_it_runs(monkeypatch):
    """The half-precision Hessian GEMM (stats._gram_panel, CUDA only) is never tried for CPU or
    float32 activations, and a torch whose mm has no out_dtype falls back to the float32 GEMM
    for good (tests/test_cuda.py checks the values on a GPU)."""
    import dist_quant.stats as stats

    monkeypatch.setitem(stats._HALF_GEMM, "ok", None)
    assert not stats._half_inputs_ok(torch.ones(4, 2, dtype=torch.bfloat16))  # CPU
    assert stats._HALF_GEMM["ok"] is None  # not even probed
    fake = type("FakeCuda", (), {"dtype": torch.bfloat16, "device": torch.device("cuda", 0)})()
    calls = []

    def no_out_dtype(*args, **kwargs):
        calls.append(1)
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")

    monkeypatch.setattr(stats, "_gram_panel", no_out_dtype)
    monkeypatch.setattr(stats.torch, "ones", lambda *a, **k: torch.empty(0))  # the probe's tensor, on CPU here
    assert not stats._half_inputs_ok(fake) and not stats._half_inputs_ok(fake)
    assert stats._HALF_GEMM["ok"] is False and len(calls) == 1  # probed once
    monkeypatch.undo()
    stat = HessianStat(8, torch.device("cpu"))
    x = torch.randn(16, 8).bfloat16()
    stat.add(x)
    torch.testing.assert_close(stat.sum, x.double().T @ x.double(), rtol=1e-6, atol=1e-6)
