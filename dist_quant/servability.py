"""Which servers can serve an output: the servers' loader and kernel limits as data.

Two kinds of rules, each citing the server code it was read from (docs/servers.md has the same
facts as a table):

* :data:`REFUSALS`: outputs that no server in :data:`SERVERS` could load in any correct form;
  :func:`refuse` raises a one-line :class:`~dist_quant.config.ConfigError` before any work.
* :data:`RULES`: per server, a job-level limit (the server has no loader for this scheme) or a
  per-linear shape limit (a kernel tile, a group size). :func:`check` applies them and
  :func:`warnings` turns the result into lines the dry run and the start of a run print
  (never silently).

Shapes are checked as the server sees them: q/k/v and gate/up are fused into one linear
(``qkv_proj``, ``gate_up_proj``: vLLM's and SGLang's ``packed_modules_mapping``), routed experts
into one fused MoE layer per sparse block, at tensor-parallel size 1 (a larger TP divides the
partitioned dimension further; the same rules then apply to the per-rank sizes).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from .kv_layout import KV_LAYOUTS, KVLayout

VLLM = "vLLM (CUDA)"
SGLANG = "SGLang (CUDA)"
ASCEND = "vLLM-Ascend"
HF = "transformers (CPU)"
SERVERS = (VLLM, SGLANG, ASCEND, HF)

FLOAT_SCHEMES = ("FP8_DYNAMIC", "FP8", "FP8_BLOCK", "W4AFP8", "NVFP4", "NVFP4A16")  # FP8 activations (docs/float_formats.md)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_MIN_THREAD_N = 64  # GPTQ_MARLIN_MIN_THREAD_N: output features per partition
MARLIN_MIN_THREAD_K = 128  # GPTQ_MARLIN_MIN_THREAD_K: input features per partition


@dataclass(frozen=True)
class Job:
    """What one job writes, in the terms the servers' loaders decide on."""

    format: str  # "compressed-tensors" | "ascend" | "awq"
    scheme: str  # "W4A16" | "W8A16" | "W8A8" (static activations) | "W8A8_DYNAMIC" | "W4A8_DYNAMIC" | FLOAT_SCHEMES
    group_size: int  # -1: per output channel
    symmetric: bool
    serve_dtype: str  # "bfloat16" | "float16" | "float32"
    model_type: str = ""
    moe: bool = False
    kv_cache: str | None = None  # quant.kv_cache: None | "fp8" | "int8"
    kv_strategy: str = "tensor"  # quant.kv_cache_strategy
    kv_layout: str = "mha"  # what the attention caches (dist_quant/kv_layout.py: "mha" | "mla")

    @property
    def weight_only(self) -> bool:
        return self.scheme in ("W4A16", "W8A16")  # integer weight-only (NVFP4A16 is its own scheme)


@dataclass(frozen=True)
class Linear:
    """A linear as the server builds it (fused where the server fuses)."""

    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class MoeLayer:
    """One fused routed-experts layer: ``hidden`` = H, ``intermediate`` = I of one expert."""

    name: str
    hidden: int
    intermediate: int


@dataclass(frozen=True)
class Rule:
    server: str
    why: str  # one line: what the server needs
    source: str  # file and function of the server code
    applies: Callable[[Job], bool]
    job_fails: Callable[[Job], bool] | None = None  # the whole output
    linear_fails: Callable[[Job, Linear], bool] | None = None  # dense (fused) linears
    moe_fails: Callable[[Job, MoeLayer], bool] | None = None  # fused expert layers
    message: Callable[[Job], str] | None = None  # refusals: the line naming the offending value (else why)
    effect: str = "cannot serve"  # or a limit that leaves it servable: "serves, but not exactly the
    # calibrated model", "serves it only on Hopper GPUs (Machete)", "needs v0.24.0 or newer for"


def _ct(job: Job) -> bool:
    return job.format == "compressed-tensors"


def _asc(job: Job) -> bool:
    return job.format == "ascend"


