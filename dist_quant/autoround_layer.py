"""The layer-level solver: AutoRound / SignRound tuning of one whole decoder layer over the
stage API, data-parallel (the math is dist_quant/algorithms/autoround.py).

Per layer, every rank holds two activation chains for its calibration slice: ``xs``, the
inputs the already-quantized layers produce, and ``fxs``, the float model's own inputs
(the float chain, carried alongside from the embeddings on). Then:

1. **targets**: the float layer on the float chain, ``t = layer(fx)``: the float chain's
   next inputs, and the tuning targets (the float inputs are freed as their targets appear);
2. **init** (``quant.autoround.init``): ``V = 0`` and factors 1 (RTN, auto-round's start; with
   ``quant.observer=mse`` the factors of the per-group clipping search), or
   the GPTQ result of the same layer (the staged GPTQ program of the architecture, run on
   ``xs`` with its writes captured, reproduced by ``V`` and the factors);
3. **tune**: ``iters`` steps; each draws the same global batch of sample indices on every rank
   (:class:`~dist_quant.algorithms.autoround.IndexSampler`, seeded by ``seed`` and the layer);
   each rank runs the layer with the fake-quantized weights ``Ŵ(V, s_min, s_max)`` on the
   samples of the batch it holds, one sample at a time, and adds ``∂L/∂Ŵ`` of each
   ``L = Σ_real tokens ‖layer_Ŵ(x) − t‖²`` to a float64 buffer; the buffers, the loss sums and
   the token counts travel in **one flat SUM all-reduce** per step (``Comm.all_reduce``); every
   rank then divides by the global element count (the loss is the global mean, so 2 ranks
   = 1 rank), back-propagates the reduced ``∂L/∂Ŵ`` through the quantizer to ``V`` and the
   factors, and takes the same signed step: every rank holds the same parameters;
4. **result**: the best-loss parameters give each linear's integers and scales
   (``QuantResult``), its owner writes them in the output format (the same tensors GPTQ
   writes), every rank loads ``Ŵ`` into the layer and propagates ``xs`` through it; the report
   gets each linear's relative output error on its real inputs (of the job's first
   :data:`ERROR_SAMPLES` samples, sums reduced over ranks).

Why per sample and float64: a sample's gradient is then computed by the same kernels on
every world size, and summing float32 gradients of ≤ batch samples in float64 is exact in
all but pathological exponent spreads, so the reduced gradient does not depend on which
rank held which sample; the signs, hence the parameters and integers, are those of one
rank (tests/test_autoround.py checks it with real gloo processes).

Dense layers run the layer's own forward (llama, qwen2, qwen3, mistral, the dense layers of
the MoE families and of DeepSeek-V3 / Kimi-K2 with MLA attention); the sparse layers of MoE
models are three blocks (attention and shared expert data-parallel, routed experts on their
owners): dist_quant/autoround_moe.py. :func:`check_supported` refuses, before any work, what is
not covered (other programs; a quantized router with MoE).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

from . import offload
from .algorithms import autoround as ar
from .arch import ArchSpec, UnsupportedModel, dense
from .quant.qparams import QuantResult
from .stage import StageContext
from .stats import error_ratio

log = logging.getLogger("dist_quant")


def check_supported(arch: ArchSpec, q=None) -> None:
    """One line, before any work, for what the layer-level tuning does not cover (``q``: the
    job's QuantConfig)."""
    if arch.moe is None and arch.program is not dense.program:
        raise UnsupportedModel(f"quant.method=autoround: model_type={arch.name!r} is not supported yet "
                               "(llama-style, MoE and MLA layers only); use gptq or rtn")
    if arch.moe is not None and q is not None:
        if arch.moe.router not in set(q.moe_ignore) | set(q.ignore):
            raise UnsupportedModel(f"quant.method=autoround keeps the MoE router float: quant.moe_ignore="
                                   f"{list(q.moe_ignore)!r} must list {arch.moe.router!r}")


def params(q) -> ar.AutoRoundParams:
    """The job's tuning parameters from ``quant.autoround`` (config.AutoRoundConfig)."""
    c = q.autoround
    lr = c.lr if c.lr is not None else 1.0 / max(c.iters, 1)
    return ar.AutoRoundParams(iters=c.iters, lr=lr, minmax_lr=c.minmax_lr if c.minmax_lr is not None else lr,
                              batch_size=c.batch_size, minmax=c.minmax, init=c.init, seed=c.seed,
                              sampler=c.sampler)


@dataclass
class _Linear:
    name: str  # checkpoint name
    param: str  # in-memory parameter name relative to the layer (``self_attn.q_proj.weight``)
    w: torch.Tensor  # float32 [out, in]
    lo: torch.Tensor
    hi: torch.Tensor
    v: torch.Tensor
    s_min: torch.Tensor
    s_max: torch.Tensor
    result: QuantResult | None = None  # once tuned


def layer_forward(ctx: StageContext, seq_len: int):
    """``f(x, weights) -> y``: the decoder layer's own forward on ``x`` [b, L, h] with the named
    parameters replaced (``torch.func.functional_call``)."""
    mask = dense.attention_mask(ctx, seq_len)
    layer = ctx.layer

    def f(x, weights=None):
        kwargs = dict(attention_mask=mask, position_embeddings=ctx.pos_emb)
        if not weights:
            return layer(x, **kwargs)
        return functional_call(layer, weights, (x,), kwargs, strict=False)
    return f


def program(ctx: StageContext, xs: list[torch.Tensor], fxs: list[torch.Tensor]):
    """Tune, write and propagate one decoder layer; returns ``(xs, fxs)`` for the next layer.
    The sparse layers of MoE models go to dist_quant/autoround_moe.py."""
    job = ctx.job
    p = job.solver_params("autoround")
    if ctx.arch.moe is not None and ctx.arch.moe.is_sparse(ctx.index, ctx.config):
        from . import autoround_moe

        return autoround_moe.program(ctx, xs, fxs, p)
    seq_len = xs[0].shape[1] if xs else 0
    f = layer_forward(ctx, seq_len)
    lins = ctx.linears()
    t0 = time.perf_counter()
    with ctx.phase("propagate"):  # 1. float targets = the float chain's next inputs
        targets = floats(ctx, f, fxs)
    first = _offset(ctx.comm, offload.rows(xs))
    captured = None
    if p.init == "gptq" and lins:
        with ctx.phase("solve"):
            captured = gptq_capture(ctx, xs)
    state, info = tune_group(ctx, f, lins, xs, targets, first, p, captured=captured)
    seconds = time.perf_counter() - t0
    with ctx.phase("propagate"):
        errors = _propagate(ctx, f, xs, state, first)
    finish_group(ctx, state, errors, info, seconds)
    return xs, targets


def floats(ctx: StageContext, f, fxs) -> list[torch.Tensor]:
    """``f`` (a float block) on each float-chain batch, held as the job holds activations
    (``ctx.hold``: host memory when offloading); plain lists free each input as its output appears."""
    def outputs():
        for j in range(len(fxs)):
            x = fxs[j]
            if isinstance(fxs, list):
                fxs[j] = None
            yield f(x)
    out = ctx.hold(outputs())
    fxs.clear()
    return out


def start(xs):
    """What the tuning carries into layer 0: the float chain, the embeddings (a new list of the
    same batches; host-held ones stay on the host)."""
    return offload.copy(xs)


def tune_group(ctx: StageContext, f, lins, xs: list[torch.Tensor], targets: list[torch.Tensor], first: int,
               p: ar.AutoRoundParams, captured: dict[str, QuantResult] | None = None
               ) -> tuple[list["_Linear"], dict]:
    """Tune the linears ``lins`` of the block ``f`` data-parallel (every rank on its samples of
    ``xs`` against ``targets``), then load their tuned weights ``Ŵ`` into the layer: every rank
    holds the same parameters. ``captured``: the layer's GPTQ results on their owners
    (:func:`gptq_capture`, ``quant.autoround.init=gptq``): the tuning starts from them. Returns
    the tuned state and the tuning's summary."""
    state = [_init(ctx, lin, p) for lin in lins]
    if captured is not None:
        with ctx.phase("broadcast"):
            init_from_gptq(ctx, captured, state)
    samples, masks, tsamples = offload.samples(xs), offload.samples(ctx.masks), offload.samples(targets)
    with ctx.phase("solve"):
        info = _tune(ctx, f, state, samples, masks, tsamples, first, p) if lins else {}
    del tsamples
    with ctx.phase("broadcast"):  # nothing travels: every rank holds the parameters; load Ŵ
        for s in state:
            s.result = ar.result(s.w, s.v, s.s_min, s.s_max, s.lo, s.hi, ctx.args)
            ctx.module(s.name).weight.data.copy_(s.result.dequantize(ctx.args))
    return state, info


def finish_group(ctx: StageContext, state: list["_Linear"], errors: dict, info: dict, seconds: float) -> None:
    """The report entries of the tuned linears and their writes (each by its owner)."""
    job, comm = ctx.job, ctx.comm
    for s in state:
        lin = ctx.linear(s.name)
        if job.owners.owner[lin.name] == comm.rank:
            ctx.record.modules[lin.name] = record(s, errors[s.name], info, seconds / max(len(state), 1), comm.rank)
            bias = ctx.tensor(lin.name + ".bias") if lin.has_bias else None
            ctx.write(lin, s.result, bias)
    if info:
        comm.rank0(log.info, "layer %d: autoround loss %.4g -> %.4g (best at step %d of %d)%s", ctx.index,
                   info["loss_init"], info["loss_best"], info["best_step"], info["steps"],
                   f" [{info['part']}]" if info.get("part") else "")


def record(s: "_Linear", error: tuple[float, float], info: dict, seconds: float, rank: int) -> dict:
    """One tuned linear's entry of the report."""
    num, den = error
    return {"rank": rank, "seconds": seconds, "fallback": None, "tokens": info.get("tokens", 0),
            "rel_output_error": error_ratio(num, den),
            "autoround": {k: info.get(k, 0) for k in ("loss_init", "loss_best", "best_step", "steps")}}


def _init(ctx: StageContext, lin, p: ar.AutoRoundParams) -> _Linear:
    w = ctx.weight(lin.name)
    lo, hi = ar.group_range(w, ctx.args)
    param = ctx.arch.memory_name(ctx.rel(lin.name)) + ".weight"
    return _Linear(lin.name, param, w, lo, hi, *ar.init_observer(w, lo, hi, ctx.args))


class _CaptureContext(StageContext):
    """The layer's staged GPTQ program with its writes kept instead of written (GPTQ init)."""

    def __init__(self, ctx: StageContext):
        super().__init__(ctx.job, ctx.layer, ctx.index, ctx.masks, ctx.record, ctx.phase)
        self.captured: dict[str, QuantResult] = {}

    def solve(self, linears, hessian, tokens, weights=None, method=None, **kw):
        # GPTQ, except where the program itself chose round-to-nearest (an expert fallback)
        return super().solve(linears, hessian, tokens, weights, "rtn" if method == "rtn" else "gptq", **kw)

    def write(self, lin, result, bias=None):
        self.captured[lin.name] = result


def gptq_capture(ctx: StageContext, xs: list[torch.Tensor]) -> dict[str, QuantResult]:
    """GPTQ of the whole layer on its quantized-chain inputs ``xs`` (the architecture's staged
    program: dense, MLA, or MoE with its routed experts solved on their owners on their routed
    tokens), its writes kept instead of written: ``{linear: result}`` of the linears this rank
    owns. Nothing else stays: the program's outputs, its report entries and the quantized
    weights it loaded into the layer are discarded (the layer's float weights are put back, so
    float targets computed afterwards are the float layer's)."""
    kept = {lin.name: ctx.module(lin.name).weight.detach().clone() for lin in ctx.linears() if lin.expert is None}
    before = set(ctx.record.modules)
    moe = ctx.record.moe
    cap = _CaptureContext(ctx)
    try:
        ctx.arch.program(cap, offload.copy(xs))
    finally:
        with torch.no_grad():
            for name, w in kept.items():
                ctx.module(name).weight.copy_(w)
    for key in set(ctx.record.modules) - before:  # the GPTQ solve's entries: the tuning reports its own
        del ctx.record.modules[key]
    ctx.record.moe = moe
    return cap.captured


def init_from_gptq(ctx: StageContext, captured: dict[str, QuantResult], state: list[_Linear],
                   share: bool = True) -> None:
    """``V`` and the factors that reproduce each linear's GPTQ integers (``captured``, from
    :func:`gptq_capture`). ``share``: the owner broadcasts its result (a data-parallel block:
    every rank tunes the linear); otherwise this rank owns the linears (a routed expert) and a
    linear without a captured result keeps its round-to-nearest start."""
    for s in state:
        res = captured.get(s.name)
        if share:
            res = res or ctx._empty_result(ctx.linear(s.name))
            for t in (res.q, res.scale, res.zero):
                ctx.comm.broadcast(t, ctx.job.owners.owner[s.name])
        if res is not None:
            s.v, s.s_min, s.s_max = ar.init_from_result(s.w, res, s.lo, s.hi, ctx.args)


def _offset(comm, n_local: int) -> int:
    """Global index of this rank's first sample (ranks hold contiguous slices in rank order,
    calibration.rank_rows)."""
    counts = comm.all_gather(torch.tensor([n_local], dtype=torch.int64))
    return int(sum(int(c) for c in counts[:comm.rank]))


def _n_global(comm, n_local: int) -> int:
    t = torch.tensor([n_local], dtype=torch.int64)
    return int(comm.all_reduce(t))


def _tune(ctx, f, state: list[_Linear], samples, masks, targets, first: int, p: ar.AutoRoundParams,
          comm=None, seed: int | None = None) -> dict:
    """The signed-gradient loop (module docstring, 3.). ``masks[i]``: per token of sample ``i``,
    True / False (real / padding) or a float weight (a routed expert's routing weight: the
    loss is then of the weighted outputs); the loss is the sum over tokens divided by the
    number of nonzero entries times the hidden size. ``comm``: the ranks the samples are
    spread over (default the job's; a routed expert is tuned by its owner alone)."""
    comm = comm if comm is not None else ctx.comm
    args, dtype = ctx.args, ctx.dtype
    n = _n_global(comm, len(samples))
    batch = min(p.batch_size, n)
    sampler = ar.SAMPLERS[p.sampler](n, batch, seed if seed is not None else p.seed * 1_000_003 + ctx.index)
    hidden = targets[0].shape[-1] if targets else 0
    hidden = int(comm.all_reduce(torch.tensor([hidden], dtype=torch.int64), "max"))
    sizes = [s.w.numel() for s in state]
    flat = torch.empty(sum(sizes) + 2, dtype=torch.float64, device=ctx.device)
    best, best_loss, best_step, loss_init, tokens_seen = None, float("inf"), 0, None, 0
    for s in state:
        for t in (s.v, s.s_min, s.s_max):
            t.requires_grad_(True)
    for step in range(p.iters):
        idx = [i - first for i in sampler.next_batch() if first <= i < first + len(samples)]
        t_step = time.perf_counter()
        with torch.enable_grad():
            w_hat = [ar.qdq(s.w, s.v, s.s_min, s.s_max, s.lo, s.hi, args) for s in state]
        leaves = [w.detach().to(dtype).requires_grad_(True) for w in w_hat]
        weights = {s.param: a for s, a in zip(state, leaves)}
        flat.zero_()
        views = list(flat[:-2].split(sizes))
        for i in idx:
            with torch.enable_grad():
                m = masks[i][..., None].to(dtype)
                diff = (f(samples[i], weights) - targets[i]) * m
                loss = diff.float().pow(2).sum()
                grads = torch.autograd.grad(loss, leaves)
            for view, g in zip(views, grads):
                view.add_(g.reshape(-1).to(torch.float64))
            flat[-2] += float(loss.detach().double())
            flat[-1] += float((masks[i] != 0).sum())
        t_reduce = time.perf_counter()
        comm.all_reduce(flat)
        t_wait = time.perf_counter() - t_reduce  # mostly waiting for a slower rank
        count = float(flat[-1]) * hidden
        loss_mean = float(flat[-2]) / count if count > 0 else 0.0
        if step == 0:
            loss_init = loss_mean
        tokens_seen += int(flat[-1])
        if loss_mean < best_loss:
            best_loss, best_step = loss_mean, step
            best = [(s.v.detach().clone(), s.s_min.detach().clone(), s.s_max.detach().clone()) for s in state]
        if count > 0:
            grads_w = [view.div(count).to(torch.float32).reshape(s.w.shape) for view, s in zip(views, state)]
            tuned = [t for s in state for t in ((s.v, s.s_min, s.s_max) if p.minmax else (s.v,))]
            with torch.enable_grad():
                got = torch.autograd.grad(w_hat, tuned, grads_w, allow_unused=True)
            lr, mlr = ar.lr_at(p.lr, step, p.iters), ar.lr_at(p.minmax_lr, step, p.iters)
            per = 3 if p.minmax else 1
            with torch.no_grad():
                for k, s in enumerate(state):
                    g = got[k * per:(k + 1) * per]
                    g = (g[0], g[1], g[2]) if p.minmax else (g[0], None, None)
                    ar.sign_step_(s.v, s.s_min, s.s_max, g, lr, mlr)
        del w_hat, leaves, weights
        log.debug("layer %d step %d: %d samples here, forward+backward %.3f s, all-reduce %.3f s, update %.3f s",
                  ctx.index, step, len(idx), t_reduce - t_step, t_wait, time.perf_counter() - t_reduce - t_wait)
    for s in state:
        for t in (s.v, s.s_min, s.s_max):
            t.requires_grad_(False)
    if best is not None:
        for s, (v, lo, hi) in zip(state, best):
            s.v, s.s_min, s.s_max = v, lo, hi
    return {"loss_init": loss_init if loss_init is not None else 0.0, "loss_best": best_loss if best else 0.0,
            "best_step": best_step, "steps": p.iters, "tokens": tokens_seen}


ERROR_SAMPLES = 16
"""Calibration samples on which each linear's relative output error is measured for the report
(two extra products per linear, so not on every sample): every ``n // 16``-th of the job's ``n``
(:func:`error_samples`)."""


def error_samples(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Which of the global sample indices ``ids`` the report's output errors are measured on:
    :data:`ERROR_SAMPLES` of the ``n`` samples, evenly spaced (every ``n // 16``-th), so ranks
    holding contiguous slices share the work instead of the first rank doing it all."""
    stride = max(1, n // ERROR_SAMPLES)
    return (ids % stride == 0) & (ids < stride * ERROR_SAMPLES)


def _propagate(ctx, f, xs: list[torch.Tensor], state: list[_Linear], first: int,
               into: list | None = None) -> dict[str, tuple[float, float]]:
    """``xs`` through the quantized block ``f`` (in place, or appended to ``into``), with each quantized linear's output
    error on its real inputs, ``(Σ ‖x(Ŵ−W)ᵀ‖², Σ ‖xWᵀ‖²)`` over the real tokens of the job's
    :func:`error_samples`, SUM-reduced over ranks."""
    sums = torch.zeros(len(state), 2, dtype=torch.float64, device=ctx.device)
    n = _n_global(ctx.comm, sum(x.shape[0] for x in xs))
    current = {}
    handles = []
    for k, s in enumerate(state):
        def hook(mod, inputs, k=k, s=s):
            sel, m = current["sel"], current["mask"]
            if sel is None:
                return
            x = inputs[0][sel].float()
            x = x.reshape(-1, x.shape[-1])[m[sel].reshape(-1)]
            ref = x @ s.w.T
            sums[k, 0] += float((x @ mod.weight.float().T - ref).pow(2).sum())
            sums[k, 1] += float(ref.pow(2).sum())
        handles.append(ctx.module(s.name).register_forward_pre_hook(hook))
    try:
        seen = first
        for j, (x, m) in enumerate(zip(xs, ctx.masks)):
            sel = error_samples(torch.arange(seen, seen + x.shape[0]), n).to(m.device)
            current["sel"], current["mask"] = (sel if bool(sel.any()) else None), m
            seen += x.shape[0]
            if into is None:
                xs[j] = f(x)
            else:
                into.append(f(x))
    finally:
        for h in handles:
            h.remove()
    ctx.comm.all_reduce(sums)
    return {s.name: (float(sums[k, 0]), float(sums[k, 1])) for k, s in enumerate(state)}
