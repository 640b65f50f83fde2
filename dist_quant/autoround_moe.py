"""AutoRound / SignRound on the sparse (MoE) decoder layers (qwen2_moe, qwen3_moe, mixtral,
glm4_moe, deepseek_v3 / kimi_k2 with MLA attention): the shared and attention parts tuned
data-parallel, the routed experts on their owners with their routed tokens.

A sparse layer is tuned as three blocks, in order, each against the float model's own
values on the float chain (``fx``, carried alongside the quantized chain ``x``,
dist_quant/autoround_layer.py):

1. **attention** ``a(x) = x + attn(input_layernorm(x))`` (the model's attention module: GQA,
   rotary, MLA all stay transformers' code): its linears are tuned data-parallel, as a dense
   layer is, on ``L = ‖a_Ŵ(x) − a_W(fx)‖²``; then ``h = a_Ŵ(x)`` and ``hf = a_W(fx)``;
2. **shared expert** (qwen2_moe, glm4_moe, deepseek) ``s(h) = down(act(gate(n)) · up(n))``,
   ``n = post_attention_layernorm(h)`` (qwen2_moe: times ``sigmoid(shared_expert_gate(n))``):
   tuned data-parallel on ``‖s_Ŵ(h) − s_W(hf)‖²``;
3. **routed experts**: the model's router (kept float) routes ``n`` of the quantized chain;
   every rank sends each expert owner, once per token and owner, the token's row of ``n``,
   the float chain's row of the same token and its global sample index
   (dist_quant/moe_comm.py ``dispatch``; rows arrive in global sample order). Each owner,
   one expert at a time (loaded, tuned, written, freed), tunes the expert's gate/up/down on
   ``Σ_t ‖w_t · (E_Ŵ(n_t) − E_W(nf_t))‖²`` over its routed tokens (``w_t``: the routing
   weight), a step's batch being the tokens of ``quant.autoround.batch_size`` samples drawn by
   the same sampler (seeded by layer and expert). No collective: an expert's rows, their
   order and every kernel shape are those of one rank, so N ranks give 1 rank's integers.

The float chain's next inputs are the float layer on ``fx`` (its own routing, a second
dispatch of ``nf`` to the owners, float experts); the quantized chain's, the quantized layer
on ``x``. Both combine routed outputs in a wider type (``moe_comm.accumulation_dtype``), so
their sums do not depend on how experts are split over ranks.

``quant.autoround.init=gptq``: before the three blocks, the layer's GPTQ program (the GPTQ MoE
path: attention and shared expert from SUM-reduced statistics, each routed expert on its owner
from its routed tokens, with ``calib.min_expert_tokens`` / ``calib.expert_fallback``) runs on the
quantized chain with its results kept (``autoround_layer.gptq_capture``); each block starts
from them (attention and shared results broadcast by their owners, an expert's kept by its
owner), and an expert routed no token keeps its GPTQ result.

Not covered yet: a quantized router (refused).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import autoround_layer as al
from . import moe_comm
from .algorithms import autoround as ar
from .arch import dense
from .arch.moe_block import ExpertStore, add_block_output
from .arch.moe_block import _role as role_of
from .arch.moe_block import _route as route

log = logging.getLogger("dist_quant")


class LocalComm:
    """The collectives of one rank alone: a routed expert is tuned by its owner only."""

    rank, world_size = 0, 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


def _call(module, prefix: str, weights, *args, **kwargs):
    """``module(*args, **kwargs)`` with the entries of ``weights`` under ``prefix`` (names
    relative to the layer) in place of its parameters."""
    sub = {k[len(prefix):]: v for k, v in (weights or {}).items() if k.startswith(prefix)}
    if not sub:
        return module(*args, **kwargs)
    return functional_call(module, sub, args, kwargs, strict=False)


def attention_block(ctx, seq_len: int):
    """``f(x, weights) = x + attn(input_layernorm(x))``, the layer's attention half."""
    arch = ctx.arch
    attn, norm = ctx.module(arch.attn), ctx.module(arch.input_norm)
    mask = dense.attention_mask(ctx, seq_len)

    def f(x, weights=None):
        out = _call(attn, arch.attn + ".", weights, hidden_states=norm(x), position_embeddings=ctx.pos_emb,
                    attention_mask=mask)
        return x + out[0]
    return f