def _marlin_linear_fails(job: Job, lin: Linear) -> bool:
    g = job.group_size
    return (lin.out_features % MARLIN_MIN_THREAD_N != 0 or lin.in_features % MARLIN_MIN_THREAD_K != 0
            or g not in MARLIN_GROUP_SIZES or (g != -1 and lin.in_features % g != 0))


def _marlin_linear_fails_padded(job: Job, lin: Linear) -> bool:
    """vLLM ≥ v0.24.0: ``MarlinLinearKernel.can_implement`` zero-pads misaligned tiles; only the
    group size and ``in_features % group_size`` remain (our outputs carry no act-order ``g_idx``)."""
    g = job.group_size
    return g not in MARLIN_GROUP_SIZES or (g != -1 and lin.in_features % g != 0)


def _marlin_linear_needs_new_vllm(job: Job, lin: Linear) -> bool:
    return _marlin_linear_fails(job, lin) and not _marlin_linear_fails_padded(job, lin)


def _marlin_moe_ok(job: Job, moe: MoeLayer, padded: bool = False) -> bool:
    """``check_moe_marlin_supports_layer``; ``padded``: vLLM ≥ v0.25.0 (``allow_tile_padding``),
    where only ``hidden % 128`` and ``intermediate % group`` remain."""
    g = job.group_size
    inter_ok = moe.intermediate % (max(g, 1) if padded else max(64, g)) == 0
    return moe.hidden % 128 == 0 and inter_ok and g in MARLIN_GROUP_SIZES


def _wna16_moe_fails(job: Job, moe: MoeLayer, padded: bool = False) -> bool:
    """Marlin MoE when its shapes allow, else the Triton WNA16 MoE method, which asserts
    ``strategy == "group"`` (no per-channel scales)."""
    return not _marlin_moe_ok(job, moe, padded) and job.group_size == -1


def _wna16_moe_needs_new_vllm(job: Job, moe: MoeLayer) -> bool:
    return _wna16_moe_fails(job, moe) and not _wna16_moe_fails(job, moe, padded=True)


def _kv_layout_refusal(layout: KVLayout) -> Rule:
    """A KV layout's strategies and output formats (kv_layout.py): the others, refused in a line
    naming the offending value."""
    def message(j: Job) -> str:
        bad = (f"quant.kv_cache_strategy={j.kv_strategy!r}" if j.kv_strategy not in layout.strategies
               else f"output.format={j.format!r}")
        return f"quant.kv_cache={j.kv_cache!r} with {bad}: {layout.refusal}"

    return Rule("all", f"quant.kv_cache with the {layout.name} KV layout: {layout.refusal}", layout.source,
                applies=lambda j: j.kv_cache is not None and j.kv_layout == layout.name,
                job_fails=lambda j: not layout.accepts(j.kv_strategy, j.format), message=message)


