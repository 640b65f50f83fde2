"""Pre-tokenized samples: no tokenizer is loaded, so a model whose tokenizer needs remote
code (Kimi-K2's tiktoken wrapper) can be calibrated on ids tokenized elsewhere.

* ``ids``: JSONL, one ``{"input_ids": [...], "attention_mask": [...]?}`` per line;
* ``safetensors``: tensors ``input_ids`` [N, L] (integer) and optionally
  ``attention_mask`` [N, L] — what :func:`dist_quant.record` writes.

With a mask, a sample is its tokens where the mask is 1, in order (so left padding is
dropped: HF models number positions from the first real token, and so does this
re-packing). Samples are truncated to ``calib.seq_len`` and right-padded.
"""
from __future__ import annotations

import torch

from ..calibration import CalibrationSet
from .base import Context, check_ids, pack, register
from .text import jsonl_records

IDS, MASK = "input_ids", "attention_mask"


def masked(ctx: Context, ids: list, mask, where: str) -> list[int]:
    if mask is None:
        return ids
    if not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask):
        raise ctx.error(f"{where}: {MASK!r} must be a list of 0/1 as long as {IDS!r} ({len(ids)})")
    return [t for t, m in zip(ids, mask) if m]


@register("ids", needs_tokenizer=False, doc="JSONL pre-tokenized samples, an 'input_ids' list "
          "(and optional 'attention_mask') per line")
def read_ids(ctx: Context) -> CalibrationSet:
    want = f"an {IDS!r} list of integers"
    samples = []
    for lineno, record in jsonl_records(ctx, want):
        ids = record.get(IDS)
        if not isinstance(ids, list):
            raise ctx.error(f"line {lineno}: no {want}")
        ids = masked(ctx, ids, record.get(MASK), f"line {lineno}")
        check_ids(ctx, ids, f"line {lineno}")
        if ids:
            samples.append(ids)
        if len(samples) == ctx.num_samples:
            break
    return pack(ctx, samples)


@register("safetensors", needs_tokenizer=False, doc="a safetensors file with 'input_ids' [N, L] and "
          "optional 'attention_mask' [N, L] (the file dist_quant.record writes)")
def read_safetensors(ctx: Context) -> CalibrationSet:
    from safetensors import SafetensorError, safe_open

    if not ctx.path.is_file():
        raise ctx.error("is a directory, expected a file" if ctx.path.is_dir() else "file not found")
    try:
        with safe_open(str(ctx.path), framework="pt") as f:
            keys = set(f.keys())
            if IDS not in keys:
                raise ctx.error(f"has no {IDS!r} tensor (tensors: {', '.join(sorted(keys)) or 'none'})")
            ids = f.get_tensor(IDS)
            mask = f.get_tensor(MASK) if MASK in keys else None
    except SafetensorError as exc:
        raise ctx.error(f"not a safetensors file ({exc})") from None
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ctx.error(f"{IDS!r} must be a 2-D integer tensor, got {ids.dtype} {list(ids.shape)}")
    if mask is not None and mask.shape != ids.shape:
        raise ctx.error(f"{MASK!r} has shape {list(mask.shape)}, {IDS!r} has {list(ids.shape)}")
    if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
        raise ctx.error(f"{MASK!r} must hold only 0 and 1")
    samples = []
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()] if mask is not None else ids[i]
        row = row.tolist()
        check_ids(ctx, row, f"row {i}")
        if row:
            samples.append(row)
        if len(samples) == ctx.num_samples:
            break
    return pack(ctx, samples, "samples with real tokens")
