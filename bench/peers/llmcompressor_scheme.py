"""Peer run: llm-compressor's preset schemes (FP8_DYNAMIC, NVFP4A16, NVFP4, ...) with its
round-to-nearest ``QuantizationModifier`` on the job of bench/bench_float_formats.py: the
same SmolLM2 checkpoint, the same calibration rows (bench/peers/_job.py; NVFP4's activation
global scales are calibrated on them), ``lm_head`` left in float as dist_quant does.

    VENV/bin/python bench/peers/llmcompressor_scheme.py MODEL_DIR DATA OUT_DIR --scheme FP8_DYNAMIC [--samples 32]
    VENV/bin/python bench/peers/llmcompressor_scheme.py MODEL_DIR DATA OUT_DIR --scheme W4A8 --group-size 64

Prints one JSON line: the scheme, wall seconds (load to saved), peak RSS. The output is
compressed-tensors as llm-compressor writes it; bench/bench_float_formats.py --peers reads it
with dist_quant.fakequant (the same reader, checked against transformers' loader in
tests/test_float_formats.py) for its perplexity.
"""
import json
import sys
import time

from datasets import Dataset
from _job import calibration_rows, parse, peak_rss_bytes  # bench/peers is on sys.path when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier


def main(a, scheme: str, group_size: int | None = None) -> None:
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = calibration_rows(tok, a.data, a.samples, a.seq_len).tolist()
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * a.seq_len] * a.samples})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=a.torch_dtype)
    if group_size is None:
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    else:  # the preset with another weight group size (W4A8's 128 does not divide SmolLM2's 576)
        from compressed_tensors.quantization import preset_name_to_scheme

        preset = preset_name_to_scheme(scheme, ["Linear"])
        preset.weights = preset.weights.model_copy(update={"group_size": group_size})
        recipe = QuantizationModifier(config_groups={"group_0": preset}, ignore=["lm_head"])
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=a.seq_len, num_calibration_samples=a.samples)
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    print(json.dumps({"tool": "llmcompressor", "scheme": scheme, "group_size": group_size, "dtype": a.dtype, "wall_s": time.time() - t0,
                      "peak_rss_gb": peak_rss_bytes() / 2**30}))


if __name__ == "__main__":
    if "--scheme" not in sys.argv:
        raise SystemExit("--scheme is required (e.g. FP8_DYNAMIC, NVFP4A16, NVFP4)")
    i = sys.argv.index("--scheme")
    scheme = sys.argv[i + 1]
    del sys.argv[i:i + 2]
    group = None
    if "--group-size" in sys.argv:
        j = sys.argv.index("--group-size")
        group = int(sys.argv[j + 1])
        del sys.argv[j:j + 2]
    main(parse(__doc__), scheme, group)
