"""The layer program of the MoE families (qwen2_moe, qwen3_moe, mixtral, glm4_moe): dense attention
(arch/dense.py), then, in sparse layers, the MoE block with experts split over ranks; dense
layers (``mlp_only_layers``, ``decoder_sparse_step``) run the dense MLP program.

The sparse MoE block, per layer:

1. ``h = post_attention_layernorm(x)`` on every rank for its own samples.
2. Stage ``moe_in`` (statistics of all tokens, reduced like a dense stage): the router
   when it is quantized (by default it stays float, ``quant.moe_ignore``), the shared
   expert's gate/up and ``shared_expert_gate`` (qwen2_moe). Then stage ``shared_out``
   (the shared expert's down projection) and the shared expert's output
   ``sigmoid(shared_expert_gate(h)) · down(act(gate(h)) · up(h))`` (qwen2_moe; glm4_moe's
   shared experts have no gate: ``down(act(gate(h)) · up(h))``).
3. Routing with the model's own router module on every rank (top-k, normalization as
   the model does). Padded positions are not routed (nothing reads their outputs).
4. **Dispatch** (dist_quant/moe_comm.py): every rank sends each expert owner the rows of
   its tokens routed to any expert of that owner, *once per token and owner*, plus
   ``(row, expert, weight)`` for each of the token's top-k slots on that owner.
5. Each owner, **one expert at a time** (loaded from the checkpoint, quantized, freed):
   Hessian of the tokens routed to it (received in global sample order, so the statistics
   do not depend on the world size), solve gate/up, ``a = act(x Gᵀ) · (x Uᵀ)`` with the
   quantized weights, Hessian of ``a``, solve down, and the weighted outputs
   ``w · a Dᵀ`` summed per received row (``ctx.solve`` / ``ctx.write``: local, no collective).
   In the fallback pre-pass (dist_quant/fallback.py, ``ProbeContext``) ``ctx.solve`` hands back
   the float weights and ``ctx.expert_statistics`` is false: no Hessian, no all-token gather,
   no expert fallback; the float experts' outputs propagate.
6. **Combine** (moe_comm.py): the summed rows go back to the ranks that sent them, which
   add them into their tokens' outputs; ``x + (routed + shared)``. Rows are summed in a
   wider type (``moe_comm.accumulation_dtype``), so the result does not depend on how
   experts are split over ranks.

Static NVFP4 activations (``quant=nvfp4``): every routed expert's gate/up input global scale is
``448 · 6 / max|h|`` over the tokens routed to the layer's experts (each expert's routed tokens,
MAX-reduced over experts and ranks: one value for the layer), and the down projections' over
``act(x Ĝᵀ) · (x Ûᵀ)`` of each expert's routed tokens, MAX-reduced likewise. One value per layer
because vLLM's FlashInfer NVFP4 MoE backends take the max of ``1 / input_global_scale`` over all
experts (``prepare_nvfp4_moe_layer_for_fi_or_cutlass``) while vLLM's CUTLASS backend uses each
expert's: equal values make every backend compute the calibrated model. The down scales need all
of an owner's gate/up solves first, so owners then solve in two passes (gate/up of all their
experts, one all-reduce, then the down projections), keeping the quantized gate/up meanwhile.

``calib.all_experts=true`` and the ``all_tokens`` fallback need every token on the
expert's owner: the hidden states of all real tokens are then all-gathered once per layer
(statistics only; propagation still uses the routed tokens and weights).
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import moe_comm
from ..quant.activations import static_params
from ..quant.qparams import QuantResult
from ..stats import HessianStat
from . import dense

log = logging.getLogger("dist_quant")

HESSIAN_CHUNK = 4096  # rows per float32 GEMM in expert statistics (fixed, so chunks do not depend on ranks)


def program(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One decoder layer of an MoE family."""
    xs = dense.attention(ctx, xs)
    if ctx.arch.moe.is_sparse(ctx.index, ctx.config):
        return sparse_mlp(ctx, xs)
    return dense.mlp(ctx, xs)


class ExpertStore:
    """The only reader of routed-expert weights: one expert's (gate, up, down) as float32.
    Keeps count of the experts of a layer materialized at once, for the report."""

    def __init__(self, ckpt, device: torch.device):
        self.ckpt, self.device = ckpt, device
        self.live: set[int] = set()
        self.peak = 0
        self.loaded: list[int] = []

    def load(self, expert: int, names: tuple[str, ...]) -> list[torch.Tensor]:
        if expert not in self.live:  # a live expert's second read (two-pass owners) is not a new load
            self.loaded.append(expert)
        self.live.add(expert)
        self.peak = max(self.peak, len(self.live))
        return [self.ckpt.get(n + ".weight").to(self.device, torch.float32) for n in names]

    def release(self, expert: int) -> None:
        self.live.discard(expert)


