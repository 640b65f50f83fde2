"""Numerical safety: a Hessian that stays not positive definite after more damping gives a
logged fallback naming the module, through a whole run, and nothing non-finite is written;
integers, scales and zero points out of range are refused before the writer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main  # noqa: E402
from tiny import WIKI, make_tiny_model  # noqa: E402

from dist_quant.numerics import NumericalError, check_result  # noqa: E402
from dist_quant.quant.qparams import QuantArgs, QuantResult  # noqa: E402


def test_cholesky_failure_falls_back_logged_and_output_is_finite(tmp_path, monkeypatch, capsys):
    import dist_quant.algorithms.gptq as gptq
    calls = []
    real = gptq.inverse_cholesky_

    def failing_for_down_proj(h, work, damp, retries):  # down_proj is the only linear with 128 inputs
        if h.shape[0] == 128:
            calls.append(h.shape[0])
            return None, damp * 10**retries
        return real(h, work, damp, retries)

    monkeypatch.setattr(gptq, "inverse_cholesky_", failing_for_down_proj)
    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64, intermediate=128)
    calib = WIKI
    out, run = tmp_path / "out", tmp_path / "run"
    rc = call_main([f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
               "quant.group_size=32", f"output.dir={out}", f"runtime.run_dir={run}"])
    assert rc == 0, capsys.readouterr().err
    assert calls == [128, 128]
    log = (run / "rank0.log").read_text()
    for i in range(2):
        assert f"model.layers.{i}.mlp.down_proj: Hessian not positive definite" in log
        assert "used RTN" in log
    report = json.loads((out / "quant_report.json").read_text())
    fallbacks = {name for layer in report["layers"] for name, m in layer["modules"].items() if m["fallback"]}
    assert fallbacks == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    for f in out.glob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), name
            if name.endswith("weight_scale"):
                assert (t > 0).all(), name


def _result(q, scale, zero=None):
    return QuantResult(q=q, scale=scale, zero=torch.zeros_like(scale, dtype=torch.int8) if zero is None else zero)


@pytest.mark.parametrize("case", ["q_high", "q_low", "nan_scale", "zero_scale", "inf_scale", "f16_overflow",
                                  "zero_point"])
def test_check_result_refuses(case):
    args = QuantArgs(4, -1, symmetric=case != "zero_point", scale_dtype=torch.float16 if case == "f16_overflow"
                     else torch.float32)
    q = torch.zeros(4, 8, dtype=torch.int8)
    scale = torch.ones(4, 1)
    zero = None
    if case == "q_high":
        q[1, 2] = 8
    elif case == "q_low":
        q[0, 0] = -9
    elif case == "nan_scale":
        scale[2, 0] = float("nan")
    elif case == "zero_scale":
        scale[0, 0] = 0
    elif case == "inf_scale":
        scale[3, 0] = float("inf")
    elif case == "f16_overflow":
        scale[0, 0] = 1e5  # finite in float32, infinite in float16
    else:
        zero = torch.full((4, 1), 9, dtype=torch.int8)
    with pytest.raises(NumericalError, match="scale|integers|zero point"):
        check_result("model.layers.0.mlp.up_proj", _result(q, scale, zero), args)
    check_result("ok", _result(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1)), args)
