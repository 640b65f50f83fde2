"""A checkpoint larger than RAM (issue 11): write a synthetic Llama-architecture checkpoint of
70B-width layers (hidden 8,192, intermediate 28,672, 64 heads, 8 KV heads; random bf16
weights, 5 GB shards; about 41 GB with the default 24 layers), then quantize it with GPTQ
W4A16 on 2 ranks of this machine and report the peak RSS of each rank and of both together
(sampled from /proc every half second), the machine's lowest MemAvailable, and the wall time.

    python bench/bench_large.py write [--dir /work/large] [--layers 24]
    python bench/bench_large.py run   [--dir /work/large] [--ranks 2] [--samples 8] [--seq-len 256] [-- overrides]

``run`` passes ``resume=auto``: rerunning the identical command after an interruption (a
scheduler's preemption, a session's end) continues after the last completed layer. Its
summary goes to ``<dir>/run-<n>.json`` (one file per invocation) and to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class Shape:
    """A Llama decoder layer's widths."""
    hidden: int
    inter: int
    heads: int
    kv_heads: int


LLAMA_70B = Shape(8192, 28672, 64, 8)  # Llama-3-70B's layer shapes (the default here)
LLAMA_8B = Shape(4096, 14336, 32, 8)  # Llama-3-8B's (bench/gpu_check.py)


def layer_tensors(i: int, shape: Shape = LLAMA_70B) -> list[tuple[str, tuple[int, ...]]]:
    p, hd, h = f"model.layers.{i}.", shape.hidden // shape.heads, shape.hidden
    return [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (shape.heads * hd, h)),
            (p + "self_attn.k_proj.weight", (shape.kv_heads * hd, h)),
            (p + "self_attn.v_proj.weight", (shape.kv_heads * hd, h)),
            (p + "self_attn.o_proj.weight", (h, shape.heads * hd)),
            (p + "mlp.gate_proj.weight", (shape.inter, h)), (p + "mlp.up_proj.weight", (shape.inter, h)),
            (p + "mlp.down_proj.weight", (h, shape.inter))]


def _value(name: str, shape, seed: int):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    std = 0.02 if "down_proj" not in name and "o_proj" not in name else 0.02 / 4
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write(directory: Path, layers: int, shape: Shape = LLAMA_70B) -> dict:
    """Shards of whole layers (≤ 5 GB), written tensor by tensor (one tensor in memory at a time)."""
    import torch
    from tiny import make_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    vocab = len(tok)
    tensors = [("model.embed_tokens.weight", (vocab, shape.hidden))]
    for i in range(layers):
        tensors += layer_tensors(i, shape)
    tensors += [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (vocab, shape.hidden))]
    shards, cur, size = [], [], 0
    for name, dims in tensors:
        b = 2 * math.prod(dims)
        if cur and size + b > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, dims, b))
        size += b
    shards.append(cur)
    weight_map, total, t0 = {}, 0, time.time()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dims, b in shard:
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [off, off + b]}
            off += b
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = directory / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for j, (name, dims, _) in enumerate(shard):
                f.write(_value(name, dims, seed=1000 * k + j).view(torch.uint8).numpy().tobytes())
        tmp.rename(directory / fname)
        total += off
        print(f"  {fname}: {off / 1e9:.2f} GB ({time.time() - t0:.0f} s)", flush=True)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                  vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
                  num_hidden_layers=layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  max_position_embeddings=8192,
                  rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  torch_dtype="bfloat16", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return {"files": len(shards), "bytes": total, "seconds": time.time() - t0}


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += _children(k)
    return out


def _mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Peak RSS of each descendant process and of their sum, lowest MemAvailable."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.done = pid, every, threading.Event()
        self.peak_each: dict[int, int] = {}
        self.peak_sum, self.min_available = 0, _mem_available_kb()

    def run(self) -> None:
        while not self.done.is_set():
            pids = _children(self.pid)
            rss = {p: _rss_kb(p) for p in pids}
            for p, v in rss.items():
                self.peak_each[p] = max(self.peak_each.get(p, 0), v)
            self.peak_sum = max(self.peak_sum, sum(rss.values()))
            self.min_available = min(self.min_available, _mem_available_kb())
            self.done.wait(self.every)


def run(directory: Path, out: Path, ranks: int, samples: int, seq_len: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29751",
           "-m", "dist_quant", f"model.path={directory}", "model.dtype=bfloat16", "quant=gptq_w4a16",
           f"calib.path={DATA}", f"calib.num_samples={samples}", f"calib.seq_len={seq_len}", "calib.batch_size=4",
           f"output.dir={out}", "resume=auto", *extra]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    sampler = Sampler(proc.pid)
    sampler.start()
    rc = proc.wait()
    sampler.done.set()
    sampler.join()
    workers = sorted(sampler.peak_each.items(), key=lambda kv: -kv[1])[:ranks]
    result = {"rc": rc, "wall_s": time.time() - t0, "ranks": ranks, "samples": samples, "seq_len": seq_len,
              "checkpoint_gb": sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9,
              "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
              "peak_rss_gb_workers": [v / 2**20 for _, v in workers],
              "peak_rss_gb_sum": sampler.peak_sum / 2**20, "min_mem_available_gb": sampler.min_available / 2**20,
              "extra": extra, "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    report = out / "quant_report.json"
    if rc == 0 and report.is_file():
        rep = json.loads(report.read_text())
        result["report_peak_rss_gb_by_rank"] = {r: v / 2**30 for r, v in rep["peak_rss_bytes_by_rank"].items()}
        result["report_wall_s"] = rep["wall_seconds"]
    return result


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(script arguments, dist_quant overrides)``: the overrides follow a ``--``."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main() -> int:
    argv, extra = split_overrides(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["write", "run"])
    ap.add_argument("--dir", type=Path, default=Path("/work/large"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    ckpt = args.dir / "checkpoint"
    if args.what == "write":
        print(json.dumps(write(ckpt, args.layers)))
        return 0
    result = run(ckpt, args.dir / "out", args.ranks, args.samples, args.seq_len, extra)
    n = len(list(args.dir.glob("run-*.json")))
    (args.dir / f"run-{n}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
