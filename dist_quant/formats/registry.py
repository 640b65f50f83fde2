"""The output format of a job (``output.format`` × the quant preset): which tensors each
quantized linear becomes, and what the finished directory holds besides the part files.

* compressed-tensors, weights only (W4A16/W8A16): ``pack-quantized`` (formats/compressed_tensors.py);
* compressed-tensors, W8A8: ``int-quantized`` (formats/compressed_tensors_w8a8.py);
* compressed-tensors, FP8 / W4AFP8: ``float-quantized`` / ``pack-quantized`` with FP8 activations
  (formats/compressed_tensors_fp8.py);
* ascend: the msModelSlim description format (formats/ascend.py): W8A8 / W8A8_DYNAMIC / W8A16, and
  W4A8_DYNAMIC routed experts with every other linear W8A8_DYNAMIC (MoE models);
* awq: the AutoAWQ GEMM layout, 4-bit weights only (formats/awq.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import FP8_BLOCK, ConfigError, JobConfig
from ..plan import Fallback, ModelPlan
from ..quant.activations import TOKEN_DIVISOR, ActQuantArgs, StaticActParams
from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec
from ..writer import PartFile, write_index
from . import ascend
from . import awq
from . import compressed_tensors as ct
from . import compressed_tensors_fp8 as ctf
from . import compressed_tensors_w8a8 as ct8
from . import fa_quant, kv_cache
from ..kv_layout import KVLayout
from ..kvcache import KVCacheArgs
from .serving import with_serving_dtype


class OutputFormat:
    """compressed-tensors ``pack-quantized`` (weights only)."""

    name = "compressed-tensors"
    part_prefix = "model"
    index_name = "model.safetensors.index.json"

    kv: KVCacheArgs | None = None  # quant.kv_cache (set by make_format)
    takes_weight_only = False  # writes linears of an activation-quantized job without input quantization

    def __init__(self, args: QuantArgs, act: ActQuantArgs | None = None):
        self.args, self.act = args, act
        self.linear_args: dict[str, QuantArgs] = {}  # linears kept at other weights (fallback w8)
        self.groups: tuple[tuple[list[str], QuantArgs], ...] = ()  # their config groups (targets, args)
        self.weight_only: frozenset[str] = frozenset()  # linears written without input quantization (plan)
        self.weight_only_targets: list[str] = []  # their config group's targets (plan.weight_only_targets)
        self.w8a16: frozenset[str] = frozenset()  # w8 fallbacks: float inputs in a job with activations

    def plan_linears(self, plan: ModelPlan) -> dict[str, Fallback]:
        """Linears this format writes at another precision than the job's, FQN → :class:`Fallback`
        (``float``, ``w8``, ``w8a8``): applied to the plan before any work (run.prepare), like the
        fallback of sensitive linears (dist_quant/fallback.py). None by default."""
        return {}

    def args_of(self, name: str) -> QuantArgs:
        return self.linear_args.get(name, self.args)

    def kv_specs(self, attn: str, layout: KVLayout, config: dict) -> list[TensorSpec]:
        """The KV-cache scale tensors of attention module ``attn`` (full name) whose cache is
        ``layout`` (dist_quant/kv_layout.py), for the checkpoint's ``config``."""
        return kv_cache.ct_specs(layout.ct_names(attn), layout.dims(config)[0], self.kv)

    def pack_kv(self, attn: str, layout: KVLayout, k_scale: torch.Tensor, v_scale: torch.Tensor,
                config: dict) -> dict[str, torch.Tensor]:
        return kv_cache.ct_tensors(layout.ct_names(attn), k_scale, v_scale, self.kv)

    def linear_specs(self, name: str, out_features: int, in_features: int,
                     bias: TensorSpec | None) -> list[TensorSpec]:
        """The linear's tensors in this format (:meth:`weight_specs`), then its bias, unchanged."""
        return self.weight_specs(name, out_features, in_features) + ([bias] if bias else [])

    def pack_linear(self, name: str, result: QuantResult, bias: torch.Tensor | None,
                    act_params: StaticActParams | None) -> dict[str, torch.Tensor]:
        """The solved linear in this format (:meth:`compress`), then its bias, unchanged."""
        out = self.compress(name, result, act_params)
        if bias is not None:
            out[f"{name}.bias"] = bias
        return out

    def weight_specs(self, name: str, out_features: int, in_features: int) -> list[TensorSpec]:
        return ct.linear_specs(name, out_features, in_features, self.args_of(name))

    def compress(self, name: str, result: QuantResult, act_params: StaticActParams | None) -> dict[str, torch.Tensor]:
        return ct.compress_linear(name, result, self.args_of(name))

    def quantization_config(self, ignore: list[str]) -> dict:
        return ct.quantization_config(self.args, ignore, self.groups)

    def finish(self, directory: Path, parts: list[PartFile], weight_map: dict[str, str], config: dict,
               ignore: list[str], quantized: list[str]) -> None:
        """Index and config.json (the part files are already written)."""
        write_index(directory, parts, weight_map, name=self.index_name)
        config = with_serving_dtype(config, self.args.scale_dtype)
        config["quantization_config"] = self.quantization_config(ignore)
        if self.kv is not None:
            config["quantization_config"]["kv_cache_scheme"] = kv_cache.ct_scheme(self.kv)
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class CompressedTensorsW8A8(OutputFormat):
    """compressed-tensors ``int-quantized``: int8 weights and int8 activations."""

    def weight_specs(self, name, out_features, in_features):
        return ct8.linear_specs(name, out_features, in_features, self.args, self.act)

    def compress(self, name, result, act_params):
        return ct8.compress_linear(name, result, self.args, self.act, act_params)

    def quantization_config(self, ignore):
        return ct8.quantization_config(self.act, ignore, self.args)