def shared_block(ctx):
    """``f(h, weights)``: the shared expert's output on ``post_attention_layernorm(h)``."""
    arch, spec = ctx.arch, ctx.arch.moe
    block, norm = ctx.module(spec.block), ctx.module(arch.post_attn_norm)
    se = getattr(block, spec.shared)
    sgate = getattr(block, spec.shared_gate) if spec.shared_gate else None
    mem = arch.memory_name(spec.block)

    def f(h, weights=None):
        n = norm(h)
        y = _call(se, f"{mem}.{spec.shared}.", weights, n)
        if sgate is not None:
            y = torch.sigmoid(_call(sgate, f"{mem}.{spec.shared_gate}.", weights, n)) * y
        return y
    return f


def expert_block(act, fixed: dict[str, torch.Tensor]):
    """``f(x, weights) = down(act(gate x) · up x)`` on token rows ``x`` [T, H]; ``weights`` keyed
    ``gate`` / ``up`` / ``down`` (default ``fixed``, the float expert)."""
    def f(x, weights=None):
        w = weights or fixed
        return F.linear(act(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])
    return f


def program(ctx, xs: list[torch.Tensor], fxs: list[torch.Tensor], p: ar.AutoRoundParams):
    """Tune, write and propagate one sparse decoder layer; returns ``(xs, fxs)`` for the next."""
    arch, comm, phase = ctx.arch, ctx.comm, ctx.phase
    spec = arch.moe
    seq_len = xs[0].shape[1] if xs else 0
    first = al._offset(comm, sum(x.shape[0] for x in xs))
    attn_prefix = arch.attn + "."
    attn_lins, shared_lins, experts_of = [], [], {}
    for lin in ctx.linears():
        if lin.expert is not None:
            experts_of.setdefault(lin.expert, []).append(lin)
        elif arch.memory_name(ctx.rel(lin.name)).startswith(attn_prefix):
            attn_lins.append(lin)
        else:
            shared_lins.append(lin)

    t0 = time.perf_counter()
    captured = None  # quant.autoround.init=gptq: the whole layer's GPTQ results, each on its owner
    if p.init == "gptq":
        with phase("solve"):
            captured = al.gptq_capture(ctx, xs)
    f_attn = attention_block(ctx, seq_len)  # 1. attention
    with phase("propagate"):
        hf = al.floats(ctx, f_attn, fxs)
    state, info = al.tune_group(ctx, f_attn, attn_lins, xs, hf, first, p, captured)
    with phase("propagate"):
        errors = al._propagate(ctx, f_attn, xs, state, first)  # xs: h, the quantized chain
    al.finish_group(ctx, state, errors, {**info, "part": "attention"} if info else info, time.perf_counter() - t0)

    shared_q, shared_f = [None] * len(xs), [None] * len(hf)
    if spec.shared:  # 2. the shared expert
        t0 = time.perf_counter()
        f_sh = shared_block(ctx)
        with phase("propagate"):
            shared_f = [f_sh(h) for h in hf]
        state, info = al.tune_group(ctx, f_sh, shared_lins, xs, shared_f, first, p, captured)
        shared_q = []
        with phase("propagate"):
            errors = al._propagate(ctx, f_sh, xs, state, first, into=shared_q)
        al.finish_group(ctx, state, errors, {**info, "part": "shared expert"} if info else info,
                        time.perf_counter() - t0)

    routed_q, routed_f = _routed(ctx, xs, hf, first, experts_of, p, captured)  # 3. the routed experts
    with phase("propagate"):
        return (add_block_output(xs, routed_q, shared_q, ctx.masks),
                add_block_output(hf, routed_f, shared_f, ctx.masks))


