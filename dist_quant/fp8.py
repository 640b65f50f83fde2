"""FP8 block-quantized release checkpoints (DeepSeek-V3 / R1 / V3.1, Kimi-K2-Instruct),
read as float: pure functions for the source config check and the per-tensor dequantization.

Such a checkpoint stores a linear's ``weight`` as float8_e4m3fn and beside it a float32
``weight_scale_inv`` of shape ``[ceil(out/bo), ceil(in/bi)]`` with ``[bo, bi] =
quantization_config.weight_block_size`` (``[128, 128]``); the float weight is
``w[i, j] = fp8[i, j] · scale_inv[i // bo, j // bi]`` (DeepSeek's ``inference/fp8_cast_bf16.py``
and transformers' ``FP8Linear`` apply this rule; the edge blocks are partial).

Other quantized sources (compressed-tensors INT4 as in Kimi-K2-Thinking, GPTQ, AWQ, ...) are
refused: dist_quant quantizes float weights, and re-quantizing integer weights would stack
two rounding errors without the user knowing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_SUFFIX = "_scale_inv"  # weight → weight_scale_inv
FP8_DTYPES = ("F8_E4M3",)


@dataclass(frozen=True)
class Fp8Source:
    """The block size of an FP8 release (``quantization_config.weight_block_size``)."""

    block: tuple[int, int] = (128, 128)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        out, inp = shape
        return math.ceil(out / self.block[0]), math.ceil(inp / self.block[1])


class SourceQuantError(ValueError):
    """The checkpoint's ``quantization_config`` is not one dist_quant reads."""


def source_quantization(config: dict, where: str) -> Fp8Source | None:
    """The FP8 block format of a checkpoint config, None for a float checkpoint; refuses
    every other ``quantization_config`` (extra keys of an fp8 config are accepted: V3.1 adds
    a scale-format key)."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise SourceQuantError(f"config.json in {where} has quantization_config={qc!r}, not an object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise SourceQuantError(
            f"config.json in {where} has quantization_config.quant_method={method!r}: the checkpoint is "
            "already quantized and dist_quant reads float checkpoints or FP8 block releases (quant_method "
            "'fp8', dequantized on read) only; start from the BF16 or FP8 release of the model")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise SourceQuantError(f"config.json in {where} has quantization_config.fmt={fmt!r}; only 'e4m3' "
                               "FP8 weights are read")
    block = qc.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise SourceQuantError(f"config.json in {where} has quantization_config.weight_block_size={block!r}; "
                               "FP8 sources are read with a block size of two positive integers, e.g. [128, 128]")
    return Fp8Source((block[0], block[1]))


def check_scale(name: str, shape: tuple[int, ...], scale_shape: tuple[int, ...] | None,
                scale_dtype: str | None, src: Fp8Source) -> None:
    """One-line errors for a float8 ``name`` whose ``weight_scale_inv`` is missing or mis-shaped."""
    scale = scale_name(name)
    if len(shape) != 2:
        raise SourceQuantError(f"FP8 tensor {name!r} has shape {list(shape)}; block-scaled FP8 weights are 2-D")
    if scale_shape is None:
        raise SourceQuantError(f"FP8 tensor {name!r} has no {scale!r} in the checkpoint; it cannot be "
                               "dequantized")
    want = src.scale_shape(shape)
    if tuple(scale_shape) != want:
        raise SourceQuantError(f"{scale!r} has shape {list(scale_shape)}, expected {list(want)} for the "
                               f"{list(shape)} FP8 weight with weight_block_size={list(src.block)}")
    if scale_dtype not in ("F32", "BF16", "F16"):
        raise SourceQuantError(f"{scale!r} has dtype {scale_dtype}, expected a float scale (F32)")


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def dequantize_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w · scale_inv`` per ``block`` (partial edge blocks), computed in float32."""
    out, inp = w.shape
    s = scale_inv.to(torch.float32)
    s = s.repeat_interleave(block[0], dim=0)[:out].repeat_interleave(block[1], dim=1)[:, :inp]
    return (w.to(torch.float32) * s).to(dtype)


def quantize_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Float → (float8_e4m3fn weight, float32 scale_inv), amax / 448 per block: how the
    releases were made (used by the tests and the synthetic benchmark to build FP8 sources)."""
    out, inp = w.shape
    rows, cols = math.ceil(out / block[0]), math.ceil(inp / block[1])
    padded = torch.zeros(rows * block[0], cols * block[1], dtype=torch.float32)
    padded[:out, :inp] = w.float()
    tiles = padded.reshape(rows, block[0], cols, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale[:, None, :, None]).reshape_as(padded)[:out, :inp].to(torch.float8_e4m3fn)
    return q, scale
