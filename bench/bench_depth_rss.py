"""Peak RSS per rank must not grow with model depth: quantize synthetic Llama models of
SmolLM2-135M's width with 8 and 32 layers (random weights) and compare peak RSS.

    python bench/bench_depth_rss.py [--layers 8 32] [--ranks 1] [--samples 32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def make_model(directory: Path, layers: int) -> Path:
    if (directory / "config.json").is_file():
        return directory
    import torch
    from tiny import make_tiny_model

    return make_tiny_model(directory, "llama", layers=layers, hidden=576, intermediate=1536, heads=9,
                           kv_heads=3, dtype=torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "depth"))
    args = p.parse_args()
    work = Path(args.work)
    rows = []
    for layers in args.layers:
        model = make_model(work / f"llama{layers}", layers)
        out = work / f"q{layers}"
        launcher = [sys.executable, "-m", "dist_quant"] if args.ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
            "--master_port=29741", "-m", "dist_quant"]
        t0 = time.time()
        subprocess.run(launcher + [f"model.path={model}", "quant=gptq_w4a16", "quant.group_size=64",
                                   f"calib.path={DATA}", f"calib.num_samples={args.samples}",
                                   f"calib.seq_len={args.seq_len}", f"output.dir={out}", "output.overwrite=true",
                                   f"runtime.run_dir={out}.run"], cwd=ROOT, check=True, capture_output=True)
        report = json.loads((out / "quant_report.json").read_text())
        rss = {int(r): v / 2**30 for r, v in report["peak_rss_bytes_by_rank"].items()}
        rows.append((layers, time.time() - t0, rss))
        print(f"{layers} layers: wall {rows[-1][1]:.0f} s, peak RSS/rank GB {rss}", flush=True)
    base = max(rows[0][2].values())
    print("\n| layers | wall s | peak RSS/rank GB | vs first |")
    print("|---|---|---|---|")
    for layers, wall, rss in rows:
        peak = max(rss.values())
        print(f"| {layers} | {wall:.0f} | {'/'.join(f'{v:.2f}' for v in rss.values())} | {100 * (peak / base - 1):+.1f} % |")


if __name__ == "__main__":
    main()
