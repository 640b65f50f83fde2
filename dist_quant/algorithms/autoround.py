"""SignRound / AutoRound (Cheng et al., 2023; intel/auto-round): the math of tuning the
rounding and the clipping of one decoder layer's weights, as pure tensor functions.

Per linear ``W`` [out, in] with groups of ``c`` columns, the tuned quantizer is

    lo, hi = min(W_g, 0) · s_min,  max(W_g, 0) · s_max        (s_min, s_max ∈ [0, 1] per group)
    scale, zero = the preset's rule on [lo, hi]               (as quant/qparams.py, scale rounded
                                                               to the scale dtype)
    q = clamp(round(W / scale + V) + zero, qmin, qmax)       (V ∈ [-0.5, 0.5] per weight)
    Ŵ = (q - zero) · scale

with ``round`` a straight-through estimator (gradient 1), so ``V``, ``s_min`` and ``s_max``
get gradients of the layer's output error. Each step moves every parameter by
``lr_t · sign(gradient)`` (signed gradient descent), with ``lr_t = lr · (1 - t / iters)``
(auto-round's ``LinearLR(start_factor=1, end_factor=0)``), keeps ``V`` in [-0.5, 0.5] and the
factors in [0, 1] (auto-round's ``minmax_scale_bound``), and the parameters with the lowest
loss seen are the result (auto-round's best-loss parameters). Defaults follow auto-round
0.16 (``SignRoundConfig``: ``iters=200``, ``lr=1/iters``, ``minmax_lr=lr``, batch size 8;
``sign_round/quantizer.py`` ``SignRoundQuantizer.quantize_block``, ``wrapper.py``
``WrapperLinear``, ``data_type/int.py`` ``quant_tensor_sym``).

Differences from auto-round, on purpose: the integer grid is the one every dist_quant
solver writes (compressed-tensors: symmetric ``scale = amax / 7.5`` with integers in
[-8, 7], asymmetric with a zero point), not auto-round's "full range" symmetric grid (its
``scale = ±amax / 8`` may be negative), so the output is the same pack-quantized format as
GPTQ's; and ``V`` is clamped to [-0.5, 0.5] explicitly (auto-round bounds it only through
the decaying learning rate, whose steps sum to 0.5 with the default lr).

The layer-level driver (forward, data-parallel gradient reduction, sampling) is
dist_quant/autoround_layer.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.qparams import QuantArgs, QuantResult


@dataclass(frozen=True)
class AutoRoundParams:
    iters: int = 200
    lr: float = 0.005  # 1 / iters unless given
    minmax_lr: float = 0.005  # lr unless given
    batch_size: int = 8  # samples per step, over all ranks
    minmax: bool = True  # tune the clip factors s_min, s_max
    init: str = "rtn"  # rtn (V = 0, factors 1) or gptq (V and factors reproduce GPTQ's integers)
    seed: int = 0
    sampler: str = "stratified"  # stratified (StratifiedSampler) or shuffle (auto-round's IndexSampler)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (auto-round's ``round_ste``)."""
    return (x.round() - x).detach() + x


def _cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (and back to float32) forward, identity backward."""
    return (x.to(dtype).float() - x).detach() + x


def group_range(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(min(w, 0), max(w, 0))`` of ``w`` [out, in] → two [out, groups] tensors
    (auto-round's ``weight_min`` / ``weight_max``: fixed during tuning)."""
    g = grouped(w, args)
    return g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)


