"""DeepSeek-V3 / R1 / V3.1 and Kimi-K2 (``DeepseekV3ForCausalLM``) as data: MLA attention,
``first_k_dense_replace`` dense MLPs, then MoE blocks with routed experts, shared experts and a
sigmoid group-limited router; plus the multi-token-prediction (MTP) layers stored after the
last decoder layer. Layer names are the checkpoint's (transformers' ``modeling_deepseek_v3``
uses the same ones, routed experts fused in memory).

Stages (each linear's input in the one-pass order; the layer program is dist_quant/arch/mla.py):

* ``attn_in``: ``q_a_proj`` (or ``q_proj`` when ``q_lora_rank`` is null) and
  ``kv_a_proj_with_mqa``, both reading ``input_layernorm(x)``. vLLM fuses ``q_a_proj`` and
  ``kv_a_proj_with_mqa`` into one ``fused_qkv_a_proj``: sharing a stage gives them one scheme,
  one Hessian and (static activations) one input scale;
* ``q_b``: ``q_b_proj`` reading ``q_a_layernorm(q_a_proj(h))``;
* ``kv_b``: ``kv_b_proj`` reading ``kv_a_layernorm(kv_a_proj_with_mqa(h)[..., :kv_lora_rank])``;
* ``attn_out``: ``o_proj`` reading the attention output;
* dense layers: ``mlp_in`` / ``mlp_out``; MoE layers: ``moe_in`` (router, shared experts'
  gate/up), ``shared_out``, ``expert_in`` / ``expert_out`` per routed expert.

KV cache (``quant.kv_cache=fp8``): the ``mla`` layout of dist_quant/kv_layout.py (the latent
``kv_a_layernorm(kv_c) ‖ k_pe`` after RoPE, one scale; dist_quant/kvcache_mla.py); with
``quant.kv_cache=int8 output.format=ascend`` its ascend variant (vLLM-Ascend FAKQuant: the normed
latent alone, int8; dist_quant/formats/fa_quant.py).

Kimi-K2's config says ``model_type: kimi_k2`` with ``architectures: [DeepseekV3ForCausalLM]``
and an ``auto_map`` to its own code: it is mapped to this spec and to transformers'
``DeepseekV3Config`` explicitly (dist_quant/hf_config.py); no checkpoint code runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kv_layout import MLA
from . import DENSE_STAGES, Stage, UnsupportedModel
from .mla import program as mla_program
from .moe import MOE_STAGE_NAMES, MoeArchSpec, MoeSpec

ATTN = "self_attn."
MLA_STAGE_NAMES = ("attn_in", "q_b", "kv_b", "attn_out")
DEEPSEEK_ARCHITECTURE = "DeepseekV3ForCausalLM"


def mla_stages(config: dict) -> tuple[Stage, ...]:
    if config.get("q_lora_rank") is None:
        return (Stage("attn_in", (ATTN + "q_proj", ATTN + "kv_a_proj_with_mqa")),
                Stage("kv_b", (ATTN + "kv_b_proj",)),
                Stage("attn_out", (ATTN + "o_proj",)))
    return (Stage("attn_in", (ATTN + "q_a_proj", ATTN + "kv_a_proj_with_mqa")),
            Stage("q_b", (ATTN + "q_b_proj",)),
            Stage("kv_b", (ATTN + "kv_b_proj",)),
            Stage("attn_out", (ATTN + "o_proj",)))


@dataclass(frozen=True)
class DeepseekArchSpec(MoeArchSpec):
    """MLA attention + dense MLP (first layers) or MoE block; MTP layers after the last
    (``extra_layers_key``: written through unquantized and ignored, dist_quant/plan.py)."""

    def layer_stages(self, index: int, config: dict) -> tuple[Stage, ...]:
        check_config(self.name, config)
        attn = mla_stages(config)
        if not self.moe.is_sparse(index, config):
            return attn + DENSE_STAGES[2:]
        return attn + super().layer_stages(index, config)[2:]


def check_config(name: str, config: dict) -> None:
    """What transformers' DeepseekV3 classes implement (and the releases use)."""
    arch = config.get("architectures") or [DEEPSEEK_ARCHITECTURE]
    if name == "kimi_k2" and DEEPSEEK_ARCHITECTURE not in arch:
        raise UnsupportedModel(f"model_type='kimi_k2' with architectures={arch!r}: only the "
                               f"{DEEPSEEK_ARCHITECTURE} layout (Kimi-K2-Base/Instruct) is supported")
    for key, want in (("moe_layer_freq", 1), ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if key in config and config[key] != want:
            raise UnsupportedModel(f"config.json {key}={config[key]!r}: the DeepSeek-V3 layout in transformers "
                                   f"(DeepseekV3ForCausalLM) implements {key}={want!r} only")


_DEEPSEEK = MoeSpec(block="mlp", num_experts_keys=("n_routed_experts",), expert_gate="gate_proj",
                    expert_up="up_proj", expert_down="down_proj", shared="shared_experts",
                    first_dense_key="first_k_dense_replace")
# every stage name in processing order, with every linear a stage can hold (the owner plan's
# order, and the smoothing pairs' stage lookup)
_ORDER = (Stage("attn_in", (ATTN + "q_a_proj", ATTN + "q_proj", ATTN + "kv_a_proj_with_mqa")),
          Stage("q_b", (ATTN + "q_b_proj",)), Stage("kv_b", (ATTN + "kv_b_proj",)),
          Stage("attn_out", (ATTN + "o_proj",))) + DENSE_STAGES[2:] + tuple(Stage(n, ()) for n in MOE_STAGE_NAMES)

# kv_b_proj: vLLM dequantizes it at load into W_UK / W_UV (absorbed into the decode attention)
DEEPSEEK_ARCHS = {name: DeepseekArchSpec(name=name, stages=_ORDER, moe=_DEEPSEEK, program=mla_program,
                                         extra_layers_key="num_nextn_predict_layers", kv_layout=MLA,
                                         absorbed=(ATTN + "kv_b_proj",))
                  for name in ("deepseek_v3", "kimi_k2")}
