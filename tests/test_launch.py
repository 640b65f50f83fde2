"""The launchers in ``launch/`` and the rank facts / rendezvous taken from their environment.

End to end, concurrently (one module fixture): ``launch/torchrun.sh`` and
``launch/deepspeed.sh`` start 2 CPU ranks each, and ``launch/slurm.sbatch`` runs under a
fake ``srun``/``scontrol`` that start 2 tasks with Slurm's variables (no torchrun). Every
job must finish a tiny run with both ranks' logs in ONE run directory chosen by the
launcher. The Slurm variable mapping is unit-tested with fake environments."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, check_done, free_ports, job_env  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant.runtime import (RankInfo, first_slurm_host, rank_info_from_env,  # noqa: E402
                                rendezvous_env, slurm_tasks_on_node)

LAUNCH = REPO / "launch"
HAVE_DEEPSPEED = shutil.which("deepspeed") is not None or shutil.which(
    "deepspeed", path=str(Path(sys.executable).parent)) is not None
OVERRIDES = ["calib.num_samples=8", "calib.seq_len=32", "calib.batch_size=4", "quant.group_size=32",
             "runtime.threads=1"]

FAKE_SRUN = '''#!{python}
"""Fake srun: start SLURM_NTASKS tasks of the command on this host with srun's variables."""
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_LOG"], "w") as f:
    f.write(" ".join(args) + "\\n")
while args and args[0].startswith("-"):
    args.pop(0)  # srun's own options (all written --opt=value)
n = int(os.environ["SLURM_NTASKS"])
procs = []
for r in range(n):
    env = dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NODEID="0", SLURM_STEP_ID="0",
               SLURM_STEPID="0", SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NUM_NODES="1",
               SLURM_STEP_TASKS_PER_NODE=str(n), SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
               SLURM_LAUNCH_NODE_IPADDR="127.0.0.1")
    procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
