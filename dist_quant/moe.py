"""The sparse MoE block of a decoder layer in the layer loop, with experts split over ranks.

After the attention stages (as in a dense layer), per sparse layer:

1. ``h = post_attention_layernorm(x)`` on every rank for its own samples.
2. Stage ``moe_in`` (statistics of all tokens, reduced like a dense stage): the router
   when it is quantized (by default it stays float, ``quant.moe_ignore``), the shared
   expert's gate/up and ``shared_expert_gate`` (qwen2_moe). Then stage ``shared_out``
   (the shared expert's down projection) and the shared expert's output
   ``sigmoid(shared_expert_gate(h)) · down(act(gate(h)) · up(h))``.
3. Routing with the model's own router module on every rank (top-k, normalization as
   the model does). Padded positions are not routed (nothing reads their outputs).
4. **Dispatch** (one ``all_to_all`` of counts, one of hidden rows, one of routing
   metadata): every rank sends each expert owner the rows of its tokens routed to any
   expert of that owner, *once per token and owner*, plus ``(row, expert, weight)`` for
   each of the token's top-k slots on that owner (3 float64 numbers).
5. Each owner, **one expert at a time** (loaded from the checkpoint, quantized, freed):
   Hessian of the tokens routed to it (received in global sample order, so the statistics
   do not depend on the world size), solve gate/up, ``a = act(x Gᵀ) · (x Uᵀ)`` with the
   quantized weights, Hessian of ``a``, solve down, and the weighted outputs
   ``w · a Dᵀ`` summed per received row.
6. **Combine** (one ``all_to_all``): the summed rows go back to the ranks that sent
   them, which add them into their tokens' outputs; ``x + (routed + shared)``. Rows are
   summed in a wider type (:func:`accumulation_dtype`), so the result does not depend on
   how experts are split over ranks.

``calib.all_experts=true`` and the ``all_tokens`` fallback need every token on the
expert's owner: the hidden states of all real tokens are then ``all_gather``-ed once per
layer (statistics only; propagation still uses the routed tokens and weights).

Bytes moved are counted per rank and layer (payload sent to *other* ranks): dispatch rows
``tokens · hidden · dtype``; metadata ``24 B`` per slot plus ``16 B`` per peer; combine
rows as many as received, in the accumulation type (float64 for float32 models); the
per-expert token counts ``8 · E · (N-1) B``; the all-gather ``(N-1) · max_tokens · hidden ·
dtype``.
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant.activations import fake_quant
from .quant.qparams import QuantResult
from .stats import HessianStat

log = logging.getLogger("dist_quant")

HESSIAN_CHUNK = 4096  # rows per float32 GEMM in expert statistics (fixed, so chunks do not depend on ranks)


# -- loading --------------------------------------------------------------------------------------
def load_moe_layer(skel, ckpt, arch, index: int, device: torch.device):
    """Layer ``index`` with every weight except the routed experts, which stay on the meta
    device (their fused ``[E, …]`` parameters are never built; owners read their own
    experts one at a time through :class:`ExpertStore`)."""
    layer = skel.layer(index)
    prefix = arch.layer_prefix(index)
    experts = f"{arch.mlp}.{arch.moe.experts}."
    state = {name: ckpt.get(prefix + arch.checkpoint_name(name)).to(device=device, dtype=skel.dtype)
             for name in layer.state_dict() if not name.startswith(experts)}
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    bad = [n for n in missing if not n.startswith(experts)] + list(unexpected)
    if bad:
        raise RuntimeError(f"layer {index}: could not load {bad[:3]}")
    return layer


class ExpertStore:
    """The only reader of routed-expert weights: one expert's (gate, up, down) as float32.
    Keeps count of the experts of a layer materialized at once, for the report."""

    def __init__(self, ckpt, device: torch.device):
        self.ckpt, self.device = ckpt, device
        self.live: set[tuple[int, int]] = set()
        self.peak: dict[int, int] = {}
        self.loaded: dict[int, list[int]] = {}

    def load(self, layer: int, expert: int, names: tuple[str, ...]) -> list[torch.Tensor]:
        self.live.add((layer, expert))
        self.peak[layer] = max(self.peak.get(layer, 0), sum(1 for k in self.live if k[0] == layer))
        self.loaded.setdefault(layer, []).append(expert)
        return [self.ckpt.get(n + ".weight").to(self.device, torch.float32) for n in names]

    def release(self, layer: int, expert: int) -> None:
        self.live.discard((layer, expert))


# -- moving tokens ----------------------------------------------------------------------------------
@dataclass
class Received:
    h: torch.Tensor  # [R, H] unique token rows received, source rank 0's first
    row: torch.Tensor  # [A] int64: received row of each routed slot
    expert: torch.Tensor  # [A] int64
    weight: torch.Tensor  # [A] routing weight
    token_splits: list[int]  # rows received from each rank
    send_rows: torch.Tensor  # local token index of every row sent, destination 0's first
    send_splits: list[int]  # rows sent to each rank


def dispatch(comm, h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, expert_owner: torch.Tensor,
             moved: dict) -> Received:
    """Send each owner the rows of this rank's tokens routed to its experts (one row per
    token and owner) and the ``(row, expert, weight)`` of those slots."""
    n, rank = comm.world_size, comm.rank
    dest = expert_owner[experts]  # [T, k] owner of each slot
    rows, metas, tok_splits, slot_splits = [], [], [], []
    for d in range(n):
        hit = dest == d
        tok = hit.any(dim=1).nonzero().squeeze(1)
        pos = torch.full((h.shape[0],), -1, dtype=torch.long, device=h.device)
        pos[tok] = torch.arange(tok.numel(), device=h.device)
        t_idx, j_idx = hit.nonzero(as_tuple=True)  # token order, then slot order
        metas.append(torch.stack([pos[t_idx].double(), experts[t_idx, j_idx].double(),
                                  weights[t_idx, j_idx].double()], dim=1))
        rows.append(tok)
        tok_splits.append(tok.numel())
        slot_splits.append(t_idx.numel())
    send_rows = torch.cat(rows)
    counts = torch.tensor([tok_splits, slot_splits], dtype=torch.long).T.contiguous().to(h.device)  # [N, 2]
    recv_counts = comm.all_to_all(counts, [1] * n, [1] * n).cpu()
    recv_tok, recv_slot = recv_counts[:, 0].tolist(), recv_counts[:, 1].tolist()
    recv_h = comm.all_to_all(h[send_rows], tok_splits, recv_tok)
    meta = comm.all_to_all(torch.cat(metas), slot_splits, recv_slot)
    source = torch.repeat_interleave(torch.arange(n, device=h.device),
                                     torch.tensor(recv_slot, device=h.device))
    offsets = torch.tensor([0] + recv_tok[:-1], device=h.device).cumsum(0)
    row = meta[:, 0].long() + offsets[source]
    others = [d for d in range(n) if d != rank]
    elem = h.element_size() * h.shape[1]
    moved["tokens_sent"] = moved.get("tokens_sent", 0) + sum(tok_splits[d] for d in others)
    moved["slots_sent"] = moved.get("slots_sent", 0) + sum(slot_splits[d] for d in others)
    add_bytes(moved, "dispatch", sum(tok_splits[d] for d in others) * elem)
    add_bytes(moved, "metadata", sum(slot_splits[d] for d in others) * 24 + (16 * len(others)))
    return Received(recv_h, row, meta[:, 1].long(), meta[:, 2].to(weights.dtype), recv_tok, send_rows,
                    tok_splits)


def combine(comm, recv: Received, out_rows: torch.Tensor, tokens: int, moved: dict) -> torch.Tensor:
    """Return each received row's summed expert outputs to its rank; ``[tokens, H]``."""
    back = comm.all_to_all(out_rows, recv.token_splits, recv.send_splits)
    result = torch.zeros(tokens, out_rows.shape[1], dtype=out_rows.dtype, device=out_rows.device)
    result.index_add_(0, recv.send_rows, back)
    elem = out_rows.element_size() * out_rows.shape[1]
    add_bytes(moved, "combine", sum(c for r, c in enumerate(recv.token_splits) if r != comm.rank) * elem)
    return result


