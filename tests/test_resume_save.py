"""The per-layer state is written in the background (dist_quant/resume.py): ``layer_done``
returns before the files are on disk, the layer becomes complete (progress.json, older files
removed, hooks) only once its files are written, at the third stop check after it, at a stop,
or at ``flush``; what is written is what the rank held at ``layer_done``."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from dist_quant import resume, stop
from dist_quant.runtime import Comm, RankInfo


class FakeWriter:
    def __init__(self):
        self.pending = {"held": torch.arange(4.0)}

    def checkpoint(self):
        return {"written": 1}, dict(self.pending)


@pytest.fixture
def progress(tmp_path, monkeypatch):
    gate = threading.Event()
    real_save = resume.save_file

    def slow_save(tensors, path):  # the write waits until the test lets it go
        assert gate.wait(30)
        real_save(tensors, path)

    monkeypatch.setattr(resume, "save_file", slow_save)
    comm = Comm(RankInfo(), torch.device("cpu"), "gloo")
    writer = FakeWriter()
    p = resume.Progress(tmp_path / "out.partial", comm, writer, num_layers=4)
    p.begin(False, {"job": 1})
    done = []
    monkeypatch.setattr(resume, "LAYER_DONE_HOOKS", [lambda rank, layer: done.append(layer)])
    return p, gate, writer, done


def _progress_layer(p) -> int | None:
    path = p.dir / "progress.json"
    return json.loads(path.read_text())["layer"] if path.exists() else None


def test_layer_done_returns_first_and_the_layer_completes_at_the_third_check(progress):
    p, gate, writer, done = progress
    xs = [torch.randn(2, 3, 4), torch.randn(1, 3, 4)]
    p.layer_done(0, xs, [])
    assert _progress_layer(p) is None and done == []  # its file is still being written
    writer.pending["held"].add_(100.0)  # the writer's tensor changes afterwards: the copy is saved
    p.check_stop(1)  # the next layer's start
    p.check_stop(1)  # its first stage
    assert _progress_layer(p) is None and done == []
    gate.set()
    p.check_stop(1)  # its second stage: the write is awaited, the layer becomes complete
    assert _progress_layer(p) == 0 and done == [0]
    saved = load_file(str(p._files(0)[1]))
    assert torch.equal(saved["xs.0"], xs[0]) and torch.equal(saved["xs.1"], xs[1])
    assert torch.equal(saved["pending.held"], torch.arange(4.0))
    assert json.loads(p._files(0)[0].read_text())["batches"] == 2


def test_the_next_layer_done_and_flush_complete_it_and_drop_older_files(progress):
    p, gate, _, done = progress
    gate.set()
    p.layer_done(0, [torch.zeros(1, 2, 3)], [])
    p.layer_done(1, [torch.ones(1, 2, 3)], [])  # completes layer 0 first
    assert _progress_layer(p) == 0 and done == [0]
    p.flush()
    assert _progress_layer(p) == 1 and done == [0, 1]
    assert not any(path.exists() for path in p._files(0))  # layer 0's files: no longer needed
    assert all(path.exists() for path in p._files(1))
    p.flush()  # nothing waiting: a no-op
    assert done == [0, 1]


def test_a_stop_completes_the_saved_layer_before_it_leaves(progress):
    p, gate, _, done = progress
    p.layer_done(2, [torch.zeros(1, 2, 3)], [])
    gate.set()
    with stop.Handlers():
        stop.request(15)
        with pytest.raises(stop.Stopped):
            p.check_stop(3)  # the first check after layer 2: stopping waits for its files
    assert _progress_layer(p) == 2 and done == [2]