class CompressedTensorsFP8(OutputFormat):
    """compressed-tensors ``float-quantized``: FP8 weights and FP8 activations."""

    def weight_specs(self, name, out_features, in_features):
        return ctf.linear_specs(name, out_features, in_features, self.args, self.act)

    def compress(self, name, result, act_params):
        return ctf.compress_linear(name, result, self.args, self.act, act_params)

    def quantization_config(self, ignore):
        return ctf.quantization_config(self.args, self.act, ignore)


class CompressedTensorsNVFP4(CompressedTensorsFP8):
    """compressed-tensors ``nvfp4-pack-quantized``: NVFP4 weights, NVFP4 or float activations; in W4A4
    jobs the plan's weight-only linears (MLA ``kv_b_proj``) are NVFP4A16, a config group of their own."""

    takes_weight_only = True

    def act_of(self, name: str) -> ActQuantArgs | None:
        return None if name in self.weight_only else self.act

    def weight_specs(self, name, out_features, in_features):
        return ctf.nvfp4_specs(name, out_features, in_features, self.act_of(name))

    def compress(self, name, result, act_params):
        return ctf.compress_nvfp4(name, result, self.args, self.act_of(name), act_params)

    def quantization_config(self, ignore):
        return ctf.nvfp4_quantization_config(self.act, ignore, self.weight_only_targets)


class CompressedTensorsW4AFP8(OutputFormat):
    """compressed-tensors ``pack-quantized`` int4 weights (as W4A16) with FP8 input activations."""

    def quantization_config(self, ignore):
        return ctf.quantization_config(self.args, self.act, ignore)


def _c8_specs(attn, layout, config, args):
    return kv_cache.ascend_specs(attn, *layout.dims(config), args)  # (KV heads, head_dim)


def _c8_pack(attn, layout, k_scale, v_scale, config, args):
    return kv_cache.ascend_tensors(attn, k_scale, v_scale, layout.dims(config)[1], args)


def _fa_specs(attn, layout, config, args):
    return fa_quant.specs(attn, layout.dims(config)[0])


def _fa_pack(attn, layout, k_scale, v_scale, config, args):
    return fa_quant.tensors(attn, k_scale, v_scale)  # MLA_FA: "K" is the absorbed query, "V" the latent


# KVLayout.ascend_form → (specs, pack): msModelSlim C8 (MHA) and FAKQuant (MLA, kv_layout.MLA_FA)
ASCEND_KV = {"C8": (_c8_specs, _c8_pack), "FAKQuant": (_fa_specs, _fa_pack)}


