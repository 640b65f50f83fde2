"""The GPTQ column recursion of one run of columns as one Triton kernel (issue 11: on a GPU the
torch loop is a chain of about eight small kernels per column and launch-bound).

A *segment* is a run of at most :data:`MAX_SEGMENT` columns of a lazy block that share one
group's scale and zero. Rows are independent given the factor ``U``, so each program takes
:data:`rows_per_program` rows, keeps the segment's [L, rows] tile in registers and walks its
columns in order, exactly the recursion of ``gptq.lazy_block_loop`` on the integer grid:

    q_i = clamp(round(w_i / s) + z, qmin, qmax)      (round half to even, as torch.round)
    e_i = (w_i − (q_i − z)·s) / U_ii
    w_k −= U_ik · e_i    for the later columns k of the segment

writing ``q_i`` and ``e_i``; the caller sends the segment's errors to the rest of the block
and of the matrix as GEMMs, as the torch loop does. One launch per segment instead of about
eight per column.

Selected by ``quant.kernel`` (``auto``: on CUDA when triton is importable). Triton is imported
lazily; with ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (the tests' reference).
"""
from __future__ import annotations

import functools
import os

import torch

from ..config import GPTQ_KERNELS as KERNELS
from ..config import ConfigError
from .factor import random_factor

MAX_SEGMENT = 128  # columns held in one program's registers


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (no driver, wrong CUDA): the torch loop runs
        return False
    return True


def usable(device: torch.device) -> bool:
    """The kernel can run on ``device``: a CUDA device with triton, or any with the interpreter."""
    return (device.type == "cuda" or interpreted()) and _triton_importable()  # no import on CPU


def use_kernel(kernel: str, device: torch.device) -> bool:
    """Whether ``quant.kernel`` selects the fused kernel on ``device``; ``triton`` where it
    cannot run is an error naming why."""
    if kernel not in KERNELS:
        raise ConfigError(f"quant.kernel={kernel!r}: expected one of {', '.join(KERNELS)}")
    if kernel not in ("auto", "triton"):  # torch, or another device's kernel (numba)
        return False
    ok = usable(device)
    if kernel == "triton" and not ok:
        why = f"the solve runs on {device.type}, and the kernel needs a CUDA device" \
            if device.type != "cuda" and not interpreted() else "the package 'triton' is not importable"
        raise ConfigError(f"quant.kernel=triton: {why}; use quant.kernel=auto or torch")
    if kernel == "auto" and ok:
        return _self_check(str(device)) is None
    return ok


@functools.lru_cache(maxsize=None)
def _self_check(device: str) -> str | None:
    """``auto`` only: compile and run the kernel once on a small problem on ``device`` and
    compare it with :func:`reference_segment_`; on any failure (a Triton build that cannot
    compile for this device, a wrong result) warn once and let the torch loop run. None: fine."""
    g = torch.Generator().manual_seed(0)
    length, rows = 48, 80
    u = random_factor(length, g).to(device)
    wt = torch.randn(length, rows, generator=g).to(device)
    s, z = (torch.rand(rows, generator=g) * 0.3 + 0.05).to(device), torch.full((rows,), 8.0, device=device)
    got, want = [torch.empty_like(wt) for _ in range(2)], [torch.empty_like(wt) for _ in range(2)]
    try:
        quantize_segment_(wt, *got, u, s, z, 0, 15)
        reference_segment_(wt, *want, u, s, z, 0, 15)
        same = (got[0] == want[0]).float().mean().item()
        problem = None if same >= 0.99 else f"only {same:.1%} of its integers match the torch loop's"
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem is not None:
        import logging

        logging.getLogger("dist_quant").warning(
            "quant.kernel=auto: the fused Triton GPTQ kernel failed its check on %s (%s); the torch "
            "column loop runs instead", device, problem)
    return problem


def rows_per_program(length: int) -> int:
    return 64 if length <= 64 else 32


def _kernel():
    from . import gptq_triton_kernel  # imports triton: only when the kernel is used

    return gptq_triton_kernel.segment


def quantize_segment_(Wt: torch.Tensor, Qt: torch.Tensor, Et: torch.Tensor, U: torch.Tensor,
                      s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> None:
    """Run the recursion over the ``L`` rows of ``Wt`` [L, out] (one column of the weight
    each, error-updated so far; overwritten only through ``Qt``/``Et``), with ``U`` [L, L] the
    segment's block of the upper factor, ``s``/``z`` [out] the group's scale and zero. Writes
    the grid values into ``Qt`` and the scaled errors ``e`` into ``Et`` (both [L, out])."""
    length, rows = Wt.shape
    if length > MAX_SEGMENT:
        raise ValueError(f"a segment holds at most {MAX_SEGMENT} columns, got {length}")
    for t in (Wt, Qt, Et):
        if t.stride(1) != 1 or t.stride(0) != Wt.stride(0):
            raise ValueError("Wt, Qt and Et need the same row stride and contiguous rows")
    lp = max(16, 1 << (length - 1).bit_length())
    br = rows_per_program(lp)
    grid = (-(-rows // br),)
    _kernel()[grid](Wt, Qt, Et, U, s.contiguous(), z.contiguous(), rows, length, Wt.stride(0), U.stride(0), U.stride(1),
                    float(qmin), float(qmax), LP=lp, BR=br)


def reference_segment_(Wt: torch.Tensor, Qt: torch.Tensor, Et: torch.Tensor, U: torch.Tensor,
                       s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> None:
    """:func:`quantize_segment_` in torch ops, column by column (the tests' reference; the
    same float operations in the same order, so the interpreted kernel matches it bit for bit)."""
    tile = Wt.clone()
    for i in range(Wt.shape[0]):
        w = tile[i]
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        e = (w - (q - z) * s) / U[i, i]
        Qt[i], Et[i] = q, e
        tile[i + 1:] -= U[i, i + 1:, None] * e
