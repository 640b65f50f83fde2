"""Integer quantization parameters and (de)quantization: pure tensor functions.

Conventions follow compressed-tensors: integers are signed, ``q ∈ [-2^(b-1), 2^(b-1)-1]``;
``w ≈ (q - zero) · scale``; symmetric schemes have ``zero == 0`` and
``scale = max|w| / ((qmax - qmin) / 2)``. Scales are rounded to ``scale_dtype`` (the
checkpoint's dtype) before use, so the stored scale is exactly the one the solver used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantArgs:
    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float32
    mse: bool = False  # search a clipping ratio per group instead of plain min/max
    mse_norm: float = 2.4  # the search's error norm p: Σ |fake_quantize(w) − w|^p (quant.mse_norm)
    grid: str = "int"  # "int" (this module), "fp8" (E4M3) or "nvfp4" (E2M1, groups of 16): quant/floatgrid.py
    fp8_strategy: str = "channel"  # fp8: channel, tensor or block (group_size 128 = the block width)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def columns_per_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs):
    if args.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / ((args.qmax - args.qmin) / 2)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / (args.qmax - args.qmin)
    finfo = torch.finfo(args.scale_dtype)  # keep the stored scale finite (float16 tops out at 65504)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps, max=finfo.max)
    scale = scale.to(args.scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(args.scale_dtype).tiny))
    if args.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (args.qmin - torch.round(lo / scale)).clamp(args.qmin, args.qmax)
    return scale, zero


# The MSE search's clipping ratios: 1.00, 0.98, ..., 0.62 (GPTQ reference: grid 100, maxshrink .8),
# each rounded to float32 exactly as a Python float times a float32 tensor is.
MSE_STEPS = 20
_MSE_RATIOS = torch.tensor([1.0 - 0.02 * step for step in range(MSE_STEPS)], dtype=torch.float32)
_MSE_CHUNK = 1 << 20  # elements per [ratios, rows, cols] temporary (4 MB): bounded memory, cache-sized
_MSE_CHUNK_DEVICE = 1 << 25  # on an accelerator (128 MB): few launches (each chunk is ~12 kernels)


def compute_qparams(w: torch.Tensor, args: QuantArgs,
                    ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` ([rows, cols] → [rows, 1] each).

    ``ratio`` [rows, 1]: a clipping ratio chosen beforehand (AWQ's clipping search,
    algorithms/awq.py): the range of each row is multiplied by it, no observer search; rows
    whose ratio is NaN (linears AWQ does not clip) get the observer's scale as without it.

    With ``args.mse`` the range of each row is shrunk by each of the ratios 1.00 … 0.62 and
    the ratio with the smallest ``Σ |fake_quantize(w) − w|^p`` wins (the first one on ties;
    ``p = args.mse_norm``, 2.4 by default as in the GPTQ reference; ``p = 2`` is a square
    instead of a log2 and an exp2 per element: the search costs about a quarter).
    All ratios (and all rows, chunked to a few MB) are evaluated in one pass of tensor ops."""
    w = w.float().contiguous()
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if ratio is not None:
        ratio = ratio.to(w.device, torch.float32)
        free = torch.isnan(ratio)  # rows without a chosen ratio: the observer's choice
        scale, zero = _params_from_range(lo * ratio.nan_to_num(1.0), hi * ratio.nan_to_num(1.0), args)
        if bool(free.any()):
            obs_scale, obs_zero = compute_qparams(w, args)
            scale, zero = torch.where(free, obs_scale, scale), torch.where(free, obs_zero, zero)
        return scale, zero
    if not args.mse:
        return _params_from_range(lo, hi, args)
    return _mse_search(w, lo, hi, args)


