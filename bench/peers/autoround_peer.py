"""Peer run: Intel AutoRound (SignRound) on exactly the job of bench/bench_gptq.py.

SmolLM2-135M-Instruct (the bf16 checkpoint made by dist_quant.demo_model), W4 symmetric
group 64, 128 x 512 calibration tokens taken from the start of WikiText-2 valid the same way
dist_quant does (one token stream cut into 128 rows, bench/peers/_job.py), AutoRound's own
defaults otherwise (lr = 1/iters, minmax_lr = lr, batch size 8, best-loss parameters kept)
except ``--iters`` and ``amp=False`` (float32 compute, the dtype dist_quant computes in; on
this CPU AutoRound would otherwise pick bf16 autocast). Runs in its own virtual environment:

    python -m venv /work/venvs/autoround
    /work/venvs/autoround/bin/pip install torch==2.13.0 auto-round==0.16.1 -c constraints.txt
    VENV/bin/python bench/peers/autoround_peer.py MODEL_DIR DATA OUT_DIR [--iters N] [--samples N] [--seq-len L]

The tuned model is saved as a float checkpoint holding its fake-quantized weights (AutoRound
replaces each weight by its quantize-dequantize result when a block is done), so
``dist_quant.eval`` measures exactly the model AutoRound tuned. Prints one JSON line: wall
seconds of the quantization (load to saved), peak RSS, and a check that every weight group
holds at most 16 distinct values.
"""
import json
import sys
import time

import torch
from _job import calibration_rows, parse, peak_rss_bytes  # bench/peers is on sys.path when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

from auto_round import AutoRound


def _max_levels(model, group: int = 64) -> int:
    """Largest number of distinct values in one group of one decoder-layer linear weight."""
    worst = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.detach().float().reshape(-1, group)[:64]
            worst = max(worst, max(len(torch.unique(r)) for r in w))
    return worst


def main(a, iters: int) -> None:
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = calibration_rows(tok, a.data, a.samples, a.seq_len)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=a.torch_dtype)
    ar = AutoRound(model, tok, bits=4, group_size=64, sym=True, iters=iters, nsamples=a.samples,
                   seqlen=a.seq_len, batch_size=8, dataset=[r[None] for r in rows], amp=False,
                   device_map="cpu", enable_torch_compile=False)
    model, _ = ar.quantize()
    levels = _max_levels(model)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    wall = time.time() - t0
    peak = peak_rss_bytes()
    print(json.dumps({"tool": "auto-round", "iters": iters, "dtype": a.dtype, "wall_s": wall,
                      "peak_rss_gb": peak / 2**30, "max_levels_per_group": levels}))


def _pop_iters(argv: list[str], default: int = 200) -> int:
    """``--iters N`` (AutoRound's iterations; the shared job parser does not know it)."""
    if "--iters" not in argv:
        return default
    k = argv.index("--iters")
    value = int(argv[k + 1])
    del argv[k:k + 2]
    return value


if __name__ == "__main__":
    _iters = _pop_iters(sys.argv)
    main(parse(__doc__), _iters)
