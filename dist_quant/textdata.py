"""Plain-text data helpers: read a text file and cut it into line-aligned fractions.

Calibration uses the beginning of a file; held-out evaluation uses a later part of
the same file, e.g. ``split_text(text, 0.5, 1.0)``. Because ``start`` snaps forward
and ``end`` snaps back to line boundaries, ``split_text(t, 0, f)`` and
``split_text(t, f, 1)`` never share a line (a line straddling the cut belongs to
neither).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file (universal newlines) and return its contents.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is empty / whitespace only, or is not valid UTF-8.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text file not found: {str(p)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"expected a text file, got a directory: {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(p)!r} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty ({len(text)} characters, no text)")
    return text


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def split_text(text: str, start: float, end: float) -> str:
    """Return the part of ``text`` between fractions ``start`` and ``end`` of its length, in whole lines.

    The cut points ``int(start * len(text))`` and ``int(end * len(text))`` are snapped
    to line boundaries: ``start`` forward to the beginning of the next line (unless it
    already is a line start), ``end`` back to just after the last newline before it
    (unless it already is a line end or the end of the text). The result therefore
    consists of complete lines, newlines included.

    Raises:
        ValueError: ``start``/``end`` are not fractions with ``0 <= start < end <= 1``,
            or the slice contains no complete non-blank line.
    """
    start = _check_fraction("start", start)
    end = _check_fraction("end", end)
    if not start < end:
        raise ValueError(f"need start < end, got start={start!r}, end={end!r}")
    n = len(text)
    lo = int(start * n)
    hi = n if end >= 1.0 else int(end * n)
    if lo > 0 and text[lo - 1] != "\n":
        nl = text.find("\n", lo)
        lo = n if nl < 0 else nl + 1
    if hi < n and (hi == 0 or text[hi - 1] != "\n"):
        hi = text.rfind("\n", 0, hi) + 1  # 0 when there is no newline before hi
    part = text[lo:hi] if lo < hi else ""
    if not part.strip():
        raise ValueError(
            f"split_text(start={start!r}, end={end!r}) of a {n}-character text with "
            f"{text.count(chr(10)) + 1} line(s) contains no complete non-blank line"
        )
    return part
