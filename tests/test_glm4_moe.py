"""``glm4_moe`` (GLM-4.5 / 4.6 / 4.5-Air) on the MoE layer program, end to end, on a tiny random
model from transformers' ``Glm4MoeConfig``: partial rotary, biases on q/k/v only,
``use_qk_norm``, ``first_k_dense_replace`` (layer 0 dense), the sigmoid router with
``e_score_correction_bias``, ungated shared experts, ``routed_scaling_factor``, and one
multi-token-prediction layer stored after the last decoder layer (added to the checkpoint
here, as the releases store it).

* W4A16: transformers loads the output; its logits equal our fake-quant reference
  (tests/moe_reference.py: own unpacker, experts dequantized into the fused tensors);
* W8A8 dynamic: the hidden states the layer loop propagates equal the reference with
  per-token int8 activations emulated (transformers 5 cannot load int-quantized experts);
* the report's routed tokens per expert equal the reference router's (correction bias in);
* 2 ranks write the 1-rank tensors bit-identically;
* the MTP layer is written through unquantized and listed in ``quantization_config.ignore``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_jobs import run_inprocess  # noqa: E402
from moe_reference import (emulate_dynamic_activations, load_fake_quant, quantized_linears, read_tensors,  # noqa: E402
                           router_counts)
from helpers import free_ports, make_job  # noqa: E402
from reference import assert_layers_match_model  # noqa: E402
from tiny import corpus_text, make_tokenizer  # noqa: E402

EXPERTS, LAYERS, MTP = 4, 2, 2  # layer 0 dense, layer 1 sparse, layer 2 = the MTP layer
NUM_SAMPLES, SEQ_LEN, BATCH = 16, 48, 4
QUANTS = {
    "w4a16": ["quant=gptq_w4a16", "quant.group_size=32"],
    "w8a8dyn": ["quant=flexsmooth_w8a8", "quant.act_dynamic=true"],
}


def make_tiny_glm4_moe(directory: Path, use_qk_norm: bool = True, seed: int = 0) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Glm4MoeConfig

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    config = Glm4MoeConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False, attention_bias=True, use_qk_norm=use_qk_norm,
        n_routed_experts=EXPERTS, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                continue
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0, 0.5 if name.endswith("mlp.gate.weight") else 0.08)
            else:
                p.normal_(0, 0.05)  # q/k/v biases
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)  # routing follows the corrected scores, weights the plain ones
    model.save_pretrained(directory)
    # the MTP layer as the releases store it: a decoder layer's tensors plus eh_proj / enorm / hnorm /
    # shared_head.norm under model.layers.{num_hidden_layers}; transformers does not build it
    files = sorted(directory.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(files[0])
    g = torch.Generator().manual_seed(seed + 1)
    src = f"model.layers.{LAYERS - 1}."
    for name in [n for n in tensors if n.startswith(src)]:
        tensors[f"model.layers.{MTP}." + name[len(src):]] = tensors[name] + 0.01 * torch.randn(
            tensors[name].shape, generator=g)
    for extra, shape in (("eh_proj.weight", (64, 128)), ("enorm.weight", (64,)), ("hnorm.weight", (64,)),
                         ("shared_head.norm.weight", (64,))):
        tensors[f"model.layers.{MTP}.{extra}"] = torch.randn(shape, generator=g)
    save_file(tensors, files[0], metadata={"format": "pt"})
    return directory


def calib_args(root: Path) -> list[str]:
    return [f"calib.path={root / 'calib.txt'}", f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}",
            f"calib.batch_size={BATCH}"]


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4moe")
    (root / "calib.txt").write_text(corpus_text(40_000), encoding="utf-8")
    model = make_tiny_glm4_moe(root / "model")
    ports = iter(free_ports(len(QUANTS)))
    two = {q: make_job(q, model, root / "out2" / q, root / "runs2" / q, root / "calib.txt",
                       args[0].split("=", 1)[1], tuple(args[1:]) + (f"calib.batch_size={BATCH}",), nproc=2,
                       port=next(ports), num_samples=NUM_SAMPLES, seq_len=SEQ_LEN).start()
           for q, args in QUANTS.items()}
    one = {q: run_inprocess(model, root / "out1" / q, calib_args(root) + args, capture=True)
           for q, args in QUANTS.items()}
    for job in two.values():
        job.wait()
    return SimpleNamespace(root=root, model=model, one=one, two=two)


def check_propagation(run, model, atol):
    assert len(run.xs) == LAYERS
    assert_layers_match_model(model, run.calib.input_ids, run.xs, atol)


def test_w4a16_loads_in_transformers_and_matches_fake_quant(glm):
    from transformers import AutoModelForCausalLM

    run = glm.one["w4a16"]
    loaded, info = AutoModelForCausalLM.from_pretrained(str(run.out), dtype=torch.float32,
                                                        attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{MTP}.") for k in info["unexpected_keys"])
    ref, replaced = load_fake_quant(glm.model, run.out)
    assert sum(".experts." in n for n in replaced) == 3 * EXPERTS  # layer 1's routed experts
    assert {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= replaced  # dense layer 0
    assert {f"model.layers.1.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")} <= replaced
    floatm = AutoModelForCausalLM.from_pretrained(str(glm.model), dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(1)
    ids = torch.randint(0, floatm.config.vocab_size, (2, 40))
    with torch.no_grad():
        got, want, fp = loaded(ids).logits, ref(ids).logits, floatm(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert 0.01 < float((got - fp).norm() / fp.norm()) < 0.5  # quantized, and still the same model
    check_propagation(run, ref, atol=1e-4)


def test_routing_uses_the_correction_bias_and_first_layer_is_dense(glm):
    run = glm.one["w4a16"]
    ref, _ = load_fake_quant(glm.model, run.out)
    counts = router_counts(ref, run.calib.input_ids)
    assert sorted(counts) == [1]  # first_k_dense_replace=1: only layer 1 routes
    section = run.report["moe"]
    assert section["sparse_layers"] == 1
    assert section["layers"][0]["tokens_per_expert"] == counts[1].tolist()
    with torch.no_grad():  # the bias changes the choice: without it the counts differ
        gate = ref.model.layers[1].mlp.gate
        gate.e_score_correction_bias.zero_()
        assert router_counts(ref, run.calib.input_ids)[1].tolist() != counts[1].tolist()


def test_w8a8_dynamic_propagation_matches_reference_with_int8_activations(glm):
    run = glm.one["w8a8dyn"]
    out = read_tensors(run.out)
    quantized = set(quantized_linears(out, 8))
    assert sum(".experts." in n for n in quantized) == 3 * EXPERTS
    assert out["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router stays float
    model, _ = load_fake_quant(glm.model, run.out, attn="sdpa")
    emulate_dynamic_activations(model, quantized)
    check_propagation(run, model, atol=1e-5)
    src = read_tensors(glm.model)
    assert not torch.equal(out["model.layers.0.input_layernorm.weight"], src["model.layers.0.input_layernorm.weight"])


@pytest.mark.parametrize("quant", list(QUANTS))
def test_two_ranks_write_the_one_rank_tensors_bit_identically(glm, quant):
    two = glm.two[quant].check()
    a, b = read_tensors(glm.one[quant].out), read_tensors(two)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("quant", list(QUANTS))
def test_mtp_layer_written_through_unquantized_and_ignored(glm, quant):
    out_dir = glm.one[quant].out
    out, src = read_tensors(out_dir), read_tensors(glm.model)
    mtp = sorted(n for n in src if n.startswith(f"model.layers.{MTP}."))
    assert len(mtp) > 20 and "model.layers.2.eh_proj.weight" in mtp
    for name in mtp:
        assert torch.equal(out[name], src[name]), name
    assert not any(n.startswith(f"model.layers.{MTP}.") for n in out if n not in src)  # no packed extras
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert f"re:model[.]layers[.]{MTP}[.].*" in qc["ignore"]
    assert "model.layers.1.mlp.gate" in qc["ignore"]
    for name in ("model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.q_proj.bias",
                 "model.layers.1.self_attn.q_norm.weight"):
        assert torch.equal(out[name], src[name]), name


def test_air_variant_without_qk_norm(glm):
    """GLM-4.5-Air: ``use_qk_norm=false`` (no q_norm / k_norm tensors); the propagated hidden
    states still equal the fake-quant reference's."""
    model = make_tiny_glm4_moe(glm.root / "air", use_qk_norm=False, seed=3)
    src = read_tensors(model)
    assert not any("q_norm" in n or "k_norm" in n for n in src)
    run = run_inprocess(model, glm.root / "out_air", calib_args(glm.root) + QUANTS["w4a16"], capture=True)
    ref, replaced = load_fake_quant(model, run.out)
    assert sum(".experts." in n for n in replaced) == 3 * EXPERTS
    check_propagation(run, ref, atol=1e-4)
