"""DeepSeek-V3-shaped synthetic benchmark: the real layer structure at reduced widths (MLA with
q_lora, first layer dense, then MoE layers with 64 routed experts top-8 in 8 groups (top-4
groups), one shared expert, sigmoid router with correction bias, one MTP layer), weights stored
as the release stores them (FP8 e4m3 128×128 blocks + weight_scale_inv), GPTQ W4A16 g128 on 1
and 2 ranks (gloo, CPU).

Prints wall time, per-layer phase times (rank 0), peak RSS per rank, token rows and bytes moved
between ranks, and rank invariance (2 ranks vs 1, tensor by tensor); then a time model of the
full DeepSeek-V3 on 8 ranks from the measured per-phase throughputs scaled by FLOPs and bytes
(see ``time_model``). Results are also written as JSON.

    python bench/bench_deepseek.py [--layers 4] [--hidden 512] [--experts 64] [--samples 32] [--out bench/out/deepseek]
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
PHASES = ("load", "capture", "reduce", "solve", "broadcast", "propagate", "write")


def make_model(path: Path, a) -> Path:
    if (path / "config.json").is_file():
        return path
    from tiny_deepseek import make_tiny_deepseek

    return make_tiny_deepseek(path, layers=a.layers, experts=a.experts, top_k=a.top_k, q_lora_rank=a.hidden // 2,
                              first_dense=1, mtp=1, fp8_block=(128, 128), n_group=8, topk_group=4, std=0.05,
                              hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                              moe_intermediate_size=a.hidden // 2, num_attention_heads=8, num_key_value_heads=8,
                              kv_lora_rank=a.hidden // 4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


def quantize(model: Path, out: Path, ranks: int, a) -> dict:
    cmd = [sys.executable, "-m", "dist_quant"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29743",
        "-m", "dist_quant"]
    cmd += [f"model.path={model}", "quant=gptq_w4a16", "quant.group_size=128", f"calib.path={a.data}",
            f"calib.num_samples={a.samples}", f"calib.seq_len={a.seq_len}", f"calib.batch_size={a.batch_size}",
            f"output.dir={out}", "output.overwrite=true", f"runtime.run_dir={out}.run", f"runtime.threads={a.threads}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", OMP_NUM_THREADS=str(a.threads))
    t0 = time.time()
    if a.reuse and (out / "quant_report.json").is_file():  # the time model again, from the last runs
        proc = subprocess.CompletedProcess(cmd, 0)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"quantization failed: {' '.join(cmd)}")
    report = json.loads((out / "quant_report.json").read_text())
    phases = {}
    for layer in report["layers"]:
        sec = layer["seconds_by_rank"].get("0", next(iter(layer["seconds_by_rank"].values())))
        phases[layer["layer"]] = {k: round(v, 2) for k, v in sec.items() if v >= 0.005}
    moe = report["moe"]
    return {"wall_s": None if a.reuse else wall, "job_s": report["wall_seconds"], "phases_rank0_by_layer": phases,
            "peak_rss_gb": {r: v / 2**30 for r, v in report["peak_rss_bytes_by_rank"].items()},
            "tokens_moved_per_layer": moe["tokens_moved_per_layer"], "mb_moved_per_layer": moe["bytes_moved_per_layer"] / 1e6,
            "tokens_per_expert": [moe["min_tokens_per_expert"], moe["median_tokens_per_expert"],
                                  moe["max_tokens_per_expert"]]}


def identical(a: Path, b: Path) -> dict:
    import torch

    from moe_reference import read_tensors

    x, y = read_tensors(a), read_tensors(b)
    same = sum(1 for n in x if n in y and x[n].dtype == y[n].dtype and torch.equal(x[n], y[n]))
    return {"tensors": len(x), "bit_identical": same, "names_equal": set(x) == set(y)}


# -- the time model ------------------------------------------------------------------------------------
def layer_work(c: dict, tokens: int) -> dict:
    """FLOPs of one MoE layer (the ones that dominate) for ``tokens`` calibration tokens: the
    forward (propagate), the Hessians Σxxᵀ (capture), and the GPTQ solve cost Σ in²(in/3+out)
    (plan.LinearInfo.solve_cost), from the config alone."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    q, kv, nope, rope, v = c["q_lora_rank"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    mi, k, e = c["moe_intermediate_size"], c["num_experts_per_tok"], c["n_routed_experts"]
    mla = [(q, h), (heads * (nope + rope), q), (kv + rope, h), (heads * (nope + v), kv), (h, heads * v)]
    shared = [(mi, h), (mi, h), (h, mi)]
    expert = [(mi, h), (mi, h), (h, mi)]
    fwd = 2 * tokens * (sum(o * i for o, i in mla + shared) + k * sum(o * i for o, i in expert) + e * h)
    hess_in = [h, q, kv, heads * v, h, mi]  # one Hessian per stage input (attn_in, q_b, kv_b, o, moe_in, shared_out)
    capture = 2 * tokens * sum(n * n for n in hess_in) + 2 * tokens * k * (h * h + mi * mi)  # + routed tokens
    solve = sum(i * i * (i / 3 + o) for o, i in [(q + kv + rope, h)] + mla[1:] + [(2 * mi, h), (h, mi)])
    solve += e * (h * h * (h / 3 + 2 * mi) + mi * mi * (mi / 3 + h))
    return {"forward": fwd, "capture": capture, "solve": solve}


