"""Floating-point weight grids: FP8 E4M3 (per channel, per tensor, 128×128 blocks) and NVFP4
(FP4 E2M1 values in groups of 16 with FP8 E4M3 group scales and a float32 global scale).
Pure tensor functions, the float counterpart of :mod:`dist_quant.quant.qparams`.

Conventions (compressed-tensors ``float-quantized`` / ``nvfp4-pack-quantized``; vLLM loads the
same): FP8 ``w ≈ fp8 · scale`` with ``scale = amax / 448``; NVFP4
``w ≈ e2m1 · (group_scale / global_scale)`` with ``global_scale = 448 · 6 / amax(w)`` and
``group_scale = fp8(amax(group) / 6 · global_scale)``. Casts saturate (never inf/NaN).
"""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP4_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of the 8 codes 0..7 (bit 3: sign)
NVFP4_GROUP = 16
FP8_BLOCK = 128


# -- FP8 E4M3 ----------------------------------------------------------------------------------
def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast to E4M3 (torch's cast maps overflow to NaN)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[out, in] → zero-padded [ceil(out/b), b, ceil(in/b), b]."""
    out_f, in_f = w.shape
    po, pi = math.ceil(out_f / block) * block, math.ceil(in_f / block) * block
    padded = torch.zeros(po, pi, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.float()
    return padded.reshape(po // block, block, pi // block, block)


def fp8_scale(w: torch.Tensor, strategy: str, block: int = FP8_BLOCK) -> torch.Tensor:
    """float32 scales: ``channel`` [out, 1], ``tensor`` [1], ``block`` [ceil(out/b), ceil(in/b)]."""
    a = w.float().abs()
    if strategy == "channel":
        amax = a.amax(dim=1, keepdim=True)
    elif strategy == "tensor":
        amax = a.amax().reshape(1)
    elif strategy == "block":
        amax = _blocks(a, block).amax(dim=(1, 3))
    else:
        raise ValueError(f"fp8 strategy {strategy!r}: expected channel, tensor or block")
    return (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def expand_fp8_scale(scale: torch.Tensor, shape: tuple[int, int], strategy: str,
                     block: int = FP8_BLOCK) -> torch.Tensor:
    """A scale per weight element, [out, in]."""
    out_f, in_f = shape
    if strategy == "block":
        return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return scale.float().expand(out_f, in_f) if strategy == "channel" else scale.float().reshape(1, 1).expand(out_f, in_f)


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor, strategy: str, block: int = FP8_BLOCK) -> torch.Tensor:
    """float8_e4m3fn weights ``fp8(w / scale)``."""
    return to_fp8(w.float() / expand_fp8_scale(scale, tuple(w.shape), strategy, block))


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, strategy: str, block: int = FP8_BLOCK) -> torch.Tensor:
    return q.float() * expand_fp8_scale(scale, tuple(q.shape), strategy, block)


# -- FP4 E2M1 (NVFP4) --------------------------------------------------------------------------------
_E2M1 = torch.tensor(E2M1_VALUES)
# decision boundaries between neighbouring magnitudes; ties go to the even code (as RNE does)
_MIDPOINTS = (_E2M1[1:] + _E2M1[:-1]) / 2


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 0..15: bit 3 sign, bits 0-2 magnitude index) of ``x`` rounded to the
    nearest E2M1 value, ties to the even code, saturating at ±6."""
    a = x.float().abs().clamp(max=FP4_MAX)
    mids = _MIDPOINTS.to(a.device)
    idx = torch.bucketize(a, mids)  # index of the first midpoint >= a: a below it → lower value
    at_mid = (idx < len(mids)) & (a == mids[idx.clamp(max=len(mids) - 1)])
    idx = torch.where(at_mid & (idx % 2 == 1), idx + 1, idx)  # exact tie: bucketize chose the lower code; keep even
    sign = (x < 0) & (idx > 0)
    return (idx + sign.to(idx.dtype) * 8).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    mag = _E2M1.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte along the last dim, the even element in the low nibble: [.., n] → [.., n/2]."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """float32 [1]: ``448 · 6 / amax(w)`` (1 for an all-zero tensor)."""
    amax = w.float().abs().amax()
    return torch.where(amax > 0, FP8_MAX * FP4_MAX / amax, torch.ones_like(amax)).reshape(1)


def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor | None = None):
    """``(codes uint8 [out, in], group_scale float8 [out, in/16], global_scale float32 [1])``;
    ``w ≈ e2m1(codes) · group_scale / global_scale`` per group of 16 input columns."""
    out_f, in_f = w.shape
    if in_f % NVFP4_GROUP:
        raise ValueError(f"nvfp4: input features {in_f} are not a multiple of {NVFP4_GROUP}")
    gs = nvfp4_global_scale(w) if global_scale is None else global_scale.float().reshape(1)
    g = w.float().reshape(out_f, in_f // NVFP4_GROUP, NVFP4_GROUP)
    group_scale = to_fp8(g.abs().amax(dim=2) / FP4_MAX * gs)
    eff = group_scale.float() / gs  # the scale the served model applies
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))
    codes = e2m1_codes(g / safe[..., None]).reshape(out_f, in_f)
    return codes, group_scale, gs


def nvfp4_dequantize(codes: torch.Tensor, group_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    out_f, in_f = codes.shape
    vals = e2m1_values(codes).reshape(out_f, in_f // NVFP4_GROUP, NVFP4_GROUP)
    return (vals * (group_scale.float() / global_scale.float())[..., None]).reshape(out_f, in_f)


# -- FP8 activations ---------------------------------------------------------------------------------
# What vLLM's FP8 linears compute on their input (``scaled_fp8_quant``): dynamic per token
# ``scale = max|x| / 448`` (floored at ``1 / (448 · 512)``, vLLM's ``min_scaling_factor``), dynamic
# per token and group of 128 input columns for block FP8 (``per_token_group_quant_fp8``), or a
# calibrated static per-tensor ``input_scale``; then ``fp8(x / scale) · scale``.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def fp8_token_scale(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Dynamic scales: per token ``[..., 1]`` (``group`` 0), or per token and group of ``group``
    columns ``[..., cols / group, 1]`` of the view ``x.reshape(..., cols / group, group)``."""
    x = x.float()
    if group:
        x = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    return (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)


def fake_quant_fp8_dynamic(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """``fp8(x / s) · s`` with the dynamic scales of :func:`fp8_token_scale`."""
    scale = fp8_token_scale(x, group)
    v = x.float()
    if group:
        v = v.reshape(*v.shape[:-1], v.shape[-1] // group, group)
    return (to_fp8(v / scale).float() * scale).reshape(x.shape).to(x.dtype)


def fp8_static_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """The per-tensor input scale of a calibrated ``max|x|`` (float32 [1])."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    return (amax / FP8_MAX).clamp(min=FP8_MIN_SCALE)


def fake_quant_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = float(scale)
    return (to_fp8(x.float() / s).float() * s).to(x.dtype)


# -- FP8 weights as a solver grid ------------------------------------------------------------------
def fp8_row_scales(w: torch.Tensor, strategy: str, amax: float | None = None,
                   block: int = FP8_BLOCK) -> torch.Tensor:
    """The FP8 weight scales of ``w`` [out, in] in the solvers' layout, one value per row and
    column group, float32 ``[out, groups]``: ``channel`` [out, 1]; ``tensor`` [out, 1], every row
    ``amax / 448`` (``amax``: the max|w| over the fused linears sharing the scale, default
    ``w``'s own); ``block`` [out, in / block], each 128×128 block's scale repeated over its rows."""
    if strategy == "tensor":
        a = float(w.float().abs().amax()) if amax is None else float(amax)
        return fp8_scale(torch.tensor([[a]]), "tensor").reshape(1, 1).expand(w.shape[0], 1).clone()
    s = fp8_scale(w, strategy, block)
    if strategy == "block":
        s = s.repeat_interleave(block, 0)[: w.shape[0]]
    return s.contiguous()


def collapse_row_scales(scale: torch.Tensor, strategy: str, block: int = FP8_BLOCK) -> torch.Tensor:
    """The stored ``weight_scale`` of solver-layout scales: channel [out, 1], tensor [1], block
    [ceil(out / block), in / block] (the first row of each row block)."""
    if strategy == "tensor":
        return scale[:1, 0].clone()
    if strategy == "block":
        return scale[::block].contiguous()
    return scale.contiguous()


def fp8_bits(values: torch.Tensor) -> torch.Tensor:
    """int8 tensor holding the E4M3 bit patterns of ``values`` (FP8-representable floats)."""
    return to_fp8(values).view(torch.int8)


def fp8_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(FP8)


# -- NVFP4 as a solver grid, and NVFP4 activations ----------------------------------------------------
def nvfp4_group_scales(w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The effective scales of ``w`` [out, in] per group of 16 columns, float32 [out, in/16]:
    ``fp8(amax(group) / 6 · gs) / gs`` (what the served model multiplies the E2M1 values by)."""
    out_f, in_f = w.shape
    if in_f % NVFP4_GROUP:
        raise ValueError(f"nvfp4: input features {in_f} are not a multiple of {NVFP4_GROUP}")
    gs = global_scale.float().reshape(1, 1)
    amax = w.float().reshape(out_f, in_f // NVFP4_GROUP, NVFP4_GROUP).abs().amax(dim=2)
    return to_fp8(amax / FP4_MAX * gs).float() / gs


def fp8_group_scales(eff: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The stored float8 group scales of effective scales (exact: ``eff · gs`` is within float32
    rounding of an E4M3 value, far below its spacing)."""
    return to_fp8(eff.float() * global_scale.float().reshape(1, 1))


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest E2M1 value (ties to even, saturating at ±6)."""
    return e2m1_values(e2m1_codes(x))


def nvfp4_safe(eff: torch.Tensor) -> torch.Tensor:
    """Scales to divide by: an all-zero group (scale 0) divides by 1 and gives code 0."""
    return torch.where(eff > 0, eff, torch.ones_like(eff))


def fake_quant_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activations (vLLM ``scaled_fp4_quant``): per token and group of 16, the local scale
    ``fp8(amax / 6 · gs)`` with the calibrated global scale ``gs``; ``e2m1(x / s) · s`` with
    ``s = local / gs``."""
    v = x.float().reshape(*x.shape[:-1], x.shape[-1] // NVFP4_GROUP, NVFP4_GROUP)
    gs = float(global_scale)
    eff = to_fp8(v.abs().amax(dim=-1, keepdim=True) / FP4_MAX * gs).float() / gs
    return (e2m1_round(v / nvfp4_safe(eff)) * eff).reshape(x.shape).to(x.dtype)


def nvfp4_static_global_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """The input global scale of a calibrated ``max|x|``: ``448 · 6 / amax`` (float32 [1])."""
    return nvfp4_global_scale(torch.as_tensor(amax, dtype=torch.float32).reshape(1))


# -- the float grids the solvers round to (QuantArgs.grid) ---------------------------------------------
# round: a value in scale units → the nearest grid value; codes: grid values → the int8 codes a
# QuantResult holds (E4M3 bit patterns; E2M1 codes 0..15); values: codes → grid values.
GRID_ROUND = {"fp8": lambda v: to_fp8(v).float(), "nvfp4": e2m1_round}
GRID_CODES = {"fp8": fp8_bits, "nvfp4": lambda v: e2m1_codes(v).to(torch.int8)}
GRID_VALUES = {"fp8": lambda q: q.view(FP8).float(), "nvfp4": lambda q: e2m1_values(q.view(torch.uint8))}


def grid_scales(w: torch.Tensor, grid: str, strategy: str = "channel", amax: float | None = None) -> torch.Tensor:
    """The fixed scales of ``w`` on ``grid`` in the solvers' layout [out, groups] (``amax``: the
    max|w| of the fused linears sharing the per-tensor scale / NVFP4 global scale)."""
    if grid == "fp8":
        return fp8_row_scales(w, strategy, amax)
    a = float(w.float().abs().amax()) if amax is None else float(amax)
    return nvfp4_group_scales(w, nvfp4_global_scale(torch.tensor(a)))