def _ascend_kv(layout: KVLayout):
    if layout.ascend_form not in ASCEND_KV:
        raise ValueError(f"the {layout.name} KV layout has no Ascend form")
    return ASCEND_KV[layout.ascend_form]


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
        return None if name in self.w8a16 else self.act

    def plan_linears(self, plan):
        """MLA models: ``kv_b_proj`` stays FLOAT. vLLM-Ascend's MLA attention asserts it unquantized
        (``vllm_ascend/attention/mla_v1.py`` and ``sfa_v1.py``, ``process_weights_after_loading``:
        ``assert isinstance(self.kv_b_proj.quant_method, UnquantizedLinearMethod)``; it splits the
        float weight into W_UK / W_UV), and msModelSlim's DeepSeek examples disable it
        (``example/DeepSeek/quant_deepseek_w4a8.py``, ``disable_names``)."""
        return {lin.name: Fallback(lin.name, "float", KV_B_REASON) for lin in plan.linears
                if lin.name.endswith(".self_attn.kv_b_proj")}

    def type_of(self, name: str) -> str:
        """The description type of quantized linear ``name``."""
        return ascend.quant_type(self.args_of(name), self.act_of(name))

    def description_extra(self) -> dict:
        return {}

    def config_keys(self, config: dict) -> dict[str, str]:
        return {"quantize": self.quant_type.lower()}  # MindIE reads the scheme from config.json

    def linear_specs(self, name, out_features, in_features, bias):
        return ascend.linear_specs(name, out_features, in_features, self.args_of(name), self.act_of(name), bias)

    def pack_linear(self, name, result, bias, act_params):
        return ascend.pack_linear(name, result, self.args_of(name), self.act_of(name), act_params, bias)

    def kv_specs(self, attn, layout, config):
        return _ascend_kv(layout)[0](attn, layout, config, self.kv)

    def pack_kv(self, attn, layout, k_scale, v_scale, config):
        return _ascend_kv(layout)[1](attn, layout, k_scale, v_scale, config, self.kv)

    def finish(self, directory, parts, weight_map, config, ignore, quantized):
        write_index(directory, parts, weight_map, name=self.index_name)
        types = {name: self.type_of(name) for name in quantized}
        desc = ascend.description(weight_map, types, self.quant_type, str(config.get("model_type", "")),
                                  self.description_extra())
        if self.kv is not None:
            desc.update(ascend_kv_description(weight_map))
        (Path(directory) / ascend.DESCRIPTION).write_text(json.dumps(desc, indent=2) + "\n")
        config = {**with_serving_dtype(config, self.args.scale_dtype), **self.config_keys(config)}
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def ascend_kv_description(weight_map) -> dict[str, str]:
    """The description entries of the KV-cache tensors in ``weight_map``: msModelSlim C8
    (formats/kv_cache.py) or FAKQuant (formats/fa_quant.py), told apart by their names."""
    c8 = [name for name in weight_map if kv_cache.is_ascend_kv(name)]
    fa = sorted({name.rsplit(".", 2)[0] for name in weight_map if fa_quant.is_fa(name)})
    desc = {}
    if c8:
        desc.update({name: kv_cache.C8 for name in c8}, kv_cache_type=kv_cache.C8, kv_quant_type=kv_cache.C8)
    for attn in fa:
        desc.update(fa_quant.description(attn))
    if fa:
        desc.update(fa_quant.global_description())
    return desc


KV_B_REASON = "output.format=ascend: vLLM-Ascend's MLA attention needs a float kv_b_proj"
W8A8_REASON = "output.format=ascend W4A8: W8A8_DYNAMIC (vLLM-Ascend's W4A8_DYNAMIC is for routed experts only)"