def time_model(measured: dict, synth: dict, full: dict, synth_tokens: int, full_tokens: int, ranks: int,
               device_rate: dict) -> dict:
    """Per MoE layer and for the model: the work of each phase (``layer_work``) on the synthetic
    model against its measured seconds (rank 0, 1 rank, median over its MoE layers) gives this
    CPU's achieved rate; the full model's work per rank divided by an *assumed* achieved device
    rate per phase gives its time. The device rates are assumptions (command-line flags),
    not measurements."""
    ws, wf = layer_work(synth, synth_tokens), layer_work(full, full_tokens)
    phase_of = {"forward": "propagate", "capture": "capture", "solve": "solve"}
    out = {"cpu_rate": {}, "full_work_per_rank": {}, "seconds_per_moe_layer": {}}
    for kind, phase in phase_of.items():
        out["cpu_rate"][kind] = ws[kind] / measured[phase] if measured[phase] > 0 else None
        out["full_work_per_rank"][kind] = wf[kind] / ranks
        out["seconds_per_moe_layer"][kind] = wf[kind] / ranks / device_rate[kind]
    layers = full["num_hidden_layers"] - full["first_k_dense_replace"]
    out["per_moe_layer_s"] = sum(out["seconds_per_moe_layer"].values())
    out["model_s"] = out["per_moe_layer_s"] * layers
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "deepseek"))
    p.add_argument("--reuse", action="store_true", help="read the reports of the last runs instead of running")
    # achieved device rates per phase, FLOP/s (assumptions for an H100, stated in the output): bf16
    # GEMMs of the forward, float32 GEMMs of the Hessians (no TF32), GPTQ's column loop
    p.add_argument("--rate-forward", type=float, default=300e12)
    p.add_argument("--rate-capture", type=float, default=40e12)
    p.add_argument("--rate-solve", type=float, default=5e12)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(out / f"synthetic-dsv3-l{a.layers}-h{a.hidden}-e{a.experts}-fp8", a)
    res: dict = {"model": str(model), "args": vars(a), "load_average_at_start": os.getloadavg()}
    print(f"model {model.name}: {sum(f.stat().st_size for f in model.glob('*.safetensors')) / 1e6:.0f} MB (FP8); "
          f"load average {res['load_average_at_start']}", flush=True)
    for ranks in (1, 2):
        res[f"w{ranks}"] = quantize(model, out / f"q-w{ranks}", ranks, a)
        print(f"{ranks} rank(s): {json.dumps(res[f'w{ranks}'])}", flush=True)
    res["invariance_2v1"] = identical(out / "q-w1", out / "q-w2")
    res["load_average_at_end"] = os.getloadavg()
    print(f"rank invariance: {res['invariance_2v1']}; load average {res['load_average_at_end']}")

    synth = json.loads((model / "config.json").read_text())
    full = json.loads((ROOT / "bench" / "configs" / "deepseek_v3.json").read_text())
    moe_layers = [ph for i, ph in res["w1"]["phases_rank0_by_layer"].items() if int(i) >= 1]
    med = {k: sorted(ph.get(k, 0.0) for ph in moe_layers)[len(moe_layers) // 2] for k in PHASES}
    rate = {"forward": a.rate_forward, "capture": a.rate_capture, "solve": a.rate_solve}
    tm = time_model(med, synth, full, a.samples * a.seq_len, 512 * 4096, 8, rate)
    res["time_model"] = {"assumed_device_rate": rate, "measured_moe_layer_phases_s": med, **tm}
    sec = tm["seconds_per_moe_layer"]
    print("\nmeasured on this CPU (MoE layer, rank 0, 1 rank): " + ", ".join(
        f"{k} {v / 1e9:.2f} GFLOP/s" for k, v in tm["cpu_rate"].items() if v))
    print(f"time model, DeepSeek-V3 on 8 ranks, 512 x 4096 tokens, assumed achieved device rates "
          f"{ {k: f'{v / 1e12:g} TFLOP/s' for k, v in rate.items()} }: forward {sec['forward']:.0f} s, capture "
          f"{sec['capture']:.0f} s, solve {sec['solve']:.0f} s per MoE layer; {tm['model_s'] / 3600:.2f} h for the "
          f"58 MoE layers, plus reading ~104 GB per rank (bench/fullsize.py) (MoE-Quant, published: ~2 h on 8xH100)")
    (out / "bench_deepseek.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
