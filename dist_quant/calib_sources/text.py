"""Plain text (one token stream cut into ``num_samples`` chunks of ``seq_len``) and JSONL
text records (one sample per line, field ``calib.text_field``)."""
from __future__ import annotations

import json
from typing import Iterator

import torch

from ..calibration import CalibrationSet
from .base import Context, pack, read_text_file, register


def stream_chunks(text: str, tokenizer, num_samples: int, seq_len: int, fail) -> CalibrationSet:
    need = num_samples * seq_len
    # Tokenize a prefix big enough for the samples asked for (≈4 chars/token, grown as needed).
    chars = max(need * 6, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        # one token beyond what is needed: the last kept token is then not a word cut by the prefix
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise fail(f"has {len(ids)} tokens, fewer than calib.num_samples={num_samples} "
                   f"x calib.seq_len={seq_len} = {need}")
    input_ids = torch.tensor(ids[:need], dtype=torch.long).reshape(num_samples, seq_len)
    return CalibrationSet(input_ids, torch.ones_like(input_ids, dtype=torch.bool))


@register("text", needs_tokenizer=True, doc="plain text, tokenized as one stream and cut into "
          "num_samples chunks of seq_len tokens from the start of the file")
def read_text(ctx: Context) -> CalibrationSet:
    return stream_chunks(read_text_file(ctx), ctx.tokenizer, ctx.num_samples, ctx.cfg.seq_len, ctx.error)


def jsonl_records(ctx: Context, want: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line; a line that is not a JSON object is an error."""
    for lineno, line in enumerate(read_text_file(ctx).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ctx.error(f"line {lineno}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ctx.error(f"line {lineno}: expected a JSON object with {want}, got {type(record).__name__}")
        yield lineno, record


@register("jsonl", needs_tokenizer=True, doc="JSONL, one sample per line in the string field "
          "calib.text_field, tokenized with the tokenizer's special tokens")
def read_jsonl(ctx: Context) -> CalibrationSet:
    field = ctx.cfg.text_field
    samples: list[list[int]] = []
    want = f"a string field {field!r} (calib.text_field)"
    for lineno, record in jsonl_records(ctx, want):
        if not isinstance(record.get(field), str):
            raise ctx.error(f"line {lineno}: no {want}")
        if record[field].strip():
            samples.append(ctx.tokenizer(record[field], add_special_tokens=True)["input_ids"])
        if len(samples) == ctx.num_samples:
            break
    return pack(ctx, samples)
