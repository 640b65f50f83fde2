"""Full-size plans from header-only checkpoints: the real tensor names, shapes and dtypes of a
released model in safetensors headers, the data region a sparse hole (``truncate``: nothing is
stored, a 671B checkpoint takes a few MB of disk), then ``dry_run=true`` for several world sizes
printing per-rank bytes read and written, estimated peak memory and the output size.

    python bench/fullsize.py                                  # DeepSeek-V3 (FP8) and Kimi-K2 (FP8), 8/16/32 ranks
    python bench/fullsize.py --models kimi_k2 --ranks 8 --dir /tmp/fullsize -- quant=rtn_w4a16

Everything after ``--`` is passed to dist_quant as overrides (default: GPTQ W4A16 g128,
512 x 4096 calibration tokens as MoE-Quant's published DeepSeek-V3 run, bfloat16 compute).

Adding a model (memory developer: Llama-3-70B / 3.1-405B, Qwen3-235B-A22B belong here too):
add an entry to ``MODELS``: name → ``(config, tensors)`` where ``config`` is the model's
config.json as a dict (or a path under bench/configs/) and ``tensors(config)`` returns the
checkpoint's ``[(name, shape, safetensors dtype)]`` in file order. ``write_header_only``
shards them (≤ 5 GB a file, as the hub releases do) with a ``model.safetensors.index.json``.
A Llama-style dense model needs only embed/norm/lm_head and per layer the q/k/v/o and
gate/up/down projections and two norms; ``moe_expert_tensors`` lists routed experts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHARD_BYTES = 5 * 10**9
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I32": 4, "I8": 1}
FP8_BLOCK = 128


def _linear(name: str, out: int, inp: int, fp8: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """A release linear: BF16, or float8_e4m3fn + its float32 ``weight_scale_inv`` blocks."""
    if not fp8:
        return [(f"{name}.weight", (out, inp), "BF16")]
    return [(f"{name}.weight", (out, inp), "F8_E4M3"),
            (f"{name}.weight_scale_inv", (math.ceil(out / FP8_BLOCK), math.ceil(inp / FP8_BLOCK)), "F32")]


def moe_expert_tensors(prefix: str, experts: int, hidden: int, inter: int, fp8: bool) -> list:
    out = []
    for e in range(experts):
        p = f"{prefix}.experts.{e}"
        out += _linear(f"{p}.gate_proj", inter, hidden, fp8) + _linear(f"{p}.up_proj", inter, hidden, fp8)
        out += _linear(f"{p}.down_proj", hidden, inter, fp8)
    return out


def _deepseek_layer(c: dict, i: int, fp8: bool) -> list:
    h, p = c["hidden_size"], f"model.layers.{i}"
    heads, nope, rope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_lora, kv_lora = c.get("q_lora_rank"), c["kv_lora_rank"]
    t = [(f"{p}.input_layernorm.weight", (h,), "BF16"), (f"{p}.post_attention_layernorm.weight", (h,), "BF16")]
    a = f"{p}.self_attn"
    if q_lora is None:
        t += _linear(f"{a}.q_proj", heads * (nope + rope), h, fp8)
    else:
        t += _linear(f"{a}.q_a_proj", q_lora, h, fp8) + [(f"{a}.q_a_layernorm.weight", (q_lora,), "BF16")]
        t += _linear(f"{a}.q_b_proj", heads * (nope + rope), q_lora, fp8)
    t += _linear(f"{a}.kv_a_proj_with_mqa", kv_lora + rope, h, fp8) + [(f"{a}.kv_a_layernorm.weight", (kv_lora,), "BF16")]
    t += _linear(f"{a}.kv_b_proj", heads * (nope + v), kv_lora, fp8) + _linear(f"{a}.o_proj", h, heads * v, fp8)
    if i < c["first_k_dense_replace"]:
        inter = c["intermediate_size"]
        t += _linear(f"{p}.mlp.gate_proj", inter, h, fp8) + _linear(f"{p}.mlp.up_proj", inter, h, fp8)
        t += _linear(f"{p}.mlp.down_proj", h, inter, fp8)
    else:
        e, mi = c["n_routed_experts"], c["moe_intermediate_size"]
        t += [(f"{p}.mlp.gate.weight", (e, h), "BF16"), (f"{p}.mlp.gate.e_score_correction_bias", (e,), "F32")]
        t += moe_expert_tensors(f"{p}.mlp", e, h, mi, fp8)
        si = mi * c["n_shared_experts"]
        s = f"{p}.mlp.shared_experts"
        t += _linear(f"{s}.gate_proj", si, h, fp8) + _linear(f"{s}.up_proj", si, h, fp8)
        t += _linear(f"{s}.down_proj", h, si, fp8)
    return t


def deepseek_tensors(c: dict) -> list:
    """DeepSeek-V3 / R1 / Kimi-K2 as released: FP8 block linears (when the config says
    ``quant_method: fp8``), BF16 norms / router / embeddings / lm_head, the MTP layers after the
    last decoder layer (a full MoE layer plus embed_tokens, enorm, hnorm, BF16 eh_proj, shared_head)."""
    fp8 = (c.get("quantization_config") or {}).get("quant_method") == "fp8"
    h, vocab, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    t = [("model.embed_tokens.weight", (vocab, h), "BF16")]
    for i in range(n):
        t += _deepseek_layer(c, i, fp8)
    for i in range(n, n + (c.get("num_nextn_predict_layers") or 0)):
        p = f"model.layers.{i}"
        t += _deepseek_layer(c, i, fp8)
        t += [(f"{p}.embed_tokens.weight", (vocab, h), "BF16"), (f"{p}.enorm.weight", (h,), "BF16"),
              (f"{p}.hnorm.weight", (h,), "BF16"), (f"{p}.eh_proj.weight", (h, 2 * h), "BF16"),
              (f"{p}.shared_head.norm.weight", (h,), "BF16"), (f"{p}.shared_head.head.weight", (vocab, h), "BF16")]
    t += [("model.norm.weight", (h,), "BF16"), ("lm_head.weight", (vocab, h), "BF16")]
    return t


MODELS = {
    "deepseek_v3": (HERE / "configs" / "deepseek_v3.json", deepseek_tensors),  # also R1 / V3.1 shapes
    "kimi_k2": (HERE / "configs" / "kimi_k2.json", deepseek_tensors),
}


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def write_header_only(directory: Path, config: dict, tensors: list, shard_bytes: int = SHARD_BYTES) -> dict:
    """A sharded safetensors checkpoint whose data regions are holes; returns its summary."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for spec in tensors:
        b = nbytes(spec[1], spec[2])
        if current and size + b > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += b
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            b = nbytes(shape, dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + b]}
            offset += b
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)  # the data: a hole, nothing stored
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return {"files": len(shards), "tensors": len(tensors), "data_bytes": total,
            "disk_bytes": sum(os.stat(directory / f).st_blocks * 512 for f in set(weight_map.values()))}