def hessian_of(x: torch.Tensor, device) -> tuple[torch.Tensor | None, int]:
    """``2 Σ x xᵀ / n`` in fixed-size chunks, and ``n`` (``None`` when ``n == 0``)."""
    stat = HessianStat(x.shape[1], device)
    for i in range(0, x.shape[0], HESSIAN_CHUNK):
        stat.add(x[i:i + HESSIAN_CHUNK])
    n = int(stat.count.item())
    return (stat.hessian() if n else None), n


def sparse_mlp(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The MLP half of a sparse layer: quantize the shared expert and this rank's routed
    experts, and return the next layer's inputs (see the module docstring)."""
    arch, comm, masks, phase = ctx.arch, ctx.comm, ctx.masks, ctx.phase
    spec = arch.moe
    block = ctx.module(spec.block)
    experts_of: dict[int, list] = {}
    for lin in ctx.linears():
        if lin.expert is not None:
            experts_of.setdefault(lin.expert, []).append(lin)
    num_experts = spec.num_experts(ctx.config)
    hidden = xs[0].shape[-1] if xs else ctx.config["hidden_size"]
    moved = moe_comm.new_traffic()
    store = ExpertStore(ctx.job.ckpt, ctx.device)

    with phase("propagate"):
        hs = [ctx.module(arch.post_attn_norm)(x) for x in xs]
    router = ctx.fqn(spec.router_name)
    if ctx.linear(router) is not None and ctx.once("router_quantized"):
        comm.rank0(log.warning, "the router (%s) is quantized (not in quant.moe_ignore): vLLM keeps MoE routers in "
                   "float and transformers 5 cannot load a quantized router (it is not an nn.Linear there)", router)
    ctx.quantize("moe_in", hs)  # statistics of what the router / shared expert see
    shared = [None] * len(xs)
    if spec.shared:
        se = getattr(block, spec.shared)
        sgate = getattr(block, spec.shared_gate) if spec.shared_gate else None
        p = f"{spec.block}.{spec.shared}."
        with phase("propagate"):
            s_in = [se.act_fn(se.gate_proj(ctx.act(p + "gate_proj", h))) * se.up_proj(ctx.act(p + "up_proj", h))
                    for h in hs]
        s_in = ctx.quantize("shared_out", s_in)  # as the (quantized) down projection sees it
        with phase("propagate"):
            if sgate is None:  # glm4_moe: the shared experts' output as it is
                shared = [se.down_proj(s) for s in s_in]
            else:  # qwen2_moe: sigmoid-gated
                shared = [torch.sigmoid(sgate(ctx.act(f"{spec.block}.{spec.shared_gate}", h))) * se.down_proj(s)
                          for h, s in zip(hs, s_in)]
        del s_in

    # calib.smooth_path: the smoothing lane's batches (after the calibration batches) are routed and
    # dispatched on their own, so the experts' statistics, counts and fallbacks see only calibration
    # tokens; the owners apply their quantized experts to the lane's rows too (it is carried on)
    lanes = ctx.job.lanes
    main = lanes.main if lanes is not None else len(xs)
    with phase("propagate"):
        # routed per batch: the same GEMM shapes whatever the world size
        gate = getattr(block, spec.router)
        h_flat, weights, chosen = _route(ctx, gate, router, hs[:main], masks[:main], hidden)
        lane = _route(ctx, gate, router, hs[main:], masks[main:], hidden) if lanes is not None else None
        del hs
    owner = moe_comm.expert_owner_tensor(lambda e: ctx.owner(experts_of[e][0].name), num_experts, ctx.device)
    with phase("reduce"):
        counts = moe_comm.count_routed(comm, chosen.to(ctx.device), num_experts, moved)
    calib = ctx.cfg.calib
    threshold = max(calib.min_expert_tokens, 1)
    below = [e for e in range(num_experts) if counts[e] < threshold]
    # (statistics only: not gathered when the experts' statistics are not captured, the fallback pre-pass)
    gather_all = ctx.expert_statistics and (calib.all_experts or (calib.expert_fallback == "all_tokens" and bool(below)))
    with phase("reduce"):
        all_h = moe_comm.gather_all_tokens(comm, h_flat, moved) if gather_all else None
        recv = moe_comm.dispatch(comm, h_flat, chosen, weights, owner, moved)
        lane_recv = (moe_comm.dispatch(comm, lane[0], lane[2], lane[1], owner, moe_comm.new_traffic())
                     if lane is not None else None)

    mine = [e for e in range(num_experts) if int(owner[e]) == comm.rank]
    out_rows = torch.zeros(recv.h.shape, dtype=moe_comm.accumulation_dtype(ctx.dtype), device=ctx.device)
    fallbacks: dict[int, str] = {}
    act = block.experts.act_fn
    slots = moe_comm.slots_by_expert(recv, num_experts)  # grouped by expert, receive order kept
    lane_rows = None
    if lane_recv is not None:
        lane_rows = torch.zeros(lane_recv.h.shape, dtype=out_rows.dtype, device=ctx.device)
        lane_slots = moe_comm.slots_by_expert(lane_recv, num_experts)
    static = _static_inputs(ctx)
    if static:  # gate/up input global scale of every expert of the layer: max|h| over the routed tokens
        with phase("act_calib"):
            amax = h_flat.abs().amax().float().reshape(1) if h_flat.numel() else torch.zeros(1, device=ctx.device)
            _layer_input_scale(ctx, experts_of, amax, down=False)
    pending = []  # static: (expert state, its down inputs' max) after the gate/up pass
    for e in mine:
        fb = None
        if e in below and ctx.expert_statistics:  # (the pre-pass solves no expert: nothing to fall back)
            fb = calib.expert_fallback
            fallbacks[e] = fb
            action = (f"statistics of all {all_h.shape[0]} calibration tokens" if fb == "all_tokens"
                      else "round-to-nearest (no statistics)")
            log.warning("%s: %d routed tokens < calib.min_expert_tokens=%d; expert_fallback=%s: %s",
                        ctx.fqn(spec.expert_prefix(e)[:-1]), int(counts[e]), threshold, fb, action)
        sel = slots[e]
        rows, w = recv.row[sel], recv.weight[sel]
        carried = None
        if lane_recv is not None:
            ls = lane_slots[e]
            carried = (lane_recv.h[lane_recv.row[ls]], lane_recv.row[ls], lane_recv.weight[ls], lane_rows)
        job_e = _ExpertJob(e, experts_of[e], rows, w, fb, int(counts[e]), carried)
        if not static:
            _quantize_expert(ctx, store, job_e, recv.h, all_h, act, out_rows)
            continue
        state = _gate_up(ctx, store, job_e, recv.h, all_h)
        pending.append(state)
    if static:  # the down projections' input global scale: MAX over every expert's routed tokens, all ranks
        with phase("act_calib"):
            amax = torch.zeros(1, dtype=torch.float32, device=ctx.device)
            for state in pending:
                amax = torch.maximum(amax, _down_input_amax(ctx, state, recv.h, act))
            _layer_input_scale(ctx, experts_of, amax, down=True)
        for state in pending:
            _down(ctx, store, state, recv.h, all_h, act, out_rows)
        del pending

    with phase("propagate"):
        routed = moe_comm.combine(comm, recv, out_rows, h_flat.shape[0], moved).to(ctx.dtype)
        if lane_recv is not None:
            routed = torch.cat([routed, moe_comm.combine(comm, lane_recv, lane_rows, lane[0].shape[0],
                                                         moe_comm.new_traffic()).to(ctx.dtype)])
        del recv, out_rows, all_h, h_flat, lane, lane_recv, lane_rows
        new_xs = add_block_output(xs, routed, shared, masks)  # both lanes' rows, in batch order

    ctx.record.moe = {
        "num_experts": num_experts,
        "tokens_per_expert": [int(c) for c in counts],
        "experts_owned": mine,
        "experts_loaded": store.loaded,
        "peak_live_experts": store.peak,
        "fallbacks": {str(e): fb for e, fb in fallbacks.items()},
        "all_tokens_gathered": bool(gather_all),
        **moved,
    }
    comm.rank0(_log_layer, ctx.index, counts, threshold, below, calib.expert_fallback, moved, comm.world_size)
    return new_xs


def add_block_output(xs, routed: torch.Tensor, shared, masks) -> list[torch.Tensor]:
    """``x + (routed + shared)`` per batch: ``routed`` holds the real tokens' rows in batch order
    (padding gets none), ``shared`` a batch-shaped tensor or None per batch."""
    out, offset = [], 0
    for x, m, s in zip(xs, masks, shared):
        n = int(m.sum())
        y = torch.zeros_like(x)
        y[m] = routed[offset:offset + n]
        offset += n
        if s is not None:
            y = y + s
        out.append(x + y)
    return out


def _route(ctx, gate, router, hs, masks, hidden):
    """``(rows, routing weights, experts)`` of the real tokens of the batches ``hs``."""
    routing = [gate(ctx.act(router, h[m])) for h, m in zip(hs, masks)]
    if routing:
        return (torch.cat([h[m] for h, m in zip(hs, masks)]), torch.cat([r[1] for r in routing]),
                torch.cat([r[2] for r in routing]))
    h_flat = torch.zeros(0, hidden, dtype=ctx.dtype, device=ctx.device)
    _, weights, chosen = gate(h_flat)
    return h_flat, weights, chosen


@dataclass
class _ExpertJob:
    """One owned expert of a layer: its linears and the received slots routed to it."""

    expert: int
    lins: list
    rows: torch.Tensor  # received rows (indices into the dispatched hidden states) of its slots
    weight: torch.Tensor  # routing weight per slot
    fallback: str | None
    routed: int  # routed tokens of all ranks (the report)
    carried: tuple | None = None  # the smoothing lane's (rows, row index, weight, output rows)


@dataclass
class _ExpertState:
    """An expert between its gate/up and its down solve."""

    job: _ExpertJob
    gate: object
    up: object
    down: object
    method: str
    basis: str
    stats_all: bool
    g_hat: torch.Tensor
    u_hat: torch.Tensor


def _layer_input_scale(ctx, experts_of, amax: torch.Tensor, down: bool) -> None:
    """The static input parameters of every expert's down (``down``) or gate/up linears of the
    layer from this rank's ``amax`` [1], MAX-reduced over the ranks (one value for the layer)."""
    params = static_params(0.0, ctx.comm.all_reduce(amax.to(ctx.device), "max").cpu(), ctx.job.act)
    for lins in experts_of.values():
        for lin in lins:
            if (_role(ctx, lin) == "down") == down:
                ctx.job.act_params[lin.name] = params


def _static_inputs(ctx) -> bool:
    """Static (calibrated) input scales for the routed experts: NVFP4 activations (plan.py refuses
    the other static activation formats for MoE models)."""
    act = ctx.job.act
    return act is not None and not act.dynamic


def _quantize_expert(ctx, store, job_e, recv_h, all_h, act, out_rows):
    """Load expert ``job_e.expert``, quantize gate/up then down with their statistics, add its
    weighted outputs for its routed rows into ``out_rows``, write, free. ``job_e.carried``: the
    smoothing lane's (rows, row index, routing weight, output rows) routed to the expert, which get
    the quantized expert's outputs too (no statistics)."""
    _down(ctx, store, _gate_up(ctx, store, job_e, recv_h, all_h), recv_h, all_h, act, out_rows)


def _expert_inputs(ctx, state_or_job, recv_h, all_h, gate_name: str, stats_all: bool):
    """``(x_e, x_stat)``: the expert's routed rows as its gate/up see them, and its statistics' rows."""
    x_e = ctx.act(gate_name, recv_h[state_or_job.rows])  # the same on any rank, for any subset of tokens
    x_stat = _chunked(lambda x: ctx.act(gate_name, x), all_h) if stats_all else x_e
    return x_e, x_stat


def _gate_up(ctx, store, job_e, recv_h, all_h) -> _ExpertState:
    phase, e, fallback = ctx.phase, job_e.expert, job_e.fallback
    gate, up, down = sorted(job_e.lins, key=lambda lin: ("gate", "up", "down").index(_role(ctx, lin)))
    stats_all = all_h is not None and (ctx.cfg.calib.all_experts or fallback == "all_tokens")
    method = "rtn" if fallback == "rtn" else ctx.cfg.quant.method
    basis = "all_tokens" if stats_all else "routed_tokens"
    with phase("load"):
        w_gate, w_up = store.load(e, (gate.name, up.name))
    x_e, x_stat = _expert_inputs(ctx, job_e, recv_h, all_h, gate.name, stats_all)
    with phase("capture"):
        h_in, n_in = hessian_of(x_stat, ctx.device) if ctx.expert_statistics else (None, 0)
    del x_e, x_stat
    with phase("solve"):
        if h_in is None and ctx.expert_statistics:
            h_in, basis = torch.eye(gate.in_features, dtype=torch.float64, device=ctx.device), "weights"
        # one solve: gate and up share their NVFP4 global scale / FP8 per-tensor scale (max|w| of both)
        res = ctx.solve([gate, up], h_in, n_in, weights=[w_gate, w_up], method=method)
    del h_in, w_gate, w_up
    dtype, args = ctx.dtype, ctx.args
    g_hat = res[gate.name].dequantize(args).to(dtype)
    u_hat = res[up.name].dequantize(args).to(dtype)
    _write(ctx, gate, res[gate.name])
    _write(ctx, up, res[up.name])
    return _ExpertState(job_e, gate, up, down, method, basis, stats_all, g_hat, u_hat)


def _down_input_amax(ctx, state: _ExpertState, recv_h, act) -> torch.Tensor:
    """max|act(x Ĝᵀ) · (x Ûᵀ)| over the expert's routed rows (float32 [1]; 0 without rows)."""
    x_e = ctx.act(state.gate.name, recv_h[state.job.rows])
    if not x_e.shape[0]:
        return torch.zeros(1, dtype=torch.float32, device=ctx.device)
    a = _chunked(lambda x: act(F.linear(x, state.g_hat)) * F.linear(x, state.u_hat), x_e)
    return a.abs().amax().float().reshape(1)


def _down(ctx, store, state: _ExpertState, recv_h, all_h, act, out_rows) -> None:
    phase, job_e = ctx.phase, state.job
    gate, up, down, g_hat, u_hat = state.gate, state.up, state.down, state.g_hat, state.u_hat
    with phase("load"):
        (w_down,) = store.load(job_e.expert, (down.name,))
    x_e, x_stat = _expert_inputs(ctx, job_e, recv_h, all_h, gate.name, state.stats_all)
    with phase("propagate"):
        a_e = ctx.act(down.name, act(F.linear(x_e, g_hat)) * F.linear(x_e, u_hat))
        a_stat = a_e if x_stat is x_e else _chunked(
            lambda x: ctx.act(down.name, act(F.linear(x, g_hat)) * F.linear(x, u_hat)), x_stat)
    del x_stat
    with phase("capture"):
        h_out, n_out = hessian_of(a_stat, ctx.device) if ctx.expert_statistics else (None, 0)
    del a_stat
    with phase("solve"):
        if h_out is None and ctx.expert_statistics:
            h_out = torch.eye(down.in_features, dtype=torch.float64, device=ctx.device)
        res_down = ctx.solve([down], h_out, n_out, weights=[w_down], method=state.method)
    del h_out
    d_hat = res_down[down.name].dequantize(ctx.args).to(ctx.dtype)
    _write(ctx, down, res_down[down.name])
    with phase("propagate"):
        y = F.linear(a_e, d_hat) * job_e.weight[:, None]
        out_rows.index_add_(0, job_e.rows, y.to(out_rows.dtype))
        if job_e.carried is not None:
            h_c, rows_c, w_c, out_c = job_e.carried
            x_c = ctx.act(gate.name, h_c)
            a_c = ctx.act(down.name, act(F.linear(x_c, g_hat)) * F.linear(x_c, u_hat))
            out_c.index_add_(0, rows_c, (F.linear(a_c, d_hat) * w_c[:, None]).to(out_c.dtype))
    for lin in (gate, up, down):
        ctx.record.modules[lin.name].update(expert=job_e.expert, routed_tokens=job_e.routed,
                                            statistics=state.basis, expert_fallback=job_e.fallback)
    del w_down
    state.g_hat = state.u_hat = None
    store.release(job_e.expert)


def _chunked(fn, x):
    """``fn`` over fixed-size row chunks of ``x`` (bounded transients; chunks independent of ranks)."""
    if not x.shape[0]:
        return fn(x)
    return torch.cat([fn(x[i:i + HESSIAN_CHUNK]) for i in range(0, x.shape[0], HESSIAN_CHUNK)])


def _role(ctx, lin) -> str:
    spec = ctx.arch.moe
    short = lin.name.rsplit(".", 1)[1]
    return {spec.expert_gate: "gate", spec.expert_up: "up", spec.expert_down: "down"}[short]


def _write(ctx, lin, result: QuantResult) -> None:
    ctx.write(lin, result, None)


def _log_layer(index, counts, threshold, below, fallback, moved, world_size) -> None:
    c = [int(x) for x in counts]
    msg = (f"layer {index} experts: routed tokens per expert min {min(c)} / median {statistics.median(c):g} / "
           f"max {max(c)} over {len(c)} experts")
    if below:
        msg += f"; {len(below)} below calib.min_expert_tokens={threshold} (expert_fallback={fallback})"
    if world_size > 1:
        msg += (f"; rank 0 sent {moved['tokens_sent']} token rows to other ranks "
                f"({sum(moved['bytes_sent'].values()) / 1e6:.2f} MB)")
    log.info(msg)
