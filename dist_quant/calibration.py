"""Calibration samples: identical tokenization on every rank, then each rank's slice.

The readers of each ``calib.format`` (text, JSONL, chat, datasets, pre-tokenized ids,
recorded traffic) are in ``dist_quant/calib_sources/``. Samples are right-padded to
``seq_len``; the attention mask marks the real tokens. Right padding keeps causal
attention exact for real tokens, and padded positions are left out of statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def from_text(text: str, tokenizer, cfg: CalibConfig, source: str) -> CalibrationSet:
    """``text`` tokenized as one stream, cut into ``num_samples`` chunks of ``seq_len``."""
    from .calib_sources.text import stream_chunks

    return stream_chunks(text, tokenizer, cfg.num_samples, cfg.seq_len,
                         lambda msg: CalibrationError(f"calib.path={source!r}: {msg}"))


def load_calibration(cfg: CalibConfig, tokenizer=None, default_text: str | None = None, **kw) -> CalibrationSet:
    """The global calibration set; the sources (``calib.format``) are in dist_quant/calib_sources/."""
    from .calib_sources import load_calibration as load

    return load(cfg, tokenizer, default_text, **kw)
