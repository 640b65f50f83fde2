"""Calibration sources: ``calib.format`` names one of :data:`SOURCES` (``auto``: chosen
from the file, see :func:`detect_format`); every rank reads the same file the same way
and gets the same global :class:`~dist_quant.calibration.CalibrationSet`.

Only the formats that need text → ids load the tokenizer (``tokenizer_factory`` is
called at most once), so pre-tokenized ids calibrate models whose tokenizer needs code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..calibration import CalibrationError, CalibrationSet
from ..config import CalibConfig
from . import chat, hf_dataset, pretokenized, text  # noqa: F401  (register the sources)
from .base import SOURCES, Context, Source

__all__ = ["SOURCES", "Source", "detect_format", "load_calibration", "load_smooth_calibration"]

DATASET_SUFFIXES = (".parquet", ".arrow")


def detect_format(path: Path) -> str:
    """``auto``: a folder, .parquet or .arrow → dataset; .safetensors → safetensors; .jsonl →
    by its first record (``input_ids`` → ids, ``messages`` → chat, else jsonl); else text."""
    if path.is_dir() or path.suffix in DATASET_SUFFIXES:
        return "dataset"
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix == ".jsonl":
        first = _first_record(path)
        if isinstance(first, dict):
            if pretokenized.IDS in first:
                return "ids"
            if chat.MESSAGES in first:
                return "chat"
        return "jsonl"
    return "text"


def _first_record(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None  # the jsonl reader names the line
    return None


def read_source(path: str, key: str, cfg: CalibConfig, num_samples: int,
                tokenizer: Any = None, tokenizer_factory: Callable[[], Any] | None = None,
                seed: int = 0, vocab_size: int | None = None) -> CalibrationSet:
    p = Path(path)
    name = cfg.format if cfg.format != "auto" else detect_format(p)
    source = SOURCES.get(name)
    if source is None:  # config.py checks calib.format; this is for direct callers
        raise CalibrationError(f"calib.format={name!r}: expected auto or one of {', '.join(SOURCES)}")
    ctx = Context(p, key, cfg, num_samples, tokenizer_factory, seed, vocab_size, _tokenizer=tokenizer)
    return source.read(ctx)


def load_calibration(cfg: CalibConfig, tokenizer: Any = None, default_text: str | None = None, *,
                     tokenizer_factory: Callable[[], Any] | None = None, seed: int = 0,
                     vocab_size: int | None = None) -> CalibrationSet:
    """The global calibration set of ``calib.path`` (``default_text`` when it is unset)."""
    if cfg.path is None:
        if default_text is None:
            raise CalibrationError("calib.path is not set")
        tok = tokenizer if tokenizer is not None else tokenizer_factory()
        return text.stream_chunks(default_text, tok, cfg.num_samples, cfg.seq_len,
                                  lambda msg: CalibrationError(f"<built-in demo text>: {msg}"))
    return read_source(cfg.path, "calib.path", cfg, cfg.num_samples, tokenizer, tokenizer_factory, seed,
                       vocab_size)


def load_smooth_calibration(cfg: CalibConfig, tokenizer: Any = None, *,
                            tokenizer_factory: Callable[[], Any] | None = None, seed: int = 0,
                            vocab_size: int | None = None) -> CalibrationSet | None:
    """The separate smoothing set of ``calib.smooth_path`` (None when unset), read with the same
    ``calib.format`` rules, ``calib.smooth_num_samples`` samples of ``calib.seq_len``."""
    if cfg.smooth_path is None:
        return None
    n = cfg.smooth_num_samples or cfg.num_samples
    return read_source(cfg.smooth_path, "calib.smooth_path", cfg, n, tokenizer, tokenizer_factory, seed,
                       vocab_size)
