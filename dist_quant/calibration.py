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

    def rank_slice(self, rank: int, world_size: int) -> "CalibrationSet":
        """Contiguous block ``[r·N/W, (r+1)·N/W)``; with ``N/W`` a multiple of the batch
        size every rank sees exactly the batches a single rank would."""
        n = self.input_ids.shape[0]
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        return CalibrationSet(self.input_ids[lo:hi], self.mask[lo:hi])

    def batches(self, batch_size: int):
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i:i + batch_size], self.mask[i:i + batch_size]


def from_text(text: str, tokenizer, cfg: CalibConfig, source: str) -> CalibrationSet:
    """``text`` tokenized as one stream, cut into ``num_samples`` chunks of ``seq_len``."""
    from .calib_sources.text import stream_chunks

    return stream_chunks(text, tokenizer, cfg.num_samples, cfg.seq_len,
                         lambda msg: CalibrationError(f"calib.path={source!r}: {msg}"))


def load_calibration(cfg: CalibConfig, tokenizer=None, default_text: str | None = None, **kw) -> CalibrationSet:
    """The global calibration set; the sources (``calib.format``) are in dist_quant/calib_sources/."""
    from .calib_sources import load_calibration as load

    return load(cfg, tokenizer, default_text, **kw)
