"""Perplexity of a causal LM (full-precision or quantized checkpoint) on a held-out text slice.

Library::

    from dist_quant.eval import evaluate, perplexity
    evaluate("ckpt_dir", "valid.txt", seq_len=512, start=0.5, end=1.0, max_windows=40)

CLI (OmegaConf dotlist; unknown keys and badly typed values are rejected)::

    python -m dist_quant.eval model.path=DIR data.path=FILE \\
        [data.seq_len=512 data.start=0.5 data.end=1.0 data.max_windows=40 data.batch_size=4 out=FILE.json]

Quantized checkpoints (compressed-tensors format) load through the same
``AutoModelForCausalLM.from_pretrained`` when the ``compressed-tensors`` package is
installed. Everything runs on CPU in float32.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from dist_quant.textdata import read_text, split_text

if TYPE_CHECKING:  # torch is imported lazily so that CLI usage errors are reported instantly
    import torch


def _model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-less models)."""
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None,
    batch_size: int,
) -> dict[str, Any]:
    """Perplexity of ``model`` over non-overlapping windows of a token stream.

    The 1-D ``input_ids`` are cut into consecutive windows of ``seq_len`` tokens (a
    trailing partial window is dropped); only the first ``max_windows`` are used
    (all when ``None``). Each window is scored independently: positions 1..seq_len-1
    are predicted from their prefix inside the window, so every window contributes
    ``seq_len - 1`` tokens. ``model(input_ids=...)`` must return an object with
    ``.logits`` of shape ``(batch, seq_len, vocab)``.

    Returns:
        ``{"ppl": exp(nll), "nll": mean NLL per predicted token (nats),
        "tokens": number of predicted tokens, "windows": number of windows}``.

    Raises:
        ValueError: bad arguments, or fewer than ``seq_len`` tokens.
    """
    import torch

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 1-D tensor of token ids, got {shape}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    available = input_ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens for one window, got {input_ids.numel()}")
    n_windows = available if max_windows is None else min(available, max_windows)
    windows = input_ids[: n_windows * seq_len].view(n_windows, seq_len).long()
    device = _model_device(model)

    total_nll = 0.0  # accumulated in float64
    with torch.inference_mode():
        for first in range(0, n_windows, batch_size):
            batch = windows[first : first + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            if logits.shape[:2] != batch.shape:
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(batch.shape)}")
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch[:, 1:].reshape(-1),
                reduction="none",
            )
            total_nll += nll.double().sum().item()
    tokens = n_windows * (seq_len - 1)
    mean_nll = total_nll / tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": tokens, "windows": n_windows}


def _check_model_dir(model_path: str | os.PathLike[str]) -> Path:
    p = Path(model_path)
    if not p.exists():
        raise FileNotFoundError(f"model directory not found: {str(p)!r}")
    if not p.is_dir():
        raise NotADirectoryError(f"model.path must be a checkpoint directory, got a file: {str(p)!r}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(p)!r} has no config.json (not a HF checkpoint)")
    return p


def evaluate(
    model_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    seq_len: int = 512,
    start: float = 0.5,
    end: float = 1.0,
    max_windows: int | None = 40,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Load a checkpoint (float32, CPU) and its tokenizer and compute perplexity on a text slice.

    The text is ``split_text(read_text(data_path), start, end)``, tokenized as one
    stream without special tokens, then scored by :func:`perplexity`.

    Returns:
        :func:`perplexity`'s dict plus ``"seconds"`` (wall time of the whole call,
        loading included), ``"eval_seconds"`` (the forward passes only), ``"available_windows"`` (full windows in the slice) and the
        settings used (``model_path``, ``data_path``, ``seq_len``, ``start``, ``end``,
        ``max_windows``, ``batch_size``).

    Raises:
        FileNotFoundError / NotADirectoryError: missing model directory or data file.
        ValueError: bad settings, or a slice too short for one window.
    """
    t0 = time.perf_counter()
    model_dir = _check_model_dir(model_path)
    text = split_text(read_text(data_path), start, end)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    input_ids = torch.tensor(ids, dtype=torch.long)
    if input_ids.numel() < seq_len:
        raise ValueError(
            f"the text slice [{start}, {end}] of {str(data_path)!r} has {input_ids.numel()} tokens, "
            f"fewer than seq_len={seq_len}"
        )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.to("cpu").eval()
    t1 = time.perf_counter()
    result = perplexity(model, input_ids, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
    result.update(
        eval_seconds=time.perf_counter() - t1,
        available_windows=input_ids.numel() // seq_len,
        model_path=str(model_path),
        data_path=str(data_path),
        seq_len=seq_len,
        start=start,
        end=end,
        max_windows=max_windows,
        batch_size=batch_size,
        seconds=time.perf_counter() - t0,
    )
    return result


# ----------------------------------------------------------------------------- CLI


@dataclass
class ModelConfig:
    """``model.*`` keys."""

    path: str = MISSING


@dataclass
class DataConfig:
    """``data.*`` keys."""

    path: str = MISSING
    seq_len: int = 512
    start: float = 0.5
    end: float = 1.0
    max_windows: int | None = 40
    batch_size: int = 4


@dataclass
class EvalConfig:
    """Top-level CLI config of ``python -m dist_quant.eval``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out: str | None = None


