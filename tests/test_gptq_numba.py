"""The compiled CPU column loop (issue 17; dist_quant/algorithms/gptq_numba.py): the same bits
as the torch loop, segment by segment and for whole solves (symmetric and asymmetric, grouped
and per channel, any number of row workers), and its selection by ``quant.kernel``."""
from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import run_main  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant.algorithms import gptq_numba  # noqa: E402
from dist_quant.algorithms.factor import random_factor  # noqa: E402
from dist_quant.algorithms.gptq import GPTQParams, column_kernel, gptq_quantize  # noqa: E402
from dist_quant.config import ConfigError  # noqa: E402
from dist_quant.quant.qparams import QuantArgs  # noqa: E402
from dist_quant.settings import load_config  # noqa: E402

pytest.importorskip("numba")
CPU = torch.device("cpu")


def reference_segment_(Wt, Qt, Et, U, s, z, qmin: int, qmax: int) -> None:
    """The inside of a sub-block as ``gptq.lazy_block_loop`` does it, written out in torch ops."""
    diag = U.diagonal().tolist()
    for i in range(Wt.shape[0]):
        col, q, err = Wt[i], Qt[i], Et[i]
        torch.div(col, s, out=q)
        q.round_()
        if z is None:
            q.clamp_(qmin, qmax)
            torch.mul(q, s, out=err)
        else:
            q.add_(z).clamp_(qmin, qmax)
            torch.sub(q, z, out=err).mul_(s)
        torch.sub(col, err, out=err)
        err.div_(diag[i])
        if i + 1 < Wt.shape[0]:
            Wt[i + 1:].sub_(U[i, i + 1:, None] * err)


def _factor_block(length: int, seed: int) -> torch.Tensor:
    return random_factor(length, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("length,rows", [(16, 96), (8, 257), (1, 5)])
def test_segment_is_the_torch_loop_bit_for_bit(symmetric, length, rows):
    g = torch.Generator().manual_seed(length * 1000 + rows)
    u = _factor_block(length, rows)
    wt = torch.randn(length, rows, generator=g) * 0.05
    s = torch.rand(rows, generator=g) * 0.01 + 0.002
    z = None if symmetric else torch.randint(0, 16, (rows,), generator=g).float()
    lo, hi = (-8, 7) if symmetric else (0, 15)
    got = [wt.clone(), torch.empty_like(wt), torch.empty_like(wt)]
    want = [wt.clone(), torch.empty_like(wt), torch.empty_like(wt)]
    gptq_numba.segment_(*got, u, s, z, lo, hi)
    reference_segment_(*want, u, s, z, lo, hi)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert bool(((got[1] >= lo) & (got[1] <= hi)).all()) and bool((got[1] == got[1].round()).all())


def _problem(out_f: int, in_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[0, :3] = 0.3  # outliers: clipping and clamping matter
    x = torch.randn(4 * in_f, in_f, generator=g) * torch.logspace(-1, 1, in_f)
    return w, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("group,symmetric,mse,act_order", [
    (32, True, True, True), (64, False, False, True), (-1, True, False, False), (32, False, True, False)])
@pytest.mark.parametrize("workers", [1, 3])
def test_whole_solve_same_bits_as_the_torch_loop(group, symmetric, mse, act_order, workers):
    w, h = _problem(400, 192)
    args = QuantArgs(4, group, symmetric, torch.bfloat16, mse=mse)
    base = GPTQParams(act_order=act_order, kernel="torch")
    want = gptq_quantize(w, h, args, base)
    got = gptq_quantize(w, h, args, replace(base, kernel="numba", workers=workers))
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
    assert torch.equal(got.err_rows, want.err_rows)
    assert (got.q.float() - w / 0.02).abs().mean() > 0  # a real solve, not a copy


def test_auto_selects_numba_on_cpu_and_torch_stays_torch():
    assert column_kernel("auto", CPU) == "numba"
    assert column_kernel("numba", CPU) == "numba"
    assert column_kernel("torch", CPU) == "torch"
    with pytest.raises(ConfigError, match="quant.kernel=numba"):
        column_kernel("numba", torch.device("meta"))


def test_without_numba_auto_falls_back_and_numba_is_an_error(monkeypatch):
    monkeypatch.setattr(gptq_numba, "_numba_importable", lambda: False)
    assert column_kernel("auto", CPU) == "torch"
    with pytest.raises(ConfigError, match="not importable"):
        column_kernel("numba", CPU)


def test_a_kernel_that_fails_its_check_is_not_used(monkeypatch, caplog):
    right = gptq_numba.segment_

    def wrong(Wt, Qt, Et, U, s, z, qmin, qmax):
        right(Wt, Qt, Et, U, s, z, qmin, qmax)
        Qt[0, 0] += 1
    monkeypatch.setattr(gptq_numba, "segment_", wrong)
    gptq_numba._self_check.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dist_quant"):
            assert column_kernel("auto", CPU) == "torch"
        assert "numba GPTQ column kernel failed its check" in caplog.text
    finally:
        gptq_numba._self_check.cache_clear()


def test_kernel_key_accepts_numba():
    assert load_config(["quant.kernel=numba"]).quant.kernel == "numba"


def test_numba_and_torch_jobs_write_the_same_tensors(tmp_path):
    from safetensors.torch import load_file

    model = make_tiny_model(tmp_path / "model", layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text(8_000))
    outs = {}
    for kernel in ("torch", "numba"):
        out = tmp_path / kernel
        code, _, stderr = run_main([f"model.path={model}", f"calib.path={calib}", "calib.num_samples=4",
                                    "calib.seq_len=64", "quant=gptq_w4a16", "quant.group_size=32",
                                    f"quant.kernel={kernel}", f"output.dir={out}",
                                    f"runtime.run_dir={tmp_path / (kernel + '.run')}"])
        assert code == 0, stderr[-3000:]
        outs[kernel] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert outs["torch"].keys() == outs["numba"].keys() and any(k.endswith("weight_packed") for k in outs["torch"])
    for k, v in outs["torch"].items():
        assert torch.equal(v, outs["numba"][k]), k
