"""AWQ inside the layer loop (``quant.smooth=awq``, preset ``awq_w4a16``): a stage hook that
chooses each smoothing pair's channel scales by the output error of the *weight-quantized*
consumers, folds them like SmoothQuant's (same pairs, same folding: dist_quant/smoothing.py),
and the clipping search that the solve of every linear then uses.

Per pair, where its linears are quantized (the stage order of dist_quant/smoothing.py):

1. statistics of the consumers' input on this rank's tokens: ``Σ|x|`` and the token count
   (SUM-reduced: the mean |x| per channel, the same on every rank), ``Σ x xᵀ``, and max |x|
   (MAX-reduced, only for the report's outlier picture);
2. ``Σ x xᵀ`` SUM-reduced (float64 sums of float32 products: the same on every rank, no
   activations moved); for each α of the grid ``s(α)`` (algorithms/awq.py) and the output
   error ``tr(ΔW (Σ x xᵀ) ΔWᵀ)`` of ``ΔW = W − Q(W·s)/s``, the grid split over the ranks (α
   number c on rank c mod world size) and over the rank's threads (single-threaded ops: the
   same number for any split); one SUM all-reduce of the errors, so every rank picks the same
   α, the one 1 rank picks;
3. ``s`` folded into the producer (norm weight, or producer rows for v→o / up→down; GQA: one
   scale per kv-group channel, from the mean over the group's heads) and into the consumers'
   columns, exactly as the W8A8 smoothers fold;
4. the stage's solve (``quant.weight_solver``: GPTQ or RTN) on the refolded inputs, with the
   clipping ratios of :func:`clip_search` when ``quant.awq_clip`` (from the reduced Hessian
   the solve gets anyway, so it is computed by the owner alone).
"""
from __future__ import annotations

import torch

from .algorithms.awq import awq_scales, candidate_errors, choose, clip_ratios, grid, weight_mean
from .arch.smooth_pairs import NO_CLIP
from .smoothing import Smoothing
from .stats import ChannelRangeStat, HessianStat


class AwqSmoothing(Smoothing):
    """Stage hook: AWQ's scale search per smoothing pair (see the module docstring); the pair
    selection, the stage order and the folding are :class:`Smoothing`'s."""

    def _workers(self) -> int:
        """Threads for this rank's candidates: its intra-op threads (CPU; 1 on accelerators)."""
        return torch.get_num_threads() if self.device.type == "cpu" else 1

    def _choose(self, ctx, pair, acts) -> torch.Tensor:
        weight = torch.cat([ctx.weight(c) for c in pair.consumers])
        n = weight.shape[1]
        xxt = HessianStat(n, self.device)
        rng = ChannelRangeStat(n, self.device)
        sums = torch.zeros(n + 1, dtype=torch.float64, device=self.device)  # Σ|x| per channel, tokens
        for a, m in zip(acts, ctx.smooth_masks):  # the smoothing set's tokens (calib.smooth_path)
            xxt.add(a, m)
            rng.add(a, m)
            real = a[m].float()
            sums[:n] += real.abs().sum(dim=0, dtype=torch.float64)
            sums[n] += real.shape[0]
        sums = self.comm.all_reduce(sums, "sum")
        rng.unpack(self.comm.all_reduce(rng.packed(), "max"))
        x_mean = (sums[:n] / sums[n].clamp(min=1)).float()
        w_mean = weight_mean(weight, self.args.group_size)
        if pair.kind == "ov":  # one scale per kv-group channel (see smoothing.Heads)
            h = self.heads
            x_mean, w_mean, expand = h.group_mean(x_mean), h.group_mean(w_mean), h.expand
        else:
            def expand(t):
                return t
        q = self.q

        def scales(alpha: float) -> torch.Tensor:
            return expand(awq_scales(x_mean, w_mean, alpha, q.awq_duo_scaling))

        def search(_alpha):
            alphas = grid(q.awq_grid)
            # Σ x xᵀ of all ranks' tokens (float64 sums: exact, the same on every rank), then
            # each rank scores its share of the grid and one SUM gives every rank all errors
            xxt.unpack(self.comm.all_reduce(xxt.packed(), "sum"))
            rank, world = self.comm.rank, self.comm.world_size
            num, den = candidate_errors(weight, xxt.sum, scales, alphas, self.args,
                                        mine=lambda c: c % world == rank, workers=self._workers())
            num = self.comm.all_reduce(num.to(self.device), "sum").cpu()
            den = float(den)
            errors = (num / den if den > 0 else num).tolist()
            alpha, err, _ = choose(errors, alphas)
            return alpha, None, err

        s, alpha, beta, searched, err = self.smoother(q, x_mean, w_mean, search)
        return self._record(ctx, pair, expand(s).contiguous(), alpha, beta, searched, err, rng.absmax())


def clips(name: str) -> bool:
    """AWQ clips every linear but those whose outputs meet in attention scores (AutoAWQ's
    ``avoid_clipping``: q and k projections)."""
    return name.rsplit(".", 1)[-1] not in NO_CLIP


def clip_search(q):
    """The solve's clipping hook of a job (None unless AWQ with ``quant.awq_clip``):
    ``clip(linears, weights, hessian, args) -> [rows, groups] ratios or None``; the rows of
    linears that are not clipped are NaN (their scales are the observer's, as without AWQ), so
    a linear gets the same scales whether it is solved alone or stacked with others."""
    if q.smooth != "awq" or not q.awq_clip:
        return None

    def clip(linears, weights, hessian, args):
        if not any(clips(lin.name) for lin in linears):
            return None
        parts = [clip_ratios(w, hessian, args) if clips(lin.name)
                 else torch.full((w.shape[0], args.groups(w.shape[1])), float("nan"), device=w.device)
                 for lin, w in zip(linears, weights)]
        return torch.cat(parts)

    return clip
