"""The tests' one helpers module: running dist_quant (in this process, as one process, under
torchrun, or as ranks started by hand the way srun starts them), ports, the environment of a
child process, and job bookkeeping. Independent reference math lives in ``tests/reference.py``."""
from __future__ import annotations

import contextlib
import io
import os
import hashlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (sockets held until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "DIST_QUANT_TEST_FAIL")


def job_env(quiet: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a dist_quant child process: this repository first on PYTHONPATH, no
    hub access, no launcher variables inherited from the test process; ``quiet``: one thread
    and no progress bars (the job tests), else progress as a user sees it."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if quiet:
        env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.update(extra)
    return env


FAULT_MAIN = str(ROOT / "tests" / "fault_main.py")


def program(extra_env: dict) -> list[str]:
    """``-m dist_quant``, or the tests' entry point with fault injection (tests/faults.py)
    when ``DIST_QUANT_TEST_FAIL`` is set."""
    return [FAULT_MAIN] if extra_env.get("DIST_QUANT_TEST_FAIL") else ["-m", "dist_quant"]


def torchrun(nproc: int, overrides: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *program(extra_env), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=job_env(quiet=False, **extra_env), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def ranks(world: int, overrides: list[str], logdir: Path, **extra_env: str) -> list[subprocess.Popen]:
    """``world`` processes with RANK/WORLD_SIZE set, as a scheduler starts them (no agent)."""
    port = str(free_port())
    procs = []
    for r in range(world):
        e = job_env(quiet=False, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE=str(world),
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


def command(overrides: list[str], nproc: int = 1, port: int | None = None) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dist_quant", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "dist_quant", *overrides]


def check_done(job) -> Path:
    """``job.out`` of a run that exited 0 and printed ``done: <out>`` (fails the calling test
    otherwise, with the ends of its stdout and stderr). ``job`` has name, returncode, stdout,
    stderr and out."""
    assert job.returncode == 0, (f"{job.name}: exit {job.returncode}\n--- stdout\n{job.stdout[-3000:]}"
                                 f"\n--- stderr\n{job.stderr[-6000:]}")
    assert f"done: {job.out}" in job.stdout, job.stdout
    return job.out


@dataclass
class Job:
    name: str
    argv: list[str]
    out: Path
    run_dir: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def start(self) -> "Job":
        self._t0 = time.time()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        return self

    def wait(self, timeout: float = 600) -> "Job":
        if self.proc is not None:
            try:
                self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.stdout, self.stderr = self.proc.communicate()
            self.returncode = self.proc.returncode
            self.seconds = time.time() - self._t0
            self.proc = None
        return self

    def check(self) -> Path:
        """The output dir of a successful run (fails the calling test otherwise)."""
        return check_done(self)


def make_job(name: str, model: Path, out: Path, run_dir: Path, calib: Path, quant: str,
             extra: tuple[str, ...] = (), nproc: int = 1, port: int | None = None,
             num_samples: int = 16, seq_len: int = 64) -> Job:
    overrides = [f"model.path={model}", f"quant={quant}", f"calib.path={calib}",
                 f"calib.num_samples={num_samples}", f"calib.seq_len={seq_len}", f"output.dir={out}",
                 "output.part_file_size=100KB", f"runtime.run_dir={run_dir}", "runtime.threads=1", *extra]
    return Job(name, command(overrides, nproc, port), out, run_dir)


def small_calib_file(path: Path, source: Path, chars: int = 40_000) -> Path:
    path.write_text(source.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


def hash_dir(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def report_gptq(report: dict, group_size: int, bits: int = 4):
    """``(QuantArgs, GPTQParams)`` of a symmetric GPTQ job as its ``quant_report.json`` recorded
    them (observer, damping, block size, act order), float32 scales: to re-solve a linear in a test."""
    import torch

    from dist_quant.algorithms.gptq import GPTQParams
    from dist_quant.quant.qparams import QuantArgs

    cfg = report["config"]["quant"]
    args = QuantArgs(bits=bits, group_size=group_size, symmetric=True, scale_dtype=torch.float32,
                     mse=cfg["observer"] == "mse")
    return args, GPTQParams(damp=cfg["damp"], block_size=cfg["block_size"], act_order=cfg["act_order"])
