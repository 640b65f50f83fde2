"""Start-up cost: process start to the first layer, step by step, in a fresh process.

Runs the steps ``python -m dist_quant`` takes before its layer loop starts, for one rank on
the SmolLM2-135M job of bench_gptq.py (the demo checkpoint, 32 x 512 calibration tokens of
WikiText-2 valid), each timed (wall and CPU seconds of the process):

interpreter, ``import torch``, ``import dist_quant.run`` (the job's modules), Hydra compose,
checkpoint headers + plan, tokenizer, calibration tokenization, model skeleton, embedding of
the calibration batches. A fresh interpreter per repeat: imports are what they are on a cold
start of the job (the OS file cache stays warm).

    python bench/bench_startup.py [--samples 32] [--seq-len 512] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

CHILD = r'''
import json, os, sys, time
T0 = float(sys.argv[1])
steps = []
def mark(name):
    steps.append((name, time.time() - T0, time.process_time()))
mark("interpreter")
import torch
mark("import torch")
import dist_quant.run as run
from dist_quant.settings import load_config
mark("import dist_quant.run")
model, data, samples, seq = sys.argv[2:6]
cfg = load_config([f"model.path={model}", "quant=gptq_w4a16", "quant.group_size=64", f"calib.path={data}",
                   f"calib.num_samples={samples}", f"calib.seq_len={seq}", "output.dir=/tmp/unused"])
mark("hydra compose")
ckpt, plan, owners, args = run.prepare(cfg, model, 1)
mark("checkpoint headers, plan")
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(ckpt.root), trust_remote_code=False)
mark("tokenizer")
from dist_quant.calibration import load_calibration
calib = load_calibration(cfg.calib, tok)
mark("calibration tokenization")
from dist_quant.layer_forward import build_skeleton
skel = build_skeleton(str(ckpt.root), torch.bfloat16, torch.device("cpu"))
mark("model skeleton")
import torch.nn.functional as F
embed = ckpt.get(plan.arch.embed)
xs = [F.embedding(ids, embed) for ids, _ in calib.batches(cfg.calib.batch_size)]
mark("embed batches")
print(json.dumps({"steps": steps, "modules": len(sys.modules),
                  "heavy": sorted(m for m in ("matplotlib", "scipy", "sklearn", "pandas", "accelerate",
                                              "compressed_tensors", "datasets", "PIL") if m in sys.modules)}))
'''


def one(model: Path, args) -> dict:
    import time

    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, repr(t0), str(model), args.data, str(args.samples),
                          str(args.seq_len)], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--data", default=str(DATA))
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from dist_quant.demo_model import ensure_demo_checkpoint

    model = ensure_demo_checkpoint()
    runs = [one(model, a) for _ in range(a.repeat)]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus; "
          f"best of {a.repeat} fresh processes; modules loaded: {runs[0]['modules']}; "
          f"heavy packages imported: {', '.join(runs[0]['heavy']) or 'none'}")
    print("| step | wall s | CPU s | cumulative wall s |")
    print("|---|---|---|---|")
    names = [s[0] for s in runs[0]["steps"]]
    for k, name in enumerate(names):
        walls = [r["steps"][k][1] - (r["steps"][k - 1][1] if k else 0.0) for r in runs]
        cpus = [r["steps"][k][2] - (r["steps"][k - 1][2] if k else 0.0) for r in runs]
        cum = min(r["steps"][k][1] for r in runs)
        print(f"| {name} | {min(walls):.2f} | {min(cpus):.2f} | {cum:.2f} |")
    print(f"| **total to first layer** | | {min(r['steps'][-1][2] for r in runs):.2f} | "
          f"{min(r['steps'][-1][1] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
