"""Calibration activations stored in one dtype, computed in another (``model.activation_dtype``).

The layer loop holds every batch of a rank's calibration samples between stages: the
residual stream, a stage's normed inputs and the widest of them all, down_proj's
``act(gate)·up`` (intermediate-size wide). In float32 that is 4 bytes an element; held in
the model's own dtype (bfloat16) it is 2, while every batch is still *computed* in float32
(``model.dtype``): a batch is cast up when it enters a module of the layer and the module's
result is cast back down when the outermost call returns. So

* inputs of dtype ``storage`` are cast to ``compute`` on entry of every module call (inner
  modules then see ``compute`` tensors already: nothing to do);
* the floating outputs of an *outermost* call (depth 0: ``norm(x)``, attention up to
  o_proj's input, ``o_proj(y)``, the MLP up to down_proj's input, ``down_proj(a)``) are cast
  to ``storage``; inner results (q/k/v, scores, ``gate(h)``) stay ``compute``;
* statistics read the stored tensors (HessianStat converts each chunk to float32), so the
  Hessians are those of the activations as stored, i.e. as a bfloat16 model holds them.

Residual sums ``x + o_proj(y)`` are then additions of two bfloat16 tensors, which torch
computes in float32 and rounds once, as a bfloat16 model does. With ``storage == compute``
nothing is hooked and the run is bit-identical to one without the setting.

Wired for the dense layer program (llama / qwen2 / qwen3 / mistral families) and
weight-only methods (GPTQ, RTN, AWQ, the fallback pre-pass); MoE and MLA programs,
activation quantization and the AutoRound layer solver read activations outside module
calls and are refused with one line (:func:`check`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .formats.serving import BY_NAME as DTYPES  # dtype names → torch dtypes


def storage_dtype(cfg) -> torch.dtype:
    """The dtype calibration activations are held in (``model.activation_dtype``, default model.dtype)."""
    return DTYPES[cfg.model.activation_dtype or cfg.model.dtype]


def split(cfg) -> bool:
    """Whether storage and compute dtypes differ (the hooks are needed)."""
    return storage_dtype(cfg) != DTYPES[cfg.model.dtype]


def check(cfg, plan) -> None:
    """One-line ConfigError for the combinations the storage split is not wired for."""
    if not split(cfg):
        return
    from .config import ConfigError

    what = f"model.activation_dtype={cfg.model.activation_dtype} with model.dtype={cfg.model.dtype}"
    if plan.arch.moe is not None or plan.arch.program.__module__ != "dist_quant.arch.dense":
        raise ConfigError(f"{what}: only dense (Llama-style) layers are supported so far, not {plan.arch.name}")
    if cfg.quant.act_bits is not None or cfg.quant.kv_cache is not None:
        raise ConfigError(f"{what}: activation / KV-cache quantization is not supported with it yet")
    if cfg.quant.method == "autoround":
        raise ConfigError(f"{what}: quant.method=autoround is not supported with it yet")


def _cast(value, src: torch.dtype, dst: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dst) if value.dtype == src else value
    if isinstance(value, tuple):
        return tuple(_cast(v, src, dst) for v in value)
    if isinstance(value, list):
        return [_cast(v, src, dst) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, src, dst) for k, v in value.items()}
    return value


class StorageCast:
    """Forward hooks on every module of a layer implementing the rules of the module docstring."""

    def __init__(self, storage: torch.dtype, compute: torch.dtype):
        self.storage, self.compute = storage, compute
        self.depth = 0
        self._handles: list = []

    def up(self, value):
        return _cast(value, self.storage, self.compute)

    def down(self, value):
        return _cast(value, self.compute, self.storage)

    def _pre(self, module, args, kwargs):
        self.depth += 1
        return self.up(args), self.up(kwargs)

    def _post(self, module, args, kwargs, output):
        self.depth -= 1
        if self.depth == 0 and output is not None:
            return self.down(output)
        return None

    def attach(self, layer: nn.Module) -> None:
        for m in layer.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.depth = 0

    @contextlib.contextmanager
    def outermost(self):
        """A call whose result the caller keeps (``input_of`` with a child replaced by a module
        without hooks, ``inputs_of`` stopped by an exception): casts the result down and
        restores the depth however the forward ended."""
        depth = self.depth
        try:
            yield self
        finally:
            self.depth = depth
