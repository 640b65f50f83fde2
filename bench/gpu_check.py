"""The GPU measurements of issues 11 and 17, as one prepared script for a lent accelerator.

Two jobs, each printing a JSON summary (and writing it under ``--out``):

``layers``: a Llama-3-8B-shaped synthetic checkpoint (hidden 4,096, intermediate 14,336, 32
heads, 8 KV heads; random bf16 weights written where it runs, ``bench/bench_large.py``'s
writer) quantized with GPTQ W4A16 on one device: the per-layer seconds by phase, the peak
device memory (``torch.cuda.max_memory_allocated``, from ``quant_report.json``), peak RSS,
wall time. Phase times are synchronized with the device at each phase boundary
(``pipeline._Phase``), so a phase's kernels are billed to it.

``smollm2``: the SmolLM2-135M GPTQ W4 g64 job (calibration rows from ``--data``) on each of
``--devices`` (default ``cuda,cpu``: the same job on the GPU and on the host's CPU), then the
held-out perplexity of every output (``dist_quant.eval``: 40 windows of 512 from the second
half, CPU float32) and the GPU run's difference from the CPU run's.

    python bench/gpu_check.py layers  [--layers 4] [--samples 128] [--seq-len 2048] [--device auto] [-- overrides]
    python bench/gpu_check.py smollm2 --model DIR | --gguf FILE  --data valid.txt [--samples 32] [--devices cuda,cpu]

On CPU with small shapes (``--hidden 64 --inter 128 --heads 4 --kv-heads 2``) both run in
seconds: that is how tests/test_gpu_check.py checks the plumbing. How to carry it to the
lent machine (wheels, the model in two parts): bench/README.md, "GPU checks".
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_large import LLAMA_8B, Shape, split_overrides  # noqa: E402


def _job(model: Path, out: Path, data: Path, device: str, samples: int, seq_len: int, group: int,
         dtype: str, extra: list[str]) -> dict:
    """Run one ``python -m dist_quant`` job; its report's numbers (or the failure)."""
    cmd = [sys.executable, "-m", "dist_quant", f"model.path={model}", f"model.dtype={dtype}", "quant=gptq_w4a16",
           f"quant.group_size={group}", f"calib.path={data}", f"calib.num_samples={samples}",
           f"calib.seq_len={seq_len}", f"runtime.device={device}", f"output.dir={out}", "output.overwrite=true",
           f"runtime.run_dir={out}.run",
           *extra]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    row = {"device": device, "rc": res.returncode, "process_s": round(wall, 2), "command": cmd[2:]}
    if res.returncode != 0:
        row["stderr_tail"] = res.stderr[-3000:]
        return row
    rep = json.loads((out / "quant_report.json").read_text())
    row["wall_s"] = rep["wall_seconds"]
    row["seconds_by_phase"] = {k: round(v, 3) for k, v in rep["summary"]["seconds_by_phase"].items()}
    row["per_layer"] = [{"layer": e["layer"], **{k: round(v, 3) for k, v in e["seconds"].items()}}
                        for e in rep["layers"]]
    row["peak_rss_gb"] = max(rep["peak_rss_bytes_by_rank"].values()) / 2**30
    peaks = rep.get("peak_device_bytes_by_rank")
    row["peak_device_gb"] = max(peaks.values()) / 2**30 if peaks else None
    row["error_mean"] = rep["summary"]["error_mean"]
    return row


def _device_facts() -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                       time.gmtime())}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def layers(args, extra: list[str]) -> dict:
    from bench_large import write

    shape = Shape(args.hidden, args.inter, args.heads, args.kv_heads)
    ckpt = args.out / "layers-checkpoint"
    if not (ckpt / "config.json").is_file():
        print(json.dumps({"write": write(ckpt, args.layers, shape)}), flush=True)
    row = _job(ckpt, args.out / "layers-output", args.data, args.device, args.samples, args.seq_len, args.group,
               "bfloat16", extra)
    return {"job": "layers", "shape": vars(shape), "layers": args.layers, "samples": args.samples,
            "seq_len": args.seq_len, **_device_facts(), "run": row}


def smollm2(args, extra: list[str]) -> dict:
    from dist_quant.eval import evaluate

    model = args.model
    if model is None:
        from dist_quant.demo_model import _convert_into

        model = args.out / "smollm2"
        if not (model / "config.json").is_file():
            model.mkdir(parents=True, exist_ok=True)
            _convert_into(args.gguf, model)
    rows = []
    for device in args.devices.split(","):
        out = args.out / f"smollm2-{device}"
        row = _job(model, out, args.data, device, args.samples, args.seq_len, args.group, "float32", extra)
        if row["rc"] == 0:
            ev = evaluate(out, args.data, seq_len=args.eval_seq_len, max_windows=args.windows)
            row["ppl"] = ev["ppl"]
        rows.append(row)
    result = {"job": "smollm2", "samples": args.samples, "seq_len": args.seq_len, **_device_facts(), "runs": rows}
    ppl = {r["device"]: r.get("ppl") for r in rows}
    if ppl.get("cuda") and ppl.get("cpu"):
        result["ppl_cuda_vs_cpu"] = ppl["cuda"] / ppl["cpu"] - 1
    return result


def main() -> int:
    argv, extra = split_overrides(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["layers", "smollm2"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
    ap.add_argument("--group", type=int, default=None, help="group size (layers: 128, smollm2: 64)")
    ap.add_argument("--samples", type=int, default=None, help="calibration rows (layers: 128, smollm2: 32)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens a row (layers: 2048, smollm2: 512)")
    # layers
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=LLAMA_8B.hidden)
    ap.add_argument("--inter", type=int, default=LLAMA_8B.inter)
    ap.add_argument("--heads", type=int, default=LLAMA_8B.heads)
    ap.add_argument("--kv-heads", type=int, default=LLAMA_8B.kv_heads)
    ap.add_argument("--device", default="auto")
    # smollm2
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    args = ap.parse_args(argv)
    big = args.what == "layers"
    args.group = args.group or (128 if big else 64)
    args.samples = args.samples or (128 if big else 32)
    args.seq_len = args.seq_len or (2048 if big else 512)
    if not args.data.is_file():
        ap.error(f"--data {args.data}: no such file")
    if args.what == "smollm2" and (args.model is None) == (args.gguf is None):
        ap.error("smollm2 needs exactly one of --model DIR or --gguf FILE")
    args.out.mkdir(parents=True, exist_ok=True)
    result = (layers if big else smollm2)(args, extra)
    text = json.dumps(result, indent=1)
    (args.out / f"{args.what}.json").write_text(text + "\n")
    print(text)
    runs = result["runs"] if "runs" in result else [result["run"]]
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
