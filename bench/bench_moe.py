"""Benchmark the MoE path on a synthetic model: random weights, qwen3_moe layout (default
64 experts, top-8, 8 layers, hidden 256), GPTQ W4 group 64, on 1 and 2 ranks (gloo, CPU).

Prints wall time, peak RSS per rank, token rows and bytes moved between ranks per layer,
the most experts a rank held at once, and rank invariance (2 ranks vs 1). Results are also
written as JSON.

    python bench/bench_moe.py [--experts 64] [--layers 8] [--hidden 256] [--samples 64] [--out bench/out/moe]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def make_model(path: Path, args) -> Path:
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from tiny import make_tokenizer

    tok = make_tokenizer(path, 512)
    config = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                            num_experts=args.experts, num_experts_per_tok=args.top_k,
                            moe_intermediate_size=args.expert_intermediate, intermediate_size=4 * args.hidden,
                            norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def quantize(model: Path, out: Path, ranks: int, args) -> dict:
    cmd = [sys.executable, "-m", "dist_quant"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29741",
        "-m", "dist_quant"]
    cmd += [f"model.path={model}", "quant=gptq_w4a16", "quant.observer=minmax",
            f"quant.group_size={args.group_size}",
            f"calib.path={args.data}", f"calib.num_samples={args.samples}", f"calib.seq_len={args.seq_len}",
            f"calib.batch_size={args.batch_size}", f"output.dir={out}", "output.overwrite=true",
            f"runtime.run_dir={out}.run", f"runtime.threads={args.threads}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"quantization failed: {' '.join(cmd)}")
    report = json.loads((out / "quant_report.json").read_text())
    moe = report["moe"]
    layer_s = {}
    for layer in report["layers"]:
        for r, sec in layer["seconds_by_rank"].items():
            layer_s[r] = layer_s.get(r, 0.0) + sum(sec.values())
    return {"wall_s": wall, "job_s": report["wall_seconds"], "layer_loop_s_by_rank": layer_s,
            "peak_rss_gb": {r: v / 2**30 for r, v in report["peak_rss_bytes_by_rank"].items()},
            "tokens_moved_per_layer": moe["tokens_moved_per_layer"],
            "mb_moved_per_layer": moe["bytes_moved_per_layer"] / 1e6,
            "bytes_by_kind_per_layer": _bytes_by_kind(moe),
            "max_live_experts_per_rank": moe["max_live_experts_per_rank"],
            "experts_per_rank_per_layer": {r: len(e) for r, e in moe["layers"][0]["experts_by_rank"].items()},
            "tokens_per_expert": {"min": moe["min_tokens_per_expert"], "median": moe["median_tokens_per_expert"],
                                  "max": moe["max_tokens_per_expert"]},
            "fallbacks": moe["fallbacks"]}


def baseline_rss_gb(model: Path) -> float:
    """Peak RSS of a process that imports what a rank imports and builds the model skeleton
    (meta device) but quantizes nothing: the part of a rank's RSS that no split can shrink."""
    code = ("import resource, torch, transformers, dist_quant.run, dist_quant.pipeline, dist_quant.arch.moe_block\n"
            "from dist_quant.layer_forward import build_skeleton\n"
            f"build_skeleton({str(model)!r}, torch.float32, torch.device('cpu'))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return int(out.stdout.split()[-1]) / 2**30


def _bytes_by_kind(moe: dict) -> dict:
    total: dict[str, float] = {}
    for layer in moe["layers"]:
        for info in layer["by_rank"].values():
            for kind, n in info["bytes_sent"].items():
                total[kind] = total.get(kind, 0) + n
    return {k: v / max(len(moe["layers"]), 1) for k, v in sorted(total.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-intermediate", type=int, default=128)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (the same for every run: "
                   "float results, hence routing near ties, depend on the thread count)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "moe"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(out / f"synthetic-qwen3moe-e{args.experts}-l{args.layers}-h{args.hidden}", args)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    results: dict = {"model": str(model), "checkpoint_mb": size / 1e6, "args": vars(args), "cpus": os.cpu_count(),
                     "load_average_at_start": os.getloadavg(), "baseline_rss_gb": baseline_rss_gb(model)}
    print(f"model {model.name}: {size / 1e6:.0f} MB; baseline RSS {results['baseline_rss_gb']:.2f} GB; "
          f"load average {results['load_average_at_start']}", flush=True)
    for ranks in (1, 2):
        r = quantize(model, out / f"q-w{ranks}", ranks, args)
        results[f"w{ranks}"] = r
        print(f"{ranks} rank(s): {json.dumps(r)}", flush=True)
    from bench_gptq import invariance

    results["invariance_2v1"] = invariance(out / "q-w1", out / "q-w2")
    print(f"rank invariance: {results['invariance_2v1']}")
    results["load_average_at_end"] = os.getloadavg()
    (out / "bench_moe.json").write_text(json.dumps(results, indent=2))

    print("\n| ranks | wall s | layer loop s/rank | peak RSS/rank GB | experts/rank/layer | max experts alive "
          "| token rows moved/layer | MB moved/layer |")
    print("|---|---|---|---|---|---|---|---|")
    for ranks in (1, 2):
        r = results[f"w{ranks}"]
        rss = " / ".join(f"{v:.2f}" for v in r["peak_rss_gb"].values())
        loop = " / ".join(f"{v:.0f}" for v in r["layer_loop_s_by_rank"].values())
        per = " / ".join(str(v) for v in r["experts_per_rank_per_layer"].values())
        print(f"| {ranks} | {r['wall_s']:.0f} | {loop} | {rss} | {per} | {r['max_live_experts_per_rank']} | "
              f"{r['tokens_moved_per_layer']:.0f} | {r['mb_moved_per_layer']:.2f} |")


if __name__ == "__main__":
    main()
