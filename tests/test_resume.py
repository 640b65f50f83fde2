"""Resume: a 2-rank run killed (SIGKILL) after layer 0 continues with ``resume=true`` and
writes exactly the bytes of an uninterrupted run; a resume that differs is refused; the
writer's checkpoint/restore cuts a torn part file back."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main, torchrun, wait_all  # noqa: E402
from tiny import WIKI, make_tiny_model  # noqa: E402

from dist_quant.tensorspec import TensorSpec  # noqa: E402
from dist_quant.writer import RankWriter, plan_parts  # noqa: E402


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return WIKI


def overrides(model: Path, calib: Path, out: Path, run: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
            "quant.group_size=32", "output.part_file_size=40KB", f"output.dir={out}",
            f"runtime.run_dir={run}", *extra]


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_killed_run_resumes_byte_identical(tmp_path, calib, capsys):
    model = make_tiny_model(tmp_path / "model", layers=2)
    ref, out, run = tmp_path / "ref", tmp_path / "out", tmp_path / "run"
    partial = tmp_path / "out.partial"
    # the uninterrupted reference and the run that rank 1 kills after layer 0, side by side
    t0 = time.monotonic()
    procs = [torchrun(2, overrides(model, calib, ref, tmp_path / "run_ref"), tmp_path / "ref.txt"),
             torchrun(2, overrides(model, calib, out, run), tmp_path / "killed.txt",
                      DIST_QUANT_TEST_FAIL="kill:1:0")]
    wait_all(procs, 400)
    print(f"reference + killed runs: {time.monotonic() - t0:.1f} s")
    assert procs[0].returncode == 0, (tmp_path / "ref.txt").read_text()[-3000:]
    assert procs[1].returncode != 0, (tmp_path / "killed.txt").read_text()[-3000:]
    assert not out.exists() and partial.is_dir()
    state = run / "resume"
    assert json.loads((state / "progress.json").read_text())["layer"] == 0

    # torn writes after the checkpoint: junk past the recorded end of each open part file
    for r in range(2):
        writer = json.loads((state / f"rank{r}.layer00000.json").read_text())["writer"]
        assert writer["open_part"] is not None
        with open(partial / writer["open_part"], "ab") as fh:
            fh.write(b"\xde\xad" * 999)
    (state / "rank1.layer00001.json").write_text("{ half-written state of a layer that never completed")

    # a resume that differs is refused, naming what differs, and leaves everything as it was
    before = tree(tmp_path / "out.partial"), tree(state)
    assert call_main(overrides(model, calib, out, run, "resume=true", "quant.damp=0.02")) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "resume=true refused" in line and "world size: recorded 2, now 1" in line, line
    assert "config.quant.damp: recorded 0.01, now 0.02" in line, line
    assert (tree(tmp_path / "out.partial"), tree(state)) == before

    # the same command with resume=true continues after layer 0
    t0 = time.monotonic()
    proc = torchrun(2, overrides(model, calib, out, run, "resume=true"), tmp_path / "resumed.txt")
    wait_all([proc], 300)
    print(f"resumed run: {time.monotonic() - t0:.1f} s")
    log = (tmp_path / "resumed.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "continuing with layer 1 of 2" in log
    assert not partial.exists()

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
    assert not state.exists()  # the resume state is dropped once the output is in place


def test_resume_needs_a_run_dir_with_a_recorded_run(tmp_path, calib, capsys):
    model = make_tiny_model(tmp_path / "model", layers=1)
    base = [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
            "quant.group_size=32", f"output.dir={tmp_path / 'out'}"]
    assert call_main([*base, "resume=true"]) == 2
    assert "needs runtime.run_dir" in capsys.readouterr().err
    assert call_main([*base, "resume=true", f"runtime.run_dir={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert "holds no resumable run" in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


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
