"""Dense families on the layer programs: ``qwen3`` (q_norm / k_norm inside attention, head_dim
apart from hidden/heads) and ``mistral``, end to end. Tiny random models from transformers'
own config classes; W4A16 (GPTQ) and W8A8 with dynamic per-token activations (Flex smooth).

* the output loads in ``transformers.AutoModelForCausalLM`` and its logits match a fake-quant
  reference built here from the output tensors by the published rules (own int4 unpacker;
  ``int8 · scale`` weights and per-token ``max|x| / 127.5`` activations), and differ from the
  float model by far more than the tolerance;
* 2 ranks (real processes, gloo) write the 1-rank tensors bit-identically;
* tensors that are not linears (qwen3's q_norm / k_norm) are written through unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import free_ports, make_job, run_main  # noqa: E402
from reference import quantized_linears, read_quant_linear, read_tensors  # noqa: E402
from tiny import corpus_text, make_tokenizer  # noqa: E402

FAMILIES = ("qwen3", "mistral")
QUANTS = {
    "w4a16": ["quant=gptq_w4a16", "quant.group_size=32"],
    "w8a8dyn": ["quant=flexsmooth_w8a8", "quant.act_dynamic=true"],
}
CASES = [(f, q) for f in FAMILIES for q in QUANTS]
IDS = [f"{f}-{q}" for f, q in CASES]
NUM_SAMPLES, SEQ_LEN = 16, 48


def make_family_model(directory: Path, family: str, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                  pad_token_id=tok.pad_token_id)
    if family == "qwen3":
        config = Qwen3Config(**common, head_dim=32)  # o_proj reads 4·32 = 128 ≠ hidden 64
    else:
        config = MistralConfig(**common, sliding_window=32)  # shorter than the calibration samples
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif "norm" in name:  # non-trivial norms (q_norm / k_norm included): folds and copies show
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return SimpleNamespace(root=root, models={f: make_family_model(root / f, f) for f in FAMILIES})


@pytest.fixture(scope="module")
def fam(models):
    root, models = models.root, models.models
    calib = root / "calib.txt"
    calib.write_text(corpus_text(40_000), encoding="utf-8")
    ports = iter(free_ports(len(CASES)))
    jobs = {}
    for family, quant in CASES:  # 2-rank jobs in the background while the 1-rank ones run here
        name = f"{family}-{quant}"
        jobs[name] = make_job(name, models[family], root / "out2" / name, root / "runs2" / name, calib,
                              QUANTS[quant][0].split("=", 1)[1], tuple(QUANTS[quant][1:]), nproc=2,
                              port=next(ports), num_samples=NUM_SAMPLES, seq_len=SEQ_LEN).start()
    one = {}
    for family, quant in CASES:
        name = f"{family}-{quant}"
        out = root / "out1" / name
        code, _, err = run_main([f"model.path={models[family]}", f"calib.path={calib}", *QUANTS[quant],
                                 f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}",
                                 f"output.dir={out}", "output.part_file_size=100KB",
                                 f"runtime.run_dir={root / 'runs1' / name}", "runtime.threads=1"])
        assert code == 0, err[-3000:]
        one[name] = out
    for job in jobs.values():
        job.wait()
    return SimpleNamespace(root=root, models=models, one=one, two=jobs)


def held_out_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(corpus_text(200_000)[150_000:], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: 2 * 40]).reshape(2, 40)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def per_token_fake_quant(module, args):
    """compressed-tensors' dynamic per-token int8: scale = max|x| / 127.5, no zero point."""
    x = args[0]
    scale = x.float().abs().amax(dim=-1, keepdim=True) / 127.5
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float32).eps), scale)
    return ((x.float() / scale).round().clamp(-128, 127) * scale).to(x.dtype), *args[1:]