def _sample_ids(masks, first: int, device) -> torch.Tensor:
    """The global sample index of every real token, in batch order."""
    ids, k = [], first
    for m in masks:
        b = m.shape[0]
        ids.append(torch.arange(k, k + b, device=device)[:, None].expand(m.shape)[m])
        k += b
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)


def _routed(ctx, xs, hf, first: int, experts_of: dict, p: ar.AutoRoundParams, captured: dict | None = None):
    """Route both chains, tune this rank's experts on theirs, combine: the routed outputs
    ``[real tokens, H]`` of the quantized and of the float chain."""
    arch, comm, phase, spec = ctx.arch, ctx.comm, ctx.phase, ctx.arch.moe
    block, norm = ctx.module(spec.block), ctx.module(arch.post_attn_norm)
    gate, router = getattr(block, spec.router), ctx.fqn(spec.router_name)
    num_experts = spec.num_experts(ctx.config)
    hidden = xs[0].shape[-1] if xs else ctx.config["hidden_size"]
    moved = moe_comm.new_traffic()
    n_samples = al._n_global(comm, sum(x.shape[0] for x in xs))
    with phase("propagate"):
        nq, nf = [norm(x) for x in xs], [norm(h) for h in hf]
        q_flat, q_w, q_e = route(ctx, gate, router, nq, ctx.masks, hidden)
        f_flat, f_w, f_e = route(ctx, gate, router, nf, ctx.masks, hidden)
        nf_rows = torch.cat([n[m] for n, m in zip(nf, ctx.masks)]) if nf else f_flat[:0]
        sid = _sample_ids(ctx.masks, first, ctx.device)
        del nq, nf
    owner = moe_comm.expert_owner_tensor(lambda e: ctx.owner(experts_of[e][0].name), num_experts, ctx.device)
    with phase("reduce"):
        counts = moe_comm.count_routed(comm, q_e.to(ctx.device), num_experts, moved)
        # one row per token and owner: the quantized chain's n, the float chain's n, the sample index
        payload = torch.cat([q_flat.float(), nf_rows.float(), sid[:, None].float()], dim=1)
        recv = moe_comm.dispatch(comm, payload, q_e, q_w, owner, moved)
        recv_f = moe_comm.dispatch(comm, f_flat, f_e, f_w, owner, moe_comm.new_traffic())
        del payload, nf_rows
    acc = moe_comm.accumulation_dtype(ctx.dtype)
    out_q = torch.zeros(recv.h.shape[0], hidden, dtype=acc, device=ctx.device)
    out_f = torch.zeros(recv_f.h.shape[0], hidden, dtype=acc, device=ctx.device)
    store = ExpertStore(ctx.job.ckpt, ctx.device)
    act = block.experts.act_fn
    mine = [e for e in range(num_experts) if int(owner[e]) == comm.rank]
    slots_q, slots_f = moe_comm.slots_by_expert(recv, num_experts), moe_comm.slots_by_expert(recv_f, num_experts)
    losses = [_expert(ctx, store, e, experts_of[e], act, recv, slots_q[e], recv_f, slots_f[e], out_q, out_f,
                      int(counts[e]), hidden, p, captured, n_samples) for e in mine]
    tuned = [x for x in losses if x]
    if tuned:  # each rank logs its own experts
        log.info("layer %d: autoround routed experts: %d of %d on this rank tuned, mean loss %.4g -> %.4g",
                 ctx.index, len(tuned), len(mine), sum(x[0] for x in tuned) / len(tuned),
                 sum(x[1] for x in tuned) / len(tuned))
    with phase("propagate"):
        routed_q = moe_comm.combine(comm, recv, out_q, q_flat.shape[0], moved).to(ctx.dtype)
        routed_f = moe_comm.combine(comm, recv_f, out_f, f_flat.shape[0], moe_comm.new_traffic()).to(ctx.dtype)
    ctx.record.moe = {"num_experts": num_experts, "tokens_per_expert": [int(c) for c in counts],
                      "experts_owned": mine, "experts_loaded": store.loaded, "peak_live_experts": store.peak,
                      "fallbacks": {}, "all_tokens_gathered": False, **moved}
    return routed_q, routed_f


