"""Independent reference code for the MoE tests: reading a dist_quant output directory with
our own int32 unpacker, and a *fake-quant* float model (the original transformers model
whose quantized linears — experts included, written per expert under checkpoint names —
are replaced by the dequantized weights of the output).

Nothing here imports ``dist_quant``."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from reference import read_tensors, unpack_int32


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """compressed-tensors pack-quantized ``weight_packed`` → signed integers [out, in]."""
    return unpack_int32(packed, bits, shape[1], dim=1)


@dataclass
class QLinear:
    q: torch.Tensor  # int64 [out, in]
    scale: torch.Tensor  # [out, groups]
    zero: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        cols = self.q.shape[1] // self.scale.shape[1]
        s = self.scale.float().repeat_interleave(cols, dim=1)
        z = 0 if self.zero is None else self.zero.float().repeat_interleave(cols, dim=1)
        return (self.q.float() - z) * s


def quantized_linears(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, QLinear]:
    """pack-quantized (``weight_packed``) and int-quantized (int8 ``weight``) linears."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight") and t.dtype == torch.int8 and name + "_scale" in tensors:
            out[name[: -len(".weight")]] = QLinear(t.long(), tensors[name + "_scale"], None)
        if name.endswith(".weight_packed"):
            base = name[: -len(".weight_packed")]
            shape = tuple(tensors[base + ".weight_shape"].tolist())
            assert base + ".weight_zero_point" not in tensors, "asymmetric outputs are not read here"
            out[base] = QLinear(unpack(t, bits, shape), tensors[base + ".weight_scale"], None)
    return out


def weight_bits(out_dir: Path) -> int:
    qc = json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"]
    return qc["config_groups"]["group_0"]["weights"]["num_bits"]


# checkpoint name of an expert linear → (in-memory layer prefix, fused parameter, which rows)
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$")
_ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def load_fake_quant(model_dir: Path, out_dir: Path, dtype=torch.float32, attn: str = "eager",
                    tensors: dict[str, torch.Tensor] | None = None, qlinears: dict[str, QLinear] | None = None):
    """The float model of ``model_dir`` with every linear quantized in ``out_dir`` replaced by
    its dequantized weight (routed experts into the fused in-memory tensors), and every float
    tensor of ``out_dir`` (norms changed by smoothing, biases, router, ...) copied in: the
    output checkpoint, dequantized, without transformers' loader. ``tensors`` / ``qlinears``:
    the output's tensors and quantized linears as a caller read them (another format)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn).eval()
    params = dict(model.named_parameters())
    done = set()
    tensors = read_tensors(out_dir) if tensors is None else tensors
    qlinears = quantized_linears(tensors, weight_bits(out_dir)) if qlinears is None else qlinears
    with torch.no_grad():
        for name, t in tensors.items():
            base = name.rsplit(".", 1)[0]
            mem = name.replace(".block_sparse_moe.", ".mlp.")
            if not (name.endswith(".weight") and base in qlinears) and t.is_floating_point() and mem in params:
                params[mem].copy_(t.to(dtype))
        for name, ql in qlinears.items():
            w = ql.dequantize().to(dtype)
            m = _EXPERT.match(name)
            if m:
                layer, e, role = m.group(1), int(m.group(3)), _ROLE[m.group(4)]
                if role == "down":
                    params[f"{layer}.mlp.experts.down_proj"][e].copy_(w)
                else:
                    fused = params[f"{layer}.mlp.experts.gate_up_proj"][e]
                    inter = fused.shape[0] // 2
                    (fused[:inter] if role == "gate" else fused[inter:]).copy_(w)
            else:
                mem = name.replace(".block_sparse_moe.", ".mlp.")
                params[mem + ".weight"].copy_(w)
            done.add(name)
    return model, done


def router_counts(model, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert per sparse layer by the model's router (real tokens only)."""
    counts, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue

        def hook(mod, args, out, i=i):
            idx = out[2]
            keep = mask.reshape(-1) if mask is not None else torch.ones(idx.shape[0], dtype=torch.bool)
            counts[i] = torch.bincount(idx[keep].reshape(-1), minlength=mod.num_experts)

        handles.append(gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids, attention_mask=None if mask is None else mask.long())
    finally:
        for h in handles:
            h.remove()
    return counts


def act_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token symmetric int8 as the servers' kernels compute it: scale = max|x| / 127
    (vLLM ``scaled_int8_quant``, SGLang ``per_token_quant_int8``, CANN ``npu_dynamic_quant``)."""
    scale = x.float().abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)
    return (torch.round(x.float() / scale).clamp(-128, 127) * scale).to(x.dtype)


def emulate_dynamic_activations(model, quantized: set[str]) -> None:
    """Make ``model`` see its quantized linears' inputs as int8 per token: a pre-hook on every
    quantized ``nn.Linear`` (checkpoint names in ``quantized``), and for the fused experts
    an expert loop of our own that quantizes each expert's input and its down projection's input."""
    import types

    from torch import nn

    mem = {n.replace(".block_sparse_moe.", ".mlp.") for n in quantized}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name in mem:
            module.register_forward_pre_hook(lambda mod, args: (act_fake_quant(args[0]),) + tuple(args[1:]))
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None or not any(f"layers.{i}." in n and ".experts." in n for n in mem):
            continue

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(self.num_experts):
                tok, slot = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                x = act_fake_quant(hidden_states[tok])
                gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
                a = act_fake_quant(self.act_fn(gate) * up)
                y = nn.functional.linear(a, self.down_proj[e]) * top_k_weights[tok, slot, None]
                out.index_add_(0, tok, y.to(out.dtype))
            return out

        experts.forward = types.MethodType(forward, experts)
