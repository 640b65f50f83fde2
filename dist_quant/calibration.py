"""Calibration samples: identical tokenization on every rank, then each rank's slice.

* plain text: tokenized as one stream and cut into ``num_samples`` chunks of ``seq_len``
  tokens taken from the start of the file;
* JSONL: one sample per line (field ``text_field``), truncated to ``seq_len`` and
  right-padded; the attention mask marks the real tokens. Right padding keeps causal
  attention exact for real tokens, and padded positions are left out of statistics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CalibConfig


class CalibrationError(ValueError):
    pass


@dataclass(frozen=True)
class CalibrationSet:
    input_ids: torch.Tensor  # [N, L] int64
    mask: torch.Tensor  # [N, L] bool: real tokens

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    def rank_slice(self, rank: int, world_size: int, batch_size: int = 1) -> "CalibrationSet":
        """This rank's rows: a contiguous block of whole *global* batches (rows
        ``[k·B, (k+1)·B)`` of the full set, in sample order), see :func:`rank_rows`. Every
        rank's ``batches(batch_size)`` then yields exactly the batches a single rank would
        form, on any world size."""
        lo, hi = rank_rows(self.input_ids.shape[0], rank, world_size, batch_size)
        return CalibrationSet(self.input_ids[lo:hi], self.mask[lo:hi])

    def batches(self, batch_size: int):
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i:i + batch_size], self.mask[i:i + batch_size]


def rank_rows(num_samples: int, rank: int, world_size: int, batch_size: int = 1) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: the ``ceil(N/B)`` global batches are split into
    contiguous blocks ``[r·K/W, (r+1)·K/W)`` (at most one batch apart), so batches never
    straddle ranks and only the last batch of the whole set may be short. The one place
    that maps ranks to calibration rows."""
    batches = -(-num_samples // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return min(first * batch_size, num_samples), min(last * batch_size, num_samples)


def _read(path: Path) -> str:
    if not path.is_file():
        raise CalibrationError(f"calib.path={str(path)!r}: file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"calib.path={str(path)!r}: file is empty")
    return text


def from_text(text: str, tokenizer, cfg: CalibConfig, source: str) -> CalibrationSet:
    need = cfg.num_samples * cfg.seq_len
    # Tokenize a prefix big enough for the samples asked for (≈4 chars/token, grown as needed).
    chars = max(need * 6, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        # one token beyond what is needed: the last kept token is then not a word cut by the prefix
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise CalibrationError(
            f"calib.path={source!r} has {len(ids)} tokens, fewer than calib.num_samples={cfg.num_samples} "
            f"x calib.seq_len={cfg.seq_len} = {need}")
    input_ids = torch.tensor(ids[:need], dtype=torch.long).reshape(cfg.num_samples, cfg.seq_len)
    return CalibrationSet(input_ids, torch.ones_like(input_ids, dtype=torch.bool))


def from_jsonl(path: Path, tokenizer, cfg: CalibConfig) -> CalibrationSet:
    texts: list[str] = []
    for lineno, line in enumerate(_read(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"calib.path={str(path)!r} line {lineno}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(cfg.text_field), str):
            raise CalibrationError(f"calib.path={str(path)!r} line {lineno}: no string field "
                                   f"{cfg.text_field!r} (calib.text_field)")
        if record[cfg.text_field].strip():
            texts.append(record[cfg.text_field])
        if len(texts) == cfg.num_samples:
            break
    if len(texts) < cfg.num_samples:
        raise CalibrationError(f"calib.path={str(path)!r} has {len(texts)} non-empty samples, fewer "
                               f"than calib.num_samples={cfg.num_samples}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((cfg.num_samples, cfg.seq_len), pad, dtype=torch.long)
    mask = torch.zeros((cfg.num_samples, cfg.seq_len), dtype=torch.bool)
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][: cfg.seq_len]
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = True
    return CalibrationSet(input_ids, mask)


def load_calibration(cfg: CalibConfig, tokenizer, default_text: str | None = None) -> CalibrationSet:
    if cfg.path is None:
        if default_text is None:
            raise CalibrationError("calib.path is not set")
        return from_text(default_text, tokenizer, cfg, "<built-in demo text>")
    path = Path(cfg.path)
    if path.suffix == ".jsonl":
        return from_jsonl(path, tokenizer, cfg)
    return from_text(_read(path), tokenizer, cfg, str(path))