def _mse_search(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs):
    rows, cols = w.shape
    ratios = _MSE_RATIOS.to(w.device)[:, None, None]
    scale, zero = _params_from_range(lo * ratios, hi * ratios, args)  # [R, rows, 1]
    err = torch.empty(MSE_STEPS, rows, 1, device=w.device)
    chunk = _MSE_CHUNK if w.device.type == "cpu" else _MSE_CHUNK_DEVICE  # rows are independent: same bits
    step = max(1, chunk // (MSE_STEPS * max(cols, 1)))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s, z, x = scale[:, r0:r1], zero[:, r0:r1], w[r0:r1]
        t = torch.div(x, s)  # fake_quantize(x) − x for every ratio, in place
        t.round_()
        if not args.symmetric:
            t.add_(z)
        t.clamp_(args.qmin, args.qmax)
        if not args.symmetric:
            t.sub_(z)
        t.mul_(s).sub_(x)
        if args.mse_norm == 2.0:
            t.square_()
        else:  # |e|^p: 1.7x cheaper than log/exp, 2.6x than pow_ (0 → 0)
            t.abs_().log2_().mul_(args.mse_norm).exp2_()
        torch.sum(t, dim=2, keepdim=True, out=err[:, r0:r1])
    # the first ratio with the smallest error; a NaN error never wins (as with ``err < best``)
    best = torch.nan_to_num(err, nan=float("inf")).argmin(dim=0, keepdim=True)  # [1, rows, 1]
    return scale.gather(0, best)[0], zero.gather(0, best)[0]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Integers ``clamp(round(w / scale) + zero)`` (float tensor holding integers)."""
    return (torch.round(w / scale) + zero).clamp(args.qmin, args.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, args), scale, zero)


def expand_groups(t: torch.Tensor, args: QuantArgs, in_features: int) -> torch.Tensor:
    """[out, groups] per-group values → [out, in] per-column values."""
    return t.repeat_interleave(args.columns_per_group(in_features), dim=1)


@dataclass
class QuantResult:
    """A quantized linear weight: ``w_hat = (q - zero) · scale`` group-wise (FP8 grid:
    ``w_hat = e4m3(q) · scale``, ``q`` the int8 view of the E4M3 codes, ``zero`` all 0)."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out, groups] (values representable in args.scale_dtype)
    zero: torch.Tensor  # int8 [out, groups]; zeros when symmetric
    fallback: str | None = None  # set when the solver fell back (e.g. GPTQ → RTN), with why
    global_scale: torch.Tensor | None = None  # NVFP4: the per-tensor global scale, set by the writer stage
    # float64 [out]: ``(ΔW H ΔWᵀ)_rr`` per row, when the solver knows it without a GEMM (GPTQ:
    # the sum of its squared column errors, algorithms/gptq.py); None: computed from H (stats.py)
    err_rows: torch.Tensor | None = None
    # float64 [out]: ``(W H Wᵀ)_rr`` per row, when the solver computed it (GPTQ, on an idle core
    # while its column loop runs); None: computed from H afterwards (stats.py)
    den_rows: torch.Tensor | None = None

    def split(self, rows: list[int]) -> list["QuantResult"]:
        """Per-module results of a row-stacked solve."""
        def parts(t):
            return t.split(rows) if t is not None else [None] * len(rows)
        return [QuantResult(q, s, z, self.fallback, err_rows=e, den_rows=d) for q, s, z, e, d in
                zip(self.q.split(rows), self.scale.split(rows), self.zero.split(rows),
                    parts(self.err_rows), parts(self.den_rows))]

    def dequantize(self, args: QuantArgs) -> torch.Tensor:
        """``w_hat`` [out, in] float32: the group's scale (and zero) broadcast over its columns
        (a [out, groups, cols] view: no expanded copies), the same values as
        ``dequantize(q, expand_groups(scale), expand_groups(zero))``."""
        out_f, n = self.q.shape
        groups = self.scale.shape[1]
        if args.grid != "int":  # q holds E4M3 bit patterns / E2M1 codes; one scale per row and group
            from .floatgrid import GRID_VALUES

            values = GRID_VALUES[args.grid](self.q).view(out_f, groups, n // groups)
            return (values * self.scale.float()[:, :, None]).view(out_f, n)
        q = self.q.float().view(out_f, groups, n // groups)
        return dequantize(q, self.scale.float()[:, :, None], self.zero.float()[:, :, None]).view(out_f, n)