def gather_all_tokens(comm, h: torch.Tensor, moved: dict) -> torch.Tensor:
    """Every rank's token rows, rank 0's first (global sample order)."""
    if comm.world_size == 1:
        return h
    sizes = [int(t) for t in comm.all_gather(torch.tensor([h.shape[0]], device=h.device))]
    top = max(sizes)
    padded = torch.cat([h, h.new_zeros(top - h.shape[0], h.shape[1])])
    parts = comm.all_gather(padded)
    add_bytes(moved, "all_tokens_gather", (comm.world_size - 1) * top * h.shape[1] * h.element_size())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def add_bytes(moved: dict, kind: str, nbytes: int) -> None:
    b = moved.setdefault("bytes_sent", {})
    b[kind] = b.get(kind, 0) + int(nbytes)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Expert outputs of a token are summed in a wider type (float64 for float32 models,
    float32 for 16-bit ones), where the sum of its k weighted outputs is exact: the result,
    rounded once, then does not depend on which owners summed which experts in which
    order, i.e. not on the world size."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def hessian_of(x: torch.Tensor, device) -> tuple[torch.Tensor | None, int]:
    """``2 Σ x xᵀ / n`` in fixed-size chunks, and ``n`` (``None`` when ``n == 0``)."""
    stat = HessianStat(x.shape[1], device)
    for i in range(0, x.shape[0], HESSIAN_CHUNK):
        stat.add(x[i:i + HESSIAN_CHUNK])
    n = stat.tokens()
    return (stat.hessian() if n else None), n