class AscendW4A8(Ascend):
    """msModelSlim W4A8_DYNAMIC routed experts (two int4 a byte, float32 scales, ``scale_bias``;
    formats/ascend.py), every other quantized linear W8A8_DYNAMIC: those are planned as ``w8a8``
    linears (int8 per-channel weights solved with the job's solver, inputs quantized per token as
    the job's), the experts at the job's 4-bit per-channel args."""

    @property
    def quant_type(self) -> str:
        return "W8A8_DYNAMIC"  # msModelSlim hides W4A8_DYNAMIC from model_quant_type (QUANT_TYPE_PRIORITY)

    def plan_linears(self, plan):
        kept = super().plan_linears(plan)
        kept.update({lin.name: Fallback(lin.name, "w8a8", W8A8_REASON) for lin in plan.linears
                     if lin.expert is None and lin.fallback is None and lin.name not in kept})
        return kept

    def _int4(self, name: str) -> bool:
        four = self.args_of(name).bits == 4
        if four != ascend.is_expert(name):
            raise AssertionError(f"{name}: {'4' if four else '8'}-bit weights; Ascend W4A8 writes routed experts "
                                 "int4 and every other linear int8 (make_format needs the job's plan)")
        return four

    def type_of(self, name):
        return ascend.W4A8 if self._int4(name) else super().type_of(name)

    def linear_specs(self, name, out_features, in_features, bias):
        if not self._int4(name):
            return super().linear_specs(name, out_features, in_features, bias)
        down = ascend.is_down(name)
        if out_features % 2 or (down and in_features % ascend.SCALE_BIAS_SPLITS):
            raise ConfigError(f"output.format=ascend quant=w4a8: {name} [{out_features}x{in_features}]: "
                              "msModelSlim's W4A8_DYNAMIC packs output channels in pairs and splits a down "
                              f"projection's scale_bias into {ascend.SCALE_BIAS_SPLITS} equal input blocks "
                              "(save/utils/pack.py, process_scale)")
        return ascend.w4a8_specs(name, out_features, in_features) + ([bias] if bias else [])

    def pack_linear(self, name, result, bias, act_params):
        if not self._int4(name):
            return super().pack_linear(name, result, bias, act_params)
        out = ascend.w4a8_pack(name, result)
        if bias is not None:
            out[f"{name}.bias"] = bias
        return out

    def description_extra(self):
        return {"group_size": 0}  # per channel; AscendW4A8DynamicFusedMoEMethod raises for group_size > 0

    def config_keys(self, config):
        return ascend.w4a8_config(mla="kv_lora_rank" in config)


class AutoAWQ(OutputFormat):
    """AutoAWQ GEMM: ``qweight`` / ``qzeros`` / ``scales`` (float16), ``quant_method: awq``."""

    name = "awq"

    def weight_specs(self, name, out_features, in_features):
        if out_features % awq.PACK or in_features % self.args.columns_per_group(in_features):
            raise ConfigError(f"output.format='awq': {name} [{out_features}x{in_features}]: the AWQ layout packs "
                              f"{awq.PACK} output channels per int32 and needs whole groups of "
                              f"quant.group_size={self.args.group_size} input columns")
        return awq.linear_specs(name, out_features, in_features, self.args)

    def compress(self, name, result, act_params):
        return awq.compress_linear(name, result, self.args)

    def quantization_config(self, ignore):
        return awq.quantization_config(self.args, ignore)


def _awq(cfg: JobConfig, args: QuantArgs, act: ActQuantArgs | None) -> OutputFormat:
    q = cfg.quant
    if q.bits != 4 or act is not None:
        raise ConfigError(f"output.format='awq' with quant.bits={q.bits}, quant.act_bits={q.act_bits}: the AWQ "
                          "GEMM layout holds 4-bit weights with float activations (W4A16)")
    if q.group_size == -1:
        raise ConfigError("output.format='awq' with quant.group_size=-1: AWQ checkpoints have group-wise "
                          "scales (set a group size, e.g. 128)")
    if args.scale_dtype != torch.float16:
        raise ConfigError(f"output.format='awq' with output.dtype={cfg.output.dtype!r}: AWQ scales are float16 "
                          "(vLLM's awq method runs float16 only); use output.dtype=auto or float16")
    return AutoAWQ(args, act)


def act_args(cfg: JobConfig, args: QuantArgs) -> ActQuantArgs | None:
    """The activation quantizer of the job (None: weights only). A static input scale is rounded
    to the dtype the server keeps it in: float32 in vLLM / SGLang (compressed-tensors
    ``input_scale`` parameters are float32), the serving dtype in vLLM-Ascend (``params_dtype``)."""
    if cfg.quant.act_bits is None:
        return None
    scale_dtype = args.scale_dtype if cfg.output.format == "ascend" else torch.float32
    q = cfg.quant
    if q.act_type == "nvfp4":  # static global scale, local scales per group of 16 at run time
        return ActQuantArgs(dynamic=False, scale_dtype=torch.float32, grid="nvfp4")
    if q.act_type == "fp8":  # block FP8 weights: activations per token and group of 128 (vLLM)
        group = FP8_BLOCK if q.weight_type == "fp8" and q.weight_strategy == "block" else 0
        return ActQuantArgs(dynamic=q.act_dynamic, scale_dtype=torch.float32, grid="fp8", group=group)
    return ActQuantArgs(dynamic=cfg.quant.act_dynamic, scale_dtype=scale_dtype, token_divisor=TOKEN_DIVISOR)


