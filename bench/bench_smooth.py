"""Benchmark W8A8 with and without smoothing on a real model: SmolLM2-135M-Instruct, the
same calibration (128 x 512 tokens from the start of WikiText-2 valid) and held-out split
(second half, 40 windows of 512) as bench/bench_gptq.py.

Runs (GPTQ weight solve, int8 per-channel weights): W8A8 without smoothing, SmoothQuant
(alpha 0.5), Flex smooth with alpha/beta given and searched; static per-tensor and dynamic
per-token activations; 1 and 2 ranks. Perplexity is measured with the activation
quantization applied: transformers' compressed-tensors loader fake-quantizes the inputs
of every W8A8 linear on CPU (checked in tests/test_w8a8.py, and here against
dist_quant.fakequant for one run).

Each finished run is cached in <out>/<run>/bench.json, keyed by the code hash and the run's
arguments (bench/provenance.py): rerunning reuses a matching file and refuses one made by
other code or arguments (--rerun replaces it). bench/run_all.py --smooth runs the same job
through the one driver.

    python bench/bench_smooth.py [--only flex_search_static,...] [--threads 1] [--out bench/out_smooth]
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
sys.path.insert(0, str(ROOT / "bench"))

import provenance as prov  # noqa: E402
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def runs(args) -> list[tuple[str, str, int, list[str]]]:
    given = [f"quant.alpha={args.alpha}", f"quant.beta={args.beta}"]
    dyn = ["quant.act_dynamic=true"]
    return [
        ("w8a8_static", "w8a8", 1, []),
        ("w8a8_dynamic", "w8a8", 1, dyn),
        ("sq_static", "smoothquant_w8a8", 1, []),
        ("sq_dynamic", "smoothquant_w8a8", 1, dyn),
        ("flex_given_static", "flexsmooth_w8a8", 1, given),
        ("flex_given_dynamic", "flexsmooth_w8a8", 1, given + dyn),
        ("flex_search_static", "flexsmooth_w8a8", 1, []),
        ("flex_search_dynamic", "flexsmooth_w8a8", 1, dyn),
        ("flex_given_static_2r", "flexsmooth_w8a8", 2, given),
        ("flex_search_static_2r", "flexsmooth_w8a8", 2, []),
    ]


def quantize(model: Path, out: Path, ranks: int, preset: str, args, extra) -> dict:
    cmd = [sys.executable, "-m", "dist_quant"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29741",
        "-m", "dist_quant"]
    cmd += [f"model.path={model}", f"quant={preset}", f"calib.path={args.data}", f"calib.num_samples={args.samples}",
            f"calib.seq_len={args.seq_len}", f"output.dir={out}", "output.overwrite=true",
            f"runtime.run_dir={out}.run", f"runtime.threads={args.threads}", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"quantization failed: {' '.join(cmd)}")
    report = json.loads((out / "quant_report.json").read_text())
    phases: dict[str, float] = {}
    for layer in report["layers"]:
        for name, sec in layer["seconds_by_rank"]["0"].items():
            phases[name] = phases.get(name, 0.0) + sec
    choices = [(c["alpha"], c["beta"]) for layer in report["layers"] for c in layer.get("smoothing", {}).values()]
    return {"wall_s": wall, "report_wall_s": report["wall_seconds"], "phase_s_rank0": phases,
            "peak_rss_gb": {r: v / 2**30 for r, v in report["peak_rss_bytes_by_rank"].items()},
            "alpha_beta": choices}


def ppl(model: Path, args) -> float:
    from dist_quant.eval import evaluate

    return evaluate(model, args.data, seq_len=args.seq_len, start=0.5, end=1.0, max_windows=args.windows,
                    batch_size=4)["ppl"]


def ppl_fake_quant(model: Path, args) -> float:
    """The same perplexity through dist_quant.fakequant (an independent path to the loader's)."""
    import torch
    from transformers import AutoTokenizer

    from dist_quant.eval import perplexity
    from dist_quant.fakequant import load_fake_quant_model
    from dist_quant.textdata import read_text, split_text

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok(split_text(read_text(args.data), 0.5, 1.0), add_special_tokens=False)["input_ids"]
    return perplexity(load_fake_quant_model(model), torch.tensor(ids), args.seq_len, args.windows, 4)["ppl"]


def compare_choices(a: Path, b: Path) -> dict:
    ra = json.loads((a / "quant_report.json").read_text())
    rb = json.loads((b / "quant_report.json").read_text())
    same = total = 0
    for la, lb in zip(ra["layers"], rb["layers"]):
        for pair, ca in la.get("smoothing", {}).items():
            cb = lb["smoothing"][pair]
            total += 1
            same += (ca["alpha"], ca["beta"], ca["scale_sha1"]) == (cb["alpha"], cb["beta"], cb["scale_sha1"])
    return {"pairs": total, "identical_alpha_beta_scales": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--alpha", type=float, default=0.9, help="alpha of the 'given' Flex smooth runs")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the 'given' Flex smooth runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "out_smooth"))
    p.add_argument("--only", default="", help="comma list of runs (default: all)")
    p.add_argument("--rerun", action="store_true", help="replace cached runs instead of refusing a mismatch")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))

    from dist_quant.demo_model import ensure_demo_checkpoint

    model = ensure_demo_checkpoint()
    code = prov.code_revision()
    data_sha = prov.file_sha256(Path(args.data))

    def cached_run(path: Path, run_args: dict, compute) -> dict:
        key = prov.run_key(code, run_args)
        try:
            old = prov.cached(path, key, code, run_args, args.rerun)
        except prov.CacheMismatch as exc:
            raise SystemExit(str(exc)) from None
        if old is not None:
            return old["result"]
        result = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "args": run_args, "provenance": {"code": code},
                                    "load_average_after": prov.load_average(), "result": result}, indent=2))
        return result

    common = {"samples": args.samples, "seq_len": args.seq_len, "windows": args.windows, "data_sha256": data_sha}
    fp = cached_run(out / "fp.json", common, lambda: {"ppl": ppl(model, args)})["ppl"]
    print(f"FP perplexity {fp:.3f}", flush=True)
    results = {"model": str(model), "samples": args.samples, "seq_len": args.seq_len, "fp_ppl": fp,
               "cpus": os.cpu_count(), "threads": args.threads, "given_alpha_beta": [args.alpha, args.beta]}
    for key, preset, ranks, extra in runs(args):
        if only and key not in only:
            continue

        def compute(key=key, preset=preset, ranks=ranks, extra=extra):
            r = quantize(model, out / key, ranks, preset, args, extra)
            r.update(preset=preset, ranks=ranks, overrides=extra)
            r["ppl"] = ppl(out / key, args)
            r["ppl_increase_pct"] = 100 * (r["ppl"] / fp - 1)
            return r

        run_args = {**common, "run": key, "preset": preset, "ranks": ranks, "overrides": extra,
                    "threads": args.threads}
        results[key] = cached_run(out / key / "bench.json", run_args, compute)  # written after the run
        print(f"{key}: ppl {results[key]['ppl']:.3f} ({results[key]['ppl_increase_pct']:+.2f} %), "
              f"{results[key]['wall_s']:.0f} s", flush=True)
    if "flex_search_static" in results and "flex_search_static_2r" in results:
        results["invariance_2v1"] = compare_choices(out / "flex_search_static", out / "flex_search_static_2r")
        print(f"2 ranks vs 1: {results['invariance_2v1']}")
    if "flex_search_static" in results and (out / "flex_search_static").exists():
        check = cached_run(out / "flex_search_static.fakequant.json", {**common, "run": "fakequant_check"},
                           lambda: {"ppl": ppl_fake_quant(out / "flex_search_static", args)})
        results["flex_search_static"]["ppl_fakequant_model"] = check["ppl"]
    (out / "bench_smooth.json").write_text(json.dumps(results, indent=2))

    print("\n| run | activations | ranks | alpha/beta | wall s | smooth s | ppl | vs FP |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| FP | - | - | - | - | - | {fp:.3f} | - |")
    for key, preset, ranks, extra in runs(args):
        if key not in results:
            continue
        r = results[key]
        acts = "dynamic per-token" if "quant.act_dynamic=true" in extra else "static per-tensor"
        ab = "-" if preset == "w8a8" else ("0.5" if preset == "smoothquant_w8a8" else
                                          ("searched" if not any("alpha" in e for e in extra) else
                                           f"{args.alpha}/{args.beta}"))
        print(f"| {preset} | {acts} | {ranks} | {ab} | {r['wall_s']:.0f} | {r['phase_s_rank0'].get('smooth', 0):.0f} "
              f"| {r['ppl']:.3f} | {r['ppl_increase_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
