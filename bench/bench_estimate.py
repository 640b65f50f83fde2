"""Is the dry run's memory estimate honest? Synthetic Llama models (random bf16 weights,
vocab 512, one decoder layer; tests/tiny.py) of three widths are quantized with GPTQ W4A16 on one CPU rank;
the peak RSS of each run (``ru_maxrss``, from its quant_report.json) is compared with the
dry run's estimated peak for the same job (``runtime.device=cpu``: its fixed overhead).

    python bench/bench_estimate.py [--sizes 1024x4096,2048x8192,3072x12288] [--samples 32] [--seq-len 256]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model(path: Path, hidden: int, inter: int) -> Path:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_model  # random weights, its own 512-token tokenizer

    if (path / "config.json").is_file():
        return path
    return make_tiny_model(path, layers=1, hidden=hidden, intermediate=inter, heads=8, kv_heads=2,
                           dtype=torch.bfloat16)


def calib_file(path: Path) -> Path:
    if not path.is_file():
        words = [f"w{i % 997}" for i in range(400_000)]
        path.write_text(" ".join(words))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="1024x4096,2048x8192,3072x12288")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default="/tmp/bench_estimate")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = calib_file(out / "calib.txt")
    rows = []
    for size in a.sizes.split(","):
        hidden, inter = map(int, size.split("x"))
        model = make_model(out / f"llama_{size}", hidden, inter)
        args = [f"model.path={model}", "quant=gptq_w4a16", f"calib.path={calib}", f"calib.num_samples={a.samples}",
                f"calib.seq_len={a.seq_len}", "runtime.device=cpu", f"output.dir={out / ('q_' + size)}",
                "output.overwrite=true", f"runtime.run_dir={out / ('run_' + size)}"]
        from dist_quant.dry_run import estimate
        from dist_quant.formats.registry import make_format
        from dist_quant.pipeline import output_specs
        from dist_quant.run import prepare
        from dist_quant.settings import load_config
        from dist_quant.writer import plan_parts

        cfg = load_config(args)
        ckpt, plan, owners, qargs = prepare(cfg, str(model), 1)
        fmt = make_format(cfg, qargs)
        parts = plan_parts(output_specs(plan, owners, ckpt, qargs, fmt), cfg.output.part_file_bytes,
                           prefix=fmt.part_prefix)
        est = estimate(cfg, ckpt, plan, owners, parts, 1)[0]
        proc = subprocess.run([sys.executable, "-m", "dist_quant", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        report = json.loads((out / ("q_" + size) / "quant_report.json").read_text())
        peak = report["peak_rss_bytes_by_rank"]["0"]
        rows.append((size, est, peak))
        print(f"{size}: estimated {est.peak_bytes / 1e9:.3f} GB (at {est.worst_stage}: "
              + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in est.memory.items())
              + f"), measured {peak / 1e9:.3f} GB, {100 * (peak / est.peak_bytes - 1):+.1f} %", flush=True)
    print("\n| hidden x intermediate | est. peak GB | measured peak RSS GB | measured vs est. |")
    print("|---|---|---|---|")
    for size, est, peak in rows:
        print(f"| {size} | {est.peak_bytes / 1e9:.2f} | {peak / 1e9:.2f} | {100 * (peak / est.peak_bytes - 1):+.1f} % |")


if __name__ == "__main__":
    main()