REFUSALS: tuple[Rule, ...] = (
    *(_kv_layout_refusal(layout) for layout in KV_LAYOUTS.values() if layout.refusal),
    Rule("all", "vLLM's and SGLang's W4A16/W8A16 MoE methods assert symmetric weights "
         "(CompressedTensorsWNA16MarlinMoEMethod / CompressedTensorsWNA16MoEMethod: \"Only symmetric "
         "quantization is supported for MoE\") in vLLM before v0.29.0 (Marlin MoE: before v0.23.0) and "
         "SGLang before v0.5.14, the releases most deployments run; set quant.symmetric=true",
         "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe.py, "
         "CompressedTensorsWNA16MarlinMoEMethod.__init__; SGLang schemes/compressed_tensors_wNa16_moe.py, "
         "CompressedTensorsWNA16MoE.__init__",
         applies=lambda j: _ct(j) and j.weight_only and j.moe, job_fails=lambda j: not j.symmetric),
    Rule("all", "vLLM-Ascend registers no W8A16 MoE scheme (methods/registry.py has no ('W8A16', 'moe'): "
         "AscendModelSlimConfig raises NotImplementedError); use quant=w8a8 quant.act_dynamic=true "
         "(W8A8_DYNAMIC) for Ascend MoE models",
         "vllm_ascend/quantization/modelslim_config.py, create_scheme_for_layer",
         applies=lambda j: _asc(j) and j.moe, job_fails=lambda j: j.scheme == "W8A16"),
    Rule("all", "vLLM-Ascend registers W4A8_DYNAMIC for MoE experts only (@register_scheme(\"W4A8_DYNAMIC\", "
         "\"moe\"); no ('W4A8_DYNAMIC', 'linear') since the W4A8 linear scheme was removed), so a dense model has "
         "nothing to write at 4 bits: use quant=w8a8 quant.act_dynamic=true (W8A8_DYNAMIC) for Ascend, or "
         "output.format=compressed-tensors for W4A8",
         "vllm_ascend/quantization/methods/w4a8.py, AscendW4A8DynamicFusedMoEMethod; methods/registry.py",
         applies=lambda j: _asc(j) and j.scheme == "W4A8_DYNAMIC", job_fails=lambda j: not j.moe),
    Rule("all", "vLLM-Ascend's MLA int8 latent cache (FAKQuant, quant.kv_cache=int8) is decoded on A2/A3 by "
         "npu_mla_prolog_v2 on int8 weights: _process_weights_for_fused_fa_quant reads fused_qkv_a_proj.weight_scale "
         "and q_proj (q_b_proj).weight_scale and the hidden states are quantized per token, so the attention's "
         "q_a_proj / kv_a_proj_with_mqa / q_b_proj must be W8A8 (quant=w8a8, static or dynamic; W4A8 writes them "
         "W8A8_DYNAMIC): use quant=w8a8 for DeepSeek-V3 / Kimi-K2 with quant.kv_cache=int8",
         "vllm_ascend/attention/mla_v1.py, AscendMLAImpl._process_weights_for_fused_fa_quant; "
         "vllm_ascend/device/device_op.py, mla_preprocess_only_decode",
         applies=lambda j: _asc(j) and j.kv_cache is not None and j.kv_layout == "mla",
         job_fails=lambda j: j.scheme not in ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC")),
)

RULES: tuple[Rule, ...] = (
    # -- which server loads which format at all ------------------------------------------------
    Rule(ASCEND, "its quantization configs are msModelSlim's description format and compressed-tensors; an "
         "AWQ-layout path is not verified by dist_quant: use output.format=ascend",
         "vllm_ascend/quantization (AscendModelSlimConfig, AscendCompressedTensorsConfig)",
         applies=lambda j: j.format == "awq", job_fails=lambda j: True),
    *(Rule(s, "loads compressed-tensors, not the msModelSlim description format",
           "its quantization config registry (the ascend format is vLLM-Ascend's AscendModelSlimConfig)",
           applies=_asc, job_fails=lambda j: True) for s in (VLLM, SGLANG, HF)),
    Rule(ASCEND, "compressed-tensors W4A16 has only an MoE scheme on Ascend (no ('W4A16', 'linear')) "
         "and W8A16 none (_detect_quant_type raises NotImplementedError): use output.format=ascend",
         "vllm_ascend/quantization/compressed_tensors_config.py, "
         "AscendCompressedTensorsConfig._create_scheme_for_layer_type",
         applies=lambda j: _ct(j) and j.weight_only, job_fails=lambda j: True),
    Rule(ASCEND, "compressed-tensors static W8A8 needs symmetric input activations on Ascend "
         "(_is_static_tensor_w8a8; ours are asymmetric): use output.format=ascend",
         "vllm_ascend/quantization/compressed_tensors_config.py, AscendCompressedTensorsConfig._detect_quant_type",
         applies=lambda j: _ct(j) and j.scheme == "W8A8", job_fails=lambda j: True),
    Rule(SGLANG, "its int8 W8A8 scheme quantizes activations per token at run time whatever the "
         "checkpoint says (apply_weights → per_token_quant_int8: the static scale is not used, so it "
         "would not compute the calibrated model) and its per-tensor input_scale [1] cannot take "
         "fused q/k/v or gate/up shards: use quant.act_dynamic=true",
         "python/sglang/srt/layers/quantization/compressed_tensors/schemes/compressed_tensors_w8a8_int8.py, "
         "CompressedTensorsW8A8Int8.create_weights / apply_weights",
         applies=lambda j: _ct(j) and j.scheme == "W8A8", job_fails=lambda j: True),
    Rule(SGLANG, "SGLang has no CUDA int8 W8A8 MoE method: get_moe_scheme raises NotImplementedError "
         "(\"The W8A8Int8 Fused MoE scheme is implemented only for NPU for now\", v0.5.8-v0.5.23; "
         "RuntimeError \"Unsupported FusedMoe scheme\" in v0.4.5-v0.5.5)",
         "python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py, "
         "CompressedTensorsConfig.get_moe_scheme",
         applies=lambda j: _ct(j) and j.scheme == "W8A8_DYNAMIC" and j.moe, job_fails=lambda j: True),
    Rule(VLLM, "asymmetric 8-bit weights: Marlin takes zero points only for 4 bits "
         "(query_marlin_supported_quant_types(has_zp=True) = [uint4]); only Machete (Hopper, SM 9.0) runs "
         "uint8 with zero points",
         "vllm/model_executor/layers/quantization/utils/marlin_utils.py, query_marlin_supported_quant_types; "
         "kernels/mixed_precision/machete.py",
         applies=lambda j: _ct(j) and j.scheme == "W8A16" and not j.moe, job_fails=lambda j: not j.symmetric,
         effect="serves it only on Hopper GPUs (Machete)"),
    Rule(SGLANG, "asymmetric 8-bit weights: its CompressedTensorsWNA16 hands them to Marlin, which has "
         "no 8-bit zero-point type (query_marlin_supported_quant_types(has_zp=True) = [uint4])",
         "python/sglang/srt/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py, "
         "CompressedTensorsWNA16.process_weights_after_loading",
         applies=lambda j: _ct(j) and j.scheme == "W8A16" and not j.moe, job_fails=lambda j: not j.symmetric),
    Rule(HF, "transformers cannot load int-quantized (W8A8) MoE experts: its compressed-tensors loader "
         "dequantizes fused experts only from weight_packed",
         "transformers/integrations/compressed_tensors.py, CompressedTensorsDequantize.convert",
         applies=lambda j: _ct(j) and not j.weight_only and j.moe and j.scheme not in ("NVFP4", "NVFP4A16"),
         job_fails=lambda j: True),
    Rule(SGLANG, "not checked: SGLang's compressed-tensors NVFP4 fused-MoE loader has not been read against "
         "the per-expert nvfp4-pack-quantized layout (vLLM's CompressedTensorsW4A4Nvfp4MoEMethod has): serve "
         "NVFP4 MoE models with vLLM",
         "python/sglang/srt/layers/quantization/compressed_tensors/ (not read for NVFP4 MoE)",
         applies=lambda j: _ct(j) and j.moe and j.scheme in ("NVFP4", "NVFP4A16"), job_fails=lambda j: True),
    Rule(HF, "transformers dequantizes NVFP4 routed experts (weight_packed) into its fused float expert "
         "parameters on load, to bfloat16 values that differ from the decoded nvfp4-pack-quantized weights "
         "(observed, transformers 5.24), and runs the fused experts without NVFP4 input activations",
         "transformers/integrations/compressed_tensors.py, CompressedTensorsDequantize.convert",
         applies=lambda j: _ct(j) and j.moe and j.scheme in ("NVFP4", "NVFP4A16"), job_fails=lambda j: True,
         effect="serves, but not exactly the calibrated model"),
    Rule(HF, "transformers fake-quantizes dynamic activations with compressed-tensors' own rule, "
         "max|x| / 127.5, while the servers' int8 kernels (and the calibration) use max|x| / 127",
         "compressed_tensors/quantization/utils/helpers.py, calculate_qparams",
         applies=lambda j: _ct(j) and j.scheme in ("W8A8_DYNAMIC", "W4A8_DYNAMIC") and not j.moe,
         job_fails=lambda j: True,
         effect="serves, but not exactly the calibrated model"),
    Rule(SGLANG, "its compressed-tensors W4A8 int8 scheme is for MoE experts only "
         "(compressed_tensors_w4a8_int8_moe.py); the dense linears have none",
         "python/sglang/srt/layers/quantization/compressed_tensors/schemes/ (no dense W4A8 int scheme)",
         applies=lambda j: _ct(j) and j.scheme == "W4A8_DYNAMIC", job_fails=lambda j: True),
    Rule(ASCEND, "compressed-tensors W4A8_DYNAMIC is registered for MoE experts only (no ('W4A8_DYNAMIC', "
         "'linear') scheme: the dense linears raise NotImplementedError) and per channel only",
         "vllm_ascend/quantization/compressed_tensors_config.py, _create_scheme_for_layer_type; "
         "methods/w4a8.py, AscendW4A8DynamicFusedMoEMethod",
         applies=lambda j: _ct(j) and j.scheme == "W4A8_DYNAMIC", job_fails=lambda j: True),
    Rule(VLLM, "the int8-activation W4A8 kernel is CPU-only: CompressedTensorsW4A8Int picks its kernel with "
         "choose_mp_linear_kernel and Dynamic4bitLinearKernel (int8 per-token activations) returns 'Only CPU is "
         "supported'; on Hopper, per-group int4 with per-token 8-bit activations is matched first as W4AFP8 "
         "(_is_fp8_w4a8_sm90): serve it with vLLM's CPU backend",
         "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py, _get_scheme_from_parts; "
         "schemes/compressed_tensors_w4a8_int.py; kernels/linear/mixed_precision/dynamic_4bit.py, "
         "Dynamic4bitLinearKernel.can_implement",
         applies=lambda j: _ct(j) and j.scheme == "W4A8_DYNAMIC", job_fails=lambda j: True),
    Rule(ASCEND, "W4A8_DYNAMIC experts: process_weights_after_loading views the packed int8 weights as int32 "
         "along the transposed output dimension (_pack_to_int32 asserts a multiple of 4 bytes: "
         "intermediate % 4 == 0 for w13, hidden % 8 == 0 for w2, per tensor-parallel rank)",
         "vllm_ascend/quantization/methods/w4a8.py, AscendW4A8DynamicFusedMoEMethod._pack_to_int32",
         applies=lambda j: _asc(j) and j.scheme == "W4A8_DYNAMIC",
         moe_fails=lambda j, m: m.hidden % 8 != 0 or m.intermediate % 4 != 0),
    Rule(ASCEND, "static W8A8 needs a 16-bit serving dtype: deq_scale exists only for bfloat16 (float32) "
         "and float16 (int64); set output.dtype=bfloat16 or float16",
         "vllm_ascend/quantization/methods/w8a8_static.py, AscendW8A8LinearMethod.get_perchannel_param",
         applies=lambda j: _asc(j) and j.scheme == "W8A8", job_fails=lambda j: j.serve_dtype == "float32"),
    Rule(VLLM, "the MLA latent's scale is written as self_attn.k_proj.k_scale / v_proj.v_scale, which "
         "maybe_remap_kv_scale_name maps to self_attn.mla_attn.mla_attn.{k,v}_scale, but vLLM's compressed-tensors "
         "config attaches its KV-cache method to Attention layers only (get_quant_method: isinstance(layer, "
         "Attention) -> CompressedTensorsKVCacheMethod; MLAAttention is an AttentionLayerBase, not an Attention): "
         "in the code read the MLA layer declares no k_scale parameter, so the scale is skipped ('k_scale is not "
         "loaded') and --kv-cache-dtype fp8 caches the latent with scale 1.0 (code read, not run on a GPU)",
         "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py, "
         "CompressedTensorsConfig.get_quant_method; vllm/model_executor/layers/attention/attention.py, "
         "_init_kv_cache_quant; vllm/model_executor/model_loader/weight_utils.py, maybe_remap_kv_scale_name",
         applies=lambda j: _ct(j) and j.kv_cache is not None and j.kv_layout == "mla", job_fails=lambda j: True,
         effect="serves, but not exactly the calibrated model"),
    # -- FP8 and W4AFP8 (docs/float_formats.md) --------------------------------------------------
    Rule(ASCEND, "vLLM-Ascend has no FP8 or NVFP4 compressed-tensors scheme: its _detect_quant_type matches on "
         "bits and strategy only (_is_dynamic_token_w8a8 / _is_static_tensor_w8a8 / _is_dynamic_token_w4a8 never "
         "read the type, so FP8 would be taken for int8) and has no 4-bit-activation or float W4A16 entry: use "
         "quant=w8a8 or output.format=ascend",
         "vllm_ascend/quantization/compressed_tensors_config.py, AscendCompressedTensorsConfig._detect_quant_type",
         applies=lambda j: _ct(j) and j.scheme in FLOAT_SCHEMES, job_fails=lambda j: True),
    Rule(SGLANG, "SGLang's compressed-tensors W4A8-FP8 scheme exists for MoE experts only "
         "(schemes/compressed_tensors_w4a8_fp8_moe.py; no dense linear scheme)",
         "python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py, _get_scheme_from_parts",
         applies=lambda j: _ct(j) and j.scheme == "W4AFP8", job_fails=lambda j: True),
    Rule(SGLANG, "SGLang's CompressedTensorsW8A8Fp8 creates channel or tensor weight scales only "
         "(create_weights asserts QuantizationStrategy.TENSOR otherwise): no 128x128 block scales",
         "python/sglang/srt/layers/quantization/compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py, "
         "CompressedTensorsW8A8Fp8.create_weights",
         applies=lambda j: _ct(j) and j.scheme == "FP8_BLOCK", job_fails=lambda j: True),
    Rule(HF, "transformers cannot build W4AFP8 layers: from_pretrained fails initialising the int8 weight its "
         "compressed-tensors integration registers for an int scheme with activation quantization "
         "(NotImplementedError in normal_; observed with transformers 5.24, tests/test_float_formats.py); "
         "evaluate with dist_quant.fakequant.load_fake_quant_model",
         "transformers/modeling_utils.py, PreTrainedModel._init_weights (via the compressed-tensors integration)",
         applies=lambda j: _ct(j) and j.scheme == "W4AFP8", job_fails=lambda j: True),
    # -- kernel shape limits ------------------------------------------------------------------
    Rule(SGLANG, f"Marlin (the CUDA W4A16/W8A16 kernel; the only one for bfloat16) needs out_features % "
                 f"{MARLIN_MIN_THREAD_N} == 0, in_features % {MARLIN_MIN_THREAD_K} == 0 and a group size in "
                 f"{list(MARLIN_GROUP_SIZES)} (SGLang pads nothing, v0.5.4-v0.5.23)",
         "python/sglang/srt/layers/quantization/marlin_utils.py, check_marlin_supports_shape",
         applies=lambda j: _ct(j) and j.weight_only, linear_fails=_marlin_linear_fails),
    Rule(VLLM, f"a group size in {list(MARLIN_GROUP_SIZES)} dividing in_features (Marlin; from v0.24.0 "
               "MarlinLinearKernel.can_implement zero-pads misaligned tiles, nothing else remains)",
         "vllm/model_executor/layers/quantization/utils/marlin_utils.py, _check_marlin_supported; "
         "kernels/mixed_precision/marlin.py, MarlinLinearKernel.can_implement",
         applies=lambda j: _ct(j) and j.weight_only, linear_fails=_marlin_linear_fails_padded),
    Rule(VLLM, f"Marlin before v0.24.0 needs out_features % {MARLIN_MIN_THREAD_N} == 0 and in_features % "
               f"{MARLIN_MIN_THREAD_K} == 0 (verify_marlin_supports_shape); v0.24.0 and newer pad the tiles",
         "vllm/model_executor/layers/quantization/utils/marlin_utils.py, verify_marlin_supports_shape",
         applies=lambda j: _ct(j) and j.weight_only, linear_fails=_marlin_linear_needs_new_vllm,
         effect="needs v0.24.0 or newer for"),
    Rule(SGLANG, "fused MoE experts: Marlin MoE needs hidden % 128 == 0, intermediate % max(64, group) == 0 "
                 "and a group size in [-1, 32, 64, 128]; otherwise the Triton WNA16 MoE method, which asserts "
                 "per-group scales (strategy group, not channel)",
         "python/sglang/srt/layers/quantization/marlin_utils.py, check_moe_marlin_supports_layer; "
         "compressed_tensors_moe.py, CompressedTensorsWNA16MoEMethod",
         applies=lambda j: _ct(j) and j.weight_only and j.moe, moe_fails=_wna16_moe_fails),
    Rule(VLLM, "fused MoE experts: Marlin MoE (from v0.25.0 with tile padding) needs hidden % 128 == 0, "
               "intermediate % group == 0 and a group size in [-1, 32, 64, 128]; otherwise the Triton WNA16 MoE "
               "method, which asserts per-group scales (strategy group, not channel)",
         "vllm/model_executor/layers/quantization/utils/marlin_utils.py, check_moe_marlin_supports_layer; "
         "compressed_tensors_moe.py, CompressedTensorsWNA16MoEMethod.__init__",
         applies=lambda j: _ct(j) and j.weight_only and j.moe,
         moe_fails=lambda j, m: _wna16_moe_fails(j, m, padded=True)),
    Rule(VLLM, "fused MoE experts: Marlin MoE before v0.25.0 needs intermediate % max(64, group) == 0 "
               "(no tile padding), and per-channel experts have no Triton fallback",
         "vllm/model_executor/layers/quantization/utils/marlin_utils.py, check_moe_marlin_supports_layer",
         applies=lambda j: _ct(j) and j.weight_only and j.moe, moe_fails=_wna16_moe_needs_new_vllm,
         effect="needs v0.25.0 or newer for"),
)

_FUSE = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)$")
_EXPERT_ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def served_shapes(linears: list[tuple[str, int, int]]) -> tuple[list[Linear], list[MoeLayer]]:
    """(name, out, in) of the quantized checkpoint linears → the fused linears and expert layers
    a server builds from them."""
    fused: dict[str, list[int]] = {}
    moe: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for name, out_f, in_f in linears:
        m = _EXPERT.match(name)
        if m and m.group(3) in _EXPERT_ROLE:
            moe[m.group(1)][_EXPERT_ROLE[m.group(3)]] = (out_f, in_f)
            continue
        prefix, _, leaf = name.rpartition(".")
        key = f"{prefix}.{_FUSE[leaf]}" if leaf in _FUSE else name
        if key in fused:
            fused[key][0] += out_f
        else:
            fused[key] = [out_f, in_f]
    dense = [Linear(k, o, i) for k, (o, i) in fused.items()]
    layers = []
    for name, roles in moe.items():
        if "down" in roles:
            hidden, inter = roles["down"]
        else:
            inter, hidden = next(iter(roles.values()))
        layers.append(MoeLayer(name, hidden, inter))
    return dense, layers


