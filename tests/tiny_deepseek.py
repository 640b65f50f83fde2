"""Tiny random DeepSeek-V3-layout checkpoints built from transformers' ``DeepseekV3Config``
and saved with ``save_pretrained`` (checkpoint names: one 2-D tensor per expert), optionally
with the release's extras: an MTP layer stored after the last decoder layer, FP8 block
weights with ``weight_scale_inv`` and ``quantization_config.quant_method: fp8``, and Kimi-K2's
``model_type: kimi_k2`` + ``auto_map`` config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiny import make_tokenizer, randomize_weights

FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")
KIMI_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


def deepseek_config(vocab: int, layers: int = 3, hidden: int = 64, experts: int = 8, top_k: int = 2,
                    q_lora_rank: int | None = 48, first_dense: int = 1, n_group: int = 4, topk_group: int = 2,
                    mtp: int = 1, tok=None, **extra):
    from transformers import DeepseekV3Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                  n_routed_experts=experts, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=8,
                  v_head_dim=16, qk_nope_head_dim=16, n_group=n_group, topk_group=topk_group,
                  num_experts_per_tok=top_k, first_k_dense_replace=first_dense, max_position_embeddings=1024,
                  routed_scaling_factor=2.5, norm_topk_prob=True, tie_word_embeddings=False,
                  num_nextn_predict_layers=mtp)
    if tok is not None:
        common.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    common.update(extra)
    return DeepseekV3Config(**common)


def fp8_blocks(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """amax/448 per block → (float8_e4m3fn, float32 scale_inv), as the releases were made."""
    out, inp = w.shape
    scale = torch.empty(math.ceil(out / block[0]), math.ceil(inp / block[1]))
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            s = w[sl].float().abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[sl] = (w[sl].float() / s).to(torch.float8_e4m3fn)
    return q, scale


def make_tiny_deepseek(directory: Path, layers: int = 3, experts: int = 8, top_k: int = 2,
                       q_lora_rank: int | None = 48, first_dense: int = 1, mtp: int = 1, fp8_block=None,
                       kimi: bool = False, seed: int = 0, std: float = 0.08, vocab: int = 512, **extra) -> Path:
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory, vocab)
    config = deepseek_config(len(tok), layers, experts=experts, top_k=top_k, q_lora_rank=q_lora_rank,
                             first_dense=first_dense, mtp=mtp, tok=tok, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    randomize_weights(model, std)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)  # the correction bias takes part in the choice
    model.save_pretrained(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    if mtp:
        g = torch.Generator().manual_seed(seed + 1)
        last = layers - 1
        for i in range(layers, layers + mtp):  # the MTP layer: a decoder layer + its own extras
            for name in [n for n in tensors if n.startswith(f"model.layers.{last}.")]:
                t = tensors[name]
                tensors[name.replace(f".{last}.", f".{i}.", 1)] = torch.randn(t.shape, generator=g) * std
            h = config.hidden_size
            for rel, shape in (("embed_tokens.weight", (config.vocab_size, h)), ("enorm.weight", (h,)),
                               ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
                               ("shared_head.norm.weight", (h,)), ("shared_head.head.weight", (config.vocab_size, h))):
                tensors[f"model.layers.{i}.{rel}"] = torch.randn(shape, generator=g) * std
    cfg = json.loads((directory / "config.json").read_text())
    if fp8_block is not None:
        for name in list(tensors):
            parts = name.split(".")
            if name.endswith(".weight") and parts[-2] in FP8_LINEARS and "shared_head" not in name:
                q, s = fp8_blocks(tensors[name], fp8_block)
                tensors[name], tensors[name + "_scale_inv"] = q, s
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(fp8_block)}
    if kimi:
        cfg["model_type"] = "kimi_k2"
        cfg["auto_map"] = KIMI_AUTO_MAP
        cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
