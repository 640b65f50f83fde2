"""Tiny random-weight checkpoints (built from transformers configs) for tests."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

# The package's own WikiText-2 excerpt (CC BY-SA 3.0, dist_quant/data/DEMO_TEXT_LICENSE.md): the tests
# need nothing outside the repository.
WIKI = Path(__file__).resolve().parents[1] / "dist_quant" / "data" / "demo_text.txt"


def corpus_text(chars: int = 200_000) -> str:
    text = WIKI.read_text(encoding="utf-8")
    return (text * (chars // len(text) + 1))[:chars]


@functools.lru_cache(maxsize=None)
def _trained_bpe(vocab_size: int) -> str:
    """A byte-level BPE trained on the corpus, as JSON (trained once per process and size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus_text(50_000)], trainer)
    return tok.to_str()


def make_tokenizer(directory: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_bpe(vocab_size))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def make_tiny_model(directory: Path, arch: str = "llama", layers: int = 2, hidden: int = 64,
                    intermediate: int = 128, heads: int = 4, kv_heads: int = 2, tied: bool = False,
                    dtype: torch.dtype = torch.float32, shard_size: str | None = None, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024, tie_word_embeddings=tied, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # larger-than-default weights make quantization error visible
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def randomize_weights(model, std: float, routers: tuple[str, ...] = ("mlp.gate.weight",)) -> None:
    """Larger-than-default random weights (quantization error becomes visible): every matrix but
    the embeddings and norms ~ N(0, std), routers ~ N(0, 0.5) (uneven expert loads)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name or "norm" in name:
                continue
            if p.dim() >= 2:
                p.normal_(0, std)
            if name.endswith(routers):
                p.normal_(0, 0.5)
