"""The fused GPTQ column kernel (issue 11: on a GPU the torch column loop is launch-bound;
dist_quant/algorithms/gptq_triton.py). The kernel itself is checked by Triton's interpreter on
CPU (tests/gptq_triton_checks.py, in a subprocess: ``TRITON_INTERPRET=1`` must precede the
import of triton); those tests skip where the package triton is not installed (.ci/run installs
it after the main suite and runs this file again). On a GPU, tests/test_cuda.py runs it compiled.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, job_env, run_main  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant.algorithms import gptq_triton  # noqa: E402
from dist_quant.config import ConfigError  # noqa: E402
from dist_quant.settings import load_config  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the package triton is not installed (.ci/run installs it "
                                  "after the main suite and runs this file again)")


@needs_triton
@pytest.mark.parametrize("check", ["segment", "rounding", "solve"])
def test_kernel_under_the_interpreter(check):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "gptq_triton_checks.py"), check],
                          env=job_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and f"ok {check}" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_auto_and_torch_select_the_torch_loop_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert gptq_triton.use_kernel("auto", cpu) is False
    assert gptq_triton.use_kernel("torch", cpu) is False
    with pytest.raises(ConfigError, match="quant.kernel=triton"):
        gptq_triton.use_kernel("triton", cpu)


def test_kernel_key_is_validated():
    with pytest.raises(ConfigError) as err:
        load_config(["quant.kernel=cuda"])
    assert "quant.kernel" in str(err.value) and "cuda" in str(err.value)
    assert load_config(["quant.kernel=torch"]).quant.kernel == "torch"


def test_triton_asked_for_on_cpu_is_one_error_before_any_work(tmp_path):
    model = make_tiny_model(tmp_path / "model", layers=1)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text(5_000))
    out = tmp_path / "out"
    code, stdout, stderr = run_main([f"model.path={model}", f"calib.path={calib}", "calib.num_samples=2",
                                     "calib.seq_len=16", "quant.kernel=triton", "runtime.device=cpu",
                                     f"output.dir={out}", f"runtime.run_dir={tmp_path / 'run'}"])
    assert code != 0
    assert "quant.kernel=triton" in stderr and "cuda" in stderr.lower(), stderr
    assert not out.exists()


def test_auto_falls_back_to_the_torch_loop_when_the_kernel_fails_its_check(monkeypatch, caplog):
    """``auto`` on a device where the kernel cannot build (an old Triton, an unsupported GPU):
    one warning naming the failure, and the torch loop runs; ``triton`` by name is not rescued."""
    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembler not found")

    monkeypatch.setattr(gptq_triton, "usable", lambda device: True)
    monkeypatch.setattr(gptq_triton, "quantize_segment_", broken)
    gptq_triton._self_check.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="dist_quant"):
            assert gptq_triton.use_kernel("auto", torch.device("cpu")) is False
            assert gptq_triton.use_kernel("auto", torch.device("cpu")) is False  # checked once
        warnings = [r.getMessage() for r in caplog.records if "fused Triton" in r.getMessage()]
        assert len(warnings) == 1 and "PTX assembler not found" in warnings[0], warnings
        assert gptq_triton.use_kernel("triton", torch.device("cpu")) is True
    finally:
        gptq_triton._self_check.cache_clear()


@needs_triton
def test_job_with_the_kernel_writes_the_torch_loops_checkpoint(tmp_path):
    """The whole pipeline with quant.kernel=triton (interpreted, CPU) against the same job with
    the torch loop: the kernel is reached through the stage API and the outputs agree
    (reference.assert_same_job: layer 0's integers, every linear's output error)."""
    from reference import assert_same_job

    model = make_tiny_model(tmp_path / "model", layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text(40_000))
    # 1,024 tokens: Hessians of full rank (128 inputs at most), a well-posed solve
    common = [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=16", "calib.seq_len=64",
              "quant.group_size=32", "runtime.threads=1", "runtime.device=cpu"]
    code, _, stderr = run_main([*common, "quant.kernel=torch", f"output.dir={tmp_path / 'torch'}",
                                f"runtime.run_dir={tmp_path / 'torch.run'}"])
    assert code == 0, stderr
    proc = subprocess.run([sys.executable, "-m", "dist_quant", *common, "quant.kernel=triton",
                           f"output.dir={tmp_path / 'triton'}", f"runtime.run_dir={tmp_path / 'triton.run'}"],
                          cwd=tmp_path, env=job_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert_same_job(tmp_path / "torch", tmp_path / "triton", 4, min_equal=0.999, error_rtol=0.01)
