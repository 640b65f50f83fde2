"""W8A8 inside the layer loop: smoothing (SmoothQuant, Flex smooth) and activation
quantization, stage by stage, before each stage's weight solve.

Two stage hooks (see dist_quant/stage.py): :class:`Smoothing` and :class:`ActivationQuant`
run inside ``StageContext.quantize`` after the stage's input has been computed and before
the capture → reduce → solve of its linears:

1. **norm → linears** pairs folded in this stage (input_layernorm → q/k/v,
   post_attention_layernorm → gate/up): per-channel max |x| of the stage input (MAX-reduced
   over ranks), scales chosen (given α/β, or the Flex smooth search), 1/s folded into the
   norm weight and s into the consumers' weight columns; the stage input is recomputed
   with the folded norm.
2. **linear → linear** pairs whose producer is solved in this stage (v_proj → o_proj in
   the q/k/v stage, up_proj → down_proj in the gate/up stage). The producer must be
   smoothed *before* it is quantized, but the consumer's input does not exist yet: it is
   computed once here with the (norm-smoothed) float weights of this stage — attention
   with float q/k/v, or ``act(gate)·up`` with float gate/up — only to take its channel
   maxima (and the search tokens). 1/s goes into the producer's output rows (and bias),
   s into the consumer's columns; for v → o the scale is shared by the heads of a kv group.
   The consumer's real input is computed later by the normal propagation, with the
   quantized producer.
3. **activation quantization** of the stage input: static per-tensor (range MIN/MAX
   reduced over ranks, asymmetric int8 scale and offset) or dynamic per-token; the stage
   input is replaced by its fake-quantized value, so the Hessian of the solve and the
   propagation to the next stage (and layer) see what the served model computes.

Everything folded is kept as an *override* of a checkpoint tensor (the writer and the
solve read overrides first): norm weights and biases in the checkpoint dtype, weights to
be quantized in float32. A norm weight is stored rounded to the checkpoint dtype; the
consumers' columns are scaled by the *effective* ratio ``w / round(w / s)``, so the float
product is unchanged exactly, rounding included.

Distributed: activation maxima and ranges are MAX-reduced; the Flex smooth search's
error sums are SUM-reduced (each rank scores its own tokens); no rank gathers
activations. Every rank reaches the same scales.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
from dataclasses import dataclass

import torch

from .algorithms.flex_smooth import candidate_errors, flex_scales, two_stage_search
from .algorithms.registry import SMOOTH_NONE, SMOOTHERS
from .arch.smooth_pairs import SmoothPair, smooth_pairs
from .calibration import rank_rows
from .quant.activations import (TOKEN_DIVISOR, ActQuantArgs, StaticActParams, fake_quant, fake_quant_dynamic,
                                fake_quant_static, static_params)
from .quant.qparams import QuantArgs
from .stats import ChannelRangeStat

log = logging.getLogger("dist_quant")


def pattern_matches(pattern: str, fqn: str) -> bool:
    """Full name, a dotted suffix (``self_attn.o_proj``) or an fnmatch pattern."""
    return fqn == pattern or fqn.endswith("." + pattern) or fnmatch.fnmatchcase(fqn, pattern) \
        or fnmatch.fnmatchcase(fqn, "*." + pattern)


@dataclass(frozen=True)
class Heads:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def group_mean(self, t: torch.Tensor) -> torch.Tensor:
        """[heads·d] per-o-channel values → [kv_heads·d]: the mean over the heads of each kv group."""
        return t.reshape(self.kv_heads, self.group, self.head_dim).mean(dim=1).reshape(-1)

    def group_max(self, t: torch.Tensor) -> torch.Tensor:
        """[heads·d] per-o-channel values → [kv_heads·d]: the max over the heads of each kv group."""
        return t.reshape(self.kv_heads, self.group, self.head_dim).amax(dim=1).reshape(-1)

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """[kv_heads·d] → [heads·d]: each kv channel repeated for the heads of its group."""
        kv = t.reshape(self.kv_heads, 1, self.head_dim)
        return kv.expand(self.kv_heads, self.group, self.head_dim).reshape(-1)

    @staticmethod
    def from_config(config: dict) -> "Heads":
        heads = int(config.get("num_attention_heads") or 1)
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = config.get("head_dim") or int(config.get("hidden_size", heads)) // heads
        return Heads(heads, kv, int(head_dim))


PROFILE_BINS = 64


def binned_max(t: torch.Tensor, bins: int = PROFILE_BINS) -> list[float]:
    """Per-channel values → at most ``bins`` values: the max over contiguous channel blocks
    (exact when there are no more channels than bins; outliers survive the binning)."""
    t = t.detach().float().cpu()
    n = t.numel()
    if n <= bins:
        return [float(v) for v in t]
    edges = [i * n // bins for i in range(bins + 1)]
    return [float(t[edges[i]:edges[i + 1]].max()) for i in range(bins)]


def channel_profile(absmax: torch.Tensor, s: torch.Tensor) -> dict:
    """What the report draws for a smoothing pair: per-channel max |x| of the consumers' input
    before smoothing and after (x / s), binned to :data:`PROFILE_BINS` values, and the
    outlier ratio max / median of each."""
    after = absmax.float() / s.float()

    def ratio(t):
        med = float(t.median())
        return float(t.max()) / med if med > 0 else None

    return {"absmax_before": binned_max(absmax), "absmax_after": binned_max(after),
            "channels": int(absmax.numel()), "outlier_ratio_before": ratio(absmax.float()),
            "outlier_ratio_after": ratio(after)}


# -- folding: pure module/tensor updates (tests call these directly) -----------------------------

def fold_norm(norm_weight: torch.Tensor, s: torch.Tensor, norm_bias: torch.Tensor | None = None):
    """1/s into a norm: returns (new weight in the norm's dtype, new bias or None, effective s).
    The effective s (``w / new_w``) is what the consumers' columns must be multiplied by."""
    w32 = norm_weight.float()
    new_w = (w32 / s).to(norm_weight.dtype)
    s_eff = torch.where(new_w != 0, w32 / new_w.float(), s)
    new_b = (norm_bias.float() / s_eff).to(norm_bias.dtype) if norm_bias is not None else None
    return new_w, new_b, s_eff


def fold_rows(weight: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None):
    """1/s into a producer linear's output rows (and bias)."""
    new_w = (weight.float() / s[:, None]).to(weight.dtype)
    new_b = (bias.float() / s).to(bias.dtype) if bias is not None else None
    return new_w, new_b


def fold_columns(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s into a consumer linear's input columns."""
    return (weight.float() * s[None, :]).to(weight.dtype)


class Smoothing:
    """Stage hook: the smoothing pairs folded where their linears are quantized (see the
    module docstring). One per job: it keeps the search-token selection and what it logged."""

    def __init__(self, cfg, comm, plan, ckpt, device: torch.device, args: QuantArgs, act: ActQuantArgs | None):
        """``act`` None: activations stay float (the Flex smooth search, which scores int8
        products, then assumes dynamic per-token activations)."""
        self.cfg, self.comm, self.plan, self.ckpt, self.device = cfg, comm, plan, ckpt, device
        self.args, self.act = args, act
        self.q = cfg.quant
        self.arch = plan.arch
        self.quantized = {lin.name for lin in plan.linears}
        self.pairs = smooth_pairs(self.arch.name) if self.q.smooth != SMOOTH_NONE else ()
        self.smoother = SMOOTHERS.get(self.q.smooth)
        self.heads = Heads.from_config(ckpt.config)
        self._select: list[torch.Tensor] | None = None
        self.lanes = None  # stage.Lanes of a job with calib.smooth_path (set by the pipeline)
        self._skipped_logged: set[str] = set()

    # -- which pairs ---------------------------------------------------------------------
    def layer_pairs(self, index: int) -> list[SmoothPair]:
        prefix = self.arch.layer_prefix(index)
        out = []
        for pair in self.pairs:
            consumers = [prefix + c for c in pair.consumers]
            linears = consumers + ([prefix + pair.producer] if pair.kind != "norm" else [])
            if any(name + ".weight" not in self.ckpt for name in linears):
                continue  # not this layer's shape (an MoE layer's MLP, MLA without q_lora_rank)
            why = None
            hit = next((p for p in self.q.disable_anti_names for c in consumers if pattern_matches(p, c)), None)
            if hit is not None:
                why = f"quant.disable_anti_names has {hit!r}"
            elif any(name not in self.quantized for name in linears):
                why = "a linear of the pair is not quantized (quant.ignore)"
            if why is None:
                out.append(pair)
            elif pair.name not in self._skipped_logged:
                self._skipped_logged.add(pair.name)
                log.info("smoothing: skip %s (%s)", pair.name, why)
        return out

    @staticmethod
    def folds_with(pair: SmoothPair, names: set[str]) -> bool:
        """A norm pair folds where its consumers are quantized, a linear pair where its producer is."""
        return (pair.consumers[0] if pair.kind == "norm" else pair.producer) in names

    # -- the stage hook --------------------------------------------------------------------
    def before_solve(self, ctx, linears, inputs, make_inputs, downstream):
        if not self.pairs:
            return inputs
        self.lanes = ctx.job.lanes
        names = {ctx.rel(lin.name) for lin in linears}
        pairs = [p for p in self.layer_pairs(ctx.index) if self.folds_with(p, names)]
        for pair in sorted(pairs, key=lambda p: p.kind != "norm"):
            if pair.kind == "norm":
                if make_inputs is None:
                    raise RuntimeError(f"smoothing pair {pair.name}: the layer program passed the stage inputs as "
                                       "values; pass a callable so they can be recomputed with the folded norm")
                with ctx.phase("smooth"):
                    s = self._choose(ctx, pair, inputs)
                    self._fold_norm(ctx, pair, s)
                with ctx.phase("propagate"):
                    inputs = list(make_inputs())
            else:
                if downstream is None:
                    raise RuntimeError(f"smoothing pair {pair.name}: the layer program gives no downstream input "
                                       f"for the consumers of {pair.producer}")
                with ctx.phase("smooth"):
                    acts = downstream(inputs)
                    s = self._choose(ctx, pair, acts)
                    del acts
                    self._fold_linear(ctx, pair, s)
        return inputs

    # -- scale choice ----------------------------------------------------------------------
    def _choose(self, ctx, pair: SmoothPair, acts) -> torch.Tensor:
        """Scales over the consumers' input channels (for v → o: shared within kv groups)."""
        masks = ctx.smooth_masks  # the smoothing set's tokens (calib.smooth_path), else the calibration set's
        weight = torch.cat([ctx.weight(c) for c in pair.consumers])
        stat = ChannelRangeStat(weight.shape[1], self.device)
        for a, m in zip(acts, masks):
            stat.add(a, m)
        stat.unpack(self.comm.all_reduce(stat.packed(), "max"))
        a_max, w_max = stat.absmax(), weight.abs().amax(dim=0)
        channel_max = a_max  # per consumer input channel, for the report's outlier picture
        if pair.kind == "ov":
            h = self.heads
            a_max, w_max = h.group_max(a_max), h.group_max(w_max)
            expand = h.expand
        else:
            def expand(t):
                return t

        def search(alpha):
            return self._search(a_max, w_max, expand, stat, acts, masks, weight, alpha)

        s, alpha, beta, searched, err = self.smoother(self.q, a_max, w_max, search)
        s = expand(s).contiguous()
        return self._record(ctx, pair, s, alpha, beta, searched, err, channel_max)

    def _record(self, ctx, pair: SmoothPair, s, alpha, beta, searched, err, channel_max) -> torch.Tensor:
        """The report's record of a pair's choice (the same on every rank); returns ``s``."""
        name = ctx.prefix + pair.name
        ctx.record.smoothing[name] = {"alpha": alpha, "beta": beta, "searched": searched, "rel_error": err,
                                      "scale_sha1": hashlib.sha1(s.cpu().numpy().tobytes()).hexdigest()[:16],
                                      "scale_min": float(s.min()), "scale_max": float(s.max()),
                                      **channel_profile(channel_max, s)}
        log.debug("smoothing %s: alpha=%s beta=%s%s", name, alpha, beta,
                  f" (searched, rel. error {err:.4g})" if searched else "")
        return s

    def _selection(self, masks) -> list[torch.Tensor]:
        """The search tokens of this rank's batches: a fixed random subset of all ranks'
        calibration tokens (same on every rank, so the union does not depend on the ranks); of
        the smoothing set's tokens when there is one (``masks``: the smoothing lane's)."""
        if self._select is None:
            lanes = self.lanes
            n, length = (self.cfg.calib.num_samples if lanes is None else lanes.smooth_samples), masks[0].shape[1]
            total = n * length
            g = torch.Generator().manual_seed(self.cfg.seed + 7919)
            chosen = torch.zeros(total, dtype=torch.bool)
            chosen[torch.randperm(total, generator=g)[: min(self.q.search_tokens, total)]] = True
            chosen = chosen.reshape(n, length)
            if lanes is None:
                offset = rank_rows(n, self.comm.rank, self.comm.world_size, self.cfg.calib.batch_size)[0]
            else:
                offset = lanes.smooth_offset
            self._select = []
            for k, m in enumerate(masks):
                if lanes is not None and k < lanes.main:  # calibration-lane batch: no search tokens
                    self._select.append(torch.zeros_like(m))
                    continue
                self._select.append(chosen[offset:offset + m.shape[0]].to(m.device) & m)
                offset += m.shape[0]
        return self._select

    def _search(self, a_max, w_max, expand, stat: ChannelRangeStat, acts, masks, weight, alpha):
        x = torch.cat([a[sel] for a, sel in zip(acts, self._selection(masks))]).float()
        lo_c, hi_c = stat.min, stat.max

        def act_fq(xs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            if self.act is None or self.act.dynamic:
                return fake_quant_dynamic(xs, self.act.token_divisor if self.act else TOKEN_DIVISOR)
            # the global per-tensor range of x/s follows from the per-channel ranges (s > 0)
            params = static_params((lo_c / s).min(), (hi_c / s).max(), self.act)
            return fake_quant_static(xs, params)

        def scales(a: float, b: float) -> torch.Tensor:
            return expand(flex_scales(a_max, w_max, a, b))

        def evaluate(candidates):
            num, den = candidate_errors(x, weight, scales, candidates, act_fq, self.args)
            flat = self.comm.all_reduce(torch.cat([num, den.reshape(1)]).to(self.device), "sum").cpu()
            den = float(flat[-1])
            return (flat[:-1] / den).sqrt() if den > 0 else flat[:-1].sqrt()

        return two_stage_search(evaluate, alpha=alpha)

    # -- folding into the layer and the overrides ------------------------------------------------
    def _fold_norm(self, ctx, pair: SmoothPair, s: torch.Tensor) -> None:
        norm = ctx.module(pair.producer)
        wname, bname = ctx.fqn(pair.producer + ".weight"), ctx.fqn(pair.producer + ".bias")
        bias = self.ckpt.get(bname) if bname in self.ckpt else None
        new_w, new_b, s_eff = fold_norm(self.ckpt.get(wname).to(self.device), s,
                                        bias.to(self.device) if bias is not None else None)
        ctx.set_tensor(wname, new_w, (norm, "weight"))
        if new_b is not None:
            ctx.set_tensor(bname, new_b, (norm, "bias"))
        for c in pair.consumers:
            w = fold_columns(ctx.weight(c), s_eff)
            ctx.set_tensor(c + ".weight", w, (ctx.module(c), "weight"))

    def _fold_linear(self, ctx, pair: SmoothPair, s_consumer: torch.Tensor) -> None:
        s_producer = s_consumer
        if pair.kind == "ov":  # back from o's channels to v's: every head of a group has the same value
            h = self.heads
            s_producer = s_consumer.reshape(h.kv_heads, h.group, h.head_dim)[:, 0].reshape(-1)
        pname = ctx.fqn(pair.producer)
        producer = ctx.module(pair.producer)
        bias = None
        if pname + ".bias" in self.ckpt:
            bias = ctx.overrides.get(pname + ".bias", self.ckpt.get(pname + ".bias")).to(self.device)
        new_w, new_b = fold_rows(ctx.weight(pname), s_producer, bias)
        ctx.set_tensor(pname + ".weight", new_w, (producer, "weight"))
        if new_b is not None:
            ctx.set_tensor(pname + ".bias", new_b, (producer, "bias"))
        for c in pair.consumers:
            w = fold_columns(ctx.weight(c), s_consumer)
            ctx.set_tensor(c + ".weight", w, (ctx.module(c), "weight"))


class ActivationQuant:
    """Stage hook: int8 activation quantization of the stage input (static: the range of
    all ranks' tokens, MIN/MAX-reduced; dynamic: per token). The inputs are replaced by
    their fake-quantized values, so the solve and the propagation see what the served model
    computes; the parameters go to ``job.act_params`` for the writer."""

    def __init__(self, comm, device: torch.device, act: ActQuantArgs):
        self.comm, self.device, self.act = comm, device, act

    def before_solve(self, ctx, linears, inputs, make_inputs, downstream):
        if linears[0].float_inputs:  # W8A16 fallback linears (dist_quant/fallback.py): float inputs
            return inputs
        with ctx.phase("act_calib"):
            params = self._calibrate(inputs, ctx.calib_masks)
            for lin in linears:
                ctx.job.act_params[lin.name] = params
            return [fake_quant(x, self.act, params) for x in inputs]

    def _calibrate(self, inputs, masks) -> StaticActParams | None:
        if self.act.dynamic:
            return None
        neg_min = torch.tensor(float("-inf"), device=self.device)
        hi = torch.tensor(float("-inf"), device=self.device)
        for x, m in zip(inputs, masks):
            real = x[m]
            if real.numel():
                lo_b, hi_b = torch.aminmax(real)
                neg_min = torch.maximum(neg_min, -lo_b.float())
                hi = torch.maximum(hi, hi_b.float())
        flat = self.comm.all_reduce(torch.stack([neg_min, hi]), "max").cpu()
        return static_params(-flat[0], flat[1], self.act)


def stage_hooks(cfg, comm, plan, ckpt, device: torch.device, args: QuantArgs, act: ActQuantArgs | None) -> list:
    """The stage hooks of a job: smoothing (when ``quant.smooth`` names a smoother: AWQ's hook
    for weight-only smoothers, dist_quant/awq.py), then activation quantization (W8A8 jobs).
    Weight-only jobs without AWQ have none."""
    hooks: list = []
    if cfg.quant.smooth != SMOOTH_NONE:
        if SMOOTHERS[cfg.quant.smooth].weight_only:
            from .awq import AwqSmoothing

            hooks.append(AwqSmoothing(cfg, comm, plan, ckpt, device, args, act))
        else:
            hooks.append(Smoothing(cfg, comm, plan, ckpt, device, args, act))
    if act is not None:
        hooks.append(ActivationQuant(comm, device, act))
    return hooks


class W8A8Stages:
    """The hooks driven by a Llama-style stage chain (``layer_forward.dense_stage_ops``)
    instead of a layer program: what tests of the folding use on one layer."""

    def __init__(self, cfg, comm, plan, ckpt, device: torch.device, args: QuantArgs, act: ActQuantArgs | None,
                 overrides: dict[str, torch.Tensor]):
        from types import SimpleNamespace

        from .stage import Job

        hooks = stage_hooks(cfg, comm, plan, ckpt, device, args, act)
        self.smoothing = hooks[0] if hooks else None
        self.act, self.overrides = act, overrides
        self.job = Job(cfg, comm, ckpt, plan, None, args, device, None, SimpleNamespace(act=act), torch.float32,
                       hooks)
        self.act_params = self.job.act_params

    def prepare(self, layer, index: int, k: int, ops, xs, prev, inputs, masks, linears, record, phase):
        from .stage import StageContext

        ctx = StageContext(self.job, layer, index, masks, record, phase)
        ctx.overrides = self.overrides

        def make():
            return [ops[k].make_input(x, p) for x, p in zip(xs, prev)]

        def downstream(hs):
            return [ops[k + 1].make_input(x, i) for x, i in zip(xs, hs)]

        for hook in self.job.hooks:
            inputs = hook.before_solve(ctx, linears, inputs, make, downstream if k + 1 < len(ops) else None)
        return inputs
