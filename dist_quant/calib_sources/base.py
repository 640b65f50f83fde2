"""What every calibration source shares: the context it reads with, the registry, and
the one way variable-length samples become a :class:`CalibrationSet`.

A source is a function ``read(ctx) -> CalibrationSet`` registered under a
``calib.format`` name. Every rank calls the same source on the same file and gets the
same global set (no rank-dependent input: the tokenizer, the file and ``seed``); the
rank's slice is taken afterwards (:meth:`CalibrationSet.rank_slice`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..calibration import CalibrationError, CalibrationSet
from ..config import CalibConfig


@dataclass(frozen=True)
class Source:
    name: str
    read: Callable[["Context"], CalibrationSet]
    needs_tokenizer: bool
    doc: str


SOURCES: dict[str, Source] = {}


def register(name: str, needs_tokenizer: bool, doc: str):
    def deco(fn):
        SOURCES[name] = Source(name, fn, needs_tokenizer, doc)
        return fn
    return deco


@dataclass
class Context:
    """One read: the file, the calibration keys, how to get the tokenizer (only sources
    that need one ask for it), the seed and the model's vocabulary size (when known)."""

    path: Path
    key: str  # the config key naming the file: calib.path or calib.smooth_path
    cfg: CalibConfig
    num_samples: int
    tokenizer_factory: Callable[[], Any] | None = None
    seed: int = 0
    vocab_size: int | None = None
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def where(self) -> str:
        return f"{self.key}={str(self.path)!r}"

    def error(self, msg: str) -> CalibrationError:
        return CalibrationError(f"{self.where}: {msg}")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_factory is None:
                raise self.error("this calibration format needs a tokenizer and none is available")
            self._tokenizer = self.tokenizer_factory()
        return self._tokenizer

    def pad_id(self) -> int:
        tok = self._tokenizer
        if tok is not None:
            for pad in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
                if pad is not None:
                    return int(pad)
        return 0  # padded positions are masked out of every statistic; the value never matters


def read_text_file(ctx: Context) -> str:
    path = ctx.path
    if not path.is_file():
        raise ctx.error("is a directory, expected a file" if path.is_dir() else "file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ctx.error("file is empty")
    return text


def check_ids(ctx: Context, ids: list[int], where: str) -> None:
    """Token ids must be integers in [0, vocab_size)."""
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ctx.error(f"{where}: token id {t!r} is not an integer")
    if ids:
        lo, hi = min(ids), max(ids)
        if lo < 0:
            raise ctx.error(f"{where}: token id {lo} is negative")
        if ctx.vocab_size is not None and hi >= ctx.vocab_size:
            raise ctx.error(f"{where}: token id {hi} >= the model's vocab_size={ctx.vocab_size}")


def pack(ctx: Context, samples: list[list[int]], what: str = "non-empty samples") -> CalibrationSet:
    """The first ``num_samples`` samples, truncated to ``seq_len`` and right-padded; the
    mask marks the real tokens. Right padding keeps causal attention exact for the real
    tokens (and positions start at 0 for every sample)."""
    n, seq_len = ctx.num_samples, ctx.cfg.seq_len
    samples = [s for s in samples if s][:n]
    if len(samples) < n:
        raise ctx.error(f"has {len(samples)} {what}, fewer than calib.num_samples={n}")
    input_ids = torch.full((n, seq_len), ctx.pad_id(), dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.bool)
    for i, ids in enumerate(samples):
        ids = ids[:seq_len]
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = True
    return CalibrationSet(input_ids, mask)
