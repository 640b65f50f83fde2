"""KV-cache quantization and W4A8 on SmolLM2-135M-Instruct: held-out perplexity (WikiText-2 valid,
second half, windows of 512) with the served K/V cache applied.

Runs (calibration: the first half of the text, --samples x 512 tokens):

* ``w8a16``: RTN int8 weights, float KV cache (the reference: near-lossless weights, so the
  KV-cache rows measure the cache alone);
* ``w8a16+kv_fp8_tensor`` / ``w8a16+kv_fp8_head``: the same with ``quant.kv_cache=fp8``;
* ``w4a16_g64`` / ``w4a8_g64``: RTN int4 weights (group 64, MSE observer) without / with dynamic
  int8 activations; ``w4a8_g64_minmax``: RTN with min/max ranges (llm-compressor's
  ``QuantizationModifier`` rule), ``w4a8_g64_gptq``: the preset's GPTQ;
* ``--peers DIR``: every subfolder (llm-compressor outputs, bench/peers/llmcompressor_scheme.py
  ``--scheme W4A8 --group-size 64``) evaluated the same way, as ``llmcompressor_<name>``.

transformers runs the weights (and W4A8's activation quantization) but not the KV cache
(docs/kv_cache.md), so the stored k_scale / v_scale are applied here by an attention function
that fake-quantizes K and V as vLLM's fp8 cache does (dist_quant/kvcache.py ``fake_quant``).

    python bench/bench_kv_cache.py [--samples 32] [--windows 16] [--out bench/out_kv]
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
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

RUNS = {
    "w8a16": ["quant=rtn_w8a16"],
    "w8a16+kv_fp8_tensor": ["quant=rtn_w8a16", "quant.kv_cache=fp8"],
    "w8a16+kv_fp8_head": ["quant=rtn_w8a16", "quant.kv_cache=fp8", "quant.kv_cache_strategy=head"],
    "w4a16_g64": ["quant=rtn_w4a16", "quant.group_size=64", "quant.observer=mse"],
    "w4a8_g64": ["quant=w4a8", "quant.weight_solver=rtn", "quant.group_size=64"],
    "w4a8_g64_minmax": ["quant=w4a8", "quant.weight_solver=rtn", "quant.group_size=64", "quant.observer=minmax"],
    "w4a8_g64_gptq": ["quant=w4a8", "quant.group_size=64"],
}


def quantize(model: Path, out: Path, extra: list[str], args) -> float:
    cmd = [sys.executable, "-m", "dist_quant", f"model.path={model}", f"calib.path={args.data}",
           f"calib.num_samples={args.samples}", "calib.seq_len=512", f"output.dir={out}", "output.overwrite=true",
           f"runtime.run_dir={out}.run", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.time() - t0


def served_ppl(model_dir: Path, args) -> float:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_quant import kvcache
    from dist_quant.kv_layout import KV_LAYOUTS
    from dist_quant.eval import perplexity, read_text, split_text

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = split_text(read_text(args.data), 0.5, 1.0)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config", {})
    scheme = qc.get("kv_cache_scheme")
    if scheme is None:
        return perplexity(model, ids, 512, args.windows, 4)["ppl"]
    kv = kvcache.KVCacheArgs("fp8", scheme["strategy"] == "attn_head")
    scales = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            scales.update({k: fh.get_tensor(k) for k in fh.keys() if k.endswith(("k_scale", "v_scale"))})
    import contextlib

    with contextlib.ExitStack() as stack:
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}.self_attn."
            stack.enter_context(kvcache.applied(layer.self_attn, (scales[p + "k_scale"].flatten(),
                                                                  scales[p + "v_scale"].flatten()), kv,
                                                 KV_LAYOUTS["mha"]))
        return perplexity(model, ids, 512, args.windows, 4)["ppl"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out_kv")
    p.add_argument("--only", default="")
    p.add_argument("--peers", type=Path, default=None, help="a folder of peer outputs, one subfolder each")
    args = p.parse_args()
    from dist_quant.demo_model import ensure_demo_checkpoint

    model = ensure_demo_checkpoint()
    results = {"fp": {"ppl": served_ppl(model, args)}}
    print("fp", results["fp"], flush=True)
    for name, extra in RUNS.items():
        if args.only and name not in args.only.split(","):
            continue
        out = args.out / name.replace("+", "_")
        wall = quantize(model, out, extra, args)
        results[name] = {"ppl": served_ppl(out, args), "wall_s_under_load": round(wall, 1)}
        print(name, results[name], flush=True)
    for qdir in sorted(args.peers.iterdir()) if args.peers else []:
        if (qdir / "config.json").is_file():
            results[f"llmcompressor_{qdir.name}"] = {"ppl": served_ppl(qdir, args)}
            print(f"llmcompressor_{qdir.name}", results[f"llmcompressor_{qdir.name}"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