@dataclass
class Finding:
    rule: Rule
    where: list[str] = field(default_factory=list)  # offending linears; empty: the whole output


def check(job: Job, dense: list[Linear], moe: list[MoeLayer], rules: tuple[Rule, ...] = RULES) -> dict[str, list[Finding]]:
    """Per server, the rules this output breaks (an empty list: servable, as far as known)."""
    out: dict[str, list[Finding]] = {s: [] for s in SERVERS}
    for rule in rules:
        if not rule.applies(job):
            continue
        if rule.job_fails is not None and rule.job_fails(job):
            out.setdefault(rule.server, []).append(Finding(rule))
            continue
        where = []
        if rule.linear_fails is not None:
            where += [f"{lin.name} [{lin.out_features}x{lin.in_features}]" for lin in dense
                      if rule.linear_fails(job, lin)]
        if rule.moe_fails is not None:
            where += [f"{m.name} [H={m.hidden}, I={m.intermediate}]" for m in moe if rule.moe_fails(job, m)]
        if where:
            out.setdefault(rule.server, []).append(Finding(rule, where))
    return out


def warnings(job: Job, dense: list[Linear], moe: list[MoeLayer]) -> list[str]:
    """The servers that cannot serve the output and why (one line per reason, naming every server
    it holds for), then one line naming the servers that can."""
    found = check(job, dense, moe)
    grouped: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    for server, findings in found.items():
        for f in findings:
            grouped.setdefault((f.rule.effect, f.rule.why, f.rule.source, tuple(f.where)), []).append(server)
    lines = []
    for (effect, why, source, where), servers in grouped.items():
        who = " and ".join(servers)
        if where:
            shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
            lines.append(f"servability: {who} {effect} {len(where)} linear(s) ({shown}): {why} [{source}]")
        elif effect == "cannot serve":
            lines.append(f"servability: {who} cannot serve this output: {why} [{source}]")
        else:
            lines.append(f"servability: {who} {effect}: {why} [{source}]")
    ok = [s for s, fs in found.items() if not any(f.rule.effect == "cannot serve" for f in fs)]
    lines.append(f"servability: servable by {', '.join(ok) if ok else 'none of ' + ', '.join(SERVERS)} "
                 f"({job.format} {job.scheme}, serving dtype {job.serve_dtype}; shapes at tensor-parallel size 1)")
    return lines