# -- the block ----------------------------------------------------------------------------------------
def moe_block(qz, layer, index: int, xs: list[torch.Tensor], masks: list[torch.Tensor], record, phase):
    """The MLP half of sparse decoder layer ``index``: quantize the shared expert and this
    rank's routed experts, and return the next layer's inputs (see the module docstring)."""
    arch, comm = qz.plan.arch, qz.comm
    spec = arch.moe
    block = getattr(layer, arch.mlp)
    linears = qz.plan.layer_linears(index)
    dense: dict[str, list] = {}
    experts_of: dict[int, list] = {}
    for lin in linears:
        if lin.expert is None:
            dense.setdefault(lin.stage, []).append(lin)
        else:
            experts_of.setdefault(lin.expert, []).append(lin)
    num_experts = spec.num_experts(qz.ckpt.config)
    hidden = xs[0].shape[-1] if xs else qz.ckpt.config["hidden_size"]
    moved: dict = {"tokens_sent": 0, "slots_sent": 0, "bytes_sent": {}}
    if getattr(qz, "expert_store", None) is None:
        qz.expert_store = ExpertStore(qz.ckpt, qz.device)

    seen = _input_quantizer(qz, linears)  # W8A8: what each quantized linear sees of its input
    with phase("propagate"):
        hs = [getattr(layer, arch.post_attn_norm)(x) for x in xs]
    if dense.get("moe_in"):
        router = arch.layer_prefix(index) + spec.router_name
        if comm.rank == 0 and any(lin.name == router for lin in dense["moe_in"]) and \
                not getattr(qz, "router_warned", False):
            qz.router_warned = True
            log.warning("the router (%s) is quantized (not in quant.moe_ignore): vLLM keeps MoE routers in float and "
                        "transformers 5 cannot load a quantized router (it is not an nn.Linear there)", router)
        with phase("propagate"):
            h_in = [seen(dense["moe_in"][0].name, h) for h in hs]
        qz._quantize_stage(layer, dense["moe_in"], h_in, masks, record, phase)
        del h_in
    shared = [None] * len(xs)
    if spec.shared:
        se, sgate = getattr(block, spec.shared), getattr(block, spec.shared_gate)
        p = arch.layer_prefix(index) + f"{spec.block}.{spec.shared}."
        gate_name = arch.layer_prefix(index) + f"{spec.block}.{spec.shared_gate}"
        with phase("propagate"):
            s_in = [se.act_fn(se.gate_proj(seen(p + "gate_proj", h))) * se.up_proj(seen(p + "up_proj", h))
                    for h in hs]
            s_in = [seen(p + "down_proj", s) for s in s_in]
        if dense.get("shared_out"):
            qz._quantize_stage(layer, dense["shared_out"], s_in, masks, record, phase)
        with phase("propagate"):
            shared = [torch.sigmoid(sgate(seen(gate_name, h))) * se.down_proj(s) for h, s in zip(hs, s_in)]
        del s_in

    with phase("propagate"):
        # routed per batch: the same GEMM shapes whatever the world size
        router = arch.layer_prefix(index) + spec.router_name
        routing = [getattr(block, spec.router)(seen(router, h[m])) for h, m in zip(hs, masks)]
        if routing:
            h_flat = torch.cat([h[m] for h, m in zip(hs, masks)])
            weights, chosen = torch.cat([r[1] for r in routing]), torch.cat([r[2] for r in routing])
        else:
            h_flat = torch.zeros(0, hidden, dtype=qz.dtype, device=qz.device)
            _, weights, chosen = getattr(block, spec.router)(h_flat)
        del hs, routing
    owner = torch.tensor([qz.owners.owner[experts_of[e][0].name] for e in range(num_experts)],
                         device=qz.device)
    with phase("reduce"):
        counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(torch.long)
        counts = comm.all_reduce(counts.to(qz.device)).cpu()
        add_bytes(moved, "counts", 8 * num_experts * (comm.world_size - 1))
    calib = qz.cfg.calib
    threshold = max(calib.min_expert_tokens, 1)
    below = [e for e in range(num_experts) if counts[e] < threshold]
    gather_all = calib.all_experts or (calib.expert_fallback == "all_tokens" and bool(below))
    with phase("reduce"):
        all_h = gather_all_tokens(comm, h_flat, moved) if gather_all else None
        recv = dispatch(comm, h_flat, chosen, weights, owner, moved)

    mine = [e for e in range(num_experts) if int(owner[e]) == comm.rank]
    out_rows = torch.zeros(recv.h.shape, dtype=accumulation_dtype(qz.dtype), device=qz.device)
    fallbacks: dict[int, str] = {}
    act = block.experts.act_fn
    order = torch.argsort(recv.expert, stable=True)  # slots grouped by expert, receive order kept
    starts = torch.bincount(recv.expert, minlength=num_experts).cumsum(0).tolist()
    for e in mine:
        fb = None
        if e in below:
            fb = calib.expert_fallback
            fallbacks[e] = fb
            action = (f"statistics of all {all_h.shape[0]} calibration tokens" if fb == "all_tokens"
                      else "round-to-nearest (no statistics)")
            log.warning("%s: %d routed tokens < calib.min_expert_tokens=%d; expert_fallback=%s: %s",
                        arch.layer_prefix(index) + spec.expert_prefix(e)[:-1], int(counts[e]), threshold, fb,
                        action)
        sel = order[(starts[e - 1] if e else 0):starts[e]]
        rows, w = recv.row[sel], recv.weight[sel]
        _quantize_expert(qz, index, e, experts_of[e], recv.h[rows], rows, w, all_h, fb, int(counts[e]),
                         act, out_rows, record, phase, seen)

    with phase("propagate"):
        routed = combine(comm, recv, out_rows, h_flat.shape[0], moved).to(qz.dtype)
        del recv, out_rows, all_h, h_flat
        new_xs, offset = [], 0
        for x, m, s in zip(xs, masks, shared):
            n = int(m.sum())
            y = torch.zeros_like(x)
            y[m] = routed[offset:offset + n]
            offset += n
            if s is not None:
                y = y + s
            new_xs.append(x + y)

    record.moe = {
        "num_experts": num_experts,
        "tokens_per_expert": [int(c) for c in counts],
        "experts_owned": mine,
        "experts_loaded": qz.expert_store.loaded.get(index, []),
        "peak_live_experts": qz.expert_store.peak.get(index, 0),
        "fallbacks": {str(e): fb for e, fb in fallbacks.items()},
        "all_tokens_gathered": bool(gather_all),
        **moved,
    }
    if comm.rank == 0:
        _log_layer(index, counts, threshold, below, calib.expert_fallback, moved, comm.world_size)
    return new_xs