def _expert(ctx, store, e: int, lins, act, recv, sel, recv_f, sel_f, out_q, out_f, routed: int, hidden: int,
            p: ar.AutoRoundParams, captured: dict | None = None, n_samples: int = 0) -> tuple[float, float] | None:
    """Load, tune, write and apply routed expert ``e`` (its owner alone); its tuning loss
    ``(start, best)``, None when it was routed no token (it keeps its start: round-to-nearest,
    or with ``captured`` the GPTQ result of the expert's owner, fallbacks included)."""
    t0, phase, dtype, args = time.perf_counter(), ctx.phase, ctx.dtype, ctx.args
    lins = sorted(lins, key=lambda lin: ("gate", "up", "down").index(role_of(ctx, lin)))
    with phase("load"):
        ws = store.load(e, tuple(lin.name for lin in lins))
    state = []
    for lin, w, role in zip(lins, ws, ("gate", "up", "down")):
        lo, hi = ar.group_range(w, args)
        state.append(al._Linear(lin.name, role, w, lo, hi, *ar.init_observer(w, lo, hi, args)))
    if captured is not None:
        al.init_from_gptq(ctx, captured, state, share=False)
    f = expert_block(act, {s.param: s.w.to(dtype) for s in state})
    rows, weight = recv.row[sel], recv.weight[sel]
    xq = recv.h[rows, :hidden].to(dtype)
    sids = recv.h[rows, 2 * hidden].long()
    info = {}
    if rows.numel():
        with phase("propagate"):
            xf = recv.h[rows, hidden:2 * hidden].to(dtype)
            sizes = torch.unique_consecutive(sids, return_counts=True)[1].tolist()
            samples, masks = list(xq.split(sizes)), list(weight.to(dtype).split(sizes))
            targets = [f(x) for x in xf.split(sizes)]
            del xf
        with phase("solve"):
            info = al._tune(ctx, f, state, samples, masks, targets, 0, p, comm=LocalComm(),
                            seed=(p.seed * 1_000_003 + ctx.index) * 1_009 + e)
        del samples, masks, targets
    with phase("broadcast"):
        for s in state:
            s.result = ar.result(s.w, s.v, s.s_min, s.s_max, s.lo, s.hi, args)
        w_hat = {s.param: s.result.dequantize(args).to(dtype) for s in state}
    with phase("propagate"):
        out_q.index_add_(0, rows, (f(xq, w_hat) * weight[:, None].to(dtype)).to(out_q.dtype))
        rows_f = recv_f.row[sel_f]
        out_f.index_add_(0, rows_f, (f(recv_f.h[rows_f]) * recv_f.weight[sel_f][:, None].to(dtype)).to(out_f.dtype))
        errors = _errors(state, w_hat, xq[al.error_samples(sids, n_samples)].float(), act)
    seconds = (time.perf_counter() - t0) / len(state)
    for s, lin in zip(state, lins):
        entry = al.record(s, errors[s.param], info, seconds, ctx.comm.rank)
        entry.update(expert=e, routed_tokens=routed, statistics="routed_tokens", expert_fallback=None)
        ctx.record.modules[lin.name] = entry
        ctx.write(lin, s.result, None)
    store.release(e)
    return (info["loss_init"], info["loss_best"]) if info else None


def _errors(state, w_hat: dict, x: torch.Tensor, act) -> dict[str, tuple[float, float]]:
    """``(Σ ‖x(Ŵ−W)ᵀ‖², Σ ‖xWᵀ‖²)`` of gate, up and down on their real inputs (the expert's
    routed rows of the job's ``autoround_layer.error_samples`` of its ``n_samples``;
    down's input from the quantized gate/up)."""
    w = {s.param: s.w for s in state}
    q = {k: v.float() for k, v in w_hat.items()}
    a = act(x @ q["gate"].T) * (x @ q["up"].T)
    out = {}
    for key, inp in (("gate", x), ("up", x), ("down", a)):
        ref = inp @ w[key].T
        out[key] = (float((inp @ q[key].T - ref).pow(2).sum()), float(ref.pow(2).sum()))
    return out
