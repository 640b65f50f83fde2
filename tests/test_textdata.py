"""Tests for dist_quant.textdata (pure helpers, no torch)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dist_quant.textdata import read_text, split_text


def _lines_text(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(f"line {i} " + "x" * rng.randint(0, 30) + "\n" for i in range(n_lines))


# ----------------------------------------------------------------------------- read_text


def test_read_text_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("hello\nworld\n", encoding="utf-8")
    assert read_text(p) == "hello\nworld\n"
    assert read_text(str(p)) == "hello\nworld\n"


def test_read_text_universal_newlines(tmp_path: Path) -> None:
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"a\r\nb\r\n")
    assert read_text(p) == "a\nb\n"


def test_read_text_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text(p)


def test_read_text_directory(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=str(tmp_path.name)):
        read_text(tmp_path)


@pytest.mark.parametrize("content", ["", "  \n\n\t"])
def test_read_text_empty(tmp_path: Path, content: str) -> None:
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        read_text(p)


def test_read_text_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bin.txt"
    p.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bin\.txt.*UTF-8"):
        read_text(p)


# ----------------------------------------------------------------------------- split_text


def test_split_whole_text() -> None:
    text = _lines_text(10)
    assert split_text(text, 0.0, 1.0) == text
    assert split_text("no newline at end", 0.0, 1.0) == "no newline at end"


def test_split_snaps_to_lines() -> None:
    text = "aaaa\nbbbb\ncccc\ndddd\n"  # 20 chars, lines start at 0, 5, 10, 15
    # 0.3 * 20 = 6 is inside "bbbb" -> start snaps forward to 10; 0.9 * 20 = 18 inside "dddd" -> end back to 15
    assert split_text(text, 0.3, 0.9) == "cccc\n"
    # 0.25 * 20 = 5 is already a line start; 0.75 * 20 = 15 is already a line end
    assert split_text(text, 0.25, 0.75) == "bbbb\ncccc\n"
    assert split_text(text, 0.0, 0.5) == "aaaa\nbbbb\n"
    assert split_text(text, 0.5, 1.0) == "cccc\ndddd\n"


def test_split_halves_are_disjoint_whole_lines() -> None:
    for seed in range(20):
        text = _lines_text(50, seed)
        lines = text.splitlines(keepends=True)
        for frac in (0.1, 0.33, 0.5, 0.77):
            head = split_text(text, 0.0, frac)
            tail = split_text(text, frac, 1.0)
            assert text.startswith(head) and text.endswith(tail)
            assert len(head) + len(tail) <= len(text)  # no overlap
            head_lines = head.splitlines(keepends=True)
            tail_lines = tail.splitlines(keepends=True)
            assert head_lines == lines[: len(head_lines)]
            assert tail_lines == lines[len(lines) - len(tail_lines) :]
            # at most the one line straddling the cut is lost
            assert len(head_lines) + len(tail_lines) >= len(lines) - 1
            assert len(head) <= int(frac * len(text)) <= len(text) - len(tail)


def test_split_middle_slice_is_contiguous_whole_lines() -> None:
    text = _lines_text(40, 3)
    part = split_text(text, 0.2, 0.6)
    i = text.index(part)
    assert i == 0 or text[i - 1] == "\n"
    assert part.endswith("\n")
    assert int(0.2 * len(text)) <= i and i + len(part) <= int(0.6 * len(text))


@pytest.mark.parametrize(
    ("start", "end", "match"),
    [
        (0.5, 0.5, "start < end"),
        (0.7, 0.2, "start=0.7"),
        (-0.1, 1.0, "start must be in \\[0, 1\\], got -0.1"),
        (0.0, 1.5, "end must be in \\[0, 1\\], got 1.5"),
        (float("nan"), 1.0, "start must be a finite number"),
        (True, 1.0, "start must be a finite number"),
        ("0.1", 1.0, "start must be a finite number"),
    ],
)
def test_split_bad_fractions(start: object, end: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_text(_lines_text(5), start, end)  # type: ignore[arg-type]


def test_split_no_complete_line() -> None:
    with pytest.raises(ValueError, match="no complete non-blank line"):
        split_text("a single long line without any break", 0.5, 1.0)
    with pytest.raises(ValueError, match="no complete non-blank line"):
        split_text("aaaa\nbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\ncc\n", 0.2, 0.6)
