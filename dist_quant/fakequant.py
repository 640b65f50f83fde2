"""A float ``transformers`` model that computes what a W8A8 / W8A16 checkpoint written by
dist_quant computes: dequantized int8 weights, and input activations fake-quantized by
forward pre-hooks (static per-tensor with the stored scale and offset, or dynamic per
token). It reads both output formats:

* compressed-tensors ``nvfp4-pack-quantized`` (NVFP4 weights; NVFP4 inputs with the stored global
  scale for W4A4), ``float-quantized`` (FP8) and ``pack-quantized`` int4 with FP8 activations
  (W4AFP8): dequantized weights, FP8 input fake-quantization (dynamic per token / per token and
  group, or the static ``input_scale``), as vLLM computes (dist_quant/quant/floatgrid.py);
* compressed-tensors ``int-quantized``: ``weight`` × ``weight_scale``; ``input_scale`` /
  ``input_zero_point``, or per-token dynamic (scale = max|x| / 127, the servers' kernels) from
  the config;
* Ascend (``quant_model_description.json``): ``(weight + weight_offset) · weight_scale`` (CANN's
  antiquant convention); W8A8 ``input_scale`` / ``input_offset``; W8A8_DYNAMIC per token
  (max|x| / 127).

Used to evaluate Ascend checkpoints on CPU (no CPU loader exists for that format) and as
the reference the tests compare transformers' own compressed-tensors loader against.

    from dist_quant.fakequant import load_fake_quant_model
    model = load_fake_quant_model("outputs/model-flexsmooth_w8a8")
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .formats import ascend
from .quant import floatgrid as fg
from .quant.activations import TOKEN_DIVISOR, StaticActParams, fake_quant_dynamic, fake_quant_static


def read_tensors(directory: Path, index_name: str) -> dict[str, torch.Tensor]:
    index = directory / index_name
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(directory / name, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _act_hook(kind: str, params: StaticActParams | None = None, divisor: float = TOKEN_DIVISOR):
    def hook(module, args):
        x = args[0]
        if kind == "nvfp4":
            x = fg.fake_quant_nvfp4(x, params.scale)
        elif kind == "fp8_static":
            x = fg.fake_quant_fp8_static(x, params.scale)
        elif kind == "fp8_dynamic":
            x = fg.fake_quant_fp8_dynamic(x, int(divisor))  # divisor: the column group (0: per token)
        elif kind == "static":
            x = fake_quant_static(x, params)
        elif kind == "dynamic":
            x = fake_quant_dynamic(x, divisor)
        return (x, *args[1:])
    return hook


def _fp8_act(inputs: dict | None, tensors, mod: str):
    """The FP8 activation quantizer of a compressed-tensors ``input_activations`` entry."""
    if inputs is None:
        return ("none", None, 0.0)
    if inputs.get("dynamic"):
        return ("fp8_dynamic", None, float(inputs.get("group_size") or 0))
    return ("fp8_static", StaticActParams(tensors[mod + ".input_scale"].float().reshape(1), torch.zeros(1)), 0.0)


def _linear_plan_fp8(tensors, qc: dict):
    """``float-quantized``: ``weight`` (E4M3) × ``weight_scale`` (channel [out, 1], tensor [1],
    block [ceil(out/128), ceil(in/128)] per 128×128 block)."""
    group = qc["config_groups"]["group_0"]
    block = (group["weights"].get("block_structure") or [None, None])
    plan = {}
    for key, t in tensors.items():
        if not key.endswith(".weight") or t.dtype != torch.float8_e4m3fn:
            continue
        mod = key[: -len(".weight")]
        scale = tensors[mod + ".weight_scale"].float()
        if block[0] is not None:
            scale = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: t.shape[0], : t.shape[1]]
        plan[mod] = (t.float() * (scale if scale.dim() == 2 else scale.reshape(1, 1)), _fp8_act(group.get("input_activations"), tensors, mod))
    return plan


def _linear_plan_w4afp8(tensors, qc: dict):
    """``pack-quantized`` symmetric int4 with FP8 activations: ``weight_packed`` (eight 4-bit values
    per int32, offset by 8) × ``weight_scale`` per group."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    group = qc["config_groups"]["group_0"]
    bits = group["weights"]["num_bits"]
    plan = {}
    for key, t in tensors.items():
        if not key.endswith(".weight_packed"):
            continue
        mod = key[: -len(".weight_packed")]
        shape = tuple(int(v) for v in tensors[mod + ".weight_shape"].tolist())
        q = unpack_from_int32(t, bits, torch.Size(shape)).float()
        scale = tensors[mod + ".weight_scale"].float()
        w = q * scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
        plan[mod] = (w, _fp8_act(group.get("input_activations"), tensors, mod))
    return plan


def _group_of(qc: dict, mod: str) -> dict:
    """The config group of module ``mod``: the first whose ``re:`` / name target matches its name
    (vLLM's ``find_matched_target`` tries layer names before class names), else ``group_0``."""
    for group in qc["config_groups"].values():
        for target in group.get("targets", ()):
            if target == mod or (target.startswith("re:") and re.match(target[3:], mod)):
                return group
    return qc["config_groups"]["group_0"]