USAGE = (
    "usage: python -m dist_quant.eval model.path=DIR data.path=FILE [data.seq_len=512 data.start=0.5 "
    "data.end=1.0 data.max_windows=40 data.batch_size=4 out=FILE.json]  (data.max_windows=null: all windows)"
)


class UsageError(ValueError):
    """A bad command line (unknown key, bad value, missing required key)."""


def _valid_keys() -> list[str]:
    """Dotted names of all CLI keys, e.g. ``data.seq_len``."""
    from dataclasses import fields, is_dataclass
    from typing import get_type_hints

    keys: list[str] = []
    for name, tp in get_type_hints(EvalConfig).items():
        keys += [f"{name}.{f.name}" for f in fields(tp)] if is_dataclass(tp) else [name]
    return keys


def parse_args(argv: list[str]) -> EvalConfig:
    """Merge ``key=value`` arguments onto the typed defaults of :class:`EvalConfig`.

    Raises:
        UsageError: an argument is not ``key=value``, a key is unknown, a value has the
            wrong type or range, or ``model.path`` / ``data.path`` is missing.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise UsageError(f"expected key=value arguments, got {arg!r}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise UsageError(f"missing required key(s): {', '.join(missing)} (pass e.g. {missing[0]}=...)")
        parsed: EvalConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        # omegaconf messages carry "full_key: ..., object_type=..." detail lines; keep the first.
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        key = getattr(e, "full_key", None)
        if key and key not in message:
            message += f" (key {key!r})"
        if "not in" in message:
            message += f"; valid keys: {', '.join(_valid_keys())}"
        raise UsageError(message) from None
    d = parsed.data
    if d.seq_len < 2:
        raise UsageError(f"data.seq_len must be >= 2, got {d.seq_len}")
    if not 0.0 <= d.start < d.end <= 1.0:
        raise UsageError(f"need 0 <= data.start < data.end <= 1, got data.start={d.start}, data.end={d.end}")
    if d.max_windows is not None and d.max_windows < 1:
        raise UsageError(f"data.max_windows must be >= 1 or null, got {d.max_windows}")
    if d.batch_size < 1:
        raise UsageError(f"data.batch_size must be >= 1, got {d.batch_size}")
    return parsed


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad arguments or inputs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE, file=sys.stderr)
        return 0
    try:
        cfg = parse_args(args)
        d = cfg.data
        _check_model_dir(cfg.model.path)
        read_text(d.path)  # fail fast, before any model is loaded
        if cfg.out is not None and Path(cfg.out).is_dir():
            raise UsageError(f"out must be a file path, got a directory: {cfg.out!r}")
        result = evaluate(
            cfg.model.path,
            d.path,
            seq_len=d.seq_len,
            start=d.start,
            end=d.end,
            max_windows=d.max_windows,
            batch_size=d.batch_size,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        # Bad arguments or inputs (UsageError is a ValueError): one line, exit 2, no traceback.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(
        f"ppl={result['ppl']:.4f} nll={result['nll']:.4f} tokens={result['tokens']} "
        f"windows={result['windows']}/{result['available_windows']} seq_len={result['seq_len']} "
        f"model={result['model_path']} data={result['data_path']}[{result['start']}:{result['end']}] "
        f"({result['seconds']:.1f}s)"
    )
    payload = json.dumps(result, sort_keys=True)
    print(payload)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(payload + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