'''
FAKE_SCONTROL = '''#!/usr/bin/env bash
# Fake scontrol: "scontrol show hostnames LIST" prints one host per line.
[ "$1 $2" = "show hostnames" ] || exit 1
echo localhost
echo otherhost
'''


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class Launch(SimpleNamespace):
    def wait(self, timeout: float = 600) -> "Launch":
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
        self.returncode, self.seconds = self.proc.returncode, time.time() - self.t0
        return self

    def check(self) -> Path:
        return check_done(self)

    def run_dirs(self) -> list[Path]:
        return sorted(p for p in (self.cwd / "runs").iterdir() if p.is_dir())


def _start(name: str, argv: list[str], cwd: Path, out: Path, **env) -> Launch:
    cwd.mkdir(parents=True, exist_ok=True)
    full = job_env()
    full["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full.get("PATH", "")
    full["PYTHON"] = sys.executable
    full.update(env)
    proc = subprocess.Popen(argv, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Launch(name=name, proc=proc, cwd=cwd, out=out, t0=time.time())


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    model = make_tiny_model(root / "model", layers=2)
    calib = root / "calib.txt"
    calib.write_text(corpus_text(40_000))
    common = [f"model.path={model}", f"calib.path={calib}", *OVERRIDES]
    ports = iter(free_ports(3))
    jobs = {}
    jobs["torchrun"] = _start("torchrun", [str(LAUNCH / "torchrun.sh"), *common, f"output.dir={root / 'out-torchrun'}"],
                              root / "cwd-torchrun", root / "out-torchrun", NPROC="2", MASTER_PORT=str(next(ports)))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN.format(python=sys.executable))
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    slurm_env = dict(SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                     SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO), SLURM_PROCID="0",
                     MASTER_PORT=str(next(ports)), FAKE_SRUN_LOG=str(root / "srun.log"),
                     PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    slurm_out = root / "out-slurm"
    # sbatch would cd to the submit dir (the checkout); runs/ then lands there, so give RUN_DIR
    jobs["slurm"] = _start("slurm", ["bash", str(LAUNCH / "slurm.sbatch"), *common, f"output.dir={slurm_out}"],
                           root / "cwd-slurm", slurm_out, RUN_DIR=str(root / "cwd-slurm" / "runs" / "slurm-run"),
                           **slurm_env)
    if HAVE_DEEPSPEED:
        jobs["deepspeed"] = _start("deepspeed", [str(LAUNCH / "deepspeed.sh"), *common,
                                                 f"output.dir={root / 'out-deepspeed'}"],
                                   root / "cwd-deepspeed", root / "out-deepspeed", NPROC="2",
                                   MASTER_PORT=str(next(ports)))
    for job in jobs.values():
        job.wait()
    return SimpleNamespace(root=root, model=model, jobs=jobs)


def _check_shared_run_dir(job: Launch, launcher: str) -> Path:
    job.check()
    dirs = job.run_dirs()
    assert len(dirs) == 1, dirs  # ONE run directory for the whole job, not one per rank
    run_dir = dirs[0]
    assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    for rank in (0, 1):
        text = (run_dir / f"rank{rank}.log").read_text()
        assert f"world size 2 ({launcher})" in text
        assert f"[rank {rank}]" in text and f"[rank {1 - rank}]" not in text
        assert "layer 2/2 done" in text  # every rank logs its per-layer progress to its file
    report = json.loads((job.out / "quant_report.json").read_text())
    assert report["world_size"] == 2 and set(report["owner_plan"].values()) == {0, 1}
    return run_dir


def test_torchrun_launcher_two_ranks_share_one_run_dir(launched):
    job = launched.jobs["torchrun"]
    run_dir = _check_shared_run_dir(job, "torchrun")
    assert run_dir.parent == job.cwd / "runs"  # resolved once by the launcher: runs/<date>_<time>
    assert f"runtime.run_dir=runs/{run_dir.name}" in job.stderr
    assert "--local-ranks-filter=0" in job.stderr or "--tee=0:3" in job.stderr  # LOG_RANK=0
    # not a terminal: one plain line per finished layer, no progress-bar carriage returns
    assert "\r" not in job.stderr and "\r" not in job.stdout
    assert job.stderr.count("layer 1/2 done") == 1 and job.stderr.count("layer 2/2 done") == 1


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="the deepspeed launcher is not installed")
def test_deepspeed_launcher_two_ranks(launched):
    job = launched.jobs["deepspeed"]
    _check_shared_run_dir(job, "deepspeed")
    assert "--local_rank=" in job.stdout + job.stderr  # DeepSpeed passed it; dist_quant dropped it


def test_slurm_sbatch_under_srun_without_torchrun(launched):
    job = launched.jobs["slurm"]
    _check_shared_run_dir(job, "slurm")
    srun_args = (launched.root / "srun.log").read_text()
    assert "-m dist_quant" in srun_args and "torchrun" not in srun_args
    assert "rendezvous localhost:" in job.stderr  # MASTER_ADDR: first host of `scontrol show hostnames`


def test_output_of_the_launchers_agree(launched):
    """Same job, same world size: the same tensors, whichever launcher started it."""
    from safetensors import safe_open

    def tensors(out: Path) -> dict:
        result = {}
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                result.update({k: h.get_tensor(k) for k in h.keys()})
        return result

    outs = [tensors(job.check()) for job in launched.jobs.values()]
    for other in outs[1:]:
        assert set(other) == set(outs[0])
        for name in outs[0]:
            assert (other[name] == outs[0][name]).all(), name


def test_launch_scripts_parse_and_multinode_requires_its_env():
    for script in [*LAUNCH.glob("*.sh"), LAUNCH / "slurm.sbatch"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    for script in ["torchrun.sh", "multinode.sh", "deepspeed.sh", "dry_run.sh", "slurm.sbatch"]:
        assert os.access(LAUNCH / script, os.X_OK), script
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR")}
    res = subprocess.run([str(LAUNCH / "multinode.sh"), "model.path=x"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "NNODES" in res.stderr


# -- rank facts and rendezvous from fake environments ------------------------------------------
SRUN_TASK = {  # what srun sets for task 5 of 8, 4 per node, on the second node
    "SLURM_JOB_ID": "1234", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7",
}


def test_slurm_task_rank_facts():
    assert rank_info_from_env(SRUN_TASK) == RankInfo(5, 8, 1, 4, "slurm")


def test_slurm_uneven_tasks_per_node():
    env = dict(SRUN_TASK, SLURM_PROCID="8", SLURM_LOCALID="0", SLURM_NODEID="2", SLURM_STEP_NUM_TASKS="9",
               SLURM_STEP_TASKS_PER_NODE="4(x2),1")
    assert rank_info_from_env(env) == RankInfo(8, 9, 0, 1, "slurm")
    assert slurm_tasks_on_node("2,3(x2),1", 2) == 3 and slurm_tasks_on_node("2", 5) is None


def test_slurm_batch_script_without_srun_is_one_process():
    """The batch step has SLURM_PROCID=0 and SLURM_NTASKS=8 but no srun step variables."""
    env = {k: v for k, v in SRUN_TASK.items() if not k.startswith(("SLURM_STEP", "SLURM_LAUNCH"))}
    env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    assert rank_info_from_env(env) == RankInfo()


def test_torchrun_variables_win_over_slurm():
    """torchrun started by srun (one task per node): torchrun's RANK/WORLD_SIZE are the truth."""
    env = dict(SRUN_TASK, RANK="13", WORLD_SIZE="16", LOCAL_RANK="5", LOCAL_WORLD_SIZE="8")
    assert rank_info_from_env(env) == RankInfo(13, 16, 5, 8, "torchrun")


def test_deepspeed_rank_facts():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CROSS_RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert rank_info_from_env(env, local_rank_arg=1) == RankInfo(1, 2, 1, 2, "deepspeed")


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[07-08]", "gpu07"), ("node1,node2", "node1"), ("a[1,3-5]b,c9", "a1b"),
    ("rack[2-3]-n[010-012]", "rack2-n010"), ("single", "single"), ("", None), ("(null)", None),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_rendezvous_from_node_list_and_job_id():
    info = rank_info_from_env(SRUN_TASK)
    assert rendezvous_env(info, SRUN_TASK) == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 1234)}
    no_list = {k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}
    assert rendezvous_env(info, no_list)["MASTER_ADDR"] == "10.0.0.7"  # the node srun ran on
    given = dict(SRUN_TASK, MASTER_ADDR="head", MASTER_PORT="7777")
    assert rendezvous_env(info, given) == {}  # the launcher's choice is kept


def test_rendezvous_defaults_for_single_node_launchers():
    assert rendezvous_env(RankInfo(0, 2, 0, 2, "torchrun"), {}) == {"MASTER_ADDR": "127.0.0.1",
                                                                    "MASTER_PORT": "29500"}


# -- slurm.sbatch after a requested stop (fake srun exiting with a given status) ----------------
FAKE_SRUN_EXIT = '''#!/usr/bin/env bash
echo "$@" >> "$FAKE_SRUN_LOG"
exit "$FAKE_SRUN_RC"
'''
FAKE_SCONTROL_LOG = '''#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then echo localhost; exit 0; fi
echo "$@" >> "$FAKE_SCONTROL_LOG"
'''


@pytest.mark.parametrize("rc,args,requeued,resume_auto", [
    (143, [], True, True),  # SIGTERM (preemption, scancel): every rank exited 143
    (138, [], True, True),  # SIGUSR1 (--signal=USR1@600 before the time limit)
    (1, [], False, True),  # a failure is not requeued
    (0, ["resume=false"], False, False),  # the user's resume wins over the script's resume=auto
])
def test_slurm_sbatch_requeues_after_a_requested_stop(tmp_path, rc, args, requeued, resume_auto):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN_EXIT)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL_LOG)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77",
               SLURM_SUBMIT_DIR=str(REPO), FAKE_SRUN_RC=str(rc), FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
               FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"), RUN_DIR=str(tmp_path / "run"))
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "model.path=/m", "output.dir=/o", *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == rc, res.stderr
    srun_args = (tmp_path / "srun.log").read_text().split()
    assert ("resume=auto" in srun_args) == resume_auto and srun_args[-1] == (args or ["output.dir=/o"])[-1]
    log = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    assert ("requeue 77" in log) == requeued, (log, res.stderr)
