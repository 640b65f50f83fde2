"""Peak memory of one rank, from the plan and safetensors headers only (pure functions).

The layer loop runs stage by stage; at each stage a rank holds (``T`` = this rank's tokens,
``b`` = one batch's tokens, ``c`` = bytes of the dtype activations are held in (the compute
dtype unless ``model.activation_dtype`` says otherwise), ``n`` = the stage's input
features, ``h`` = hidden size):

* **layer weights**: one decoder layer in the compute dtype (MoE: without its routed
  experts, which their owners read one at a time);
* **activations**: the residual stream and the stage's inputs, held in the compute dtype
  (``T·(h + n)·c``; a streamed closing stage, ``runtime.activation_budget``: ``(2·T·h + b·n)·c``); while a stage's inputs are being built the previous stage's inputs are
  still alive (``T·(2h + n)·c``, plus one batch's gate/up/activation for ``down_proj`` or
  one batch's attention scores);
* **Hessian** (``stats.HessianStat``): every rank accumulates ``Σ x xᵀ`` in float64
  (``8 n²``; the collective reduces that buffer in place) plus one row block of the batch
  product and the batch in float32; an owner solves in the same storage (the float32
  Hessian and the factor's workspace are its two halves), so ``8 n²`` is also the solve's
  Hessian memory;
* **solve weight** (owners): the linears read from the checkpoint, this rank's rows of them
  in float32, the permuted working copy, the integers; every rank then receives the
  quantized linear (integers, scales) and dequantizes it block by block into the layer;
* **embedding phase**: the embedding matrix and the layer-0 inputs.

The peak is the largest stage total (or the embedding phase), plus the process's fixed
overhead (``PROCESS_OVERHEAD``: Python, torch, transformers, a device context).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .stats import DEQUANT_ROWS, HESSIAN_ROW_BLOCK, TOKEN_CHUNK

DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
PROCESS_OVERHEAD = {"cpu": int(0.45e9), "cuda": int(1.5e9), "npu": int(2.0e9)}


@dataclass(frozen=True)
class Shape:
    """What the memory model needs of the job and the model (all per rank where it matters)."""

    tokens: int  # this rank's calibration tokens (samples × seq_len; with calib.smooth_path both lanes')
    batch_tokens: int  # one batch's tokens
    seq_len: int
    hidden: int
    heads: int
    compute_bytes: int  # bytes of the compute dtype
    storage_bytes: int = 0  # c: bytes of the dtype activations are held in (model.activation_dtype); 0: compute

    @property
    def held_bytes(self) -> int:
        return self.storage_bytes or self.compute_bytes


def hessian_bytes(n: int, s: Shape) -> int:
    """Capture (every rank) and solve (owners) of one stage's Hessian: the float64 sums,
    one row block of a chunk's product, one chunk of tokens in float32 and its real-token copy."""
    chunk = min(TOKEN_CHUNK, s.batch_tokens)
    return 8 * n * n + 4 * min(HESSIAN_ROW_BLOCK, n) * n + chunk * n * (4 + s.held_bytes)


def solve_weight_bytes(read: list[tuple[int, int, int]], rows_in: list[tuple[int, int]]) -> int:
    """``read``: (out, in, checkpoint bytes per element) of the linears this rank reads to
    solve; ``rows_in``: (rows, in) of its pieces. Read tensors + float32 piece + permuted
    copy + int8 integers and their reordered copy."""
    return sum(m * n * e for m, n, e in read) + sum(r * n * (4 + 4 + 1 + 1) for r, n in rows_in)


def received_bytes(stage_linears: list[tuple[int, int]], group: int) -> int:
    """Every rank receives each quantized linear of the stage (int8 integers, a float32 scale
    and an int8 zero per group) and dequantizes it ``DEQUANT_ROWS`` rows at a time (about four
    float32 temporaries of a block)."""
    return sum(m * n + m * (n // group) * 5 + 16 * min(DEQUANT_ROWS, m) * n for m, n in stage_linears)


def stage_total(s: Shape, n: int, extra_build: int, solve: int, received: int,
                streamed: bool = False) -> tuple[int, dict]:
    """Peak of one stage and its parts: max(building its inputs, capture + solve). A streamed
    stage (``runtime.activation_budget``) holds the residual stream, the branch's normed
    inputs and one batch of its own inputs instead of all of them."""
    c, t = s.held_bytes, s.tokens
    if streamed:
        held = (2 * t * s.hidden + s.batch_tokens * n) * c
        build = held + extra_build
    else:
        build = t * (2 * s.hidden + n) * c + extra_build
        held = t * (s.hidden + n) * c
    hess = hessian_bytes(n, s)
    solve_phase = held + hess + solve + received
    if build >= solve_phase:
        return build, {"activations": build, "hessians": 0, "solve_weight": 0}
    return solve_phase, {"activations": held, "hessians": hess, "solve_weight": solve + received}


def moe_mlp_bytes(s: Shape, experts: int, top_k: int, world_size: int, expert_dims: tuple[int, int],
                  acc_bytes: int) -> tuple[int, dict]:
    """A sparse MoE MLP: the residual and normalized hidden states of this rank's tokens,
    the rows received for this rank's experts (each token once per owner: the expected
    share of the job's tokens with at least one of its ``top_k`` experts here) and their
    summed outputs in the accumulation type, one expert's tokens and activations and its
    Hessians."""
    c, t, h = s.held_bytes, s.tokens, s.hidden
    inter, _ = expert_dims
    mine = math.ceil(experts / world_size)
    p_row = 1 - (1 - mine / experts) ** top_k
    received = int(world_size * t * p_row)
    per_expert = world_size * t * top_k // experts
    acts = 2 * t * h * c + received * h * (c + acc_bytes)
    expert = per_expert * (h * (c + 4) + 3 * inter * 4)
    hess = max(hessian_bytes(h, s), hessian_bytes(inter, s))
    return acts + expert + hess, {"activations": acts + expert, "hessians": hess, "solve_weight": 0}


TUNE_BYTES_PER_WEIGHT = 48
"""AutoRound, per quantized weight element of the layer: the float32 weight, offsets, best
offsets, their gradient, the quantizer's saved tensors (about 16 bytes), the float64
gradient buffer that is all-reduced and its float32 copy."""


def tuned_weights(linears) -> int:
    """Weights of a layer tuned at once by AutoRound: all of a dense layer; in a sparse layer the
    attention and shared parts (data-parallel) or one routed expert (its owner tunes them one at
    a time, dist_quant/autoround_moe.py), whichever is larger."""
    dense, experts = 0, {}
    for lin in linears:
        n = lin.in_features * lin.out_features
        if lin.expert is None:
            dense += n
        else:
            experts[lin.expert] = experts.get(lin.expert, 0) + n
    return max(dense, max(experts.values(), default=0))


def autoround_bytes(s: Shape, weights: int, inter: int) -> tuple[int, dict]:
    """Layer-level tuning (dist_quant/autoround_layer.py): the quantized chain's inputs and the
    float targets (the float chain's next inputs) of this rank's tokens, ``2·T·h·c``; the
    tuning state of the layer's ``weights`` quantized elements; one sample's forward kept for
    its backward (about ``10·h + 4·inter`` values a token and one head's ``L²`` scores per
    head)."""
    c = s.compute_bytes
    acts = 2 * s.tokens * s.hidden * c
    sample = s.seq_len * (10 * s.hidden + 4 * inter) * c + s.heads * s.seq_len ** 2 * 4
    state = TUNE_BYTES_PER_WEIGHT * weights
    return acts + sample + state, {"activations": acts + sample, "hessians": 0, "solve_weight": state}

