"""Helpers for tests that run dist_quant in real processes (torchrun, or ranks started by hand
the way srun starts them, with no launcher to stop the others)."""
from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                         "DIST_QUANT_TEST_FAIL", "MASTER_PORT")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


FAULT_MAIN = str(ROOT / "tests" / "fault_main.py")


def program(extra_env: dict) -> list[str]:
    """``-m dist_quant``, or the tests' entry point with fault injection (tests/faults.py)
    when ``DIST_QUANT_TEST_FAIL`` is set."""
    return [FAULT_MAIN] if extra_env.get("DIST_QUANT_TEST_FAIL") else ["-m", "dist_quant"]


def torchrun(nproc: int, overrides: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *program(extra_env), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**extra_env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def ranks(world: int, overrides: list[str], logdir: Path, **extra_env: str) -> list[subprocess.Popen]:
    """``world`` processes with RANK/WORLD_SIZE set, as a scheduler starts them (no agent)."""
    port = str(free_port())
    procs = []
    for r in range(world):
        e = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE=str(world),
                LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world), **extra_env)
        procs.append(subprocess.Popen([sys.executable, *program(extra_env), *overrides], cwd=ROOT, env=e,
                                      stdout=open(logdir / f"out{r}.txt", "w"), stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[float]:
    """Wait for every process; return the time (``time.time()``) at which each was seen to exit."""
    deadline = time.monotonic() + timeout
    ended: dict[int, float] = {}
    while len(ended) < len(procs):
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.time()
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise TimeoutError(f"processes still running after {timeout} s")
        time.sleep(0.05)
    return [ended[i] for i in range(len(procs))]


@contextlib.contextmanager
def isolated_main():
    """Around an in-process ``dist_quant.__main__.main``: afterwards restore torch's thread
    count and close the log handlers it opened."""
    import logging

    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        logger = logging.getLogger("dist_quant")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def call_main(argv: list[str]) -> int:
    """``dist_quant.__main__.main(argv)`` in this process (world size 1); output goes where
    this process's goes."""
    from dist_quant.__main__ import main

    with isolated_main():
        return main(argv)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``dist_quant.__main__.main(argv)`` in this process (world size 1): the same code path
    as ``python -m dist_quant`` without paying the imports again. Returns (exit code, stdout,
    stderr)."""
    from dist_quant.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with isolated_main(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()