def _input_quantizer(qz, linears):
    """``seen(name, x)``: the input linear ``name`` sees — int8 fake-quantized per token in
    W8A8 jobs (dynamic activations, see plan.py) when ``name`` is quantized, else ``x``."""
    w8a8 = getattr(qz, "w8a8", None)
    if w8a8 is None or w8a8.act is None:
        return lambda name, x: x
    quantized = {lin.name for lin in linears}
    for name in quantized:
        w8a8.act_params[name] = None  # dynamic: nothing to store

    def seen(name, x):
        return fake_quant(x, w8a8.act, None) if name in quantized else x
    return seen


def _quantize_expert(qz, index, e, lins, x_e, rows, w, all_h, fallback, routed, act, out_rows, record, phase,
                     seen=lambda name, x: x):
    """Load expert ``e``, quantize gate/up then down with their statistics, add its
    weighted outputs for its routed rows into ``out_rows``, write, free."""
    gate, up, down = sorted(lins, key=lambda lin: ("gate", "up", "down").index(_role(qz, lin)))
    stats_all = all_h is not None and (qz.cfg.calib.all_experts or fallback == "all_tokens")
    method = "rtn" if fallback == "rtn" else qz.cfg.quant.method
    basis = "all_tokens" if stats_all else "routed_tokens"
    with phase("load"):
        w_gate, w_up, w_down = qz.expert_store.load(index, e, (gate.name, up.name, down.name))
    x_e = seen(gate.name, x_e)  # per-token quantization: the same on any rank, for any subset of tokens
    x_stat = _chunked(lambda x: seen(gate.name, x), all_h) if stats_all else x_e

    with phase("capture"):
        h_in, n_in = hessian_of(x_stat, qz.device)
    with phase("solve"):
        if h_in is None:
            h_in, basis = torch.eye(gate.in_features, dtype=torch.float64, device=qz.device), "weights"
        res = qz._solve([gate, up], h_in, n_in, record, weights=[w_gate, w_up], method=method)
    del h_in
    dtype = qz.dtype
    g_hat = res[gate.name].dequantize(qz.args).to(dtype)
    u_hat = res[up.name].dequantize(qz.args).to(dtype)
    _write(qz, gate, res[gate.name], phase)
    _write(qz, up, res[up.name], phase)

    with phase("propagate"):
        a_e = seen(down.name, act(F.linear(x_e, g_hat)) * F.linear(x_e, u_hat))
        a_stat = a_e if x_stat is x_e else _chunked(
            lambda x: seen(down.name, act(F.linear(x, g_hat)) * F.linear(x, u_hat)), x_stat)
    with phase("capture"):
        h_out, n_out = hessian_of(a_stat, qz.device)
    del a_stat
    with phase("solve"):
        if h_out is None:
            h_out = torch.eye(down.in_features, dtype=torch.float64, device=qz.device)
        res_down = qz._solve([down], h_out, n_out, record, weights=[w_down], method=method)
    del h_out
    d_hat = res_down[down.name].dequantize(qz.args).to(dtype)
    _write(qz, down, res_down[down.name], phase)
    with phase("propagate"):
        y = F.linear(a_e, d_hat) * w[:, None]
        out_rows.index_add_(0, rows, y.to(out_rows.dtype))
    for lin in (gate, up, down):
        record.modules[lin.name].update(expert=e, routed_tokens=routed, statistics=basis,
                                        expert_fallback=fallback)
    del w_gate, w_up, w_down
    qz.expert_store.release(index, e)


