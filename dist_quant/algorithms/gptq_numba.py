"""The GPTQ column recursion of one sub-block as compiled CPU code (numba; issue 17: the torch
loop spends most of a column's time dispatching eight small ops on a few hundred floats).

``gptq.lazy_block_loop`` works a lazy block in sub-blocks of ``gptq.SUB_BLOCK`` columns: inside
a sub-block every column's error goes at once to the later columns of the sub-block (rank-1
updates), and the sub-block's errors reach the rest of the block as one GEMM. Here the inside
of a sub-block is one compiled call, element for element the same float32 operations in the
same order as the torch ops (no fused multiply-add: numba does not contract without
``fastmath``), so the integers, scales and errors are the same bits as the torch loop's:

    q = clamp(rint(w / s) + z, qmin, qmax)        (rint: round half to even, as torch.round)
    e = (w − (q − z)·s) / U_ii                     (symmetric: z = 0 is neither added nor taken)
    w_k −= U_ik · e    for the later columns k of the sub-block

The GEMMs stay torch's. The call releases the GIL, so row chunks run in parallel threads
(``GPTQParams.workers``) with no per-op dispatch between them.

Selected by ``quant.kernel`` (``auto``: on CPU when numba is importable and its one-time check
against the torch ops passes). numba is imported on first use, not at start-up.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from ..config import ConfigError

log = logging.getLogger("dist_quant")


@functools.lru_cache(maxsize=1)
def _kernels():
    import numba  # ~0.2 s; only when a CPU solve first needs it

    opts = dict(cache=True, nogil=True, boundscheck=False)

    @numba.njit(**opts)
    def symmetric(Wt, Qt, Et, U, s, qmin, qmax):  # pragma: no cover - compiled
        length, rows = Wt.shape
        for i in range(length):
            d = U[i, i]
            for r in range(rows):
                w = Wt[i, r]
                q = np.rint(w / s[r])
                if q < qmin:
                    q = qmin
                elif q > qmax:
                    q = qmax
                Qt[i, r] = q
                Et[i, r] = (w - q * s[r]) / d
            for k in range(i + 1, length):
                u = U[i, k]
                for r in range(rows):
                    Wt[k, r] -= u * Et[i, r]

    @numba.njit(**opts)
    def asymmetric(Wt, Qt, Et, U, s, z, qmin, qmax):  # pragma: no cover - compiled
        length, rows = Wt.shape
        for i in range(length):
            d = U[i, i]
            for r in range(rows):
                w = Wt[i, r]
                q = np.rint(w / s[r]) + z[r]
                if q < qmin:
                    q = qmin
                elif q > qmax:
                    q = qmax
                Qt[i, r] = q
                Et[i, r] = (w - (q - z[r]) * s[r]) / d
            for k in range(i + 1, length):
                u = U[i, k]
                for r in range(rows):
                    Wt[k, r] -= u * Et[i, r]

    return symmetric, asymmetric


@functools.lru_cache(maxsize=1)
def _numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:  # ImportError, or a numba that does not match this numpy: the torch loop runs
        return False
    return True


def usable(device: torch.device) -> bool:
    return device.type == "cpu" and _numba_importable()


def use_kernel(kernel: str, device: torch.device) -> bool:
    """Whether ``quant.kernel`` selects this kernel on ``device`` (``auto``: a CPU with numba,
    after :func:`_self_check`); ``numba`` where it cannot run is an error naming why."""
    if kernel not in ("auto", "numba"):
        return False
    ok = usable(device)
    if kernel == "numba" and not ok:
        why = f"the solve runs on {device.type}, and this kernel is for CPUs" if device.type != "cpu" \
            else "the package 'numba' is not importable"
        raise ConfigError(f"quant.kernel=numba: {why}; use quant.kernel=auto or torch")
    if kernel == "auto" and ok:
        return _self_check() is None
    return ok


def segment_(Wt: torch.Tensor, Qt: torch.Tensor, Et: torch.Tensor, U: torch.Tensor, s: torch.Tensor,
             z: torch.Tensor | None, qmin: int, qmax: int) -> None:
    """The recursion over the ``L`` columns held as the rows of ``Wt`` [L, out] (float32,
    contiguous rows; updated in place), ``U`` [L, L] their block of the factor, ``s``/``z``
    [out] the group's scale and zero (``z=None``: symmetric). Writes the grid values into
    ``Qt`` and the scaled errors into ``Et`` (both [L, out])."""
    sym, asym = _kernels()
    lo, hi = np.float32(qmin), np.float32(qmax)
    if z is None:
        sym(Wt.numpy(), Qt.numpy(), Et.numpy(), U.numpy(), s.numpy(), lo, hi)
    else:
        asym(Wt.numpy(), Qt.numpy(), Et.numpy(), U.numpy(), s.numpy(), z.numpy(), lo, hi)


@functools.lru_cache(maxsize=1)
def _self_check() -> str | None:
    """``auto`` only: compile (or load from numba's cache) both kernels and run the integer-grid
    column loop once with them and once with torch ops (``gptq.quantize_columns``) on a small
    problem, symmetric and asymmetric, comparing every result bit for bit; on any failure warn
    once and let the torch loop run. None: fine."""
    from ..quant.qparams import QuantArgs
    from .factor import random_factor
    from .gptq import quantize_columns

    g = torch.Generator().manual_seed(0)
    cols, rows = 64, 96
    u = random_factor(cols, g)
    w = torch.randn(rows, cols, generator=g) * 0.05
    perm = torch.arange(cols)
    problem = None
    try:
        for symmetric in (True, False):
            args = QuantArgs(4, 32, symmetric)
            got = quantize_columns(w.clone(), u, perm, args, 32, loop="numba")
            want = quantize_columns(w.clone(), u, perm, args, 32, loop="torch")
            if not all(torch.equal(x, y) for x, y in zip(got, want)):
                problem = "its results differ from the torch loop's"
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem is not None:
        log.warning("quant.kernel=auto: the numba GPTQ column kernel failed its check (%s); the torch "
                    "column loop runs instead", problem)
    return problem
