"""End to end, world size 1: ``python -m dist_quant …`` as a real process on tiny random
llama / qwen2 checkpoints, then the output directory checked against references computed
here (own unpacker, own RTN, own fake-quant model) — see ``tests/reference.py``.

All jobs are started once per module (concurrently) and shared by the tests."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import (LINEARS, calibration_ids, header_data_bytes, layer0_attn_input,  # noqa: E402
                       part_file_contents, read_quant_linears, read_tensors, reference_rtn,
                       relative_output_error, relative_weight_error, unpack_int32)
from helpers import hash_dir, make_job, small_calib_file  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

NUM_SAMPLES, SEQ_LEN = 16, 64
PART_LIMIT = 100_000  # output.part_file_size=100KB
LAYERS = 2

# job name → (model, quant preset, extra overrides, bits, group size, symmetric)
JOBS = {
    "llama_gptq_w4": ("llama", "gptq_w4a16", ("quant.group_size=32",), 4, 32, True),
    "qwen_gptq_w4": ("qwen", "gptq_w4a16", ("quant.group_size=32",), 4, 32, True),
    "llama_rtn_w4": ("llama", "rtn_w4a16", ("quant.group_size=32",), 4, 32, True),
    "qwen_rtn_w4_asym": ("qwen", "rtn_w4a16", ("quant.group_size=32", "quant.symmetric=false"), 4, 32, False),
    "llama_rtn_w8": ("llama", "rtn_w8a16", (), 8, -1, True),
}
GPTQ_JOBS = ["llama_gptq_w4", "qwen_gptq_w4"]
RTN_JOBS = ["llama_rtn_w4", "qwen_rtn_w4_asym", "llama_rtn_w8"]


def _text(chars: int) -> str:
    return corpus_text(chars)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    source = root / "wiki.txt"
    source.write_text(_text(200_000), encoding="utf-8")
    calib = small_calib_file(root / "calib.txt", source, 40_000)
    models = {}
    jobs = {}
    hashes_before = {}

    def launch(model_key: str) -> None:
        for name, (key, quant, extra, *_rest) in JOBS.items():
            if key == model_key:
                jobs[name] = make_job(name, models[key], root / "out" / name, root / "runs" / name, calib,
                                      quant, extra, num_samples=NUM_SAMPLES, seq_len=SEQ_LEN).start()

    # Start llama's jobs while the qwen checkpoint is being built.
    models["llama"] = make_tiny_model(root / "llama", arch="llama", layers=LAYERS, tied=False)
    hashes_before["llama"] = hash_dir(models["llama"])
    launch("llama")
    models["qwen"] = make_tiny_model(root / "qwen", arch="qwen2", layers=LAYERS, tied=True, shard_size="200KB")
    assert (models["qwen"] / "model.safetensors.index.json").is_file()  # a sharded input
    hashes_before["qwen"] = hash_dir(models["qwen"])
    launch("qwen")
    for job in jobs.values():
        job.wait()
    originals = {k: read_tensors(v) for k, v in models.items()}
    held_out = source.read_text(encoding="utf-8")[150_000:152_000]
    return SimpleNamespace(root=root, calib=calib, models=models, jobs=jobs, hashes_before=hashes_before,
                           originals=originals, held_out=held_out)


def _output(e2e, name):
    out = e2e.jobs[name].check()
    _, _, _, bits, group, sym = JOBS[name]
    linears, tensors = read_quant_linears(out, bits)
    return out, linears, tensors, bits, group, sym


def _model_key(name):
    return JOBS[name][0]


# -- the reference unpacker -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_own_unpacker_inverts_compressed_tensors_packing(bits):
    """Our unpacker agrees with compressed-tensors' packer on both packed dims."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    for shape in [(64, 128), (40, 96), (33, 17)]:
        v = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int8)
        for dim in (0, 1):
            packed = pack_to_int32(v, bits, packed_dim=dim)
            assert torch.equal(unpack_int32(packed, bits, shape[dim], dim), v.long())


