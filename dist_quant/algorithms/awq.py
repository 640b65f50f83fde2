"""AWQ (Lin et al., 2023; msModelSlim anti-outlier method m3): activation-aware channel
scales for weight-only quantization, and its clipping search.

Scale search, per smoothing pair (the consumers ``W`` [out, in] share one input ``x``):

    s(α) = mean|x|^α / w_mean^(1−α)        (AutoAWQ's ``duo_scaling``; without it: mean|x|^α)
    s ← s / sqrt(max s · min s)
    err(α) = ‖x Wᵀ − x (Q(W·s)/s)ᵀ‖²      over the calibration tokens

with ``w_mean`` the mean over the rows of ``|W|`` normalized by each quantization group's
max (AutoAWQ ``_search_best_scale``), α on the grid ``0, 1/n, …, (n−1)/n`` and the first
α of smallest error kept (AutoAWQ ``_compute_best_scale``: ``loss < best_error``). ``Q`` is
round to nearest with the job's group size and symmetry and min-max ranges (AutoAWQ's).
Because the error is a quadratic form in the weight error, it is computed from the
inputs' ``Σ x xᵀ`` alone: ``err = tr(ΔW (Σ x xᵀ) ΔWᵀ)``: every token counts, at a cost that
does not grow with the tokens, and each rank's partial error (from its own tokens' sums)
adds up to the global one, so the ranks SUM-reduce one number per candidate and gather no
activations.

Clipping search (AutoAWQ ``_search_best_clip``): per output row and quantization group the
range is shrunk by ``1, 0.95, …, 0.55`` and the ratio with the smallest output error of that
group ``Δw_g H_gg Δw_gᵀ`` is kept (``H_gg``: the group's diagonal block of the Hessian, i.e.
the group's contribution to the output on all calibration tokens; AutoAWQ samples 512 tokens).
Linears whose outputs meet in attention scores (q, k) are not clipped, as in AutoAWQ.

Pure tensor functions; the reductions are the caller's (dist_quant/awq.py).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..quant.qparams import QuantArgs
from ..solver_threads import single_threaded
from .rtn import rtn_quantize

SCALE_EPS = 1e-4  # AutoAWQ: clamp(min=1e-4) of the scales, + 1e-4 on the weight statistic
CLIP_STEPS = 10  # ratios 1 - i/20, i < 10 (AutoAWQ n_grid=20, max_shrink=0.5)
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(CLIP_STEPS))
ERROR_ROWS = 1024  # weight rows per float64 GEMM in candidate_errors


def weight_mean(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """AutoAWQ's per-input-channel weight statistic: ``|W|`` divided by its group's max (each
    row's groups of ``group_size`` columns; the whole row for -1), averaged over the rows."""
    w = weight.float()
    cols = w.shape[1] if group_size == -1 else group_size
    g = w.abs().reshape(-1, cols)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(w.shape).mean(dim=0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool = True) -> torch.Tensor:
    """The channel scales of one grid point (float32, normalized to geometric mid-range 1)."""
    x = x_mean.float()
    if duo:
        s = (x.pow(alpha) / (w_mean.float().pow(1.0 - alpha) + SCALE_EPS)).clamp(min=SCALE_EPS)
    else:
        s = x.pow(alpha).clamp(min=SCALE_EPS)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def grid(points: int) -> tuple[float, ...]:
    return tuple(i / points for i in range(points))


def search_args(args: QuantArgs) -> QuantArgs:
    """The search's quantizer: the job's bits, group size, symmetry and scale dtype, min-max
    ranges (AutoAWQ's ``pseudo_quantize_tensor``; the MSE observer would cost ~7x per candidate)."""
    return QuantArgs(args.bits, args.group_size, args.symmetric, args.scale_dtype, mse=False)


def scaled_error(weight: torch.Tensor, s: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``W − Q(W·s)/s`` (float32): the weight error the served model has on the original input."""
    w = weight.float()
    wq = rtn_quantize(w * s[None, :], search_args(args)).dequantize(args)
    return w - wq / s[None, :]


def quadratic_rows(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``Σ_rows (d H) ∘ d``, row block by row block: float32 GEMMs (``h`` float32 [in, in]),
    products summed in float64 (as stats.output_error_rows); the grid only ranks candidates."""
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for a in range(0, d.shape[0], ERROR_ROWS):
        db = d[a:a + ERROR_ROWS].float()
        total += ((db @ h).double() * db.double()).sum()
    return total


def candidate_errors(weight: torch.Tensor, xxt: torch.Tensor, scales: Callable[[float], torch.Tensor],
                     alphas, args: QuantArgs, mine: Callable[[int], bool] = lambda c: True,
                     workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the tokens whose ``Σ x xᵀ`` is ``xxt`` ([in, in]): the output error ``num[c]`` of
    candidate ``alphas[c]`` (float64 [C]) and ``den = ‖x Wᵀ‖²``. Only candidates with ``mine(c)``
    are computed (the others are 0: ranks split the grid and SUM-reduce ``num``), in ``workers``
    threads of single-threaded ops: each candidate's number is the same on any rank and for
    any thread count."""
    h = xxt.float()
    todo = [c for c in range(len(alphas)) if mine(c)]

    def one(c):
        return quadratic_rows(scaled_error(weight, scales(alphas[c]), args), h)

    num = torch.zeros(len(alphas), dtype=torch.float64, device=weight.device)
    with single_threaded(weight.device):
        if workers > 1 and len(todo) > 1:
            with ThreadPoolExecutor(min(workers, len(todo)), thread_name_prefix="awq") as pool:
                values = list(pool.map(one, todo))
        else:
            values = [one(c) for c in todo]
        den = quadratic_rows(weight.float(), h)
    for c, v in zip(todo, values):
        num[c] = v
    return num, den


def choose(errors: list[float], alphas) -> tuple[float, float, int]:
    """The first grid point of smallest error (NaN never wins): ``(alpha, error, index)``."""
    best, best_err = 0, float("inf")
    for i, e in enumerate(errors):
        if e < best_err:
            best, best_err = i, e
    return float(alphas[best]), best_err, best


def clip_ratios(weight: torch.Tensor, h: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Per (row, group) the range ratio of :data:`CLIP_RATIOS` with the smallest group output
    error ``Δw_g H_gg Δw_gᵀ`` (``h``: the Hessian of the linear's inputs; its scale does not
    matter). Returns float32 [out, groups]; the first ratio wins ties (1.0: no clipping)."""
    out = torch.ones(weight.shape[0], weight.shape[1] // args.columns_per_group(weight.shape[1]),
                     device=weight.device)
    for a in range(0, weight.shape[0], ERROR_ROWS):  # row blocks: bounded float64 temporaries
        out[a:a + ERROR_ROWS] = _clip_block(weight[a:a + ERROR_ROWS].float(), h, args)
    return out


def _clip_block(w: torch.Tensor, h: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    out_f, n = w.shape
    cols = args.columns_per_group(n)
    groups = n // cols
    plain = search_args(args)
    best = torch.ones(out_f, groups, device=w.device)
    best_err = torch.full((out_f, groups), float("inf"), dtype=torch.float64, device=w.device)
    hg = torch.stack([h[g * cols:(g + 1) * cols, g * cols:(g + 1) * cols] for g in range(groups)]).double()
    wg = w.reshape(out_f, groups, cols)
    for r in CLIP_RATIOS:
        ratio = torch.full((out_f, groups), r, device=w.device)
        d = (wg - rtn_quantize(w, plain, clip=ratio).dequantize(plain).reshape(out_f, groups, cols)).double()
        err = (torch.einsum("ogi,gij->ogj", d, hg) * d).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    return best
