"""Resume, preemption and requeue with real processes (2 ranks on gloo).

* A run SIGKILLed after layer 0 continues with ``resume=true`` (the identical command, a new
  run directory, as a requeued job gets) and writes exactly the bytes of an uninterrupted run;
  a resume that differs is refused.
* A run told to stop mid-run (SIGTERM to torchrun, which forwards it; SIGUSR1 to one rank of
  a launcher-less job, as Slurm's ``--signal`` sends it) stops on every rank after its last
  completed layer with a clear line and exit status 128 + signal; ``resume=auto`` then
  finishes it to the same bytes.
* ``resume`` validation; the writer's checkpoint/restore cuts a torn part file back."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main, ranks, torchrun, wait_all  # noqa: E402
from tiny import WIKI, make_tiny_model  # noqa: E402

from dist_quant.tensorspec import TensorSpec  # noqa: E402
from dist_quant.writer import RankWriter, plan_parts  # noqa: E402

STOP_BOUND_S = 30  # signal -> every rank gone (measured: 0.6 s; 13 s under a load average of 20)
AGENT_BOUND_S = 120  # SIGTERM to torchrun -> torchrun gone (measured 13 s, 47 s at load average 30)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 2-layer model, calibration text, and the uninterrupted 2-rank reference output
    (started with ``resume=auto`` and nothing to resume: a fresh start)."""
    root = tmp_path_factory.mktemp("resume")
    calib = WIKI
    model = make_tiny_model(root / "model", layers=2)
    ref = root / "ref"
    proc = torchrun(2, overrides(model, calib, ref, root / "run_ref", "resume=auto"), root / "ref.txt")
    wait_all([proc], 400)
    log = (root / "ref.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "resume=auto: no earlier run of this job" in log and "starting fresh" in log
    return model, calib, ref


def overrides(model: Path, calib: Path, out: Path, run: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
            "quant.group_size=32", "output.part_file_size=40KB", f"output.dir={out}",
            f"runtime.run_dir={run}", *extra]


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_output(out: Path, ref: Path) -> None:
    got, want = tree(out), tree(ref)
    assert set(got) == set(want)
    for name in want:
        if not name.startswith("quant_report"):  # the run report and its plots hold timings
            assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((ref / "model.safetensors.index.json").read_text())
    for f in sorted(set(index["weight_map"].values())):
        a, b = load_file(str(out / f)), load_file(str(ref / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_byte_identical(job, tmp_path, capsys):
    model, calib, ref = job
    out, run = tmp_path / "out", tmp_path / "run"
    partial = tmp_path / "out.partial"
    proc = torchrun(2, overrides(model, calib, out, run), tmp_path / "killed.txt", DIST_QUANT_TEST_FAIL="kill:1:0")
    wait_all([proc], 400)
    assert proc.returncode != 0, (tmp_path / "killed.txt").read_text()[-3000:]
    assert not out.exists() and partial.is_dir()
    state = partial / ".resume"  # kept with the partial output, not in the run directory
    assert not (run / "resume").exists()
    assert json.loads((state / "progress.json").read_text())["layer"] == 0

    # torn writes after the checkpoint: junk past the recorded end of each open part file
    for r in range(2):
        writer = json.loads((state / f"rank{r}.layer00000.json").read_text())["writer"]
        assert writer["open_part"] is not None
        with open(partial / writer["open_part"], "ab") as fh:
            fh.write(b"\xde\xad" * 999)
    (state / "rank1.layer00001.json").write_text("{ half-written state of a layer that never completed")

    # a resume that differs is refused, naming what differs, and leaves everything as it was
    before = tree(partial)
    assert call_main(overrides(model, calib, out, tmp_path / "run2", "resume=true", "quant.damp=0.02")) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "resume=true refused" in line and "world size: recorded 2, now 1" in line, line
    assert "config.quant.damp: recorded 0.01, now 0.02" in line, line
    assert tree(partial) == before

    # the identical command with resume=true, in a new run directory (as a requeued job runs),
    # continues after layer 0
    proc = torchrun(2, overrides(model, calib, out, tmp_path / "run3", "resume=true"), tmp_path / "resumed.txt")
    wait_all([proc], 300)
    log = (tmp_path / "resumed.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "resume=true: layers 0..0 complete" in log and "continuing with layer 1 of 2" in log
    assert not partial.exists()
    assert_same_output(out, ref)
    assert not (out / ".resume").exists()  # the resume state is dropped, not moved into the output


def _wait_for(path: Path, procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), "a rank ended before the pause"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_stop_signal_then_requeue_with_resume_auto(job, tmp_path):
    """Rank 1 pauses after layer 0 (test hook); then, (a) torchrun gets SIGTERM and forwards it
    to both workers; (b) in a job started without a launcher, only rank 1 gets SIGUSR1. Every
    rank stops before layer 1 and says so; the identical command with resume=auto finishes."""
    model, calib, ref = job
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    job_a = torchrun(2, overrides(model, calib, a / "out", a / "run", "resume=auto"), a / "console.txt",
                     DIST_QUANT_TEST_FAIL="pause:1:0", DIST_QUANT_TEST_PAUSED=str(a / "paused"))
    job_b = ranks(2, overrides(model, calib, b / "out", b / "run", "resume=auto"), b,
                  DIST_QUANT_TEST_FAIL="pause:1:0", DIST_QUANT_TEST_PAUSED=str(b / "paused"))
    _wait_for(a / "paused", [job_a], 400)
    t_a = time.time()
    job_a.send_signal(signal.SIGTERM)  # the agent, which forwards SIGTERM to its workers
    _wait_for(b / "paused", job_b, 400)
    t_b = time.time()
    job_b[1].send_signal(signal.SIGUSR1)
    ends = wait_all([job_a, *job_b], 120)

    assert job_a.returncode != 0
    # torchrun's own shutdown (it SIGKILLs workers still alive 30 s after forwarding the signal,
    # then exits itself) takes longer than the workers' stop; the log lines below show theirs
    assert max(ends[0], t_a) - t_a < AGENT_BOUND_S
    assert [p.returncode for p in job_b] == [128 + signal.SIGUSR1] * 2, (b / "out0.txt").read_text()[-3000:]
    assert max(ends[1:]) - t_b < STOP_BOUND_S
    print(f"stop: torchrun gone {ends[0] - t_a:.1f} s after SIGTERM, both ranks {max(ends[1:]) - t_b:.1f} s "
          "after SIGUSR1 to rank 1")
    for base, sig in ((a, "SIGTERM"), (b, "SIGUSR1")):
        want = (f"stopped by {sig} during layer 1 of 2: layers 0..0 are complete and their state is saved; "
                "rerun the same command with resume=auto to continue")
        for r in (0, 1):
            assert want in (base / "run" / f"rank{r}.log").read_text(), (base, r)
        assert not (base / "out").exists()
        progress = json.loads((base / "out.partial" / ".resume" / "progress.json").read_text())
        assert progress["layer"] == 0
    assert want in (b / "out0.txt").read_text()  # rank 0's console
    assert "Traceback" not in (b / "out0.txt").read_text()

    # the requeued jobs: the identical commands, new run directories, nothing else
    again = [torchrun(2, overrides(model, calib, base / "out", base / "run2", "resume=auto"),
                      base / "again.txt") for base in (a, b)]
    wait_all(again, 400)
    for base, proc in zip((a, b), again):
        log = (base / "again.txt").read_text()
        assert proc.returncode == 0, log[-3000:]
        assert "resume=auto: layers 0..0 complete" in log and "continuing with layer 1 of 2" in log
        assert_same_output(base / "out", ref)
        assert not (base / "out.partial").exists()


def test_stop_between_stages_keeps_nothing_of_the_layer(job, tmp_path, monkeypatch):
    """A stop requested while layer 1's first stage runs (1 rank, in process) takes effect at
    the next stage boundary: exit 143, layer 0 complete; what layer 1 had already written past
    the checkpoint is cut back on resume, and the output equals an uninterrupted 1-rank run's."""
    from dist_quant import stage, stop

    model, calib, _ = job
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert call_main(overrides(model, calib, ref, tmp_path / "run_ref")) == 0
    original = stage.StageContext._quantize
    seen = []

    def stage_then_signal(self, linears, *args):
        seen.append((linears[0].layer, stop.requested()))
        if linears[0].layer == 1:
            stop.request(signal.SIGTERM)  # what the handler does when SIGTERM arrives
        return original(self, linears, *args)

    monkeypatch.setattr(stage.StageContext, "_quantize", stage_then_signal)
    assert call_main(overrides(model, calib, out, tmp_path / "run", "resume=auto")) == 128 + signal.SIGTERM
    assert seen[-1] == (1, 0) and [i for i, _ in seen].count(1) == 1  # stopped after one stage of layer 1
    log = (tmp_path / "run" / "rank0.log").read_text()
    assert "stopped by SIGTERM during layer 1 of 2: layers 0..0 are complete" in log
    state = tmp_path / "out.partial" / ".resume"
    assert json.loads((state / "progress.json").read_text())["layer"] == 0
    monkeypatch.setattr(stage.StageContext, "_quantize", original)
    assert call_main(overrides(model, calib, out, tmp_path / "run2", "resume=auto")) == 0
    assert "continuing with layer 1 of 2" in (tmp_path / "run2" / "rank0.log").read_text()
    assert_same_output(out, ref)


def test_resume_modes(job, tmp_path, capsys):
    model, calib, _ = job
    base = overrides(model, calib, tmp_path / "out", tmp_path / "run")
    for bad in ("maybe", "yes", "1"):
        assert call_main([*base, f"resume={bad}"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "resume" in err[0] and bad in err[0], err
    assert call_main([*base, "resume=true"]) == 2  # nothing recorded for this output.dir
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "resume=true: no resumable run for this output.dir" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _specs() -> list[list[TensorSpec]]:
    return [[TensorSpec(f"t{i}", "F32", (50, 10)) for i in range(7)]]  # 2000 bytes each


def test_writer_checkpoint_restore_cuts_torn_part_back(tmp_path):
    parts = plan_parts(_specs(), 4500)  # 2 tensors per part: t0 t1 | t2 t3 | t4 t5 | t6
    tensors = [torch.randn(50, 10) for _ in range(7)]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()

    ref = RankWriter(tmp_path / "a", parts, 0)
    for i, t in enumerate(tensors):
        ref.add(f"t{i}", t)
    ref.finish()

    w = RankWriter(tmp_path / "b", parts, 0)
    for i in (0, 1, 2, 4):  # t4 waits for t3
        w.add(f"t{i}", tensors[i])
    state, pending = w.checkpoint()
    assert state == {"written": 3, "open_part": parts[1].file, "offset": len(parts[1].header()) + 2000}
    assert list(pending) == ["t4"]
    w.add("t3", tensors[3])  # progress after the checkpoint, then the process dies
    w.add("t5", tensors[5])
    w.abort()
    with open(tmp_path / "b" / parts[1].file, "ab") as fh:
        fh.write(b"junk" * 10)

    again = RankWriter(tmp_path / "b", parts, 0)
    again.restore(state, pending)
    for i in (3, 5, 6):
        again.add(f"t{i}", tensors[i])
    again.finish()
    for part in parts:
        assert (tmp_path / "a" / part.file).read_bytes() == (tmp_path / "b" / part.file).read_bytes()

    shutil.rmtree(tmp_path / "b")
    (tmp_path / "b").mkdir()
    broken = RankWriter(tmp_path / "b", parts, 0)  # the finished first part is gone
    with pytest.raises(Exception, match=parts[0].file):
        broken.restore(state, pending)
