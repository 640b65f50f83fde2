"""The output format of a job (``output.format`` × the quant preset): which tensors each
quantized linear becomes, and what the finished directory holds besides the part files.

* compressed-tensors, weights only (W4A16/W8A16): ``pack-quantized`` (formats/compressed_tensors.py);
* compressed-tensors, W8A8: ``int-quantized`` (formats/compressed_tensors_w8a8.py);
* ascend: the msModelSlim description format (formats/ascend.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, JobConfig
from ..quant.activations import TOKEN_DIVISOR, ActQuantArgs, StaticActParams
from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec
from ..writer import PartFile, write_index
from . import ascend
from . import compressed_tensors as ct
from . import compressed_tensors_w8a8 as ct8
from .serving import with_serving_dtype


class OutputFormat:
    """compressed-tensors ``pack-quantized`` (weights only)."""

    name = "compressed-tensors"
    part_prefix = "model"
    index_name = "model.safetensors.index.json"

    def __init__(self, args: QuantArgs, act: ActQuantArgs | None = None):
        self.args, self.act = args, act
        self.linear_args: dict[str, QuantArgs] = {}  # linears kept at other weights (fallback w8)
        self.groups: tuple[tuple[list[str], QuantArgs], ...] = ()  # their config groups (targets, args)

    def args_of(self, name: str) -> QuantArgs:
        return self.linear_args.get(name, self.args)

    def linear_specs(self, name: str, out_features: int, in_features: int,
                     bias: TensorSpec | None) -> list[TensorSpec]:
        return ct.linear_specs(name, out_features, in_features, self.args_of(name)) + ([bias] if bias else [])

    def pack_linear(self, name: str, result: QuantResult, bias: torch.Tensor | None,
                    act_params: StaticActParams | None) -> dict[str, torch.Tensor]:
        out = ct.compress_linear(name, result, self.args_of(name))
        if bias is not None:
            out[f"{name}.bias"] = bias
        return out

    def quantization_config(self, ignore: list[str]) -> dict:
        return ct.quantization_config(self.args, ignore, self.groups)

    def finish(self, directory: Path, parts: list[PartFile], weight_map: dict[str, str], config: dict,
               ignore: list[str], quantized: list[str]) -> None:
        """Index and config.json (the part files are already written)."""
        write_index(directory, parts, weight_map, name=self.index_name)
        config = with_serving_dtype(config, self.args.scale_dtype)
        config["quantization_config"] = self.quantization_config(ignore)
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class CompressedTensorsW8A8(OutputFormat):
    """compressed-tensors ``int-quantized``: int8 weights and int8 activations."""

    def linear_specs(self, name, out_features, in_features, bias):
        return ct8.linear_specs(name, out_features, in_features, self.args, self.act) + ([bias] if bias else [])

    def pack_linear(self, name, result, bias, act_params):
        out = ct8.compress_linear(name, result, self.args, self.act, act_params)
        if bias is not None:
            out[f"{name}.bias"] = bias
        return out

    def quantization_config(self, ignore):
        return ct8.quantization_config(self.act, ignore)


class Ascend(OutputFormat):
    """msModelSlim description format."""

    name = "ascend"
    part_prefix = ascend.PREFIX
    index_name = ascend.INDEX

    @property
    def quant_type(self) -> str:
        return ascend.quant_type(self.args, self.act)

    def act_of(self, name: str) -> ActQuantArgs | None:
        """The activation quantizer of ``name``: none for W8A16 fallback linears (fallback.py)."""
        return None if name in self.linear_args else self.act

    def linear_specs(self, name, out_features, in_features, bias):
        return ascend.linear_specs(name, out_features, in_features, self.args_of(name), self.act_of(name), bias)

    def pack_linear(self, name, result, bias, act_params):
        return ascend.pack_linear(name, result, self.args_of(name), self.act_of(name), act_params, bias)

    def finish(self, directory, parts, weight_map, config, ignore, quantized):
        write_index(directory, parts, weight_map, name=self.index_name)
        types = {name: ascend.quant_type(self.args_of(name), self.act_of(name)) for name in quantized}
        desc = ascend.description(weight_map, types, self.quant_type, str(config.get("model_type", "")))
        (Path(directory) / ascend.DESCRIPTION).write_text(json.dumps(desc, indent=2) + "\n")
        config = with_serving_dtype(config, self.args.scale_dtype)
        config["quantize"] = self.quant_type.lower()  # MindIE reads the scheme from config.json
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def act_args(cfg: JobConfig, args: QuantArgs) -> ActQuantArgs | None:
    """The activation quantizer of the job (None: weights only). A static input scale is rounded
    to the dtype the server keeps it in: float32 in vLLM / SGLang (compressed-tensors
    ``input_scale`` parameters are float32), the serving dtype in vLLM-Ascend (``params_dtype``)."""
    if cfg.quant.act_bits is None:
        return None
    scale_dtype = args.scale_dtype if cfg.output.format == "ascend" else torch.float32
    return ActQuantArgs(dynamic=cfg.quant.act_dynamic, scale_dtype=scale_dtype, token_divisor=TOKEN_DIVISOR)


def _compressed_tensors(cfg: JobConfig, args: QuantArgs, act: ActQuantArgs | None) -> OutputFormat:
    return CompressedTensorsW8A8(args, act) if act is not None else OutputFormat(args, act)


def _ascend(cfg: JobConfig, args: QuantArgs, act: ActQuantArgs | None) -> OutputFormat:
    if cfg.quant.bits != 8:
        raise ConfigError(f"output.format='ascend' with quant.bits={cfg.quant.bits}: the Ascend description "
                          "format is written for 8-bit weights (W8A8, W8A8_DYNAMIC, W8A16)")
    if cfg.quant.group_size != -1:
        raise ConfigError(f"output.format='ascend' with quant.group_size={cfg.quant.group_size}: vLLM-Ascend's "
                          "W8A16 method declares one weight_scale/weight_offset per output channel "
                          "(AscendW8A16LinearMethod.get_perchannel_param, [out, 1]); set quant.group_size=-1")
    return Ascend(args, act)


# output.format → factory(cfg, args, act) -> OutputFormat; config validation reads the keys
FORMATS = {"compressed-tensors": _compressed_tensors, "ascend": _ascend}


def make_format(cfg: JobConfig, args: QuantArgs, plan=None) -> OutputFormat:
    """``plan``: the job's plan, whose fallback linears (``w8``) get their own args and group."""
    fmt = FORMATS[cfg.output.format](cfg, args, act_args(cfg, args))
    if plan is not None:
        from ..fallback import w8_groups

        fmt.linear_args, fmt.groups = w8_groups(plan, args)
    return fmt
