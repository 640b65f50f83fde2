"""Tiny random-weight MoE checkpoints (qwen2_moe, qwen3_moe, mixtral) built from the
transformers configs and saved with ``save_pretrained`` (so the checkpoint keys are the
ones transformers writes: one 2-D tensor per expert)."""
from __future__ import annotations

from pathlib import Path

import torch

from tiny import make_tokenizer, randomize_weights

MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral")


def moe_config(arch: str, vocab: int, layers: int = 2, hidden: int = 64, experts: int = 4, top_k: int = 2,
               expert_intermediate: int = 32, tok=None, **extra):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                  num_experts_per_tok=top_k)
    if tok is not None:
        common.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    common.update(extra)
    if arch == "qwen2_moe":
        common.setdefault("norm_topk_prob", False)  # Qwen1.5-MoE: weights not renormalized
        return Qwen2MoeConfig(**common, num_experts=experts, moe_intermediate_size=expert_intermediate,
                              shared_expert_intermediate_size=2 * expert_intermediate,
                              intermediate_size=4 * expert_intermediate)
    if arch == "qwen3_moe":
        common.setdefault("norm_topk_prob", True)  # Qwen3-MoE renormalizes the top-k weights
        return Qwen3MoeConfig(**common, num_experts=experts, moe_intermediate_size=expert_intermediate,
                              intermediate_size=4 * expert_intermediate, head_dim=hidden // 4)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=experts, intermediate_size=expert_intermediate)
    raise ValueError(arch)


def make_tiny_moe(directory: Path, arch: str, layers: int = 2, hidden: int = 64, experts: int = 4,
                  top_k: int = 2, expert_intermediate: int = 32, seed: int = 0, std: float = 0.08,
                  dtype: torch.dtype = torch.float32, shard_size: str | None = None, tokenizer: bool = True,
                  vocab: int = 512, **extra) -> Path:
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory, vocab) if tokenizer else None
    config = moe_config(arch, len(tok) if tok is not None else vocab, layers, hidden, experts, top_k,
                        expert_intermediate, tok, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    randomize_weights(model, std, ("mlp.gate.weight", "shared_expert_gate.weight"))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory
