"""Running dist_quant jobs for the MoE tests: one rank inside the test process (the same
code path as ``python -m dist_quant``, without paying the imports again), or N ranks as real
processes under ``torch.distributed.run`` with the instrumented reader of
tests/moe_trace_main.py."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from helpers import REPO, free_port, isolated_main, job_env

TRACE = Path(__file__).resolve().parent / "moe_trace_main.py"


def run_inprocess(model: Path, out: Path, args: list[str], *extra: str, capture: bool = False):
    """One-rank job in this process; with ``capture``, the hidden states after every layer
    and the calibration set."""
    from dist_quant.__main__ import main
    from dist_quant.pipeline import LayerwiseQuantizer

    seen = SimpleNamespace(xs={}, calib=None)
    orig_layer, orig_run = LayerwiseQuantizer._layer, LayerwiseQuantizer.run

    def _layer(self, layer, index, *a, **k):
        result = orig_layer(self, layer, index, *a, **k)  # (xs, what a layer solver carries)
        seen.xs[index] = torch.cat([x.detach().clone() for x in result[0]])
        return result

    def _run(self, calib, *a, **k):
        seen.calib = calib
        return orig_run(self, calib, *a, **k)

    overrides = [f"model.path={model}", *args, f"output.dir={out}", f"runtime.run_dir={out}.run",
                 "runtime.threads=1", *extra]
    err = io.StringIO()
    if capture:
        LayerwiseQuantizer._layer, LayerwiseQuantizer.run = _layer, _run
    try:
        with isolated_main(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(overrides)
    finally:
        LayerwiseQuantizer._layer, LayerwiseQuantizer.run = orig_layer, orig_run
    assert rc == 0, err.getvalue()[-3000:]
    seen.report = json.loads((out / "quant_report.json").read_text())
    seen.log = (Path(f"{out}.run") / "rank0.log").read_text()
    seen.out = out
    return seen


def start_ranks(model: Path, out: Path, args: list[str], nproc: int, trace: Path,
                run_dir: Path | None = None, env_extra: dict | None = None) -> SimpleNamespace:
    """``torch.distributed.run --nproc_per_node=nproc tests/moe_trace_main.py …`` in the background."""
    run_dir = Path(run_dir or f"{out}.run")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(TRACE), f"model.path={model}", *args,
           f"output.dir={out}", f"runtime.run_dir={run_dir}", "runtime.threads=1"]
    env = job_env(TRACE_DIR=str(trace), **(env_extra or {}))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return SimpleNamespace(out=out, run_dir=run_dir, trace=trace, proc=proc, t0=time.time())


def finish(job, timeout: float = 900) -> SimpleNamespace:
    _, job.stderr = job.proc.communicate(timeout=timeout)
    job.rc, job.seconds = job.proc.returncode, time.time() - job.t0
    if job.rc == 0:
        job.report = json.loads((job.out / "quant_report.json").read_text())
    return job