def grouped(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    out_f, in_f = w.shape
    cols = args.columns_per_group(in_f)
    return w.reshape(out_f, in_f // cols, cols)


def tuned_qparams(lo: torch.Tensor, hi: torch.Tensor, s_min: torch.Tensor, s_max: torch.Tensor,
                  args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [out, groups] of the clipped range ``[lo·s_min, hi·s_max]``, by the
    rule of ``quant.qparams`` (differentiable in the factors; the zero point's rounding and
    the scale's rounding to ``args.scale_dtype`` are straight-through)."""
    lo, hi = lo * s_min, hi * s_max
    if args.symmetric:
        scale = torch.maximum(-lo, hi) / ((args.qmax - args.qmin) / 2)
    else:
        scale = (hi - lo) / (args.qmax - args.qmin)
    finfo = torch.finfo(args.scale_dtype)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps, max=finfo.max)
    scale = _cast_ste(scale, args.scale_dtype)
    if args.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (args.qmin - round_ste(lo / scale)).clamp(args.qmin, args.qmax)
    return scale, zero


def tuned_integers(w: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   args: QuantArgs) -> torch.Tensor:
    """``clamp(round(w / scale + v) + zero)`` per group: [out, groups, cols] (float, STE)."""
    g = grouped(w, args)
    q = round_ste(g / scale[..., None] + grouped(v, args)) + zero[..., None]
    return q.clamp(args.qmin, args.qmax)


def qdq(w: torch.Tensor, v: torch.Tensor, s_min: torch.Tensor, s_max: torch.Tensor,
        lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The tuned fake-quantized weight ``Ŵ`` [out, in] (differentiable in ``v``, ``s_min``,
    ``s_max``); ``lo``, ``hi``: :func:`group_range` of ``w``."""
    scale, zero = tuned_qparams(lo, hi, s_min, s_max, args)
    q = tuned_integers(w, v, scale, zero, args)
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)


def result(w: torch.Tensor, v: torch.Tensor, s_min: torch.Tensor, s_max: torch.Tensor,
           lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> QuantResult:
    """The integers, scales and zero points of the tuned quantizer (``result(...).dequantize()``
    is exactly :func:`qdq`'s value)."""
    with torch.no_grad():
        scale, zero = tuned_qparams(lo, hi, s_min, s_max, args)
        q = tuned_integers(w, v, scale, zero, args)
        return QuantResult(q=q.reshape(w.shape).to(torch.int8), scale=scale.contiguous(),
                           zero=zero.to(torch.int8))


INIT_MARGIN = 0.01
"""How far inside its integer's rounding interval an initial offset puts a weight."""


def init_factors(scale: torch.Tensor, zero: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_min, s_max)`` that give another quantizer's per-group ``scale`` (and zero point)
    where they lie within the group's range (symmetric: both ``scale·7.5 / amax``; asymmetric:
    ``lo' / lo`` and ``hi' / hi`` of the range ``lo' = (qmin − zero)·scale``, ``hi' = lo' + 15·scale``),
    clamped to [0, 1]."""
    tiny = torch.finfo(torch.float32).tiny
    if args.symmetric:
        full = torch.maximum(-lo, hi) / ((args.qmax - args.qmin) / 2)
        factor = torch.where(full > 0, scale / full.clamp(min=tiny), torch.ones_like(full)).clamp(0.0, 1.0)
        return factor.clone(), factor.clone()
    lo_t = (args.qmin - zero.float()) * scale
    hi_t = lo_t + (args.qmax - args.qmin) * scale
    s_min = torch.where(lo < 0, lo_t / lo.clamp(max=-tiny), torch.ones_like(lo)).clamp(0.0, 1.0)
    s_max = torch.where(hi > 0, hi_t / hi.clamp(min=tiny), torch.ones_like(hi)).clamp(0.0, 1.0)
    return s_min, s_max


def init_from_result(w: torch.Tensor, init: QuantResult, lo: torch.Tensor, hi: torch.Tensor,
                     args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(V, s_min, s_max)`` that reproduce another solver's integers (GPTQ) as far as the
    parameterization allows: :func:`init_factors` for its scales, and for each weight the
    smallest offset that rounds ``w / scale + V`` to its integer (0 where round-to-nearest
    already gives it, else just :data:`INIT_MARGIN` inside the integer's rounding interval,
    so the tuning can move it back as easily as a rounded weight), clamped to [-0.5, 0.5]:
    GPTQ's error feedback can move a weight further than half a step (about 95 % of the
    integers are reproduced on correlated inputs, tests/test_autoround.py)."""
    s_min, s_max = init_factors(init.scale, init.zero, lo, hi, args)
    scale, zero = tuned_qparams(lo, hi, s_min, s_max, args)
    d = (grouped(init.q.float(), args) - zero[..., None]) - grouped(w, args) / scale[..., None]
    v = torch.sign(d) * (d.abs() - 0.5 + INIT_MARGIN).clamp(min=0)
    return v.clamp(-0.5, 0.5).reshape(w.shape).contiguous(), s_min, s_max


def init_observer(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RTN start: ``V = 0`` and factors 1 (min/max, auto-round's start), or with
    ``args.mse`` (``quant.observer=mse``) the factors of the per-group clipping search."""
    if not args.mse:
        return torch.zeros_like(w), torch.ones_like(lo), torch.ones_like(hi)
    from ..quant.qparams import compute_qparams

    g = grouped(w, args)
    scale, zero = compute_qparams(g.reshape(-1, g.shape[-1]), args)
    s_min, s_max = init_factors(scale.reshape(lo.shape), zero.reshape(lo.shape), lo, hi, args)
    return torch.zeros_like(w), s_min, s_max


def lr_at(lr: float, step: int, iters: int) -> float:
    """Learning rate of step ``step`` (0-based): linear decay from ``lr`` to 0 over ``iters``
    (``torch.optim.lr_scheduler.LinearLR(start_factor=1.0, end_factor=0.0, total_iters=iters)``)."""
    return lr * (1.0 - min(step, iters) / iters)


def sign_step_(v: torch.Tensor, s_min: torch.Tensor, s_max: torch.Tensor, grads, lr: float,
               minmax_lr: float) -> None:
    """One signed-gradient step in place (auto-round's ``SignSGD``: ``p -= lr · sign(g)``),
    then ``V`` back into [-0.5, 0.5] and the factors into [0, 1]. ``grads``: (dV, ds_min, ds_max);
    factor gradients may be None (factors not tuned)."""
    gv, gmin, gmax = grads
    v.sub_(lr * torch.sign(gv)).clamp_(-0.5, 0.5)
    for p, g in ((s_min, gmin), (s_max, gmax)):
        if g is not None:
            p.sub_(minmax_lr * torch.sign(g)).clamp_(0.0, 1.0)


class IndexSampler:
    """Batches of sample indices as auto-round's ``IndexSampler`` draws them: a shuffled
    order taken ``batch`` at a time; when fewer than ``batch`` remain, reshuffle and start
    over (the incomplete rest is skipped). Seeded, so every rank draws the same batches."""

    def __init__(self, n: int, batch: int, seed: int):
        if not 0 < batch <= n:
            raise ValueError(f"batch size {batch} must be in [1, {n}]")
        self.n, self.batch, self.index = n, batch, 0
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.gen).tolist()

    def next_batch(self) -> list[int]:
        if self.index + self.batch > self.n:
            self.order = torch.randperm(self.n, generator=self.gen).tolist()
            self.index = 0
        out = self.order[self.index:self.index + self.batch]
        self.index += self.batch
        return out


class StratifiedSampler:
    """Batches of sample indices with one index from each of ``batch`` contiguous strata of
    ``range(n)`` (``torch.tensor_split`` of it into ``batch`` near-equal parts): each stratum is
    shuffled, and batch ``k`` of a pass takes the ``k``-th index of every stratum; when the
    smallest stratum is used up, every stratum is reshuffled (a stratum's unused rest is
    skipped, as :class:`IndexSampler` skips its incomplete rest). Every sample is drawn once per
    pass, as with auto-round's sampler, but a batch is spread evenly over the sample order, so
    the ranks, which hold contiguous slices of it (calibration.rank_rows), get ``batch / world``
    samples of every batch when the world size divides the batch and the sample count: no rank
    waits for one that drew more. It depends on ``n``, ``batch`` and ``seed`` only, so every
    world size draws the same batches (N ranks tune exactly as 1 rank)."""

    def __init__(self, n: int, batch: int, seed: int):
        if not 0 < batch <= n:
            raise ValueError(f"batch size {batch} must be in [1, {n}]")
        self.strata = [t.tolist() for t in torch.arange(n).tensor_split(batch)]
        self.depth = min(len(t) for t in self.strata)
        self.gen = torch.Generator().manual_seed(seed)
        self.index = self.depth

    def next_batch(self) -> list[int]:
        if self.index >= self.depth:
            self.order = [[t[i] for i in torch.randperm(len(t), generator=self.gen).tolist()] for t in self.strata]
            self.index = 0
        out = [t[self.index] for t in self.order]
        self.index += 1
        return out


SAMPLERS = {"stratified": StratifiedSampler, "shuffle": IndexSampler}
"""``quant.autoround.sampler``: how each step's batch of samples is drawn."""
