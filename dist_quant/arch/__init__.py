"""Per-architecture facts as data: where the decoder layers are, which linears each
layer has, in which order their inputs become available (the *stages*), and the *layer
program* that quantizes one decoder layer over the stage API (dist_quant/stage.py):
arch/dense.py for Llama-style layers, arch/moe_block.py for the MoE families.

A new architecture is one entry of ``ARCHS`` (an ``ArchSpec``: names, stage table,
program), its smoothing pairs in arch/smooth_pairs.py, and, when its layer is not one of
the existing shapes, a program file of its own (see docs/architectures.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..kv_layout import MHA, KVLayout
from . import dense


class UnsupportedModel(ValueError):
    """The checkpoint's architecture (or layout) is not one dist_quant can quantize."""


@dataclass(frozen=True)
class Stage:
    """Linears that read the same input; their statistics are taken together."""

    name: str
    linears: tuple[str, ...]  # names relative to the decoder layer, without ".weight"
    expert: int | None = None  # MoE: the routed expert whose linears these are (its input: its tokens)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    stages: tuple[Stage, ...]
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # attribute names used by the staged forward (see dist_quant/layer_forward.py)
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    attn: str = "self_attn"
    mlp: str = "mlp"
    program: Callable = dense.program
    """``program(ctx, xs) -> xs``: quantize one decoder layer and return its outputs."""
    extra_layers_key: str | None = None
    """config.json key counting layers stored after the last decoder layer that transformers does
    not build (multi-token-prediction layers: ``num_nextn_predict_layers``); their tensors are
    written through unquantized and listed in the output's ``ignore``."""
    kv_layout: KVLayout = MHA
    """What the server's KV cache holds for this attention (dist_quant/kv_layout.py): K and V per
    KV head, or MLA's one latent per token."""

    absorbed: tuple[str, ...] = ()
    """Linears (relative to the layer) the server dequantizes at load and folds into other
    weights instead of running them on their quantized input: vLLM's MLA attention builds
    ``W_UK`` / ``W_UV`` from ``kv_b_proj`` (``split_kv_b_proj`` → ``get_and_maybe_dequant_weights``,
    vllm/model_executor/layers/attention/mla_attention.py). With statically calibrated inputs
    they are written weight-only (dist_quant/plan.py, ``LinearInfo.weight_only``)."""

    moe = None  # MoE architectures: a dist_quant.arch.moe.MoeSpec (see MoeArchSpec)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def layer_stages(self, index: int, config: dict) -> tuple[Stage, ...]:
        """The stages of decoder layer ``index`` (MoE architectures vary them per layer)."""
        return self.stages

    def sliding_window(self, index: int, config: dict) -> int | None:
        """Tokens a position of layer ``index`` attends to (itself included), None for full
        causal attention: ``sliding_window`` of config.json (Mistral), restricted to the
        ``sliding_attention`` entries of ``layer_types`` where the config lists them (Qwen2/3)."""
        window = config.get("sliding_window")
        types = config.get("layer_types")
        if not window or (types is not None and (index >= len(types) or types[index] != "sliding_attention")):
            return None
        if types is None and config.get("use_sliding_window") is False:
            return None
        return int(window)

    def loaded_later(self, name: str) -> bool:
        """In-memory parameter names (relative to the layer) the layer load skips because the
        program reads them itself (MoE: routed experts, read one at a time by their owner)."""
        return False

    def memory_name(self, rel: str) -> str:
        """In-memory (transformers module) name of a checkpoint name relative to the layer."""
        return rel

    def checkpoint_name(self, rel: str) -> str:
        """Checkpoint name of an in-memory name relative to the layer (inverse of memory_name)."""
        return rel


DENSE_STAGES = (
    Stage("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Stage("attn_out", ("self_attn.o_proj",)),
    Stage("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    Stage("mlp_out", ("mlp.down_proj",)),
)

ARCHS: dict[str, ArchSpec] = {
    name: ArchSpec(name=name, stages=DENSE_STAGES) for name in ("llama", "qwen2", "qwen3", "mistral")
}

from .moe import MOE_ARCHS  # noqa: E402  (MoE architectures: qwen2_moe, qwen3_moe, mixtral)

ARCHS.update(MOE_ARCHS)

from .deepseek import DEEPSEEK_ARCHS  # noqa: E402  (deepseek_v3, kimi_k2: MLA, arch/mla.py)

ARCHS.update(DEEPSEEK_ARCHS)


def get_arch(model_type: str) -> ArchSpec:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"model_type={model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        ) from None