def refuse(job: Job) -> None:
    """Raise a one-line ConfigError for an output no server could load in a correct form."""
    from .config import ConfigError

    for rule in REFUSALS:
        if rule.applies(job) and rule.job_fails is not None and rule.job_fails(job):
            why = rule.message(job) if rule.message is not None else rule.why
            raise ConfigError(f"{job.format} {job.scheme} {'MoE ' if job.moe else ''}output: {why}")


# -- from a job's config and plan ------------------------------------------------------------------

def job_of(cfg, plan, serve_dtype) -> Job:
    """The :class:`Job` of a config and model plan (``serve_dtype``: a torch dtype)."""
    q = cfg.quant
    if q.weight_type == "nvfp4":
        scheme = "NVFP4A16" if q.act_bits is None else "NVFP4"
    elif q.act_bits is None:
        scheme = f"W{q.bits}A16"
    elif q.act_type == "fp8":
        scheme = "W4AFP8" if q.weight_type != "fp8" else {"channel": "FP8_DYNAMIC", "tensor": "FP8",
                                                          "block": "FP8_BLOCK"}[q.weight_strategy]
    elif q.bits == 4:
        scheme = "W4A8_DYNAMIC"
    else:
        scheme = "W8A8_DYNAMIC" if q.act_dynamic else "W8A8"
    return Job(format=cfg.output.format, scheme=scheme, group_size=q.group_size, symmetric=q.symmetric,
               serve_dtype=str(serve_dtype).removeprefix("torch."), model_type=plan.arch.name,
               moe=plan.arch.moe is not None, kv_cache=q.kv_cache, kv_strategy=q.kv_cache_strategy,
               kv_layout=plan.arch.kv_layout.name)


def plan_warnings(cfg, plan, serve_dtype) -> list[str]:
    dense, moe = served_shapes([(lin.name, lin.out_features, lin.in_features) for lin in plan.linears])
    return warnings(job_of(cfg, plan, serve_dtype), dense, moe)
