"""Calibration samples (dist_quant/calibration.py) against the tokenizer's own output."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.calibration import CalibrationError, CalibrationSet, load_calibration  # noqa: E402
from dist_quant.config import CalibConfig  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus() -> str:
    from tiny import corpus_text

    return corpus_text(60_000)


def cfg(path, **kw) -> CalibConfig:
    return CalibConfig(path=str(path), **kw)


# -- plain text ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples,seq_len", [(4, 16), (8, 64), (3, 257), (1, 2)])
def test_text_chunks_equal_tokenizer_tokenization_of_the_file(tmp_path, tokenizer, corpus, num_samples, seq_len):
    path = tmp_path / "calib.txt"
    path.write_text(corpus, encoding="utf-8")
    calib = load_calibration(cfg(path, num_samples=num_samples, seq_len=seq_len), tokenizer)
    ref = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    need = num_samples * seq_len
    assert len(ref) > need
    assert calib.input_ids.dtype == torch.long
    assert calib.input_ids.shape == (num_samples, seq_len)
    assert calib.input_ids.reshape(-1).tolist() == ref[:need]
    assert calib.mask.dtype == torch.bool and bool(calib.mask.all())
    assert calib.tokens == need
    # The chunks decode back to the start of the file.
    text = tokenizer.decode(calib.input_ids.reshape(-1).tolist())
    assert corpus.startswith(text)


def test_text_using_the_whole_file(tmp_path, tokenizer, corpus):
    text = corpus[:3000]
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    ref = tokenizer(text, add_special_tokens=False)["input_ids"]
    calib = load_calibration(cfg(path, num_samples=1, seq_len=len(ref)), tokenizer)
    assert calib.input_ids[0].tolist() == ref


class WordTokenizer:
    """One token per whitespace-separated word (a stand-in whose tokens are long)."""

    pad_token_id = 0
    eos_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]}


def test_text_chunk_does_not_end_in_a_word_cut_by_the_prefix(tmp_path):
    tok = WordTokenizer()
    text = " ".join(f"w{i:011d}" for i in range(1000))  # 13 chars per word with its space
    path = tmp_path / "words.txt"
    path.write_text(text)
    calib = load_calibration(cfg(path, num_samples=4, seq_len=79), tok)  # 316 tokens
    ref = tok(text)["input_ids"][:316]
    assert calib.input_ids.reshape(-1).tolist() == ref


def test_text_too_short_names_path_and_numbers(tmp_path, tokenizer):
    text = "hello world, this is short."
    path = tmp_path / "short.txt"
    path.write_text(text)
    have = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=16, seq_len=128), tokenizer)
    msg = str(err.value)
    assert str(path) in msg
    for number in (str(have), "16", "128", str(16 * 128)):
        assert number in msg


def test_missing_file_named(tmp_path, tokenizer):
    path = tmp_path / "nope" / "missing.txt"
    with pytest.raises(CalibrationError, match="missing.txt") as err:
        load_calibration(cfg(path), tokenizer)
    assert str(path) in str(err.value)
    with pytest.raises(CalibrationError, match="missing.jsonl"):
        load_calibration(cfg(tmp_path / "missing.jsonl"), tokenizer)


@pytest.mark.parametrize("content", ["", "   \n\n\t  \n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file_named(tmp_path, tokenizer, content, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    with pytest.raises(CalibrationError, match="empty") as err:
        load_calibration(cfg(path), tokenizer)
    assert str(path) in str(err.value)


def test_directory_is_not_a_file(tmp_path, tokenizer):
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(tmp_path), tokenizer)
    assert str(tmp_path) in str(err.value)


# -- JSONL -----------------------------------------------------------------------------------
def write_jsonl(path: Path, records, **dump_kw) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, **dump_kw)) + "\n" for r in records),
                    encoding="utf-8")


def test_jsonl_truncation_padding_and_mask(tmp_path, tokenizer, corpus):
    texts = [corpus[:40], corpus[1000:3000], "a", corpus[5000:5200], corpus[9000:9020]]
    records = [{"text": texts[0], "other": 1}, "", {"text": texts[1]}, {"text": "   "}, {"text": texts[2]},
               {"text": texts[3]}, {"text": texts[4]}, {"text": "never reached"}]
    path = tmp_path / "calib.jsonl"
    write_jsonl(path, records)
    seq_len = 24
    calib = load_calibration(cfg(path, num_samples=5, seq_len=seq_len), tokenizer)
    assert calib.input_ids.shape == (5, seq_len) and calib.mask.shape == (5, seq_len)
    pad = tokenizer.pad_token_id
    assert pad is not None
    lengths = []
    for i, text in enumerate(texts):
        ref = tokenizer(text, add_special_tokens=True)["input_ids"]
        n = min(len(ref), seq_len)
        lengths.append(n)
        assert calib.input_ids[i, :n].tolist() == ref[:n]
        assert calib.input_ids[i, n:].tolist() == [pad] * (seq_len - n)
        assert calib.mask[i].tolist() == [True] * n + [False] * (seq_len - n)
    assert lengths[1] == seq_len  # truncated
    assert lengths[2] < seq_len  # padded
    assert calib.tokens == sum(lengths)


def test_jsonl_custom_text_field(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"content": "one two three"}, {"content": "four five"}])
    calib = load_calibration(cfg(path, num_samples=2, seq_len=8, text_field="content"), tokenizer)
    assert calib.input_ids[1, : calib.mask[1].sum()].tolist() == tokenizer("four five")["input_ids"][:8]


def test_jsonl_bad_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "fine"}, "", '{"text": "broken', {"text": "more"}])
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=3, seq_len=8), tokenizer)
    assert "line 3" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("record", [{"txt": "x"}, {"text": 5}, ["text"], "3"])
def test_jsonl_line_without_text_field_is_named(tmp_path, tokenizer, record):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "fine"}, record])
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=2, seq_len=8), tokenizer)
    assert "line 2" in str(err.value) and "'text'" in str(err.value)


def test_jsonl_too_few_samples_names_numbers(tmp_path, tokenizer):
    path = tmp_path / "few.jsonl"
    write_jsonl(path, [{"text": "a b"}, {"text": ""}, {"text": "c d"}])
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=7, seq_len=8), tokenizer)
    msg = str(err.value)
    assert str(path) in msg and "2" in msg and "7" in msg


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_jsonl_text_with_unicode_line_separators(tmp_path, tokenizer, sep):
    texts = [f"first{sep}line", "second"]
    path = tmp_path / "u.jsonl"
    write_jsonl(path, [{"text": t} for t in texts], ensure_ascii=False)
    assert len(path.read_text(encoding="utf-8").split("\n")) == 3
    calib = load_calibration(cfg(path, num_samples=2, seq_len=16), tokenizer)
    ref = tokenizer(texts[0])["input_ids"][:16]
    assert calib.input_ids[0, : len(ref)].tolist() == ref


# -- rank slices -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 16, 33, 128])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 8, 13])
def test_rank_slices_partition_in_order(n, w):
    ids = torch.arange(n * 3).reshape(n, 3)
    mask = (torch.arange(n * 3).reshape(n, 3) % 4) != 0
    whole = CalibrationSet(ids, mask)
    slices = [whole.rank_slice(r, w) for r in range(w)]
    assert torch.equal(torch.cat([s.input_ids for s in slices]), ids)
    assert torch.equal(torch.cat([s.mask for s in slices]), mask)
    sizes = [s.input_ids.shape[0] for s in slices]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert sum(s.tokens for s in slices) == whole.tokens
    for s in slices:
        batches = list(s.batches(2))
        if s.input_ids.shape[0]:
            assert torch.equal(torch.cat([b[0] for b in batches]), s.input_ids)
            assert torch.equal(torch.cat([b[1] for b in batches]), s.mask)
        else:
            assert batches == []
