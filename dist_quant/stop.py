"""Stopping when the launcher or the scheduler asks: SIGTERM (Slurm preemption, ``scancel``,
Kubernetes, torchrun forwarding its own SIGTERM), SIGUSR1 (Slurm ``--signal=USR1@<seconds>``
ahead of the time limit).

The signal handler only records the request. The layer loop asks :func:`check` at points
that every rank reaches in the same order (the start of every layer and of every stage); there
the ranks all-reduce the request (max of the signal numbers), so all of them stop at the same
point even when only one was signalled, and raise :class:`Stopped`. Nothing of the
interrupted layer is kept: the state of the last completed layer is already on disk
(``dist_quant/resume.py``), and ``resume=auto`` continues from it. A second signal while a
stop is pending ends the process at once (the on-disk state stays valid: every state file
is renamed into place whole).

The process exits with ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1), the
status a shell reports for a process the signal killed, so that a batch script can tell a
requested stop from a failure (``launch/slurm.sbatch`` requeues on it).
"""
from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """The job stopped on request; ``layer`` is the first layer that is not complete."""

    def __init__(self, signum: int, layer: int, num_layers: int):
        self.signum, self.layer, self.num_layers = signum, layer, num_layers
        done = f"layers 0..{layer - 1} are complete" if layer > 0 else "no layer was complete"
        super().__init__(f"stopped by {signal_name(signum)} during layer {layer} of {num_layers}: {done} "
                         "and their state is saved; rerun the same command with resume=auto to continue")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_requested = 0  # the first stop signal received (0: none)


def requested() -> int:
    """The signal number of a pending stop request on this rank, or 0."""
    return _requested


def request(signum: int) -> None:
    """Record a stop request (what the signal handler does; also for tests)."""
    global _requested
    if _requested:
        msg = f"\ndist_quant: second {signal_name(signum)} while stopping: exiting now\n"
        os.write(2, msg.encode())
        os._exit(128 + signum)
    _requested = signum


def _handler(signum, frame) -> None:
    request(signum)


class Handlers:
    """``with Handlers():`` the stop signals are recorded instead of ending the process;
    the previous handlers come back afterwards. Only the main thread can install handlers:
    elsewhere this does nothing."""

    def __enter__(self) -> "Handlers":
        global _requested
        _requested = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, _handler)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def check(comm, layer: int, num_layers: int) -> None:
    """Called by every rank at the same points of the layer loop: raise :class:`Stopped` on
    every rank if any rank has a stop request."""
    import torch

    flag = torch.tensor([_requested], dtype=torch.int64)
    signum = int(comm.all_reduce(flag, "max").item())
    if signum:
        raise Stopped(signum, layer, num_layers)
