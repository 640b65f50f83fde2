"""Test-only fault injection, installed from the environment by the tests' entry points
(``tests/fault_main.py``, ``tests/moe_trace_main.py``) through dist_quant's layer-done hook
(``dist_quant.resume.LAYER_DONE_HOOKS``); nothing of it is in the package.

``DIST_QUANT_TEST_FAIL=<mode>:<rank>:<layer>`` makes that rank act once layer ``<layer>``'s
progress is recorded on every rank:

* ``kill``  SIGKILL itself;
* ``raise`` raise an exception;
* ``hang``  sleep forever, alive;
* ``pause`` write ``$DIST_QUANT_TEST_PAUSED`` (a marker file) and wait, up to 120 s, until a
  stop signal has been received (the test sends it), then go on: a deterministic "mid-run"
  moment for the preemption tests.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("dist_quant")
ENV = "DIST_QUANT_TEST_FAIL"


def _flush() -> None:
    for handler in log.handlers:
        handler.flush()


def make_hook(spec: str):
    mode, rank, layer = spec.split(":")
    rank, layer = int(rank), int(layer)

    def hook(r: int, i: int) -> None:
        if r != rank or i != layer:
            return
        log.warning("test hook: %s on rank %d after layer %d (t=%.3f)", mode, r, i, time.time())
        _flush()
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "raise":
            raise RuntimeError(f"test-injected failure on rank {r} after layer {i}")
        elif mode == "hang":
            while True:
                time.sleep(3600)
        elif mode == "pause":
            from dist_quant import stop

            Path(os.environ["DIST_QUANT_TEST_PAUSED"]).write_text(str(time.time()))
            deadline = time.monotonic() + 120
            while not stop.requested() and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            raise ValueError(f"{ENV}={spec!r}: unknown mode {mode!r}")

    return hook


def install_from_env() -> None:
    spec = os.environ.get(ENV, "")
    if spec:
        from dist_quant.resume import LAYER_DONE_HOOKS

        LAYER_DONE_HOOKS.append(make_hook(spec))