def _linear_plan_nvfp4(tensors, qc: dict):
    """``nvfp4-pack-quantized``: ``e2m1(weight_packed) · weight_scale / weight_global_scale`` per
    group of 16; W4A4 inputs: NVFP4 with ``input_global_scale`` (local scales at run time), except for
    modules of a config group without ``input_activations`` (NVFP4A16: MLA ``kv_b_proj``)."""
    plan = {}
    for key, t in tensors.items():
        if not key.endswith(".weight_packed"):
            continue
        mod = key[: -len(".weight_packed")]
        inputs = _group_of(qc, mod).get("input_activations")
        w = fg.nvfp4_dequantize(fg.unpack_e2m1(t), tensors[mod + ".weight_scale"], tensors[mod + ".weight_global_scale"])
        act = ("none", None, 0.0) if inputs is None else (
            "nvfp4", StaticActParams(tensors[mod + ".input_global_scale"].float().reshape(1), torch.zeros(1)), 0.0)
        plan[mod] = (w, act)
    return plan


def _linear_plan_ct(tensors, config: dict, divisor: float = TOKEN_DIVISOR):
    qc = config["quantization_config"]
    inputs = qc["config_groups"]["group_0"].get("input_activations")
    if qc.get("format") == "nvfp4-pack-quantized":
        return _linear_plan_nvfp4(tensors, qc)
    if qc.get("format") == "float-quantized":
        return _linear_plan_fp8(tensors, qc)
    if qc.get("format") == "pack-quantized" and inputs is not None and inputs.get("type") == "float":
        return _linear_plan_w4afp8(tensors, qc)
    if qc.get("format") != "int-quantized":
        raise ValueError(f"fake-quant model: compressed-tensors format {qc.get('format')!r} is not W8A8 "
                         "int-quantized (transformers loads weight-only formats itself)")
    inputs = qc["config_groups"]["group_0"].get("input_activations")
    plan = {}
    for key, t in tensors.items():
        if not key.endswith(".weight") or t.dtype != torch.int8:
            continue
        mod = key[: -len(".weight")]
        w = t.float() * tensors[mod + ".weight_scale"].float()
        if mod + ".weight_zero_point" in tensors:
            w = (t.float() - tensors[mod + ".weight_zero_point"].float()) * tensors[mod + ".weight_scale"].float()
        if inputs is None:
            act = ("none", None, 0.0)
        elif inputs.get("dynamic"):
            act = ("dynamic", None, divisor)
        else:
            zp = tensors.get(mod + ".input_zero_point")
            params = StaticActParams(tensors[mod + ".input_scale"].float().reshape(1),
                                     zp.float().reshape(1) if zp is not None else torch.zeros(1))
            act = ("static", params, 0.0)
        plan[mod] = (w, act)
    return plan


def _linear_plan_ascend(tensors, desc: dict):
    plan = {}
    for key, kind in desc.items():
        if not key.endswith(".weight") or kind == "FLOAT" or key not in tensors:
            continue
        mod = key[: -len(".weight")]
        q = tensors[key].float()
        scale = tensors[mod + ".weight_scale"].float()
        offset = tensors[mod + ".weight_offset"].float()
        cols = q.shape[1] // scale.shape[1]
        w = (q + offset.repeat_interleave(cols, dim=1)) * scale.repeat_interleave(cols, dim=1)
        if kind == "W8A8":
            params = StaticActParams(tensors[mod + ".input_scale"].float().reshape(1),
                                     tensors[mod + ".input_offset"].float().reshape(1))
            act = ("static", params, 0.0)
        elif kind == "W8A8_DYNAMIC":
            act = ("dynamic", None, TOKEN_DIVISOR)
        elif kind == "W8A16":
            act = ("none", None, 0.0)
        else:
            raise ValueError(f"fake-quant model: unsupported Ascend type {kind!r} for {key!r}")
        plan[mod] = (w, act)
    return plan


def load_fake_quant_model(directory, dtype: torch.dtype = torch.float32,
                          token_divisor: float = TOKEN_DIVISOR) -> nn.Module:
    """``token_divisor``: dynamic per-token scale = max|x| / token_divisor (127: the servers' int8
    kernels; 127.5 reproduces what transformers computes, through compressed-tensors' own
    ``calculate_qparams``, for a compressed-tensors checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if (directory / ascend.DESCRIPTION).is_file():
        tensors = read_tensors(directory, ascend.INDEX)
        plan = _linear_plan_ascend(tensors, json.loads((directory / ascend.DESCRIPTION).read_text()))
    else:
        tensors = read_tensors(directory, "model.safetensors.index.json")
        plan = _linear_plan_ct(tensors, config, token_divisor)
    plain = {k: v for k, v in config.items() if k not in ("quantization_config", "quantize")}
    hf_config = AutoConfig.for_model(**plain)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    state = {}
    for name in model.state_dict():
        mod = name.rsplit(".", 1)[0]
        if mod in plan and name.endswith(".weight"):
            state[name] = plan[mod][0]
        elif name in tensors:
            state[name] = tensors[name].float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"fake-quant model: checkpoint lacks {missing[:3]}")
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    for mod, (_, (kind, params, divisor)) in plan.items():
        if kind != "none":
            model.get_submodule(mod).register_forward_pre_hook(_act_hook(kind, params, divisor))
    return model.eval()
