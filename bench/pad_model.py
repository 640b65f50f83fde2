"""A servable-shape twin of SmolLM2-135M-Instruct: the same function, every linear a multiple of 128.

``fp8_block`` (128 x 128 weight blocks, activation groups of 128) and ``w4afp8`` (int4 groups of
128) need every linear's input and each fused part's output to be a multiple of 128, which
SmolLM2 (hidden 576, 9 query heads, 3 KV heads of 64) is not. This script writes a checkpoint
that computes exactly what SmolLM2 computes but with hidden 768 (6 x 128), 12 query heads and 4
KV heads (q 768, k/v 256, o 768 -> 768), the MLP unchanged (1536 = 12 x 128):

* the extra hidden channels are zero everywhere (embedding columns, output rows of o_proj and
  down_proj), so the residual stream carries them as zeros; each RMSNorm then sees the same sum of
  squares over 768 channels as over 576, so with its eps scaled by ``576/768`` it normalizes by
  ``sqrt(576/768)`` times the original root mean square, which its weight, scaled by
  ``sqrt(576/768)``, undoes;
* query heads 9..11 and KV head 3 are zero (their rows of q/k/v_proj, their columns of o_proj):
  GQA keeps 3 query heads per KV head, so real query head h still reads real KV head h // 3, and
  the padded heads' output is their zero V, dropped by o_proj's zero columns.

Perplexity of the twin equals the original's up to float rounding (checked by ``--check``).

    python bench/pad_model.py OUT_DIR [--check]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, Q_HEADS, KV_HEADS = 768, 12, 4  # transformers wants hidden % heads == 0: lcm(12, 128) = 384


def pad(t, shape):
    import torch

    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def pad_checkpoint(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    h0, hd = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cfg["num_attention_heads"] * hd == h0 and cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert Q_HEADS // KV_HEADS == cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    norm_gain = math.sqrt(h0 / HIDDEN)  # the 768-channel mean is 576/768 of the 576-channel one
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = {}
    for name, t in tensors.items():
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if name.endswith("norm.weight"):
            out[name] = pad(t.float() * norm_gain, (HIDDEN,)).to(t.dtype)
        elif leaf in ("embed_tokens", "lm_head"):
            out[name] = pad(t, (t.shape[0], HIDDEN))
        elif leaf == "q_proj":
            out[name] = pad(t, (Q_HEADS * hd, HIDDEN))
        elif leaf in ("k_proj", "v_proj"):
            out[name] = pad(t, (KV_HEADS * hd, HIDDEN))
        elif leaf == "o_proj":
            out[name] = pad(t, (HIDDEN, Q_HEADS * hd))
        elif leaf in ("gate_proj", "up_proj"):
            out[name] = pad(t, (t.shape[0], HIDDEN))
        elif leaf == "down_proj":
            out[name] = pad(t, (HIDDEN, t.shape[1]))
        else:
            raise SystemExit(f"pad_model: no rule for tensor {name!r} {tuple(t.shape)}")
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(hidden_size=HIDDEN, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=hd,
               rms_norm_eps=cfg["rms_norm_eps"] * h0 / HIDDEN)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():  # tokenizer, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--check", action="store_true", help="compare the logits of both models on a text")
    a = p.parse_args()
    from dist_quant.demo_model import ensure_demo_checkpoint

    src = ensure_demo_checkpoint()
    dst = pad_checkpoint(src, Path(a.out))
    print(f"wrote {dst}")
    if a.check:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src))
        ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            la = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(ids).logits
            lb = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32)(ids).logits
        print(f"max |logit difference| {float((la - lb).abs().max()):.2e} (max |logit| {float(la.abs().max()):.1f})")


if __name__ == "__main__":
    main()
