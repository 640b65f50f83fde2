"""Peer run: msModelSlim's Flex smooth (anti-outlier method m6) + W8A8 (static per-tensor
int8 activations, min/max; per-channel symmetric int8 weights) on SmolLM2-135M-Instruct,
with SAMPLES x 512 calibration rows cut the way dist_quant cuts them. Runs on CPU in a
virtual environment with msmodelslim installed (see bench/README.md, "Smoothing / W8A8").

    VENV/bin/python bench/peers/msmodelslim_flex.py MODEL_DIR DATA WORK_DIR [--samples N] [--seq-len L] [--windows W] [--dtype D]

msModelSlim's anti-outlier stage saves its activation statistics (``features.npy``) into the
current directory; the script runs inside WORK_DIR (created if needed; the calibrated model
itself is not saved) so nothing lands in the caller's directory or the repository.

Prints one JSON line: wall seconds (model load to the calibrated model; saving is left
out), peak RSS, and the perplexity of msModelSlim's own fake-quantized model on the 40
held-out windows of bench/bench_smooth.py (dist_quant.eval.perplexity, repository on
PYTHONPATH).
"""
import json
import os
import time

import torch
from _job import calibration_rows, parse, peak_rss_bytes  # bench/peers is on sys.path when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

from msmodelslim.pytorch.llm_ptq.anti_outlier import AntiOutlier, AntiOutlierConfig
from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig


def main(a) -> None:
    a.model, a.data = os.path.abspath(a.model), os.path.abspath(a.data)
    os.makedirs(a.out, exist_ok=True)
    os.chdir(a.out)  # its features.npy goes here
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = calibration_rows(tok, a.data, a.samples, a.seq_len)
    calib = [[r[None]] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=a.torch_dtype)
    AntiOutlier(model, calib_data=calib, cfg=AntiOutlierConfig(anti_method="m6", dev_type="cpu")).process()
    cfg = QuantConfig(w_bit=8, a_bit=8, act_method=1, mm_tensor=False, dev_type="cpu", pr=1.0, w_sym=True,
                      disable_names=[])
    Calibrator(model, cfg, calib_data=calib, disable_level="L0").run()
    wall = time.time() - t0
    peak = peak_rss_bytes()

    from dist_quant.eval import perplexity
    from dist_quant.textdata import read_text, split_text

    held = tok(split_text(read_text(a.data), 0.5, 1.0), add_special_tokens=False)["input_ids"]
    ppl = perplexity(model.float(), torch.tensor(held), a.seq_len, a.windows, 4)["ppl"]
    print(json.dumps({"tool": "msmodelslim", "dtype": a.dtype, "samples": a.samples, "wall_s": wall,
                      "peak_rss_gb": peak / 2**30, "ppl": ppl}))


if __name__ == "__main__":
    main(parse(__doc__))