def _chunked(fn, x):
    """``fn`` over fixed-size row chunks of ``x`` (bounded transients; chunks independent of ranks)."""
    if not x.shape[0]:
        return fn(x)
    return torch.cat([fn(x[i:i + HESSIAN_CHUNK]) for i in range(0, x.shape[0], HESSIAN_CHUNK)])


def _role(qz, lin) -> str:
    spec = qz.plan.arch.moe
    short = lin.name.rsplit(".", 1)[1]
    return {spec.expert_gate: "gate", spec.expert_up: "up", spec.expert_down: "down"}[short]


def _write(qz, lin, result: QuantResult, phase) -> None:
    with phase("write"):
        for name, tensor in qz.fmt.pack_linear(lin.name, result, None, None).items():
            qz.writer.add(name, tensor)


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


# -- report ----------------------------------------------------------------------------------------------
def moe_report(gathered: list[dict]) -> dict:
    """The ``moe`` section of ``quant_report.json``: per sparse layer, the routed tokens of
    every expert (statistics coverage), owners, fallbacks and what each rank moved."""
    layers: dict[int, dict] = {}
    for g in gathered:
        for r in g["records"]:
            m = r.get("moe")
            if not m:
                continue
            entry = layers.setdefault(r["layer"], {
                "layer": r["layer"], "tokens_per_expert": m["tokens_per_expert"], "experts_by_rank": {},
                "fallbacks": {}, "all_tokens_gathered": m["all_tokens_gathered"], "by_rank": {}})
            entry["experts_by_rank"][g["rank"]] = m["experts_owned"]
            entry["fallbacks"].update(m["fallbacks"])
            entry["by_rank"][g["rank"]] = {k: m[k] for k in ("tokens_sent", "slots_sent", "bytes_sent",
                                                              "experts_loaded", "peak_live_experts")}
    out = []
    for i in sorted(layers):
        e = layers[i]
        e["fallbacks"] = dict(sorted(e["fallbacks"].items(), key=lambda kv: int(kv[0])))
        e["tokens_moved"] = sum(b["tokens_sent"] for b in e["by_rank"].values())
        e["bytes_moved"] = sum(sum(b["bytes_sent"].values()) for b in e["by_rank"].values())
        out.append(e)
    all_counts = [c for e in out for c in e["tokens_per_expert"]]
    return {
        "sparse_layers": len(out),
        "experts_per_layer": len(out[0]["tokens_per_expert"]) if out else 0,
        "min_tokens_per_expert": min(all_counts, default=0),
        "median_tokens_per_expert": statistics.median(all_counts) if all_counts else 0,
        "max_tokens_per_expert": max(all_counts, default=0),
        "fallbacks": sum(len(e["fallbacks"]) for e in out),
        "tokens_moved_per_layer": (sum(e["tokens_moved"] for e in out) / len(out)) if out else 0,
        "bytes_moved_per_layer": (sum(e["bytes_moved"] for e in out) / len(out)) if out else 0,
        "max_live_experts_per_rank": max((b["peak_live_experts"] for e in out for b in e["by_rank"].values()),
                                         default=0),
        "layers": out,
    }


def log_moe_summary(section: dict) -> None:
    log.info("MoE coverage: %d sparse layers x %d experts; routed tokens per expert min %d / median %g / max %d; "
             "%d expert(s) used a fallback; %.0f token rows (%.2f MB) moved between ranks per layer",
             section["sparse_layers"], section["experts_per_layer"], section["min_tokens_per_expert"],
             section["median_tokens_per_expert"], section["max_tokens_per_expert"], section["fallbacks"],
             section["tokens_moved_per_layer"], section["bytes_moved_per_layer"] / 1e6)
    for e in section["layers"]:
        for expert, kind in e["fallbacks"].items():
            log.info("MoE fallback: layer %d expert %s (%d routed tokens): %s", e["layer"], expert,
                     e["tokens_per_expert"][int(expert)], kind)
