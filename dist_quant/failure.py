"""When one rank fails, every rank stops soon, nonzero, and the failing rank's error is shown.

* :class:`Watch` wraps the job on every rank. An exception on a rank is logged there (with its
  traceback, to the rank's log) and posted to the job's key-value store (the c10d store that
  ``init_process_group`` created) as ``abort``.
* A watchdog thread on every rank polls that key once a second. When another rank posted an
  abort, it logs that rank's error and ends this process with the same exit status, whatever
  the main thread is doing (computing, or waiting in a collective). If the store itself is
  gone (it lives in rank 0, or in the launcher's agent), the job is gone: it exits too.
* A rank that dies without a word (SIGKILL, OOM killer) closes its sockets: the other ranks'
  next collective fails at once ("Connection closed by peer"), and they post the abort.
* A rank that hangs while alive: the collectives time out after ``runtime.timeout_s``.
* A stop that the launcher or scheduler asked for (SIGTERM, SIGUSR1) is not a failure: every
  rank agrees on it and leaves the same way (``dist_quant/stop.py``).

Under torchrun the agent also stops the other workers once one exits nonzero; under srun or
other launchers that do not, the above bounds the time to a job-wide exit.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger("dist_quant")

POLL_S = 1.0  # watchdog poll interval
PEER_WAIT_S = 1.0  # a rank whose collective broke looks this long for the failed peer's posted cause
LINGER_S = 2.0  # how long a failing rank 0 keeps its store up for the others to read the abort
KEY, DONE = "abort", "abort_seen"


def _user_errors() -> tuple[type, ...]:
    """Errors in what the user gave (exit status 2), as in ``__main__.USER_ERRORS``."""
    from .arch import UnsupportedModel
    from .calibration import CalibrationError
    from .checkpoint import CheckpointError
    from .config import ConfigError

    return ConfigError, CheckpointError, CalibrationError, UnsupportedModel


def exit_code(exc: BaseException) -> int:
    return 2 if isinstance(exc, _user_errors()) else 1


def _flush_logs() -> None:
    for handler in log.handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stderr.flush()


def _job_store(comm):
    if comm.world_size == 1:
        return None
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        if not dist.is_initialized():
            return None
        return dist.PrefixStore("dist_quant/", c10d._get_default_store())
    except Exception:  # private API: without it only collective errors and timeouts stop the job
        return None


class Watch:
    """``with Watch(comm): run_job(...)`` — see the module docstring."""

    def __init__(self, comm, poll_s: float = POLL_S):
        self.comm, self.poll_s = comm, poll_s
        self.store = _job_store(comm)
        self._stop = threading.Event()
        self._handling = threading.Event()  # the main thread is reporting its own failure
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Watch":
        if self.store is not None:
            self._thread = threading.Thread(target=self._watch, name="dist_quant-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        from .stop import Stopped

        if exc is None or isinstance(exc, Stopped):  # a requested stop: every rank agreed on it
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            # no rank may exit (taking its end of the store with it) while another still polls
            self.comm.barrier()
            return False
        self._handling.set()
        code = exit_code(exc)
        text = _first_line(exc)
        if code == 2:
            message = str(exc)  # reported by __main__ (report_user_error)
        elif is_collective_error(exc):
            cause = self._peer_failure(PEER_WAIT_S)
            if cause is not None:  # the collective failed because that rank did: report its cause
                self._stop.set()
                self._acknowledge_and_die(*cause)
            message = (f"a collective failed on rank {self.comm.rank} (another rank died, hung past "
                       f"runtime.timeout_s, or stopped; see the other ranks' logs): {text}")
            log.error("%s", message)
        else:
            message = f"rank {self.comm.rank} failed: {type(exc).__name__}: {text}"
            log.error("%s", message)
        log.debug("traceback of rank %d", self.comm.rank, exc_info=exc)  # to the rank's log file
        self._post(code, message)
        self._stop.set()
        _flush_logs()
        return False

    def _post(self, code: int, message: str) -> None:
        if self.store is None:
            return
        try:
            value = f"{code}|{self.comm.rank}|{message}"
            try:
                self.store.compare_set(KEY, "", value)  # the first failure wins
            except Exception:
                self.store.set(KEY, value)
            self.store.add(DONE, 1)
            self._linger()
        except Exception:
            pass  # the store is gone too: the others find out from their collectives

    def _linger(self) -> None:
        """Rank 0 may host the store: keep it up until the others have read the abort."""
        if self.comm.rank != 0:
            return
        deadline = time.monotonic() + LINGER_S
        while time.monotonic() < deadline and self.store.add(DONE, 0) < self.comm.world_size:
            time.sleep(0.05)

    def _peer_failure(self, wait_s: float) -> tuple[str, str, str] | None:
        """``(code, rank, message)`` of a failure another rank posted, waiting up to ``wait_s``
        for it (a rank posts its cause before its exit breaks the others' collectives)."""
        if self.store is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.store.check([KEY]):
                    raw = self.store.get(KEY).decode(errors="replace")
                    code_s, rank_s, message = (raw.split("|", 2) + ["", ""])[:3]
                    if rank_s != str(self.comm.rank):
                        return code_s, rank_s, message
            except Exception:
                return None  # the store is gone with the failed rank
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _acknowledge_and_die(self, code_s: str, rank_s: str, message: str) -> None:
        """Stop this rank because rank ``rank_s`` failed, with that rank's message."""
        try:
            self.store.add(DONE, 1)
            self._linger()
        except Exception:
            pass
        code = int(code_s) if code_s.isdigit() else 1
        if code == 2:
            self._die(code, f"error: {message} (reported by rank {rank_s}); stopping rank {self.comm.rank}")
        self._die(code, f"{message}; stopping rank {self.comm.rank}")

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if not self.store.check([KEY]):
                    continue
                raw = self.store.get(KEY).decode(errors="replace")
            except Exception as exc:
                if self._stop.is_set() or self._handling.is_set():
                    return
                self._die(1, f"lost the job's store ({type(exc).__name__}: {exc}); rank 0 or the "
                             "launcher is gone, stopping this rank")
                return
            code_s, rank_s, message = (raw.split("|", 2) + ["", ""])[:3]
            if rank_s == str(self.comm.rank) or self._handling.is_set():
                continue  # our own failure, being reported by the main thread
            self._acknowledge_and_die(code_s, rank_s, message)
            return

    def _die(self, code: int, message: str) -> None:
        if self.comm.rank == 0:
            sys.stderr.write("\n")  # past rank 0's progress bar
        log.error("%s", message)
        _flush_logs()
        os._exit(code)


def report_user_error(rank: int, exc: BaseException) -> None:
    """One line for an error in the user's input: ``error: …`` on rank 0's stderr (and in its
    log file); other ranks log it (their console shows warnings and errors)."""
    if rank != 0:
        log.error("%s", exc)
        return
    print(f"error: {exc}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def is_collective_error(exc: BaseException) -> bool:
    """A collective that failed because of another rank (dead peer, timeout)."""
    if type(exc).__name__ in ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("/gloo/", "Connection closed by peer", "Connection reset by peer", "NCCL", "HCCL"))


def agree(comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; if it raised a user error on any rank, raise it on all (so
    that no rank is left waiting in a collective for one that stopped)."""
    error = None
    try:
        result = fn()
    except _user_errors() as exc:
        error, result = exc, None
    errors = comm.all_gather_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        from .config import ConfigError

        rank = errors.index(first)
        raise ConfigError(f"{first[1]} (on rank {rank})")
    return result
