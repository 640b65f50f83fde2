"""Held-out perplexity of the FP8 presets on SmolLM2-135M-Instruct (quality only; timings on a
shared machine mean nothing): FP, fp8_dynamic and fp8_static, each with RTN and GPTQ, nvfp4a16
(RTN, GPTQ) and nvfp4 (RTN), with the
activation quantization applied as vLLM computes it (dist_quant.fakequant; transformers'
loader gives the same logits, tests/test_float_formats.py). fp8_block and w4afp8 need every
linear to be a multiple of 128, which SmolLM2 (hidden 576) is not: they are refused up front on
it; ``--padded`` runs them on its servable-shape twin (bench/pad_model.py, the same function with
hidden 768 and 12 / 4 heads), with fp8_dynamic on the twin for comparison.

Calibration: the first ``--samples`` x ``--seq-len`` tokens of the data file; held out: its
second half, ``--windows`` windows of ``--seq-len`` (dist_quant.eval's split).

    python bench/bench_float_formats.py [--samples 32] [--windows 20] [--out bench/out_float] [--padded]
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
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
RUNS = [("fp8_dynamic_rtn", "fp8_dynamic", "rtn"), ("fp8_dynamic_gptq", "fp8_dynamic", "gptq"),
        ("fp8_static_rtn", "fp8_static", "rtn"), ("fp8_static_gptq", "fp8_static", "gptq"),
        ("nvfp4a16_rtn", "nvfp4a16", "rtn"), ("nvfp4a16_gptq", "nvfp4a16", "gptq"), ("nvfp4_rtn", "nvfp4", "rtn")]
# --padded: the servable-shape twin of SmolLM2 (bench/pad_model.py), for the presets that need 128-multiples
PADDED_RUNS = [("fp8_block_rtn", "fp8_block", "rtn"), ("fp8_block_gptq", "fp8_block", "gptq"),
               ("w4afp8_rtn", "w4afp8", "rtn"), ("w4afp8_gptq", "w4afp8", "gptq"),
               ("fp8_dynamic_rtn", "fp8_dynamic", "rtn"), ("fp8_dynamic_gptq", "fp8_dynamic", "gptq")]


def quantize(model: Path, out: Path, preset: str, solver: str, args) -> float:
    cmd = [sys.executable, "-m", "dist_quant", f"model.path={model}", f"quant={preset}",
           f"quant.weight_solver={solver}", f"calib.path={args.data}", f"calib.num_samples={args.samples}",
           f"calib.seq_len={args.seq_len}", f"output.dir={out}", "output.overwrite=true",
           f"runtime.run_dir={out}.run", f"runtime.threads={args.threads}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"quantization failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.time() - t0


def held_out_ids(model: Path, args):
    import torch
    from transformers import AutoTokenizer

    from dist_quant.textdata import read_text, split_text

    tok = AutoTokenizer.from_pretrained(str(model))
    return torch.tensor(tok(split_text(read_text(args.data), 0.5, 1.0), add_special_tokens=False)["input_ids"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "out_float"))
    p.add_argument("--only", default="", help="comma list of runs (default: all)")
    p.add_argument("--padded", action="store_true", help="quantize the servable-shape twin of SmolLM2 "
                   "(bench/pad_model.py: hidden 768, 12 / 4 heads, the same function) with fp8_block, w4afp8 "
                   "and fp8_dynamic; results in <out>/padded")
    p.add_argument("--peers", default="", help="a folder of llm-compressor outputs, one subfolder per scheme "
                   "(bench/peers/llmcompressor_scheme.py): each is evaluated the same way as llmcompressor_<scheme>")
    args = p.parse_args()
    out = Path(args.out) / ("padded" if args.padded else "")
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM

    from dist_quant.demo_model import ensure_demo_checkpoint
    from dist_quant.eval import perplexity
    from dist_quant.fakequant import load_fake_quant_model

    torch.set_num_threads(args.threads)
    model = ensure_demo_checkpoint()
    runs = RUNS
    if args.padded:
        from pad_model import pad_checkpoint

        if not (out / "model" / "config.json").is_file():
            pad_checkpoint(model, out / "model")
        model, runs = out / "model", PADDED_RUNS
    ids = held_out_ids(model, args)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "fp" not in results:
        fp = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
        results["fp"] = perplexity(fp, ids, args.seq_len, args.windows, 4)["ppl"]
        results_path.write_text(json.dumps(results, indent=2))
    only = set(filter(None, args.only.split(",")))
    for name, preset, solver in runs:
        if (only and name not in only) or name in results:
            continue
        qdir = out / name
        wall = quantize(model, qdir, preset, solver, args)
        results.setdefault("wall_s", {})[name] = {"wall_s": round(wall, 1), "load_avg": round(os.getloadavg()[0], 1)}
        results[name] = perplexity(load_fake_quant_model(qdir), ids, args.seq_len, args.windows, 4)["ppl"]
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{name}: ppl {results[name]:.4f} (FP {results['fp']:.4f})", flush=True)
    for qdir in sorted(Path(args.peers).iterdir()) if args.peers else []:
        name = f"llmcompressor_{qdir.name}"
        if name not in results and (qdir / "config.json").is_file():
            results[name] = perplexity(load_fake_quant_model(qdir), ids, args.seq_len, args.windows, 4)["ppl"]
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{name}: ppl {results[name]:.4f} (FP {results['fp']:.4f})", flush=True)
    results["job"] = {"samples": args.samples, "seq_len": args.seq_len, "windows": args.windows,
                      "data": str(args.data)}
    results_path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
