"""The serving dtype of an output (``output.dtype``): the dtype the server runs the model in.

Scales are rounded to it before the solve uses them and stored in it, so the served scale is
the calibrated one; Ascend's ``deq_scale`` encoding follows it (int64 bits for float16, see
formats/ascend.py); the output's config.json names it as ``torch_dtype`` so that a server's
``--dtype auto`` picks it."""
from __future__ import annotations

import torch

BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BY_SAFETENSORS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def serving_dtype(setting: str, checkpoint_dtype: str) -> torch.dtype:
    """``setting``: ``output.dtype`` (auto: the checkpoint's weight dtype, a safetensors dtype
    string such as ``BF16``; anything else than 16-bit counts as float32)."""
    if setting == "auto":
        return BY_SAFETENSORS.get(checkpoint_dtype, torch.float32)
    return BY_NAME[setting]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def with_serving_dtype(config: dict, dtype: torch.dtype) -> dict:
    """config.json naming the serving dtype (``torch_dtype``, and ``dtype`` where transformers 5
    wrote that key), so that ``--dtype auto`` serves in it."""
    config = dict(config)
    config["torch_dtype"] = dtype_name(dtype)
    if "dtype" in config:
        config["dtype"] = dtype_name(dtype)
    return config
