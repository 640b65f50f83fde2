"""The parameters the servers' loaders create for one decoder layer, and how their weight
loaders place checkpoint tensors into them: copied from the loader code (cited per table),
so that tests can check that a dist_quant output fills every parameter exactly.

Read from: vLLM main (``vllm/model_executor/layers/quantization/compressed_tensors/``,
``fused_moe/layer.py``, ``fused_moe/oracle/nvfp4.py``, ``quantization/utils/flashinfer_fp4_moe.py``, ``linear.py``, ``models/{llama,qwen2,qwen2_moe,qwen3_moe,mixtral}.py``),
SGLang (``python/sglang/srt/layers/quantization/compressed_tensors/schemes/``, same tables as
vLLM's for these schemes), vLLM-Ascend (``vllm_ascend/quantization/``, snapshot 182b75e,
2026-08-22). ``params_dtype`` is the serving dtype (config.json ``torch_dtype``).

A :class:`Param` is one ``register_parameter`` of a ``create_weights``; a :class:`Module` is one
server layer (a fused linear or a fused-MoE layer) with the checkpoint prefixes it loads from.
:func:`load` runs the placement rules and returns per-parameter coverage counts and values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

I8, I32, I64, F32, F8 = torch.int8, torch.int32, torch.int64, torch.float32, torch.float8_e4m3fn


@dataclass(frozen=True)
class Param:
    dtype: torch.dtype
    shape: tuple[int, ...]
    out_dim: int | None = 0  # linear: dim the fused shards are stacked along; None: one value for all shards
    out_pack: int = 1  # linear: values packed along out_dim per element (zero points)
    transposed: bool = False  # MoE: the loader transposes the checkpoint tensor (is_transposed)
    single: bool = False  # MoE: one value per expert (weight_shape: FusedMoE._load_single_value)
    per_tensor: bool = False  # MoE: quant_method TENSOR (FusedMoE._load_per_tensor_weight_scale): w1 → [e][0], w3 → [e][1], w2 → [e]
    used: bool = True  # False: loaded, never read at inference (weight_shape)
    exact_dtype: bool = False  # the checkpoint must have exactly this dtype (not a lossless cast)


@dataclass
class Module:
    name: str  # the server's module prefix (what quant configs and descriptions are keyed by)
    kind: str  # "linear" or "moe"
    params: dict[str, Param]
    shards: list[tuple[str, int]] = field(default_factory=list)  # linear: (checkpoint prefix, out size)
    experts: list[dict[str, str]] = field(default_factory=list)  # moe: per expert {"w1"|"w2"|"w3": prefix}


# -- one linear's parameters, per scheme --------------------------------------------------------------

def vllm_wna16(out: int, inp: int, bits: int, group: int, symmetric: bool, pd: torch.dtype) -> dict[str, Param]:
    """CompressedTensorsWNA16.create_weights (vLLM compressed_tensors_wNa16.py; SGLang's copy,
    compressed_tensors_wNa16.py, creates the same): weight_packed PackedvLLMParameter int32
    [out, in // pack_factor]; weight_scale Group/ChannelQuantScaleParameter params_dtype
    [out, in // group]; weight_shape BasevLLMParameter int64 [2]; weight_zero_point (asymmetric)
    PackedvLLMParameter(output_dim=0, packed_dim=0) int32 [out // pack_factor, groups]."""
    pack = 32 // bits
    groups = 1 if group == -1 else inp // group
    p = {"weight_packed": Param(I32, (out, inp // pack), exact_dtype=True),
         "weight_scale": Param(pd, (out, groups), exact_dtype=True),
         "weight_shape": Param(I64, (2,), out_dim=None, used=False)}
    if not symmetric:
        p["weight_zero_point"] = Param(I32, (out // pack, groups), out_pack=pack, exact_dtype=True)
    return p


def vllm_w8a8_int8(out: int, inp: int, static: bool, pd: torch.dtype) -> dict[str, Param]:
    """CompressedTensorsW8A8Int8.create_weights (vLLM compressed_tensors_w8a8_int8.py): weight
    ModelWeightParameter int8 [out, in]; weight_scale ChannelQuantScaleParameter float32 [out, 1];
    static: input_scale BasevLLMParameter float32 [1], input_zero_point (asymmetric)
    BasevLLMParameter int8 [1] — one value for q, k and v (QKVParallelLinear.weight_loader_v2 →
    BasevLLMParameter.load_qkv_weight copies every shard into the same [1])."""
    p = {"weight": Param(I8, (out, inp), exact_dtype=True), "weight_scale": Param(F32, (out, 1))}
    if static:
        p["input_scale"] = Param(F32, (1,), out_dim=None, exact_dtype=True)
        p["input_zero_point"] = Param(I8, (1,), out_dim=None, exact_dtype=True)
    return p


def vllm_w8a8_fp8(out: int, inp: int, strategy: str, static: bool) -> dict[str, Param]:
    """CompressedTensorsW8A8Fp8.create_weights (vLLM compressed_tensors_w8a8_fp8.py, via fp8_utils
    create_fp8_weight_parameter / create_fp8_scale_parameter / create_fp8_input_scale; SGLang's
    compressed_tensors_w8a8_fp8.py creates the same): weight float8_e4m3fn [out, in]; weight_scale
    float32: channel ChannelQuantScaleParameter [out, 1], block BlockQuantScaleParameter
    [ceil(out/128), ceil(in/128)] (each fused shard narrows out/128 rows), tensor
    PerTensorScaleParameter one slot per fused shard, requantized to their max after loading
    (process_fp8_weight_tensor_strategy → requantize_with_max_scale; modelled here as one value all
    shards must agree on, which makes that requantization exact); static: input_scale
    PerTensorScaleParameter float32, its max taken after loading (modelled the same way)."""
    p = {"weight": Param(F8, (out, inp), exact_dtype=True)}
    if strategy == "channel":
        p["weight_scale"] = Param(F32, (out, 1), exact_dtype=True)
    elif strategy == "block":
        p["weight_scale"] = Param(F32, (-(-out // 128), -(-inp // 128)), out_pack=128, exact_dtype=True)
    else:
        p["weight_scale"] = Param(F32, (1,), out_dim=None, exact_dtype=True)
    if static:
        p["input_scale"] = Param(F32, (1,), out_dim=None, exact_dtype=True)
    return p


def vllm_nvfp4(out: int, inp: int, w4a4: bool) -> dict[str, Param]:
    """CompressedTensorsW4A16Fp4.create_weights (compressed_tensors_w4a16_nvfp4.py) and
    CompressedTensorsW4A4Fp4.create_weights (compressed_tensors_w4a4_nvfp4.py): weight_packed
    ModelWeightParameter uint8 [out, in/2]; weight_scale GroupQuantScaleParameter float8_e4m3fn
    [out, in/16]; weight_global_scale PerTensorScaleParameter float32, one slot per fused shard,
    max taken after loading (modelled as one value all shards must agree on); W4A4:
    input_global_scale the same way."""
    p = {"weight_packed": Param(torch.uint8, (out, inp // 2), exact_dtype=True),
         "weight_scale": Param(F8, (out, inp // 16), exact_dtype=True),
         "weight_global_scale": Param(F32, (1,), out_dim=None, exact_dtype=True)}
    if w4a4:
        p["input_global_scale"] = Param(F32, (1,), out_dim=None, exact_dtype=True)
    return p


def vllm_w8a8_fp8_moe(e: int, h: int, i: int, strategy: str) -> dict[str, Param]:
    """CompressedTensorsW8A8Fp8MoEMethod.create_weights (compressed_tensors_moe.py): w13_weight
    float8_e4m3fn [E, 2I, H], w2_weight [E, H, I]; channel: w13_weight_scale float32 [E, 2I, 1],
    w2_weight_scale [E, H, 1]; block: [E, 2·ceil(I/128), ceil(H/128)], [E, ceil(H/128), ceil(I/128)]
    (dynamic activations: no input scales)."""
    p = {"w13_weight": Param(F8, (e, 2 * i, h), exact_dtype=True), "w2_weight": Param(F8, (e, h, i), exact_dtype=True)}
    if strategy == "block":
        p["w13_weight_scale"] = Param(F32, (e, 2 * -(-i // 128), -(-h // 128)), exact_dtype=True)
        p["w2_weight_scale"] = Param(F32, (e, -(-h // 128), -(-i // 128)), exact_dtype=True)
    else:
        p["w13_weight_scale"] = Param(F32, (e, 2 * i, 1), exact_dtype=True)
        p["w2_weight_scale"] = Param(F32, (e, h, 1), exact_dtype=True)
    return p


def vllm_w4a8_int(out: int, inp: int, group: int, pd: torch.dtype) -> dict[str, Param]:
    """CompressedTensorsW4A8Int.create_weights (vLLM compressed_tensors_w4a8_int.py): weight
    ModelWeightParameter int8 [out, in], one int4 value per element (registered again as
    ``weight_packed`` for the kernel); weight_scale Group/ChannelQuantScaleParameter params_dtype
    [out, in // group] ([out, 1] per channel); no zero point."""
    groups = 1 if group == -1 else inp // group
    return {"weight": Param(I8, (out, inp), exact_dtype=True), "weight_scale": Param(pd, (out, groups))}


def ascend_w8a8_static(out: int, inp: int, pd: torch.dtype) -> dict[str, Param]:
    """AscendW8A8LinearMethod (vllm_ascend/quantization/methods/w8a8_static.py): get_weight
    weight int8 [out, in]; get_pertensor_param input_scale params_dtype [1], input_offset int8
    [1] (PerTensorScaleParameter; AscendLinearMethod is not a v2 loader, so
    QKVParallelLinear.weight_loader copies each shard into the same [1]); get_perchannel_param
    quant_bias int32 [out], deq_scale float32 [out] for bfloat16 / int64 [out] for float16 (none
    for float32), weight_scale / weight_offset params_dtype [out, 1]."""
    p = {"weight": Param(I8, (out, inp), exact_dtype=True),
         "input_scale": Param(pd, (1,), out_dim=None, exact_dtype=True),
         "input_offset": Param(I8, (1,), out_dim=None),
         "quant_bias": Param(I32, (out,), exact_dtype=True),
         "weight_scale": Param(pd, (out, 1), exact_dtype=True),
         "weight_offset": Param(pd, (out, 1), exact_dtype=True)}
    if pd == torch.bfloat16:
        p["deq_scale"] = Param(F32, (out,), exact_dtype=True)
    elif pd == torch.float16:
        p["deq_scale"] = Param(I64, (out,), exact_dtype=True)
    return p


def ascend_w8a8_dynamic(out: int, inp: int, pd: torch.dtype) -> dict[str, Param]:
    """AscendW8A8DynamicLinearMethod (w8a8_dynamic.py) and AscendW8A16LinearMethod (w8a16.py):
    weight int8 [out, in]; weight_scale, weight_offset params_dtype [out, 1]."""
    return {"weight": Param(I8, (out, inp), exact_dtype=True),
            "weight_scale": Param(pd, (out, 1), exact_dtype=True),
            "weight_offset": Param(pd, (out, 1), exact_dtype=True)}


# -- fused MoE parameters, per scheme (E experts, hidden H, intermediate I) ---------------------------

def vllm_wna16_moe(e: int, h: int, i: int, bits: int, group: int, pd: torch.dtype) -> dict[str, Param]:
    """CompressedTensorsWNA16MarlinMoEMethod.create_weights (Marlin backend) and
    CompressedTensorsWNA16MoEMethod.create_weights (compressed_tensors_moe*.py): is_transposed=True;
    w13_weight_packed int32 [E, H // pack, 2I], w2_weight_packed int32 [E, I // pack, H];
    w13_weight_scale params_dtype [E, H // group, 2I], w2_weight_scale [E, I // group, H];
    w13/w2_weight_shape [E, 2] (torch.empty default float32). FusedMoE.weight_loader transposes
    the checkpoint tensor for these two methods. (The g_idx parameters are not loaded when the
    checkpoint has none; act-order is off for the fused experts.)"""
    pack = 32 // bits
    g13 = 1 if group == -1 else h // group
    g2 = 1 if group == -1 else i // group
    return {"w13_weight_packed": Param(I32, (e, h // pack, 2 * i), transposed=True, exact_dtype=True),
            "w2_weight_packed": Param(I32, (e, i // pack, h), transposed=True, exact_dtype=True),
            "w13_weight_scale": Param(pd, (e, g13, 2 * i), transposed=True, exact_dtype=True),
            "w2_weight_scale": Param(pd, (e, g2, h), transposed=True, exact_dtype=True),
            "w13_weight_shape": Param(F32, (e, 2), single=True, used=False),
            "w2_weight_shape": Param(F32, (e, 2), single=True, used=False)}


def vllm_nvfp4_moe(e: int, h: int, i: int, w4a4: bool) -> dict[str, Param]:
    """CompressedTensorsW4A4Nvfp4MoEMethod.create_weights (vLLM compressed_tensors_moe.py; the method
    get_moe_method returns for NVFP4 weights with NVFP4 or no input activations, ``use_a16=(input_quant
    is None)``: NVFP4A16 experts load through the same method, its backend chosen for weight-only):
    w13_weight_packed uint8 [E, 2I, H/2], w2_weight_packed uint8 [E, H, I/2] (not transposed);
    w13_weight_scale float8_e4m3fn [E, 2I, H/16], w2_weight_scale [E, H, I/16] (quant_method GROUP:
    FusedMoE._load_model_weight_or_group_weight_scale, w1 first half, w3 second); w13_weight_global_scale
    float32 [E, 2], w2_weight_global_scale float32 [E], w13_input_global_scale float32 [E, 2],
    w2_input_global_scale float32 [E] (quant_method TENSOR: FusedMoE.weight_loader, "weight/input global
    scales" branch → _load_per_tensor_weight_scale: w1 → [e][0], w3 → [e][1], w2 → [e]).
    process_weights_after_loading keeps w13_weight_global_scale[:, 0] only (it warns "w1_weight_global_scale
    must match w3_weight_global_scale" when the two columns differ) and passes 1 / input_global_scale on;
    convert_to_nvfp4_moe_kernel_format → prepare_nvfp4_moe_layer_for_fi_or_cutlass (utils/
    flashinfer_fp4_moe.py) takes ``a13_scale.max()`` / ``a2_scale.max()`` over all experts for the
    FlashInfer backends (is_global_sf_supported_for_nvfp4_backend) and ``a13_scale.max(dim=1)`` (per expert,
    over gate/up) for VLLM_CUTLASS; the MARLIN backend (weight-only) sets both to None. The input global
    scales are created for NVFP4A16 too but never read there (the checkpoint has none: not modelled)."""
    p = {"w13_weight_packed": Param(torch.uint8, (e, 2 * i, h // 2), exact_dtype=True),
         "w2_weight_packed": Param(torch.uint8, (e, h, i // 2), exact_dtype=True),
         "w13_weight_scale": Param(F8, (e, 2 * i, h // 16), exact_dtype=True),
         "w2_weight_scale": Param(F8, (e, h, i // 16), exact_dtype=True),
         "w13_weight_global_scale": Param(F32, (e, 2), per_tensor=True, exact_dtype=True),
         "w2_weight_global_scale": Param(F32, (e,), per_tensor=True, exact_dtype=True)}
    if w4a4:
        p["w13_input_global_scale"] = Param(F32, (e, 2), per_tensor=True, exact_dtype=True)
        p["w2_input_global_scale"] = Param(F32, (e,), per_tensor=True, exact_dtype=True)
    return p


def vllm_w8a8_int8_moe(e: int, h: int, i: int, pd: torch.dtype) -> dict[str, Param]:
    """CompressedTensorsW8A8Int8MoEMethod.create_weights: w13_weight int8 [E, 2I, H], w2_weight
    int8 [E, H, I]; w13_weight_scale float32 [E, 2I, 1], w2_weight_scale float32 [E, H, 1]
    (quant_method CHANNEL); no input scales (dynamic per token only)."""
    return {"w13_weight": Param(I8, (e, 2 * i, h), exact_dtype=True),
            "w2_weight": Param(I8, (e, h, i), exact_dtype=True),
            "w13_weight_scale": Param(F32, (e, 2 * i, 1)), "w2_weight_scale": Param(F32, (e, h, 1))}


def ascend_w8a8_dynamic_moe(e: int, h: int, i: int, pd: torch.dtype) -> dict[str, Param]:
    """AscendW8A8DynamicFusedMoEMethod.get_weight / get_dynamic_quant_param (w8a8_dynamic.py):
    w13_weight int8 [E, 2I, H], w2_weight int8 [E, H, I]; w13_weight_scale / w13_weight_offset
    params_dtype [E, 2I, 1], w2_weight_scale / w2_weight_offset [E, H, 1] (AscendFusedMoEMethod
    sets quant_method CHANNEL)."""
    return {"w13_weight": Param(I8, (e, 2 * i, h), exact_dtype=True),
            "w2_weight": Param(I8, (e, h, i), exact_dtype=True),
            "w13_weight_scale": Param(pd, (e, 2 * i, 1), exact_dtype=True),
            "w13_weight_offset": Param(pd, (e, 2 * i, 1), exact_dtype=True),
            "w2_weight_scale": Param(pd, (e, h, 1), exact_dtype=True),
            "w2_weight_offset": Param(pd, (e, h, 1), exact_dtype=True)}


def ascend_w4a8_dynamic_moe(e: int, h: int, i: int, pd: torch.dtype) -> dict[str, Param]:
    """AscendW4A8DynamicFusedMoEMethod, msModelSlim path (methods/w4a8.py: get_weight,
    get_dynamic_quant_param_modelslim; tensor-parallel size 1): w13_weight int8 [E, I, H] (gate and up
    [I/2, H] each, two int4 a byte along the output dim), w2_weight int8 [E, H/2, I]; w13_weight_scale /
    w13_weight_offset float32 [E, 2I, 1], w2_weight_scale / w2_weight_offset float32 [E, H, 1];
    w13_scale_bias float32 [E, 2I, 1], w2_scale_bias float32 [E, H, 16 // tp] (AscendFusedMoEMethod
    gives *scale_bias quant_method GROUP: w1/w3 halves of dim 1, w2 whole at TP 1). params_dtype unused."""
    return {"w13_weight": Param(I8, (e, i, h), exact_dtype=True),
            "w2_weight": Param(I8, (e, h // 2, i), exact_dtype=True),
            "w13_weight_scale": Param(F32, (e, 2 * i, 1), exact_dtype=True),
            "w13_weight_offset": Param(F32, (e, 2 * i, 1), exact_dtype=True),
            "w2_weight_scale": Param(F32, (e, h, 1), exact_dtype=True),
            "w2_weight_offset": Param(F32, (e, h, 1), exact_dtype=True),
            "w13_scale_bias": Param(F32, (e, 2 * i, 1), exact_dtype=True),
            "w2_scale_bias": Param(F32, (e, h, 16), exact_dtype=True)}


# -- the server's layer: which modules, fused how ----------------------------------------------------

def layer_modules(config: dict, index: int, linear, moe, has_bias: bool, pd: torch.dtype) -> list[Module]:
    """The quantized modules of decoder layer ``index`` as vLLM's model classes build them:
    QKVParallelLinear ``self_attn.qkv_proj`` (stacked_params_mapping q/k/v), RowParallelLinear
    ``o_proj``; dense MLP MergedColumnParallelLinear ``mlp.gate_up_proj`` (gate 0, up 1) +
    ``down_proj``; MoE (qwen2_moe / qwen3_moe ``mlp.experts``, mixtral
    ``block_sparse_moe.experts``, FusedMoE.make_expert_params_mapping: gate/up → w13 shards
    w1/w3, down → w2), qwen2_moe's ``mlp.shared_expert`` a dense MLP. ``linear(out, in)`` and
    ``moe(E, H, I)`` give the parameter tables."""
    mt = config["model_type"]
    p = f"model.layers.{index}."
    h = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    q_size, kv_size = heads * hd, kv * hd
    qkv = linear(q_size + 2 * kv_size, h)
    if has_bias:  # ColumnParallelLinear(bias=True): bias params_dtype [out], output_dim 0
        qkv["bias"] = Param(pd, (q_size + 2 * kv_size,))
    mods = [Module(p + "self_attn.qkv_proj", "linear", qkv,
                   [(p + "self_attn.q_proj", q_size), (p + "self_attn.k_proj", kv_size),
                    (p + "self_attn.v_proj", kv_size)]),
            Module(p + "self_attn.o_proj", "linear", linear(h, q_size), [(p + "self_attn.o_proj", h)])]

    def dense_mlp(prefix: str, inter: int) -> list[Module]:
        return [Module(prefix + "gate_up_proj", "linear", linear(2 * inter, h),
                       [(prefix + "gate_proj", inter), (prefix + "up_proj", inter)]),
                Module(prefix + "down_proj", "linear", linear(h, inter), [(prefix + "down_proj", h)])]

    if mt in ("llama", "qwen2", "qwen3", "mistral"):
        return mods + dense_mlp(p + "mlp.", config["intermediate_size"])
    if mt == "mixtral":
        e, i = config["num_local_experts"], config["intermediate_size"]
        block, names = p + "block_sparse_moe.experts", ("w1", "w2", "w3")
    else:
        e, i = config.get("num_experts") or config["num_local_experts"], config["moe_intermediate_size"]
        block, names = p + "mlp.experts", ("gate_proj", "down_proj", "up_proj")
    experts = [{shard: f"{block}.{x}.{name}" for shard, name in zip(("w1", "w2", "w3"), names)} for x in range(e)]
    mods.append(Module(block, "moe", moe(e, h, i), experts=experts))
    if mt == "qwen2_moe" and config.get("shared_expert_intermediate_size"):
        mods += dense_mlp(p + "mlp.shared_expert.", config["shared_expert_intermediate_size"])
    return mods


def mla_layer_modules(config: dict, index: int, linear, moe) -> list[Module]:
    """The quantized modules of DeepSeek-V3 / Kimi-K2 decoder layer ``index`` as vLLM's
    ``DeepseekV2ForCausalLM`` builds them (models/deepseek_v2.py): ``self_attn.fused_qkv_a_proj``
    (DeepSeekV2FusedQkvAProjLinear, a MergedColumnParallelLinear: mla_params_mapping q_a_proj → shard 0,
    kv_a_proj_with_mqa → 1) when ``q_lora_rank`` is set, else ``q_proj`` and ``kv_a_proj_with_mqa``
    apart; ``q_b_proj``, ``kv_b_proj`` (ColumnParallelLinear), ``o_proj``; the first
    ``first_k_dense_replace`` layers a dense ``mlp.gate_up_proj`` + ``mlp.down_proj``, the others
    ``mlp.experts`` (FusedMoE) and ``mlp.shared_experts`` (DeepseekV2MLP: gate_up_proj, down_proj; the
    router ``mlp.gate`` stays float). ``linear(name, out, in)`` gives each module's parameter table."""
    p, h = f"model.layers.{index}.", config["hidden_size"]
    a = p + "self_attn."
    heads, rank, rope = config["num_attention_heads"], config["kv_lora_rank"], config["qk_rope_head_dim"]
    qk = config["qk_nope_head_dim"] + rope
    kv_b_out = heads * (config["qk_nope_head_dim"] + config["v_head_dim"])

    def one(name: str, out: int, inp: int) -> Module:
        return Module(name, "linear", linear(name, out, inp), [(name, out)])

    mods = []
    if config.get("q_lora_rank") is not None:
        q = config["q_lora_rank"]
        name = a + "fused_qkv_a_proj"
        mods += [Module(name, "linear", linear(name, q + rank + rope, h),
                        [(a + "q_a_proj", q), (a + "kv_a_proj_with_mqa", rank + rope)]),
                 one(a + "q_b_proj", heads * qk, q)]
    else:
        mods += [one(a + "q_proj", heads * qk, h), one(a + "kv_a_proj_with_mqa", rank + rope, h)]
    mods += [one(a + "kv_b_proj", kv_b_out, rank), one(a + "o_proj", h, heads * config["v_head_dim"])]

    def mlp(prefix: str, inter: int) -> list[Module]:
        name = prefix + "gate_up_proj"
        return [Module(name, "linear", linear(name, 2 * inter, h), [(prefix + "gate_proj", inter),
                                                                  (prefix + "up_proj", inter)]),
                one(prefix + "down_proj", h, inter)]

    if index < config.get("first_k_dense_replace", 0):
        return mods + mlp(p + "mlp.", config["intermediate_size"])
    e, i = config["n_routed_experts"], config["moe_intermediate_size"]
    block = p + "mlp.experts"
    experts = [{"w1": f"{block}.{x}.gate_proj", "w2": f"{block}.{x}.down_proj", "w3": f"{block}.{x}.up_proj"}
               for x in range(e)]
    mods.append(Module(block, "moe", moe(e, h, i), experts=experts))
    return mods + mlp(p + "mlp.shared_experts.", i * config["n_shared_experts"])


# -- placement (the weight loaders) -----------------------------------------------------------------

class LoadError(AssertionError):
    pass


@dataclass
class Loaded:
    values: dict[str, torch.Tensor]  # float64 copies of what the loader put in each parameter
    counts: dict[str, torch.Tensor]  # how many checkpoint tensors wrote each element
    consumed: set[str]  # checkpoint tensor names the loader consumed


def _put(name: str, p: Param, loaded: torch.Tensor, out: Loaded, index) -> None:
    if p.exact_dtype and loaded.dtype != p.dtype:
        raise LoadError(f"{name}: checkpoint dtype {loaded.dtype}, loader parameter {p.dtype}")
    cast = loaded.to(p.dtype)
    if p.dtype == F8 or loaded.dtype == F8:  # no float8 comparison kernels: compare the bytes
        if loaded.dtype != p.dtype:
            raise LoadError(f"{name}: {loaded.dtype} → {p.dtype} is not exact")
    elif not torch.equal(cast.to(loaded.dtype), loaded):
        raise LoadError(f"{name}: {loaded.dtype} → {p.dtype} is not exact")
    view = out.values[name][index] if index is not None else out.values[name]
    counts = out.counts[name][index] if index is not None else out.counts[name]
    if tuple(view.shape) != tuple(cast.shape):
        raise LoadError(f"{name}: checkpoint slice {tuple(cast.shape)} into parameter slice {tuple(view.shape)}")
    if p.used and p.out_dim is None and bool((counts > 0).any()) and not torch.equal(view, cast.double()):
        raise LoadError(f"{name}: the shards sharing this parameter carry different values "
                        f"({view.flatten().tolist()} vs {cast.double().flatten().tolist()})")
    view.copy_(cast.double())
    counts += 1


def load(modules: list[Module], tensors: dict[str, torch.Tensor]) -> Loaded:
    """Place ``tensors`` (checkpoint name → tensor) into the modules' parameters the way the
    servers' weight loaders do; raise :class:`LoadError` where a loader would fail or lose bits."""
    out = Loaded({}, {}, set())
    for m in modules:
        for suffix, p in m.params.items():
            key = f"{m.name}.{suffix}"
            out.values[key] = torch.zeros(p.shape, dtype=torch.float64)
            out.counts[key] = torch.zeros(p.shape, dtype=torch.int64)
    for m in modules:
        if m.kind == "linear":
            offset = 0
            for ckpt_prefix, size in m.shards:
                for name in [n for n in tensors if n.startswith(ckpt_prefix + ".")]:
                    suffix = name[len(ckpt_prefix) + 1:]
                    if suffix not in m.params:
                        raise LoadError(f"{name}: the server's {m.name} has no parameter {suffix!r}")
                    p, key = m.params[suffix], f"{m.name}.{suffix}"
                    if p.out_dim is None:
                        index = None
                    else:  # QKV / MergedColumn weight_loader: narrow the output dim (packed units)
                        index = tuple([slice(None)] * p.out_dim + [slice(offset // p.out_pack,
                                                                         (offset + size) // p.out_pack)])
                    _put(key, p, tensors[name], out, index)
                    out.consumed.add(name)
                offset += size
        else:  # FusedMoE.weight_loader
            for e, shards in enumerate(m.experts):
                for shard, ckpt_prefix in shards.items():
                    for name in [n for n in tensors if n.startswith(ckpt_prefix + ".")]:
                        suffix = name[len(ckpt_prefix) + 1:]
                        key_suffix = ("w2_" if shard == "w2" else "w13_") + suffix
                        if key_suffix not in m.params:
                            raise LoadError(f"{name}: the server's {m.name} has no parameter {key_suffix!r}")
                        p, key = m.params[key_suffix], f"{m.name}.{key_suffix}"
                        t = tensors[name]
                        if p.transposed and t.dim() == 2:
                            t = t.t().contiguous()
                        if p.per_tensor:  # _load_per_tensor_weight_scale: a one-element tensor per slot
                            if t.numel() != 1:
                                raise LoadError(f"{name}: {tuple(t.shape)} into a per-tensor slot")
                            t = t.reshape(())
                            index = (e,) if shard == "w2" else (e, 0 if shard == "w1" else 1)
                        elif p.single:
                            index = (e,)
                        else:
                            dim = 1 if p.transposed else 0  # SHARD_ID_TO_SHARDED_DIM w1/w3: 0, flipped
                            full = p.shape[1 + dim]
                            if shard == "w2":
                                index = (e,)
                            else:
                                half = full // 2
                                lo = 0 if shard == "w1" else half
                                sl = [slice(None), slice(None)]
                                sl[dim] = slice(lo, lo + half)
                                index = (e, *sl)
                        _put(key, p, t, out, index)
                        out.consumed.add(name)
    return out


def check_complete(modules: list[Module], loaded: Loaded) -> None:
    """Every parameter element written (sharded ones exactly once); raise otherwise."""
    for m in modules:
        for suffix, p in m.params.items():
            key = f"{m.name}.{suffix}"
            c = loaded.counts[key]
            if bool((c == 0).any()):
                raise LoadError(f"{key}: {int((c == 0).sum())} of {c.numel()} elements never loaded")
            if p.out_dim is not None and not p.single and not p.per_tensor and bool((c > 1).any()):
                raise LoadError(f"{key}: shards overlap")


# -- vLLM-Ascend's description lookup (modelslim_config.py) --------------------------------------------

# packed_modules_model_mapping entries of the model types used here; others fall back to the vLLM
# model class's packed_modules_mapping (qkv_proj, gate_up_proj), which has no "experts" entry
ASCEND_PACKED = {"qwen3_moe": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
                               "experts": ["experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"]}}
VLLM_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
# (quant_type, layer_type) pairs registered by @register_scheme in vllm_ascend/quantization/methods/
ASCEND_SCHEMES = {("W8A8", "linear"), ("W8A8_DYNAMIC", "linear"), ("W8A8_DYNAMIC", "moe"), ("W8A16", "linear"),
                  ("W4A16", "moe"), ("W4A8_DYNAMIC", "moe"), ("FAKQuant", "attention")}


def ascend_quant_type(desc: dict, prefix: str, model_type: str, layer_type: str) -> str:
    """get_linear_quant_type + get_scheme_class: the type vLLM-Ascend picks for a server module
    (KeyError where the description lacks the key it looks up; shards must agree)."""
    mapping = ASCEND_PACKED.get(model_type, VLLM_PACKED)
    proj = prefix.split(".")[-1]
    if proj in mapping:
        kinds = {desc[prefix.replace(proj, shard) + ".weight"] for shard in mapping[proj]}
        if len(kinds) != 1:
            raise LoadError(f"{prefix}: shards typed {sorted(kinds)}")
        kind = kinds.pop()
    else:
        kind = desc[prefix + ".weight"]
    if kind != "FLOAT" and (kind, layer_type) not in ASCEND_SCHEMES:
        raise LoadError(f"{prefix}: vLLM-Ascend has no scheme for ({kind!r}, {layer_type!r})")
    return kind


LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# -- KV-cache scales: the attention layer's parameters and the loaders' renames -----------------------

def vllm_kv_cache(kv_heads: int, strategy: str) -> dict[str, Param]:
    """vLLM ``CompressedTensorsKVCacheMethod.create_weights``: ``k_scale`` / ``v_scale`` float32
    [num_kv_heads] for attn_head (its ``_tp_aware_loader`` flattens LLM-Compressor's
    ``[num_heads, 1, 1]``), [1] for tensor (the default loader copies a one-element tensor)."""
    n = kv_heads if strategy == "attn_head" else 1
    return {"k_scale": Param(F32, (n,), out_dim=None), "v_scale": Param(F32, (n,), out_dim=None)}


def vllm_kv_name(name: str) -> str | None:
    """vLLM's ``maybe_remap_kv_scale_name`` (model_loader/weight_utils.py) for the compressed-tensors
    names: ``<layer>.self_attn.k_scale`` → ``<layer>.self_attn.attn.k_scale`` (None: not a KV scale)."""
    for k in ("k_scale", "v_scale"):
        if name.endswith(".self_attn." + k):
            return name[: -len(k)] + "attn." + k
    return None


VLLM_KV_SCALE_PATTERNS = (  # maybe_remap_kv_scale_name's scale_mapping_patterns, in order (k/v part)
    (r"\.self_attn\.([kv])_proj\.([kv])_scale$", r".self_attn.{attn}.\2_scale"),  # ModelOpt: MLA-aware
    (r"\.self_attn\.qkv_proj\.([kv])_scale$", r".self_attn.attn.\1_scale"),
    (r"\.self_attn\.qkqkv_proj\.([kv])_scale$", r".self_attn.attn.\1_scale"),
    (r"\.mixer\.[kv]_proj\.([kv])_scale$", r".mixer.attn.\1_scale"),
    (r"\.([qkv])_scale$", r".attn.\1_scale"),  # default
)


def vllm_remap_kv_scale_name(name: str, params: set[str]) -> str | None:
    """vLLM's ``maybe_remap_kv_scale_name`` (model_loader/weight_utils.py, the regex version):
    ``attn_str`` is ``mla_attn.mla_attn`` when any parameter name holds ``mla_attn`` (DeepSeek's
    ``DeepseekV2MLAAttention.mla_attn`` wrapper → its ``MLAAttention``), else ``attn``; the first
    matching pattern decides; a remapped name the model does not have is dropped (None, "is not
    loaded"); other names pass unchanged."""
    attn = "mla_attn.mla_attn" if any("mla_attn" in p for p in params) else "attn"
    if not name.endswith((".k_scale", ".v_scale", ".q_scale")):
        return name
    for pattern, replacement in VLLM_KV_SCALE_PATTERNS:
        if re.search(pattern, name):
            remapped = re.sub(pattern, replacement.replace("{attn}", attn), name)
            return remapped if remapped in params else None
    return name


def vllm_mla_kv_params(layers: int) -> set[str]:
    """The KV-scale parameter names of vLLM's DeepseekV2 MLA model when a KV-cache method is
    attached to its ``MLAAttention`` (``BaseKVCacheMethod.create_weights``: ``k_scale``,
    ``v_scale``; the module path ``model.layers.N.self_attn`` (DeepseekV2MLAAttention) ``.mla_attn``
    (MultiHeadLatentAttentionWrapper) ``.mla_attn`` (MLAAttention))."""
    return {f"model.layers.{i}.self_attn.mla_attn.mla_attn.{k}_scale" for i in range(layers) for k in "kv"}


def vllm_kv_load(tensor: torch.Tensor, p: Param) -> torch.Tensor:
    """What lands in the parameter: flattened (attn_head loader) and cast to float32 exactly."""
    flat = tensor.flatten()
    if tuple(flat.shape) != p.shape:
        raise LoadError(f"KV scale of {tuple(tensor.shape)} into parameter {p.shape}")
    cast = flat.to(p.dtype)
    if not torch.equal(cast.to(tensor.dtype), flat):
        raise LoadError(f"KV scale {tensor.dtype} → {p.dtype} is not exact")
    return cast


# vLLM-Ascend AscendModelSlimConfig.get_cache_scale_mapper (enable_c8_quant: kv_cache_type == "C8")
ASCEND_C8_RENAMES = {".k_proj.kv_cache_scale": ".attn.k_cache_scale", ".k_proj.kv_cache_offset": ".attn.k_cache_offset",
                     ".v_proj.kv_cache_scale": ".attn.v_cache_scale", ".v_proj.kv_cache_offset": ".attn.v_cache_offset"}


def ascend_c8_load(desc: dict, tensors: dict[str, torch.Tensor], kv_heads: int, head_dim: int,
                   pd: torch.dtype) -> dict[str, torch.Tensor]:
    """AscendC8KVCacheAttentionMethod: the C8 layers are those whose description has a
    ``k_proj.kv_cache_scale`` key (``_add_kvcache_quant_metadata``); parameters ``k_cache_scale`` ...
    in ``params_dtype`` (``_c8_kv_scale_weight_loader``: squeeze, cast); the backend
    (``_prepare_c8_scales``) takes one value or ``num_kv_heads · head_size``. Returns the
    server names → loaded values."""
    if desc.get("kv_cache_type") != "C8":
        raise LoadError("kv_cache_type is not C8: vLLM-Ascend does not enable the C8 KV cache")
    layers = {k.split(".k_proj.kv_cache_scale")[0] for k in desc if k.endswith("k_proj.kv_cache_scale")}
    out = {}
    for attn in sorted(layers):
        for suffix, target in ASCEND_C8_RENAMES.items():
            t = tensors[attn + suffix].squeeze()
            cast = t.to(pd)
            if not torch.equal(cast.to(t.dtype), t):
                raise LoadError(f"{attn + suffix}: {t.dtype} → {pd} is not exact")
            if cast.numel() not in (1, kv_heads * head_dim):
                raise LoadError(f"{attn + suffix}: {cast.numel()} values; the C8 backend takes 1 or "
                                f"{kv_heads * head_dim}")
            out[attn + target] = cast
    return out


# vLLM-Ascend FAKQuant, the MLA int8 latent cache (snapshot 182b75e): AscendModelSlimConfig
# get_cache_scale_mapper (enable_fa_quant: fa_quant_type non-empty)
ASCEND_FA_RENAMES = {f".{b}.{leaf}": f".mla_attn.mla_attn.{b}.{leaf}"
                     for b in ("fa_q", "fa_k", "fa_v") for leaf in ("scale", "offset")}


def _fa_quant_weight_loader(param: torch.Tensor, loaded: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """methods/kv_c8.py ``_fa_quant_weight_loader``: a one-value parameter is filled with the
    one-value tensor's ``item()``; otherwise dim 0 is narrowed to this TP rank's rows and copied
    (``param.data.copy_``: cast to the parameter's dtype, which must be exact here)."""
    if param.numel() == 1 and loaded.numel() == 1:
        part = loaded.reshape(param.shape)
    else:
        shard = loaded.shape[0] // tp
        part = loaded.narrow(0, shard * rank, shard)
        if part.shape != param.shape:
            raise LoadError(f"[vllm-ascend/FAKQuant] Attempted to load weight ({tuple(part.shape)}) into parameter "
                            f"({tuple(param.shape)}) when TP size is {tp} and TP rank is {rank}")
    cast = part.to(param.dtype)
    if not torch.equal(cast.to(part.dtype), part):
        raise LoadError(f"FAKQuant {part.dtype} → {param.dtype} is not exact")
    return cast


def ascend_fa_load(desc: dict, tensors: dict[str, torch.Tensor], num_heads: int, kv_lora_rank: int,
                   pd: torch.dtype, tp: int = 1, rank: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """What vLLM-Ascend builds from a FAKQuant checkpoint for each quantized MLA layer, keyed by the
    server's ``<attn>.mla_attn.mla_attn`` prefix. ``_add_kvcache_quant_metadata``: enabled by a
    non-empty ``fa_quant_type``, the layers are the ids of the keys containing ``fa_k.scale``;
    ``get_quant_type_for_layer`` (attention) returns ``fa_quant_type``, which must be a registered
    attention scheme (``@register_scheme("FAKQuant", "attention")``); ``AscendFAQuantAttentionMethod.
    create_weights``: ``fa_q.scale`` [num_heads / tp, 1] and ``fa_k`` / ``fa_v.scale`` [num_kv_heads
    = 1, 1] in the default (serving) dtype, offsets int8; ``process_weights_after_loading``:
    ``fak_descale_float`` = fa_k.scale squeezed, unsqueezed, as float [1] (the decode attention's
    ``dequant_scale_key`` / ``dequant_scale_value``), ``quant_kscale`` = 1 / fa_k.scale repeated [1, kv_lora_rank] (the
    prolog's ``quant_scale_ckv``), ``fak_offset`` (the PD-transfer quantizer's offset)."""
    kind = desc.get("fa_quant_type", "")
    if kind == "":
        raise LoadError("fa_quant_type is empty: vLLM-Ascend does not enable FAKQuant")
    if (kind, "attention") not in ASCEND_SCHEMES:
        raise LoadError(f"fa_quant_type {kind!r}: vLLM-Ascend has no such attention scheme")
    layers = sorted({int("".join(re.findall(r"\.(\d+)\.", k))) for k in desc if "fa_k.scale" in k})
    params = {"fa_q.scale": (num_heads // tp, 1, pd), "fa_k.scale": (1, 1, pd), "fa_v.scale": (1, 1, pd),
              "fa_q.offset": (num_heads // tp, 1, I8), "fa_k.offset": (1, 1, I8), "fa_v.offset": (1, 1, I8)}
    out = {}
    for i in layers:
        attn = f"model.layers.{i}.self_attn"
        loaded = {}
        for suffix, target in ASCEND_FA_RENAMES.items():
            rows, cols, dt = params[suffix[1:]]
            loaded[suffix[1:]] = _fa_quant_weight_loader(torch.empty(rows, cols, dtype=dt), tensors[attn + suffix],
                                                         tp, rank)
        fa_k_scale = loaded["fa_k.scale"].squeeze().unsqueeze(0)
        loaded["fak_descale_float"] = fa_k_scale.float()
        loaded["fak_offset"] = loaded["fa_k.offset"].squeeze().unsqueeze(0).to(fa_k_scale.dtype)
        loaded["quant_kscale"] = 1.0 / fa_k_scale.repeat(kv_lora_rank).view(1, kv_lora_rank).float()
        out[attn + ".mla_attn.mla_attn"] = loaded
    return out
