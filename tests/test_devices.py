"""Devices and backends: ``runtime.device=auto|cpu|cuda|npu``, ``runtime.backend=auto|gloo|nccl|hccl``.

* torch_npu is imported only when an NPU is asked for (or ``auto`` finds it installed), and a
  missing or broken torch_npu is one clear line, exit 2;
* the hccl path runs on CPU: a fake ``hccl`` backend (gloo underneath, registered inside each
  rank by ``tests/fake_hccl_main.py``) carries the process group of a 2-rank job with
  ``runtime.device=cpu runtime.backend=hccl``; the CPU-tensor collectives go over the extra
  gloo group, and the result equals the same job on one rank."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import assert_same_solution, read_quant_linears  # noqa: E402
from helpers import REPO, free_ports, job_env, run_main  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant.config import ConfigError  # noqa: E402
from dist_quant.runtime import Comm, DeviceError, RankInfo, resolve_backend, resolve_device  # noqa: E402

OVERRIDES = ["calib.num_samples=8", "calib.seq_len=32", "calib.batch_size=4", "quant.group_size=32",
             "runtime.threads=1"]


@pytest.fixture
def broken_torch_npu(tmp_path, monkeypatch):
    """A ``torch_npu`` that is installed but fails to import (no CANN), recording attempts."""
    pkg = tmp_path / "site" / "torch_npu"
    pkg.mkdir(parents=True)
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('x')\n"
        "raise ImportError('libhccl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    return marker


def test_cpu_never_imports_torch_npu(broken_torch_npu):
    assert resolve_device("cpu", 0) == torch.device("cpu")
    assert not broken_torch_npu.exists()


def test_auto_falls_back_to_cpu_when_torch_npu_is_broken(broken_torch_npu, caplog):
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    logger = logging.getLogger("dist_quant")  # may not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        assert resolve_device("auto", 0) == torch.device("cpu")
    finally:
        logger.removeHandler(caplog.handler)
    assert broken_torch_npu.exists()
    assert "torch_npu is installed but unusable" in caplog.text


def test_npu_with_broken_torch_npu_is_a_one_line_error(broken_torch_npu):
    with pytest.raises(DeviceError) as info:
        resolve_device("npu", 0)
    message = str(info.value)
    assert "\n" not in message and "torch_npu" in message and "libhccl.so" in message
    assert isinstance(info.value, ConfigError)  # a user error: exit 2, no traceback


def test_cuda_without_gpu_is_a_device_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="runtime.device='cuda'"):
        resolve_device("cuda", 0)


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "gloo"
    assert resolve_backend("gloo", cpu) == "gloo"
    with pytest.raises(DeviceError, match="nccl"):
        resolve_backend("nccl", cpu)
    if not hasattr(dist.Backend, "HCCL"):  # nothing registered hccl in this process
        with pytest.raises(DeviceError, match="hccl"):
            resolve_backend("hccl", cpu)


def test_comm_sends_cpu_tensors_over_the_cpu_group():
    comm = Comm(RankInfo(), torch.device("cpu"), "hccl")
    comm._cpu_group = marker = object()
    assert comm._group(torch.zeros(1)) is marker
    assert comm._group(torch.zeros(1, device="meta")) is None  # accelerator tensors: the main group


def test_cli_npu_without_torch_npu_exits_2_with_one_line(tmp_path):
    if _torch_npu_importable():
        pytest.skip("torch_npu is importable here")
    res = subprocess.run([sys.executable, "-m", "dist_quant", f"model.path={tmp_path}", "runtime.device=npu"],
                         cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: runtime.device='npu' needs torch_npu"), res.stderr
    assert "Traceback" not in res.stderr


def _torch_npu_importable() -> bool:
    try:
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return True


# -- the hccl path on CPU, end to end --------------------------------------------------------------
def test_hccl_backend_two_ranks_on_cpu(tmp_path):
    model = make_tiny_model(tmp_path / "model", layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text(40_000))
    common = [f"model.path={model}", f"calib.path={calib}", *OVERRIDES]
    run2, out2 = tmp_path / "run-hccl", tmp_path / "out-hccl"
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "tests" / "fake_hccl_main.py"),
         *common, "runtime.device=cpu", "runtime.backend=hccl", f"output.dir={out2}", f"runtime.run_dir={run2}"],
        cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # meanwhile, the same job on one rank (gloo, in this process) as the reference
    out1 = tmp_path / "out-one"
    code, stdout, stderr = run_main([*common, f"output.dir={out1}", f"runtime.run_dir={tmp_path / 'run-one'}"])
    assert code == 0, stderr
    stdout2, stderr2 = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"--- stdout\n{stdout2[-3000:]}\n--- stderr\n{stderr2[-6000:]}"

    assert stderr2.count("fake hccl process group: rank") == 2  # the job's group is the hccl one
    log0 = (run2 / "rank0.log").read_text()
    assert "world size 2 (torchrun), device cpu, backend hccl" in log0
    report = json.loads((out2 / "quant_report.json").read_text())
    assert report["world_size"] == 2 and set(report["owner_plan"].values()) == {0, 1}

    one, _ = read_quant_linears(out1, 4)
    two, _ = read_quant_linears(out2, 4)
    assert set(one) == set(two)
    same = total = 0
    for name in one:  # reduction order differs (ranks, threads): see reference.assert_same_solution
        assert_same_solution(one[name], two[name], 0.99, name, scale_rtol=1e-5)
        same += int((one[name].q == two[name].q).sum())
        total += one[name].q.numel()
    assert same / total >= 0.999
    errors = {m: i["rel_output_error"] for layer in report["layers"] for m, i in layer["modules"].items()}
    ref = json.loads((out1 / "quant_report.json").read_text())
    for layer in ref["layers"]:
        for m, info in layer["modules"].items():
            assert errors[m] == pytest.approx(info["rel_output_error"], rel=1e-3, abs=1e-9), m
            assert info["tokens"] == 8 * 32
