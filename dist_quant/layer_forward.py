"""Decoder layers built from the transformers model class (on the meta device, then
filled one at a time from the checkpoint) and run *stage by stage*: each stage yields the
input of a group of linears, so their statistics can be taken and their weights
quantized before the next stage runs with the quantized weights (one forward per layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .arch import ArchSpec
from .checkpoint import Checkpoint


@dataclass
class Skeleton:
    model: nn.Module  # on the meta device: no memory
    rotary: nn.Module
    dtype: torch.dtype

    def layer(self, index: int) -> nn.Module:
        return self.model.model.layers[index]


def build_skeleton(model_dir: str, dtype: torch.dtype, device: torch.device) -> Skeleton:
    from transformers import AutoModelForCausalLM

    from .checkpoint import read_json
    from .hf_config import hf_config

    config = hf_config(read_json(Path(model_dir) / "config.json", "config.json"))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    rotary = type(model.model.rotary_emb)(config=config).to(device)
    return Skeleton(model, rotary, dtype)


def load_layer(skel: Skeleton, ckpt: Checkpoint, arch: ArchSpec, index: int, device: torch.device) -> nn.Module:
    """Layer ``index`` filled from the checkpoint, except the parameters the architecture's
    program reads itself (``arch.loaded_later``: MoE routed experts, which stay on the meta
    device; their owners read them one expert at a time)."""
    layer = skel.layer(index)
    prefix = arch.layer_prefix(index)
    names = list(layer.state_dict())
    later = [n for n in names if arch.loaded_later(n)]
    state = {name: ckpt.get(prefix + arch.checkpoint_name(name)).to(device=device, dtype=skel.dtype)
             for name in names if not arch.loaded_later(name)}
    if not later:
        layer.to_empty(device=device)
        layer.load_state_dict(state, strict=True)
        return layer
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    bad = [n for n in missing if not arch.loaded_later(n)] + list(unexpected)
    if bad:
        raise RuntimeError(f"layer {index}: could not load {bad[:3]}")
    return layer


def unload_layer(layer: nn.Module) -> None:
    layer.to(device="meta")


def _without(module: nn.Module, child: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` with ``module.<child>`` replaced by identity (yields that child's input)."""
    original = getattr(module, child)
    setattr(module, child, nn.Identity())
    try:
        return fn()
    finally:
        setattr(module, child, original)


@dataclass(frozen=True)
class StageOps:
    """How to obtain a stage's input from the previous stage's input / the residual stream,
    and how the residual stream advances once the stage's linears are quantized."""

    make_input: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, prev_input) -> input
    advance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # (x, input) -> new x


def dense_stage_ops(layer: nn.Module, arch: ArchSpec, position_embeddings) -> list[StageOps]:
    """Llama-style layer: x → norm → q/k/v → attention → o (+x) → norm → gate/up → act·mul → down (+x)."""
    attn = getattr(layer, arch.attn)
    mlp = getattr(layer, arch.mlp)

    def attn_core(h: torch.Tensor) -> torch.Tensor:
        return _without(attn, "o_proj", lambda: attn(hidden_states=h, position_embeddings=position_embeddings,
                                                     attention_mask=None)[0])

    def mlp_core(h: torch.Tensor) -> torch.Tensor:
        return _without(mlp, "down_proj", lambda: mlp(h))

    return [
        StageOps(lambda x, _: getattr(layer, arch.input_norm)(x), None),
        StageOps(lambda x, prev: attn_core(prev), lambda x, a: x + attn.o_proj(a)),
        StageOps(lambda x, _: getattr(layer, arch.post_attn_norm)(x), None),
        StageOps(lambda x, prev: mlp_core(prev), lambda x, d: x + mlp.down_proj(d)),
    ]