# -- output structure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(JOBS))
def test_tensor_set_and_unquantized_tensors_copied(e2e, name):
    """Exactly the expected tensors: every decoder linear quantized (packed/scale/shape,
    + zero point when asymmetric), lm_head/embeddings/norms/biases bit-identical copies."""
    out, linears, tensors, bits, group, sym = _output(e2e, name)
    original = e2e.originals[_model_key(name)]
    expected_linears = sorted(f"model.layers.{i}.{rel}" for i in range(LAYERS) for rel in LINEARS)
    assert sorted(linears) == expected_linears
    suffixes = ["weight_packed", "weight_scale", "weight_shape"] + ([] if sym else ["weight_zero_point"])
    expected = {n for n in original if n.rsplit(".", 1)[0] not in linears or not n.endswith(".weight")}
    expected |= {f"{lin}.{s}" for lin in linears for s in suffixes}
    assert set(tensors) == expected
    for n in expected & set(original):
        assert tensors[n].dtype == original[n].dtype and torch.equal(tensors[n], original[n]), n
    if _model_key(name) == "qwen":  # tied: no lm_head; q/k/v biases kept with their linears
        assert "lm_head.weight" not in tensors
        biases = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(LAYERS) for p in "qkv"]
        assert all(b in original and b in tensors for b in biases)
    for lin in linears:
        w = original[lin + ".weight"]
        assert tensors[lin + ".weight_shape"].tolist() == list(w.shape)
        groups = 1 if group == -1 else w.shape[1] // group
        assert tensors[lin + ".weight_packed"].dtype == torch.int32
        assert tuple(tensors[lin + ".weight_packed"].shape) == (w.shape[0], w.shape[1] * bits // 32)
        assert tensors[lin + ".weight_scale"].dtype == w.dtype  # scales in the checkpoint's dtype
        assert tuple(tensors[lin + ".weight_scale"].shape) == (w.shape[0], groups)
        if not sym:
            zp = tensors[lin + ".weight_zero_point"]
            assert zp.dtype == torch.int32 and tuple(zp.shape) == (math.ceil(w.shape[0] * bits / 32), groups)


@pytest.mark.parametrize("name", list(JOBS))
def test_index_names_every_tensor_once_and_parts_respect_limit(e2e, name):
    """index.json's weight_map is exactly the part files' contents; parts are named
    model-0000k-of-0000N and hold ≤ part_file_size of data unless a single tensor is larger."""
    out = e2e.jobs[name].check()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    contents = part_file_contents(out)
    on_disk = [(name, f) for f, names in contents.items() for name in names]
    assert len(on_disk) == len({n for n, _ in on_disk}), "a tensor is in two part files"
    assert index["weight_map"] == {n: f for n, f in on_disk}
    files = sorted(contents)
    assert len(files) >= 2  # 100KB parts force a split of these ~0.5 MB models
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert not (out / "model.safetensors").exists()
    tensors = read_tensors(out)
    data = {f: sum(tensors[n].numel() * tensors[n].element_size() for n in names) for f, names in contents.items()}
    assert index["metadata"]["total_size"] == sum(data.values())
    for f, names in contents.items():
        assert header_data_bytes(out / f) == data[f]
        assert data[f] <= PART_LIMIT or len(names) == 1, (f, data[f], names)


@pytest.mark.parametrize("name", list(JOBS))
def test_config_has_quantization_config(e2e, name):
    out = e2e.jobs[name].check()
    _, _, _, bits, group, sym = JOBS[name]
    config = json.loads((out / "config.json").read_text())
    original = json.loads((e2e.models[_model_key(name)] / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "tie_word_embeddings", "vocab_size"):
        assert config[key] == original[key]
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert "lm_head" in qc["ignore"]
    (scheme,) = qc["config_groups"].values()
    assert scheme["targets"] == ["Linear"]
    w = scheme["weights"]
    assert w["num_bits"] == bits and w["type"] == "int" and w["symmetric"] is sym
    if group == -1:
        assert w["strategy"] == "channel" and w["group_size"] is None
    else:
        assert w["strategy"] == "group" and w["group_size"] == group
    assert scheme.get("input_activations") is None  # W*A16: weights only
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (e2e.models[_model_key(name)] / f).read_bytes()


@pytest.mark.parametrize("name", list(JOBS))
def test_quant_report(e2e, name):
    out = e2e.jobs[name].check()
    report = json.loads((out / "quant_report.json").read_text())
    assert report["world_size"] == 1
    assert [layer["layer"] for layer in report["layers"]] == list(range(LAYERS))
    modules = {m: info for layer in report["layers"] for m, info in layer["modules"].items()}
    expected = {f"model.layers.{i}.{rel}" for i in range(LAYERS) for rel in LINEARS}
    assert set(modules) == expected == set(report["owner_plan"])
    bound = 0.01 if JOBS[name][3] == 8 else 0.1
    for m, info in modules.items():
        err = info["rel_output_error"]
        assert isinstance(err, float) and math.isfinite(err) and 0 < err < bound, (m, err)
        assert info["tokens"] == NUM_SAMPLES * SEQ_LEN
        assert info["fallback"] is None


@pytest.mark.parametrize("name", list(JOBS))
def test_partial_dir_gone_and_input_unchanged(e2e, name):
    out = e2e.jobs[name].check()
    assert not out.with_name(out.name + ".partial").exists()
    assert not out.with_name(out.name + ".old").exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(name + ".")]
    key = _model_key(name)
    assert hash_dir(e2e.models[key]) == e2e.hashes_before[key]
    assert (e2e.jobs[name].run_dir / "rank0.log").is_file()


# -- numerics: dequantized weights, fake-quant logits, generation ------------------------------------
@pytest.mark.parametrize("name", list(JOBS))
def test_dequantized_weights_close_to_original(e2e, name):
    """Garbage-but-consistent output fails here: Ŵ must be near W for every linear."""
    out, linears, tensors, bits, group, sym = _output(e2e, name)
    original = e2e.originals[_model_key(name)]
    bound = 0.15 if bits == 4 else 0.01
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for lin, ql in linears.items():
        assert ql.q.min() >= qmin and ql.q.max() <= qmax
        assert (ql.scale > 0).all()
        err = relative_weight_error(original[lin + ".weight"], ql.dequantize())
        assert err < bound, (lin, err)
        assert err > 1e-5 if bits == 4 else True  # it really is quantized


@pytest.mark.parametrize("name", list(JOBS))
def test_compressed_tensors_decompress_matches_own_dequantization(e2e, name):
    """compressed-tensors' own decompressor (as vLLM/transformers read the format) gives the
    weights our unpacker gives, zero points included. (transformers 5.x cannot load
    asymmetric pack-quantized checkpoints at all — its meta-device compression keeps
    weight_zero_point unpacked, vllm-project/llm-compressor#1618 — hence this check.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    out, linears, tensors, *_ = _output(e2e, name)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (scheme,) = qc["config_groups"].values()
    scheme = QuantizationScheme.model_validate(scheme)
    for lin, ql in linears.items():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(lin + ".weight_")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        torch.testing.assert_close(weight.float(), ql.dequantize(), rtol=1e-6, atol=1e-7, msg=lin)


def _load_quantized(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def _fake_quant_reference(model_dir, linears):
    """The original float model with every quantized linear's weight replaced by our Ŵ."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    float_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for lin, ql in linears.items():
            weight = model.get_submodule(lin).weight
            assert weight.shape == ql.shape
            weight.copy_(ql.dequantize())
    return model, float_model


def _held_out_ids(e2e, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(e2e.held_out, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] >= 96
    return tok, ids[:, :96].reshape(2, 48)


@pytest.mark.parametrize("name", GPTQ_JOBS)
def test_transformers_loads_output_and_logits_match_fake_quant(e2e, name):
    """transformers loads the compressed-tensors checkpoint on CPU; its logits equal those of
    the float model carrying our own dequantized weights, and differ from the float model's."""
    out, linears, *_ = _output(e2e, name)
    model_dir = e2e.models[_model_key(name)]
    quantized = _load_quantized(out)
    reference, float_model = _fake_quant_reference(model_dir, linears)
    _, ids = _held_out_ids(e2e, model_dir)
    with torch.no_grad():
        got = quantized(ids).logits
        want = reference(ids).logits
        unquantized = float_model(ids).logits
    scale = want.abs().max().item()
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4 * scale, (diff, scale)
    # the comparison has teeth: quantization moved the logits far more than the tolerance
    assert (unquantized - want).abs().max().item() > 100 * 1e-4 * scale


@pytest.mark.parametrize("name", GPTQ_JOBS)
def test_transformers_generates(e2e, name):
    out = e2e.jobs[name].check()
    model = _load_quantized(out)
    tok, ids = _held_out_ids(e2e, out)
    prompt = ids[:1, :12]
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, 20)
    assert torch.equal(gen[:, :12], prompt)
    assert ((gen >= 0) & (gen < len(tok))).all()
    # the same greedy tokens as the float model carrying our own dequantized weights
    _, linears, *_ = _output(e2e, name)
    reference, _ = _fake_quant_reference(e2e.models[_model_key(name)], linears)
    with torch.no_grad():
        want = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                  min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(gen, want), (gen.tolist(), want.tolist())


# -- RTN integers and scales against our own RTN ------------------------------------------------------
@pytest.mark.parametrize("name", RTN_JOBS)
def test_rtn_matches_reference(e2e, name):
    out, linears, tensors, bits, group, sym = _output(e2e, name)
    original = e2e.originals[_model_key(name)]
    total = same = 0
    for lin, ql in linears.items():
        w = original[lin + ".weight"]
        ref = reference_rtn(w, bits, group, sym, w.dtype)
        assert ql.scale.dtype == ref.scale.dtype == torch.float32
        rel = ((ql.scale.double() - ref.scale.double()).abs() / ref.scale.double()).max().item()
        assert rel <= 1e-6, (lin, rel)
        assert (ql.q - ref.q).abs().max().item() <= 1, lin
        assert (ql.zero - ref.zero).abs().max().item() <= 1, lin
        total += ql.q.numel()
        same += int((ql.q == ref.q).sum())
        assert (ql.zero == ref.zero).float().mean().item() >= 0.99, lin
        if sym:
            assert (ql.zero == 0).all()
        else:
            assert (ref.zero != 0).any()  # asymmetric zero points are really exercised
    assert same / total >= 0.999, same / total


# -- GPTQ vs RTN ----------------------------------------------------------------------------------------
def test_gptq_beats_rtn_on_layer0_calibration_inputs(e2e):
    """‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖ on the layer-0 attention inputs X of the calibration tokens (computed
    here: embeddings → RMSNorm) is lower for GPTQ than RTN; the report's value agrees."""
    model_dir = e2e.models["llama"]
    ids = calibration_ids(model_dir, e2e.calib, NUM_SAMPLES, SEQ_LEN)
    x = layer0_attn_input(model_dir, ids)
    gptq, _ = read_quant_linears(e2e.jobs["llama_gptq_w4"].check(), 4)
    rtn, _ = read_quant_linears(e2e.jobs["llama_rtn_w4"].check(), 4)
    report = json.loads((e2e.jobs["llama_gptq_w4"].out / "quant_report.json").read_text())
    modules = report["layers"][0]["modules"]
    original = e2e.originals["llama"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        lin = f"model.layers.0.self_attn.{proj}"
        w = original[lin + ".weight"]
        e_gptq = relative_output_error(x, w, gptq[lin].dequantize())
        e_rtn = relative_output_error(x, w, rtn[lin].dequantize())
        assert e_gptq < e_rtn, (lin, e_gptq, e_rtn)
        if proj == "q_proj":
            assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
        # the report stores the squared ratio ‖X(W−Ŵ)ᵀ‖²/‖XWᵀ‖² (see dist_quant/stats.py)
        assert modules[lin]["rel_output_error"] == pytest.approx(e_gptq ** 2, rel=1e-3)
