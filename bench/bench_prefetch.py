"""Time saved by ``runtime.prefetch`` (the next layer's tensors read in the background) on a
cold page cache.

Writes a synthetic bf16 Llama checkpoint (random weights; default 8 layers of hidden 1536 /
intermediate 4096, 50 MB a layer). Every run starts with the checkpoint's pages evicted from
the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)`` on its files, checked with ``fincore``
when that tool is installed; no root needed). Prefetch off and on alternate.

* ``--mode loop`` (default): the layer loop's reads alone, in this process: per layer, every
  tensor of the layer through ``Checkpoint.get`` (timed: the wait for the disk), the next
  layer's ``Checkpoint.prefetch`` as the pipeline calls it, then ``--compute`` seconds of
  sleep standing in for the layer's computation on an accelerator (the CPU idle meanwhile).
  Independent of the CPU load of a shared machine.
* ``--mode job``: the real job (``python -m dist_quant``, one rank, RTN W4A16), summing the
  ``load`` phase of its report; on a loaded CPU the conversion work in ``load`` and the noise
  of the other phases hide the disk time.

Prints the reads' wait and the load average.

    python bench/bench_prefetch.py [--mode loop|job] [--compute 1.0] [--layers 8] [--hidden 1536]
        [--intermediate 4096] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_model(directory: Path, layers: int, hidden: int, intermediate: int) -> Path:
    if (directory / "config.json").is_file():
        return directory
    import torch
    from tiny import make_tiny_model

    return make_tiny_model(directory, "llama", layers=layers, hidden=hidden, intermediate=intermediate,
                           heads=hidden // 128, kv_heads=max(1, hidden // 512), dtype=torch.bfloat16)


def evict(model: Path) -> str:
    """Drop the checkpoint's clean pages from the page cache; return fincore's residency."""
    files = sorted(model.glob("*.safetensors"))
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if shutil.which("fincore"):
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, files)], capture_output=True,
                             text=True).stdout.split()
        return f"{sum(int(x) for x in out) / 1e6:.1f} MB resident after eviction"
    return "residency not checked (no fincore)"


def run(model: Path, work: Path, prefetch: bool, args) -> dict:
    out = work / f"q-{'on' if prefetch else 'off'}"
    cmd = [sys.executable, "-m", "dist_quant", f"model.path={model}", f"quant={args.quant}",
           "quant.group_size=128", f"calib.num_samples={args.samples}", f"calib.seq_len={args.seq_len}",
           f"output.dir={out}", "output.overwrite=true", f"runtime.run_dir={out}.run",
           f"runtime.prefetch={str(prefetch).lower()}", "model.dtype=bfloat16"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    residency = evict(model)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    report = json.loads((out / "quant_report.json").read_text())
    load = report["summary"]["seconds_by_phase"].get("load", 0.0)
    return {"prefetch": prefetch, "wall": wall, "load": load, "residency": residency,
            "loadavg": os.getloadavg()[0]}


def run_loop(model: Path, prefetch: bool, compute: float) -> dict:
    from dist_quant.checkpoint import Checkpoint

    residency = evict(model)
    ckpt = Checkpoint(model)
    layers = ckpt.config["num_hidden_layers"]
    names = [[n for n in ckpt.tensors if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    waits = []
    t0 = time.perf_counter()
    for i in range(layers):
        t = time.perf_counter()
        tensors = [ckpt.get(n) for n in names[i]]
        waits.append(time.perf_counter() - t)
        if prefetch and i + 1 < layers:
            ckpt.prefetch(names[i + 1])
        time.sleep(compute)
        del tensors
        ckpt.release()
    wall = time.perf_counter() - t0
    ckpt.close()
    return {"prefetch": prefetch, "wall": wall, "load": sum(waits), "first": waits[0],
            "rest": sum(waits[1:]), "residency": residency, "loadavg": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=("loop", "job"), default="loop")
    p.add_argument("--compute", type=float, default=1.0, help="loop mode: seconds of 'compute' per layer")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--quant", default="rtn_w4a16")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "prefetch"))
    args = p.parse_args()
    work = Path(args.work)
    model = make_model(work / f"llama{args.layers}x{args.hidden}", args.layers, args.hidden, args.intermediate)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    what = (f"loop mode, {args.compute} s of compute per layer" if args.mode == "loop" else
            f"job mode, quant={args.quant}, {args.samples} x {args.seq_len} tokens")
    print(f"checkpoint {model}: {size / 1e6:.0f} MB, {args.layers} layers; {what}; load average before: "
          f"{os.getloadavg()}", flush=True)
    rows = []
    for _ in range(args.repeats):
        for prefetch in (False, True):
            rows.append(run_loop(model, prefetch, args.compute) if args.mode == "loop"
                        else run(model, work, prefetch, args))
            r = rows[-1]
            detail = (f" (layer 0 {r['first']:.2f} s, layers 1.. {r['rest']:.2f} s)" if "first" in r else "")
            print(f"prefetch={str(prefetch).lower():5s} wall {r['wall']:6.1f} s, waiting for reads "
                  f"{r['load']:6.2f} s{detail} ({r['residency']}; load average {r['loadavg']:.1f})", flush=True)
    print("\n| prefetch | wall s (median) | waiting for reads s (median) | load average |")
    print("|---|---|---|---|")
    for prefetch in (False, True):
        sel = [r for r in rows if r["prefetch"] == prefetch]
        loads = ", ".join(f"{r['loadavg']:.1f}" for r in sel)
        print(f"| {str(prefetch).lower()} | {statistics.median(r['wall'] for r in sel):.1f} | "
              f"{statistics.median(r['load'] for r in sel):.2f} | {loads} |")


if __name__ == "__main__":
    main()