def build(name: str, root: Path) -> tuple[Path, dict]:
    config, tensors = MODELS[name]
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    directory = root / name
    return directory, write_header_only(directory, config, tensors(config))


DEFAULT_OVERRIDES = ["quant=gptq_w4a16", "quant.group_size=128", "calib.num_samples=512", "calib.seq_len=4096",
                     "calib.batch_size=4", "model.dtype=bfloat16"]


def plan(directory: Path, world_size: int, overrides: list[str]) -> list[str]:
    """The dry-run summary (everything before the part-file and per-module listings)."""
    from dist_quant.dry_run import plan_report
    from dist_quant.settings import load_config

    cfg = load_config([f"model.path={directory}", "dry_run=true", f"runtime.world_size={world_size}",
                       f"output.dir={directory.parent / (directory.name + '-out')}", *overrides])
    lines, warnings = plan_report(cfg, str(directory), world_size)
    return lines[: lines.index("part files:")] + [f"warning: {w}" for w in warnings]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dist_quant_fullsize"))
    args = ap.parse_args(argv)
    overrides = DEFAULT_OVERRIDES + extra
    for name in args.models:
        t0 = time.perf_counter()
        directory, info = build(name, args.dir)
        print(f"== {name}: header-only checkpoint {directory}: {info['files']} files, {info['tensors']} tensors, "
              f"{info['data_bytes'] / 1e9:.1f} GB of data as holes ({info['disk_bytes'] / 1e6:.1f} MB on disk), "
              f"written in {time.perf_counter() - t0:.1f} s")
        for n in args.ranks:
            t0 = time.perf_counter()
            lines = plan(directory, n, overrides)
            print("\n".join(lines))
            print(f"(planned in {time.perf_counter() - t0:.1f} s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
