"""Plan full-size models from header-only checkpoints: the real configs of Llama-3-70B,
Llama-3.1-405B and Qwen3-235B-A22B, safetensors shards (≤ 5 GB each) whose headers carry
the real tensor names, shapes and dtypes and whose data regions are sparse holes
(``truncate``: no disk blocks), then ``dry_run=true`` with 8 ranks, 512 × 2048 calibration
tokens, ``model.dtype=bfloat16``, GPTQ W4A16. Prints each model's estimated peak per rank
and its parts; nothing but headers is ever read.

    python bench/fullsize_dense.py [--out /tmp/fullsize] [--models llama3-70b,llama3.1-405b,qwen3-235b-a22b]
        [--world-size 8] [--samples 512] [--seq-len 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_BYTES = 5 * 10**9

_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
              vocab_size=128256, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, torch_dtype="bfloat16", initializer_range=0.02)
CONFIGS = {  # from the models' config.json on the Hugging Face hub
    "llama3-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                   "rope_theta": 500000.0},
    "llama3.1-405b": {**_LLAMA, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                      "num_attention_heads": 128, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                      "rope_theta": 500000.0,
                      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    # the 4-layer Llama-3-8B-shaped checkpoint bench/gpu_check.py layers quantized on an H200
    # (tokenizer of tests/tiny.py: a small vocabulary), to set the estimate beside its measured peak
    "gpu-check-8b-4l": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                        "rope_theta": 500000.0, "vocab_size": 512},
    "qwen3-235b-a22b": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 4096,
                        "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
                        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
                        "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
                        "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": 151936,
                        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
                        "torch_dtype": "bfloat16"},
}


def tensors(cfg: dict) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of the checkpoint, in file order."""
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", h // heads)
    out = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "self_attn.q_proj.weight", [heads * hd, h]), (p + "self_attn.k_proj.weight", [kv * hd, h]),
                (p + "self_attn.v_proj.weight", [kv * hd, h]), (p + "self_attn.o_proj.weight", [h, heads * hd])]
        if cfg["model_type"] == "qwen3_moe":
            out += [(p + "self_attn.q_norm.weight", [hd]), (p + "self_attn.k_norm.weight", [hd]),
                    (p + "mlp.gate.weight", [cfg["num_experts"], h])]
            inter = cfg["moe_intermediate_size"]
            for e in range(cfg["num_experts"]):
                q = f"{p}mlp.experts.{e}."
                out += [(q + "gate_proj.weight", [inter, h]), (q + "up_proj.weight", [inter, h]),
                        (q + "down_proj.weight", [h, inter])]
        else:
            inter = cfg["intermediate_size"]
            out += [(p + "mlp.gate_proj.weight", [inter, h]), (p + "mlp.up_proj.weight", [inter, h]),
                    (p + "mlp.down_proj.weight", [h, inter])]
    out += [("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]
    return out


def write_header_only(directory: Path, cfg: dict, dtype: str = "BF16", elem: int = 2) -> int:
    """Shards of at most SHARD_BYTES with real headers and hole data regions; returns the
    total size in bytes the checkpoint claims."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in tensors(cfg):
        n = elem
        for d in shape:
            n *= d
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            n = elem
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = directory / fname
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
        os.truncate(path, 8 + len(raw) + offset)  # the data: a sparse hole
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def plan(model: Path, world: int, samples: int, seq_len: int, extra: tuple[str, ...] = ()) -> tuple[list[str], object]:
    from dist_quant.dry_run import estimate
    from dist_quant.formats.registry import make_format
    from dist_quant.pipeline import output_specs
    from dist_quant.run import prepare
    from dist_quant.settings import load_config
    from dist_quant.writer import plan_parts

    cfg = load_config([f"model.path={model}", "quant=gptq_w4a16", "model.dtype=bfloat16",
                       f"calib.num_samples={samples}", f"calib.seq_len={seq_len}", "dry_run=true",
                       f"runtime.world_size={world}", "runtime.device=cuda", *extra])
    ckpt, mplan, owners, args = prepare(cfg, str(model), world)
    fmt = make_format(cfg, args)
    parts = plan_parts(output_specs(mplan, owners, ckpt, args, fmt), cfg.output.part_file_bytes,
                       prefix=fmt.part_prefix)
    return estimate(cfg, ckpt, mplan, owners, parts, world), owners, mplan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="/tmp/fullsize")
    p.add_argument("--models", default=",".join(CONFIGS))
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--set", nargs="*", default=[], help="more overrides, e.g. runtime.activation_budget=4GB")
    a = p.parse_args()
    rows = []
    for key in a.models.split(","):
        d = Path(a.out) / key
        claimed = write_header_only(d, CONFIGS[key])
        on_disk = sum(f.stat().st_blocks * 512 for f in d.iterdir())
        ranks, owners, mplan = plan(d, a.world_size, a.samples, a.seq_len, tuple(a.set))
        worst = max(ranks, key=lambda e: e.peak_bytes)
        m = worst.memory
        split = [lin for lin in mplan.linears if lin.name in owners.rows]
        rows.append((key, claimed, on_disk, worst, split and owners.pieces(split[0])))
        print(f"{key}: {claimed / 1e9:.0f} GB claimed by the headers, {on_disk / 1e6:.1f} MB on disk; "
              f"rank {worst.rank} peak {worst.peak_bytes / 1e9:.1f} GB at {worst.worst_stage}: "
              + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in m.items()), flush=True)
        if split:
            print(f"  rows split: {len(split)} linears, e.g. {split[0].name}: "
                  + ", ".join(f"{lo}-{hi}->rank {r}" for r, lo, hi in owners.pieces(split[0])))
    print("\n| model | checkpoint | est. peak / rank | worst stage | Hessians | activations | solve weight "
          "| layer weights |")
    print("|---|---|---|---|---|---|---|---|")
    for key, claimed, _, e, _ in rows:
        m = e.memory
        print(f"| {key} | {claimed / 1e9:.0f} GB | **{e.peak_bytes / 1e9:.1f} GB** | {e.worst_stage} | "
              f"{m['hessians'] / 1e9:.1f} GB | {m['activations'] / 1e9:.1f} GB | {m['solve_weight'] / 1e9:.1f} GB | "
              f"{m['layer_weights'] / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
