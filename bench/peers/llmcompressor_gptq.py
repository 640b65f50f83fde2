"""Peer run: llm-compressor's GPTQ on exactly the job of bench/bench_gptq.py.

SmolLM2-135M-Instruct (the bf16 checkpoint made by dist_quant.demo_model), W4 symmetric
group 64, 128 x 512 calibration tokens taken from the start of WikiText-2 valid the same way
dist_quant does (one token stream cut into 128 rows), llm-compressor's own defaults otherwise
(sequential pipeline, static act order, dampening 0.01). Runs in its own virtual environment
(llm-compressor pins transformers <= 5.17 and compressed-tensors 0.19); see bench/README.md.

    VENV/bin/python bench/peers/llmcompressor_gptq.py MODEL_DIR DATA OUT_DIR [--samples N] [--seq-len L] [--dtype D]

``--dtype`` (default float32, as dist_quant computes): the dtype the model is loaded and
calibrated in. bench/run_all.py passes the same dtype to every tool.

Prints one JSON line: wall seconds of the quantization (load to saved), peak RSS.
Perplexity is measured afterwards with dist_quant.eval (same windows as bench_gptq.py).
"""
import json
import time

from datasets import Dataset
from _job import calibration_rows, parse, peak_rss_bytes  # bench/peers is on sys.path when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier


def main(a) -> None:
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = calibration_rows(tok, a.data, a.samples, a.seq_len).tolist()
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * a.seq_len] * a.samples})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=a.torch_dtype)
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}})
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=a.seq_len, num_calibration_samples=a.samples)
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    wall = time.time() - t0
    peak = peak_rss_bytes()
    print(json.dumps({"tool": "llmcompressor", "dtype": a.dtype, "wall_s": wall, "peak_rss_gb": peak / 2**30}))


if __name__ == "__main__":
    main(parse(__doc__))
