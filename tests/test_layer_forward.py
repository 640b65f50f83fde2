"""Staged decoder-layer forward (dist_quant/layer_forward.py) against the transformers model:
the stage chain must reproduce the layer, and each stage must yield exactly what the HF
linears of that stage receive."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.arch import get_arch  # noqa: E402
from dist_quant.checkpoint import Checkpoint  # noqa: E402
from dist_quant.layer_forward import build_skeleton, dense_stage_ops, load_layer, unload_layer  # noqa: E402

ARCHS = ["llama", "qwen2"]
ATOL, RTOL = 2e-5, 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import make_tiny_model

    out = {}
    for arch in ARCHS:
        path = make_tiny_model(tmp_path_factory.mktemp(arch), arch=arch, layers=2, hidden=64, intermediate=128,
                               heads=4, kv_heads=2)
        out[arch] = path
    return out


def hf_model(path: Path, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def run_stages(layer, arch, x, pos_emb, hooks=None):
    """The chain of LayerwiseQuantizer._layer, without quantization."""
    ops = dense_stage_ops(layer, arch, pos_emb)
    assert len(ops) == len(arch.stages)
    prev = None
    for stage, op in zip(arch.stages, ops):
        inp = op.make_input(x, prev)
        if hooks is not None:
            hooks[stage.name] = inp
        if op.advance is not None:
            x = op.advance(x, inp)
        prev = inp
    return x


def positions_for(skel, x):
    pos = torch.arange(x.shape[1])[None]
    return tuple(t.to(skel.dtype) for t in skel.rotary(x, pos))


@pytest.mark.parametrize("arch_name", ARCHS)
def test_stages_reproduce_the_layer_and_the_model(models, arch_name):
    path = models[arch_name]
    arch = get_arch(arch_name)
    ckpt = Checkpoint(path)
    skel = build_skeleton(str(path), torch.float32, torch.device("cpu"))
    eager = hf_model(path, "eager")  # builds its own causal mask: an independent reference
    sdpa = hf_model(path, "sdpa")
    cfg = eager.config
    assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads == 4  # GQA

    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (3, 19))
    with torch.no_grad():
        ref = eager(ids, output_hidden_states=True).hidden_states  # emb, after layer 0, norm(after layer 1)
        x = ref[0]
        pos_emb = positions_for(skel, x)
        hf_pos = sdpa.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
        for a, b in zip(pos_emb, hf_pos):
            torch.testing.assert_close(a, b, atol=0, rtol=0)

        outs = []
        for i in range(cfg.num_hidden_layers):
            layer = load_layer(skel, ckpt, arch, i, torch.device("cpu"))
            stage_inputs: dict[str, torch.Tensor] = {}
            y = run_stages(layer, arch, x, pos_emb, stage_inputs)

            # Same as the HF layer called with attention_mask=None (causal under sdpa).
            direct = sdpa.model.layers[i](x, position_embeddings=hf_pos, attention_mask=None)
            direct = direct[0] if isinstance(direct, tuple) else direct
            torch.testing.assert_close(y, direct, atol=ATOL, rtol=RTOL)

            # Each stage's input is what the HF linears of that stage receive.
            seen: dict[str, torch.Tensor] = {}
            hf_layer = sdpa.model.layers[i]
            handles = [hf_layer.get_submodule(stage.linears[0]).register_forward_pre_hook(
                lambda m, args, name=stage.name: seen.__setitem__(name, args[0]))
                for stage in arch.stages]
            try:
                hf_layer(x, position_embeddings=hf_pos, attention_mask=None)
            finally:
                for h in handles:
                    h.remove()
            for stage in arch.stages:
                torch.testing.assert_close(stage_inputs[stage.name], seen[stage.name], atol=ATOL, rtol=RTOL)

            unload_layer(layer)
            outs.append(y)
            x = y

        # Layer by layer equals the whole model's forward (its own mask and attention code).
        torch.testing.assert_close(outs[0], ref[1], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(eager.model.norm(outs[-1]), ref[-1], atol=ATOL, rtol=RTOL)

        # Causality: changing the last token does not change earlier positions.
        x2 = ref[0].clone()
        x2[:, -1] += 1.0
        layer = load_layer(skel, ckpt, arch, 0, torch.device("cpu"))
        y2 = run_stages(layer, arch, x2, pos_emb)
        torch.testing.assert_close(y2[:, :-1], outs[0][:, :-1], atol=ATOL, rtol=RTOL)
        assert not torch.allclose(y2[:, -1], outs[0][:, -1])
        unload_layer(layer)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_load_layer_reads_exactly_that_layers_tensors(models, arch_name):
    path = models[arch_name]
    arch = get_arch(arch_name)
    ckpt = Checkpoint(path)
    skel = build_skeleton(str(path), torch.float32, torch.device("cpu"))
    ref = hf_model(path, "sdpa")

    calls: list[str] = []
    original = ckpt.get

    def recording_get(name):
        calls.append(name)
        return original(name)

    ckpt.get = recording_get  # type: ignore[method-assign]
    for i in range(ref.config.num_hidden_layers):
        calls.clear()
        layer = load_layer(skel, ckpt, arch, i, torch.device("cpu"))
        prefix = f"model.layers.{i}."
        in_ckpt = {n for n in ckpt.tensors if n.startswith(prefix)}
        assert sorted(calls) == sorted(in_ckpt)  # every tensor of the layer, each once, nothing else
        if arch_name == "qwen2":
            assert prefix + "self_attn.q_proj.bias" in calls
        got = layer.state_dict()
        want = ref.model.layers[i].state_dict()
        assert set(got) == set(want)
        for name, t in want.items():
            assert got[name].device.type == "cpu" and got[name].dtype == torch.float32
            assert torch.equal(got[name], t), f"layer {i} {name}"
        # The other layers are still on the meta device (one layer in memory at a time).
        for j in range(ref.config.num_hidden_layers):
            if j != i:
                assert all(p.is_meta for p in skel.layer(j).parameters())
        unload_layer(layer)
        assert all(p.is_meta for p in skel.layer(i).parameters())
    # The skeleton itself holds no real weights.
    assert skel.model.model.embed_tokens.weight.is_meta