def fake_quant_reference(out: Path, act_quant: bool):
    """A float model of the output's architecture carrying the output's tensors, quantized
    linears dequantized by the published rules, inputs fake-quantized when ``act_quant``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((out / "config.json").read_text())
    qc = config.pop("quantization_config")
    bits = qc["config_groups"]["group_0"]["weights"]["num_bits"]
    tensors = read_tensors(out)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32).eval()
    state, quantized = {}, []
    for name in model.state_dict():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and mod + ".weight_packed" in tensors:
            state[name] = read_quant_linear(tensors, mod, bits).dequantize()
            quantized.append(mod)
        elif name.endswith(".weight") and tensors.get(name, torch.zeros(0)).dtype == torch.int8:
            state[name] = tensors[name].float() * tensors[mod + ".weight_scale"].float()
            quantized.append(mod)
        else:
            state[name] = tensors[name].float()
    model.load_state_dict(state, strict=True)
    if act_quant:
        for mod in quantized:
            model.get_submodule(mod).register_forward_pre_hook(per_token_fake_quant)
    return model, quantized


@pytest.mark.parametrize("family, quant", CASES, ids=IDS)
def test_output_loads_in_transformers_and_matches_fake_quant_reference(fam, family, quant):
    from transformers import AutoModelForCausalLM

    out = fam.one[f"{family}-{quant}"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    served = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    reference, quantized = fake_quant_reference(out, act_quant=quant == "w8a8dyn")
    assert len(quantized) == 2 * 7  # every attention and MLP linear of both layers
    ids = held_out_ids(out)
    got, want = logits(served, ids), logits(reference, ids)
    fp = logits(AutoModelForCausalLM.from_pretrained(str(fam.models[family]), dtype=torch.float32).eval(), ids)
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4 * scale, (diff, scale)
    # teeth: quantization moved the logits far more than the tolerance, and not absurdly far
    assert (fp - want).abs().max().item() > 100 * 1e-4 * scale
    assert float((got - fp).norm() / fp.norm()) < 0.5  # 4-bit on random weights: ~0.2
    if quant == "w8a8dyn":  # the activations were quantized in the served model too
        weights_only, _ = fake_quant_reference(out, act_quant=False)
        assert (logits(weights_only, ids) - got).abs().max().item() > 100 * 1e-4 * scale


@pytest.mark.parametrize("family, quant", CASES, ids=IDS)
def test_two_ranks_write_the_one_rank_tensors_bit_identically(fam, family, quant):
    name = f"{family}-{quant}"
    two = fam.two[name].check()
    a, b = read_tensors(fam.one[name]), read_tensors(two)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert len(list(two.glob("*.safetensors"))) >= 2  # both ranks wrote part files


@pytest.mark.parametrize("quant", list(QUANTS))
def test_qwen3_q_norm_and_k_norm_written_through(fam, quant):
    out = read_tensors(fam.one[f"qwen3-{quant}"])
    src = read_tensors(fam.models["qwen3"])
    for i in range(2):
        for norm in ("q_norm", "k_norm"):
            key = f"model.layers.{i}.self_attn.{norm}.weight"
            assert torch.equal(out[key], src[key]) and not torch.all(src[key] == 1), key
    assert not any("norm" in lin for lin in quantized_linears(out))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_program_reproduces_the_transformers_layer(models, family):
    """The dense program with quantization switched off gives transformers' own layer-0 output
    (eager attention, which builds its own causal / sliding-window mask), on samples longer
    than Mistral's sliding window."""
    from transformers import AutoModelForCausalLM

    from dist_quant.arch import get_arch
    from dist_quant.checkpoint import Checkpoint
    from dist_quant.layer_forward import build_skeleton, load_layer, unload_layer
    from dist_quant.pipeline import LayerRecord
    from dist_quant.plan import inspect_model
    from dist_quant.settings import load_config
    from dist_quant.stage import Job, StageContext

    class FloatContext(StageContext):  # the program's data flow, no solve
        def quantize(self, linears, inputs, downstream=None, masks=None):
            return list(inputs() if callable(inputs) else inputs)

    path = models.models[family]
    ckpt = Checkpoint(path)
    plan = inspect_model(ckpt, load_config([f"model.path={path}", "quant.group_size=32"]).quant)
    skel = build_skeleton(str(path), torch.float32, torch.device("cpu"))
    ids = held_out_ids(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(input_ids=ids, output_hidden_states=True).hidden_states[1]
        x = hf.model.embed_tokens(ids)
        pos = tuple(t.float() for t in skel.rotary(x, torch.arange(ids.shape[1])[None]))
        job = Job(None, None, ckpt, plan, None, None, torch.device("cpu"), None, None, torch.float32, pos_emb=pos)
        layer = load_layer(skel, ckpt, get_arch(family), 0, torch.device("cpu"))
        ctx = FloatContext(job, layer, 0, [torch.ones(ids.shape, dtype=torch.bool)], LayerRecord(0))
        got = get_arch(family).program(ctx, [x.clone()])[0]
        window = get_arch(family).sliding_window(0, ckpt.config)
        unload_layer(layer)
    assert window == (32 if family == "mistral" else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
