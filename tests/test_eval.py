"""Tests for dist_quant.eval: perplexity() against an independent reference, evaluate(), and the CLI.

Everything runs offline on a tiny random Llama with a WordLevel tokenizer built here.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dist_quant.eval import evaluate, perplexity  # noqa: E402
from dist_quant.textdata import read_text, split_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(60)] + ["the", "a", "of", "and", "to", "in", "=", ",", "."]


def _write_corpus(path: Path, n_lines: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny random Llama + WordLevel tokenizer saved as a HF checkpoint, and a text file."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "tiny-llama"
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(str(model_dir))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(model_dir), safe_serialization=True)

    data = root / "corpus.txt"
    _write_corpus(data)
    return SimpleNamespace(model_dir=model_dir, data=data, model=model, vocab_size=len(vocab))


def _reference_nll(model: Any, ids: torch.Tensor, seq_len: int, n_windows: int) -> tuple[float, int]:
    """Sum of NLL and count of predicted tokens, one window at a time, via log_softmax/gather."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = ids[w * seq_len : (w + 1) * seq_len]
            logits = model(window.unsqueeze(0)).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            targets = window[1:].unsqueeze(1)
            total += -logp[:-1].gather(1, targets).sum().item()
            count += targets.numel()
    return total, count


# ----------------------------------------------------------------------------- perplexity()


class _UniformLM(torch.nn.Module):
    """All-zero logits: every token has probability 1/vocab, so ppl == vocab exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_uniform_model_is_vocab_size() -> None:
    ids = torch.randint(0, 37, (1000,))
    out = perplexity(_UniformLM(37), ids, seq_len=64, max_windows=None, batch_size=3)
    assert out["windows"] == 1000 // 64
    assert out["tokens"] == (1000 // 64) * 63
    assert out["nll"] == pytest.approx(math.log(37), rel=1e-6)
    assert out["ppl"] == pytest.approx(37.0, rel=1e-6)


@pytest.mark.parametrize(("max_windows", "batch_size"), [(None, 1), (None, 3), (5, 2), (100, 4)])
def test_perplexity_matches_reference(tiny: SimpleNamespace, max_windows: int | None, batch_size: int) -> None:
    torch.manual_seed(1)
    seq_len = 16
    ids = torch.randint(0, tiny.vocab_size, (7 * seq_len + 5,))  # 7 full windows + a partial one
    out = perplexity(tiny.model, ids, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
    n_windows = 7 if max_windows is None else min(7, max_windows)
    total, count = _reference_nll(tiny.model, ids, seq_len, n_windows)
    assert out["windows"] == n_windows
    assert out["tokens"] == count == n_windows * (seq_len - 1)
    assert out["nll"] == pytest.approx(total / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["ppl"] > 1.0


def test_perplexity_bad_arguments(tiny: SimpleNamespace) -> None:
    ids = torch.arange(40) % tiny.vocab_size
    with pytest.raises(ValueError, match="need at least seq_len=64 tokens for one window, got 40"):
        perplexity(tiny.model, ids, seq_len=64, max_windows=None, batch_size=1)
    with pytest.raises(ValueError, match="1-D tensor"):
        perplexity(tiny.model, ids.view(4, 10), seq_len=4, max_windows=None, batch_size=1)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 1"):
        perplexity(tiny.model, ids, seq_len=1, max_windows=None, batch_size=1)
    with pytest.raises(ValueError, match="max_windows must be a positive integer or None, got 0"):
        perplexity(tiny.model, ids, seq_len=8, max_windows=0, batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        perplexity(tiny.model, ids, seq_len=8, max_windows=None, batch_size=0)


# ----------------------------------------------------------------------------- evaluate()


def test_evaluate_matches_reference(tiny: SimpleNamespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = evaluate(tiny.model_dir, tiny.data, seq_len=32, start=0.5, end=1.0, max_windows=3, batch_size=2)
    # Independent path: reload tokenizer and model, tokenize the same held-out half.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), dtype=torch.float32).eval()
    text = split_text(read_text(tiny.data), 0.5, 1.0)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokenizer.unk_token_id not in ids.tolist()  # the tokenizer round-tripped through save/load
    total, count = _reference_nll(model, ids, 32, 3)
    assert out["windows"] == 3 and out["tokens"] == count == 3 * 31
    assert out["available_windows"] == ids.numel() // 32
    assert out["nll"] == pytest.approx(total / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["seconds"] >= out["eval_seconds"] > 0
    assert out["seq_len"] == 32 and out["start"] == 0.5 and out["end"] == 1.0


def test_evaluate_too_few_tokens(tiny: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="fewer than seq_len=100000"):
        evaluate(tiny.model_dir, tiny.data, seq_len=100000)


def test_evaluate_missing_inputs(tiny: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        evaluate(tmp_path / "no-model", tiny.data)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate(tmp_path, tiny.data)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluate(tiny.model_dir, tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- CLI


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    return subprocess.run(
        [sys.executable, "-m", "dist_quant.eval", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_happy_path(tiny: SimpleNamespace, tmp_path: Path) -> None:
    out_file = tmp_path / "sub" / "result.json"
    proc = _run_cli(
        f"model.path={tiny.model_dir}",
        f"data.path={tiny.data}",
        "data.seq_len=32",
        "data.max_windows=null",
        "data.batch_size=8",
        f"out={out_file}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("ppl=")
    result = json.loads(lines[1])
    assert json.loads(out_file.read_text()) == result
    assert result["windows"] == result["available_windows"] > 3
    assert result["max_windows"] is None and result["seq_len"] == 32 and result["batch_size"] == 8
    # Same numbers as the library call.
    lib = evaluate(tiny.model_dir, tiny.data, seq_len=32, max_windows=None, batch_size=8)
    assert result["nll"] == pytest.approx(lib["nll"], rel=1e-6)
    assert f"ppl={result['ppl']:.4f}" in lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["data.bogus=1"], "data.bogus"),
        (["data.seq_len=abc"], "data.seq_len"),
        (["data.start=0.9", "data.end=0.1"], "data.start=0.9"),
        (["data.path={tmp}/missing.txt"], "missing.txt"),
        (["model.path={tmp}/no-such-model"], "no-such-model"),
    ],
)
def test_cli_errors(tiny: SimpleNamespace, tmp_path: Path, args: list[str], needle: str) -> None:
    base = {"model.path": str(tiny.model_dir), "data.path": str(tiny.data)}
    for arg in args:
        key, value = arg.split("=", 1)
        base[key] = value.format(tmp=tmp_path)
    proc = _run_cli(*(f"{k}={v}" for k, v in base.items()), cwd=tmp_path)
    assert proc.returncode == 2
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1, proc.stderr
    assert err_lines[0].startswith("error: ") and needle in err_lines[0]
    assert proc.stdout == ""


def test_cli_missing_required_key(tmp_path: Path) -> None:
    proc = _run_cli("data.seq_len=16", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: missing required key(s): data.path, model.path (pass e.g. data.path=...)"
    ]
