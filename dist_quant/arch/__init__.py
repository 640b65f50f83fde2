"""Per-architecture facts as data: where the decoder layers are, which linears each
layer has, and in which order their inputs become available (the *stages*)."""
from __future__ import annotations

from dataclasses import dataclass


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

    moe = None  # MoE architectures: a dist_quant.arch.moe.MoeSpec (see MoeArchSpec)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def layer_stages(self, index: int, config: dict) -> tuple[Stage, ...]:
        """The stages of decoder layer ``index`` (MoE architectures vary them per layer)."""
        return self.stages

    def forward_stages(self, index: int, config: dict) -> tuple[Stage, ...]:
        """The stages of layer ``index`` that the layer loop runs with :meth:`stage_ops` (a
        sparse MoE block is run by dist_quant/moe.py)."""
        return self.stages

    def stage_ops(self, layer, position_embeddings, seen=None) -> list:
        """One :class:`dist_quant.layer_forward.StageOps` per stage of :meth:`forward_stages`
        (``seen(name, x)``: what a linear sees of its input, see dist_quant/arch/mla.py)."""
        from ..layer_forward import dense_stage_ops

        return dense_stage_ops(layer, self, position_embeddings)

    def extra_layers(self, config: dict) -> int:
        """Layers stored after the last decoder layer that the model class does not build
        (DeepSeek-V3's multi-token-prediction layer); written through in float."""
        return 0

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

from .deepseek import DEEPSEEK_ARCHS  # noqa: E402  (deepseek_v3, kimi_k2)

ARCHS.update(DEEPSEEK_ARCHS)


def get_arch(model_type: str) -> ArchSpec:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedModel(
            f"model_type={model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        ) from None
