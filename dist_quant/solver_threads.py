"""How many threads a rank's GPTQ solve may use, and the single-threaded torch ops it runs with.

A solve is a long chain of small tensor ops. On CPU, OpenMP intra-op threads synchronize
per op, which costs more than it saves (about 20x slower with 2 threads on a busy 2-core
machine), and MKL's multi-threaded GEMM and Cholesky do not give the same bits as the
single-threaded ones, which would make the output depend on the thread count (and so on
the world size). So every torch op of a solve runs single-threaded, and the cores a rank
may use are used by *workers*: Python threads that run the column loop on disjoint row
chunks (``GPTQParams.workers``; same bits for any count).

The cores of a node are shared by its local ranks. In a stage where only some of them
solve (a stage with one linear: the others wait for its broadcast), the solving ranks get
the waiting ranks' cores: ``workers = (threads per rank × local ranks) // local solvers``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


def solve_workers(rank_threads: int, rank: int, local_world_size: int, solvers: Iterable[int]) -> int:
    """Workers for ``rank``'s solve when the ranks ``solvers`` solve at the same time.
    Ranks ``[k·L, (k+1)·L)`` share a node (L = ``local_world_size``, torchrun / Slurm order)."""
    node = rank // max(1, local_world_size)
    local = {r for r in solvers if r // max(1, local_world_size) == node} | {rank}
    return max(1, rank_threads * max(1, local_world_size) // len(local))


@contextlib.contextmanager
def single_threaded(device: torch.device):
    """Torch intra-op threads set to 1 on CPU for the duration (restored after)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