def _compressed_tensors(cfg: JobConfig, args: QuantArgs, act: ActQuantArgs | None) -> OutputFormat:
    if args.grid == "nvfp4":
        return CompressedTensorsNVFP4(args, act)
    if act is not None and act.grid == "fp8":
        return CompressedTensorsFP8(args, act) if args.grid == "fp8" else CompressedTensorsW4AFP8(args, act)
    return CompressedTensorsW8A8(args, act) if act is not None else OutputFormat(args, act)


def _ascend(cfg: JobConfig, args: QuantArgs, act: ActQuantArgs | None) -> OutputFormat:
    if cfg.quant.weight_type != "int" or cfg.quant.act_type != "int":
        raise ConfigError(f"output.format='ascend' with quant={cfg.quant.name}: the msModelSlim description "
                          "format has no FP8 / NVFP4 types (Ascend NPUs serve W8A8 / W8A8_DYNAMIC); use "
                          "output.format=compressed-tensors")
    if cfg.quant.bits == 4 and cfg.quant.act_bits is not None:
        if cfg.quant.group_size != -1:
            raise ConfigError(f"output.format='ascend' quant=w4a8 with quant.group_size={cfg.quant.group_size}: "
                              "vLLM-Ascend's W4A8_DYNAMIC MoE method takes per-channel weights only "
                              "(AscendW4A8DynamicFusedMoEMethod.__init__ raises for a description group_size > 0); "
                              "set quant.group_size=-1")
        return AscendW4A8(args, act)  # dense models: servability.REFUSALS
    if cfg.quant.bits != 8:
        raise ConfigError(f"output.format='ascend' with quant.bits={cfg.quant.bits}: the Ascend description "
                          "format is written for 8-bit weights (W8A8, W8A8_DYNAMIC, W8A16)")
    if cfg.quant.group_size != -1:
        raise ConfigError(f"output.format='ascend' with quant.group_size={cfg.quant.group_size}: vLLM-Ascend's "
                          "W8A16 method declares one weight_scale/weight_offset per output channel "
                          "(AscendW8A16LinearMethod.get_perchannel_param, [out, 1]); set quant.group_size=-1")
    return Ascend(args, act)


# output.format → factory(cfg, args, act) -> OutputFormat; config validation reads the keys
FORMATS = {"compressed-tensors": _compressed_tensors, "ascend": _ascend, "awq": _awq}

# output.format → the serving dtype that ``output.dtype=auto`` means for it (default: the checkpoint's)
AUTO_DTYPE = {"awq": "float16"}


def kv_args(cfg: JobConfig, args: QuantArgs) -> KVCacheArgs | None:
    """The KV-cache quantizer of the job (None: the cache stays in the serving dtype). Its scale
    is kept as the server keeps it: float32 in vLLM (k_scale parameters), the serving dtype in
    vLLM-Ascend (params_dtype)."""
    if cfg.quant.kv_cache is None:
        return None
    scale_dtype = args.scale_dtype if cfg.output.format == "ascend" else torch.float32
    return KVCacheArgs(cfg.quant.kv_cache, cfg.quant.kv_cache_strategy == "head", scale_dtype)


def make_format(cfg: JobConfig, args: QuantArgs, plan=None) -> OutputFormat:
    """``plan``: the job's plan, whose fallback linears (``w8``) get their own args and group."""
    fmt = FORMATS[cfg.output.format](cfg, args, act_args(cfg, args))
    if plan is not None:
        from ..fallback import w8_groups
        from ..plan import weight_only_targets

        fmt.linear_args, fmt.groups = w8_groups(plan, args)
        names = frozenset(lin.name for lin in plan.linears if lin.weight_only)
        if names and not fmt.takes_weight_only:
            raise ConfigError(f"quant={cfg.quant.name} with model_type={plan.arch.name!r}: {sorted(names)[0]} is "
                              f"absorbed by the server at load (ArchSpec.absorbed) and must be written weight-only, "
                              f"which output.format={cfg.output.format!r} with this preset does not do")
        fmt.weight_only, fmt.weight_only_targets = names, weight_only_targets(plan)
        fmt.w8a16 = frozenset(lin.name for lin in plan.linears if lin.float_input)
    fmt.kv = kv_args(cfg, args)
    return fmt
