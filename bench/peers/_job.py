"""The job every peer script runs, defined once: the calibration rows dist_quant takes
(the token stream from the start of the file, cut into SAMPLES rows of SEQ tokens), and the
command line the driver (bench/run_all.py) passes to every peer."""
import argparse

import torch

from dist_quant.memory import peak_rss_bytes  # noqa: F401  (VmHWM: see its doc; bench/run_all.py puts the checkout on PYTHONPATH)

SAMPLES, SEQ, WINDOWS = 128, 512, 40  # defaults: rows, tokens per row, held-out windows


def calibration_rows(tok, data: str, samples: int = SAMPLES, seq: int = SEQ) -> torch.Tensor:
    text = open(data, encoding="utf-8", errors="replace").read()
    ids = tok(text[: samples * seq * 6], add_special_tokens=False)["input_ids"][: samples * seq]
    if len(ids) != samples * seq:
        raise SystemExit(f"{data} has {len(ids)} tokens, fewer than {samples} x {seq}")
    return torch.tensor(ids).view(samples, seq)


def parse(doc: str, last: str = "out") -> argparse.Namespace:
    """``MODEL_DIR DATA OUT [--samples N] [--seq-len L] [--windows W] [--dtype float32|bfloat16]``:
    ``--dtype`` is the dtype the model is loaded and calibrated in (the driver passes the
    same one to dist_quant as ``model.dtype``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument(last)
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--seq-len", type=int, default=SEQ)
    p.add_argument("--windows", type=int, default=WINDOWS)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = p.parse_args()
    a.torch_dtype = getattr(torch, a.dtype)
    return a
