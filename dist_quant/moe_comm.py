"""MoE token movement between ranks, as collectives a layer program calls (see
arch/moe_block.py): ``dispatch`` sends each expert owner the rows of the tokens routed to
its experts (one all_to_all of counts, one of hidden rows, one of routing metadata),
``combine`` returns the summed expert outputs (one all_to_all), ``gather_all_tokens``
gives every rank all ranks' token rows (``calib.all_experts`` and the ``all_tokens``
fallback), and ``expert_owner_tensor`` maps experts to their owner ranks.

Bytes moved are counted per rank and layer in a ``moved`` dict (payload sent to *other*
ranks): dispatch rows ``tokens · hidden · dtype``; metadata ``24 B`` per slot plus ``16 B``
per peer; combine rows as many as received, in the accumulation type (float64 for float32
models); the per-expert token counts ``8 · E · (N-1) B``; the all-gather
``(N-1) · max_tokens · hidden · dtype``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def new_traffic() -> dict:
    """An empty ``moved`` record (what a rank sent to the others in one layer)."""
    return {"tokens_sent": 0, "slots_sent": 0, "bytes_sent": {}}


def expert_owner_tensor(owner_of, num_experts: int, device) -> torch.Tensor:
    """``[E]`` int64: the owner rank of every expert (``owner_of(e)``)."""
    return torch.tensor([owner_of(e) for e in range(num_experts)], device=device)


def count_routed(comm, chosen: torch.Tensor, num_experts: int, moved: dict) -> torch.Tensor:
    """Tokens routed to every expert over all ranks (SUM all_reduce), on the CPU."""
    counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(torch.long)
    counts = comm.all_reduce(counts.to(chosen.device)).cpu()
    add_bytes(moved, "counts", 8 * num_experts * (comm.world_size - 1))
    return counts


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


def slots_by_expert(recv: Received, num_experts: int) -> list[torch.Tensor]:
    """The received slots of each expert (indices into ``recv.row`` / ``recv.weight``), in receive
    order: source rank 0's first, each rank's in token order (global sample order)."""
    order = torch.argsort(recv.expert, stable=True)
    ends = torch.bincount(recv.expert, minlength=num_experts).cumsum(0).tolist()
    return [order[(ends[e - 1] if e else 0):ends[e]] for e in range(num_experts)]


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


