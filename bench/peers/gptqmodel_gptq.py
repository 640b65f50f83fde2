"""Peer run: GPTQModel's GPTQ on exactly the job of bench/bench_gptq.py.

SmolLM2-135M-Instruct (the bf16 checkpoint made by dist_quant.demo_model), W4 symmetric
group 64, 128 x 512 calibration tokens from the start of WikiText-2 valid cut the way
dist_quant cuts them, GPTQModel's defaults otherwise (group-aware reordering, its default
damping). Runs in its own virtual environment (see bench/README.md). GPTQModel writes
its own GPTQ format, so the perplexity of its output is measured here, after the timed
part, through GPTQModel's loader with dist_quant.eval.perplexity on the held-out windows
of bench_gptq.py (the repository on PYTHONPATH).

    VENV/bin/python bench/peers/gptqmodel_gptq.py MODEL_DIR DATA OUT_DIR [--samples N] [--seq-len L] [--windows W] [--dtype D]

``--dtype`` (default float32): the dtype the model is loaded and calibrated in.

Runs inside OUT_DIR.work (GPTQModel's logs/ land there, not in the caller's directory).

Prints one JSON line: wall seconds of the quantization (load to saved), peak RSS, perplexity.
"""
import json
import os
import time

import torch
from _job import calibration_rows, parse, peak_rss_bytes  # bench/peers is on sys.path when run as a script
from transformers import AutoTokenizer

from gptqmodel import GPTQModel, QuantizeConfig


def main(a) -> None:
    a.model, a.data, a.out = os.path.abspath(a.model), os.path.abspath(a.data), os.path.abspath(a.out)
    os.makedirs(a.out + ".work", exist_ok=True)
    os.chdir(a.out + ".work")  # GPTQModel writes its run logs (logs/) into the current directory
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = calibration_rows(tok, a.data, a.samples, a.seq_len)
    calib = [{"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in rows]
    qc = QuantizeConfig(bits=4, group_size=64, sym=True)
    model = GPTQModel.load(a.model, qc, device="cpu", dtype=a.torch_dtype)
    model.quantize(calib, batch_size=8)
    model.save(a.out)
    wall = time.time() - t0
    peak = peak_rss_bytes()
    del model

    from dist_quant.eval import perplexity
    from dist_quant.textdata import read_text, split_text

    held = tok(split_text(read_text(a.data), 0.5, 1.0), add_special_tokens=False)["input_ids"]
    qmodel = GPTQModel.load(a.out, device="cpu")
    ppl = perplexity(qmodel.model, torch.tensor(held), a.seq_len, a.windows, 4)["ppl"]
    print(json.dumps({"tool": "gptqmodel", "dtype": a.dtype, "damp_percent": qc.damp_percent,
                      "act_group_aware": qc.act_group_aware, "wall_s": wall, "peak_rss_gb": peak / 2**30,
                      "ppl": ppl}))


if __name__ == "__main__":
    main(parse(__doc__))
