"""DeepSeek-V3 / Kimi-K2 (MLA attention, dense-then-MoE layers, shared experts, sigmoid
group-limited router, MTP layer, FP8 release weights) on tiny random models built from
transformers' ``DeepseekV3Config``, against references written here or in
tests/moe_reference.py (which imports nothing from dist_quant):

* the output loads in ``transformers.AutoModelForCausalLM`` and its logits equal the
  fake-quant model (the float model with the output's dequantized weights);
* the hidden states after every layer equal that model's (sequential quantization);
* every linear's statistics come from its true input in the one-pass order: the relative
  output error in the report equals the one recomputed here from the inputs the fake-quant
  model feeds that linear (upstream linears quantized), and not the float model's;
* W8A8 dynamic with the MLA smoothing pairs; q_lora_rank null (q_proj); the MTP layer
  written through in float and ignored; Kimi-K2 (model_type kimi_k2 + auto_map, FP8 blocks)
  gives the integers of its float32-dequantized DeepSeek-V3 twin and an output config that
  transformers loads without remote code; 2 ranks == 1 rank.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_jobs import finish, run_inprocess, start_ranks  # noqa: E402
from moe_reference import (emulate_dynamic_activations, load_fake_quant, quantized_linears,  # noqa: E402
                           read_tensors)
from reference import assert_layers_match_model  # noqa: E402
from tiny import corpus_text  # noqa: E402
from tiny_deepseek import make_tiny_deepseek  # noqa: E402

NUM_SAMPLES, SEQ_LEN, BATCH = 16, 64, 4
LAYERS, EXPERTS = 3, 8
FP8_BLOCK = (16, 16)


def _args(root: Path, *extra: str) -> list[str]:
    w8 = any(e.startswith("quant=") and "w8" in e for e in extra)  # 8-bit presets: per-channel weights
    return [*([] if w8 else ["quant.group_size=16"]), f"calib.path={root / 'calib.txt'}",
            f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}", f"calib.batch_size={BATCH}", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    (root / "calib.txt").write_text(corpus_text(40_000), encoding="utf-8")
    models = {
        "ds": make_tiny_deepseek(root / "ds", layers=LAYERS, experts=EXPERTS, mtp=1),
        "noq": make_tiny_deepseek(root / "noq", layers=2, experts=EXPERTS, q_lora_rank=None, mtp=0, seed=1),
        "kimi": make_tiny_deepseek(root / "kimi", layers=2, experts=EXPERTS, mtp=0, n_group=1, topk_group=1,
                                   fp8_block=FP8_BLOCK, kimi=True, seed=2),
    }
    return SimpleNamespace(root=root, models=models, runs={})


def job(env, key, model, *extra, capture=True):
    if key not in env.runs:
        env.runs[key] = run_inprocess(env.models[model] if model in env.models else model,
                                      env.root / f"out_{key}", _args(env.root, *extra), capture=capture)
    return env.runs[key]


def check_propagation(model, run, atol=1e-4):
    assert_layers_match_model(model, run.calib.input_ids, run.xs, atol)


# -- plan ------------------------------------------------------------------------------------------
def test_plan_stages_dense_then_moe_and_mtp_written_through(env):
    from dist_quant.checkpoint import Checkpoint
    from dist_quant.config import QuantConfig
    from dist_quant.plan import inspect_model

    plan = inspect_model(Checkpoint(env.models["ds"]), QuantConfig(group_size=16))
    stages = {}
    for lin in plan.linears:
        stages.setdefault((lin.layer, lin.stage), []).append(lin.name.split(".", 3)[3])
    a = "self_attn."
    for i in range(LAYERS):
        assert stages[(i, "attn_in")] == [a + "q_a_proj", a + "kv_a_proj_with_mqa"]
        assert stages[(i, "q_b")] == [a + "q_b_proj"] and stages[(i, "kv_b")] == [a + "kv_b_proj"]
        assert stages[(i, "attn_out")] == [a + "o_proj"]
    assert stages[(0, "mlp_in")] == ["mlp.gate_proj", "mlp.up_proj"] and stages[(0, "mlp_out")] == ["mlp.down_proj"]
    for i in (1, 2):
        assert (i, "mlp_in") not in stages
        assert stages[(i, "moe_in")] == ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"]  # router: float
        assert stages[(i, "shared_out")] == ["mlp.shared_experts.down_proj"]
        assert len(stages[(i, "expert_in")]) == 2 * EXPERTS and len(stages[(i, "expert_out")]) == EXPERTS
    assert not any(lin.layer >= LAYERS for lin in plan.linears)
    mtp = [n for n in plan.global_tensors if n.startswith(f"model.layers.{LAYERS}.")]
    assert f"model.layers.{LAYERS}.eh_proj.weight" in mtp and f"model.layers.{LAYERS}.self_attn.q_a_proj.weight" in mtp
    assert f"re:model[.]layers[.]{LAYERS}[.].*" in plan.ignored
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in plan.layer_tensors[1]

    noq = inspect_model(Checkpoint(env.models["noq"]), QuantConfig(group_size=16))
    names = [lin.name.split(".", 3)[3] for lin in noq.linears if lin.layer == 0 and lin.stage.startswith(("attn", "q_"))]
    assert names == [a + "q_proj", a + "kv_a_proj_with_mqa", a + "o_proj"]

    kimi = inspect_model(Checkpoint(env.models["kimi"]), QuantConfig(group_size=16))
    assert kimi.arch.name == "kimi_k2" and not any("scale_inv" in n for grp in kimi.layer_tensors for n in grp)
    assert len(kimi.linears) == len([lin for lin in plan.linears if lin.layer < 2])


@pytest.mark.parametrize("edit, match", [
    ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"architectures": ["KimiVLForConditionalGeneration"]}, "model_type='kimi_k2' with architectures="),
])
def test_unsupported_variants_refused_in_one_line(env, tmp_path, edit, match):
    from dist_quant.arch import UnsupportedModel
    from dist_quant.checkpoint import Checkpoint
    from dist_quant.config import QuantConfig
    from dist_quant.plan import inspect_model

    d = Path(shutil.copytree(env.models["kimi"], tmp_path / "m"))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match=match) as e:
        inspect_model(Checkpoint(d), QuantConfig(group_size=16))
    assert "\n" not in str(e.value)


# -- W4A16 ------------------------------------------------------------------------------------------
def test_w4a16_loads_in_transformers_and_matches_fake_quant(env):
    from transformers import AutoModelForCausalLM

    run = job(env, "gptq", "ds", "quant=gptq_w4a16")
    loaded, info = AutoModelForCausalLM.from_pretrained(str(run.out), dtype=torch.float32,
                                                        attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # the MTP layer is not part of DeepseekV3ForCausalLM (transformers skips layer 61 silently; here layer 3)
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{LAYERS}.") for k in info["unexpected_keys"])
    ref, replaced = load_fake_quant(env.models["ds"], run.out)
    assert sum(".experts." in n for n in replaced) == (LAYERS - 1) * 3 * EXPERTS
    assert sum(".self_attn." in n for n in replaced) == LAYERS * 5
    floatm = AutoModelForCausalLM.from_pretrained(str(env.models["ds"]), dtype=torch.float32,
                                                  attn_implementation="eager")
    torch.manual_seed(1)
    ids = torch.randint(0, floatm.config.vocab_size, (2, 40))
    with torch.no_grad():
        got, want, fp = loaded(ids).logits, ref(ids).logits, floatm(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert 0 < (got - fp).norm() / fp.norm() < 1.0  # quantized, and still the same model
    check_propagation(load_fake_quant(env.models["ds"], run.out, attn="sdpa")[0], run)

    out, src = read_tensors(run.out), read_tensors(env.models["ds"])
    for name in [n for n in src if n.startswith(f"model.layers.{LAYERS}.")]:  # MTP: written through
        assert torch.equal(out[name], src[name]), name
    for i in (1, 2):  # router and its correction bias: float, untouched
        for rel in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
            assert torch.equal(out[f"model.layers.{i}.{rel}"], src[f"model.layers.{i}.{rel}"])
    qc = json.loads((run.out / "config.json").read_text())["quantization_config"]
    assert {f"re:model[.]layers[.]{LAYERS}[.].*", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"} <= set(qc["ignore"])
    cfg = json.loads((run.out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["model_type"] == "deepseek_v3"


def _modules(run) -> dict:
    return {name: m for layer in run.report["layers"] for name, m in layer["modules"].items()}


def _inputs_of(model, names: list[str], ids) -> dict[str, torch.Tensor]:
    """The input every module ``names`` (memory names) receives in a forward of ``ids``."""
    seen, handles = {}, []
    for n in names:
        handles.append(model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]).double())))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _rel_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).double().T) ** 2).sum() / ((x @ w.double().T) ** 2).sum())


def test_statistics_from_true_inputs_in_one_pass_order(env):
    """For the MLA linears, dense MLP and shared experts: the report's ‖X(W−Ŵ)ᵀ‖²/‖XWᵀ‖² with X
    the linear's input in the output model (every linear before it quantized) — recomputed
    here from hooks on transformers' own modules — and not with X from the float model."""
    from transformers import AutoModelForCausalLM

    run = job(env, "gptq", "ds", "quant=gptq_w4a16")
    ref, _ = load_fake_quant(env.models["ds"], run.out, attn="sdpa")
    floatm = AutoModelForCausalLM.from_pretrained(str(env.models["ds"]), dtype=torch.float32,
                                                  attn_implementation="sdpa")
    a = "self_attn."
    rels = [a + n for n in ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj")]
    names = [f"model.layers.{i}.{r}" for i in range(2) for r in rels]
    names += ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.up_proj",
              "model.layers.1.mlp.shared_experts.down_proj"]
    ids = run.calib.input_ids
    x_true, x_float = _inputs_of(ref, names, ids), _inputs_of(floatm, names, ids)
    src = read_tensors(env.models["ds"])
    refp = dict(ref.named_parameters())
    for n in names:
        w, w_hat = src[n + ".weight"], refp[n + ".weight"].detach()
        want = _rel_error(x_true[n], w, w_hat)
        got = _modules(run)[n]["rel_output_error"]
        assert got == pytest.approx(want, rel=2e-5), n
        if n != "model.layers.0.self_attn.q_a_proj" and n != "model.layers.0.self_attn.kv_a_proj_with_mqa":
            # downstream of a quantized linear: the float model's input is a different statistic,
            # farther from the report than the recomputation's tolerance
            assert abs(_rel_error(x_float[n], w, w_hat) - got) > 1e-4 * want, n


def test_q_proj_when_q_lora_rank_is_null(env):
    from transformers import AutoModelForCausalLM

    run = job(env, "noq", "noq", "quant=gptq_w4a16")
    loaded = AutoModelForCausalLM.from_pretrained(str(run.out), dtype=torch.float32, attn_implementation="eager")
    ref, replaced = load_fake_quant(env.models["noq"], run.out)
    assert "model.layers.0.self_attn.q_proj" in replaced
    ids = torch.randint(0, loaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=2e-4, rtol=1e-4)
    check_propagation(load_fake_quant(env.models["noq"], run.out, attn="sdpa")[0], run)


# -- W8A8 dynamic + MLA smoothing pairs ---------------------------------------------------------------
def test_w8a8_dynamic_with_mla_smoothing_pairs(env):
    run = job(env, "w8a8", "ds", "quant=smoothquant_w8a8", "quant.act_dynamic=true")
    mla = ["input_layernorm->q_a_proj/kv_a_proj_with_mqa", "self_attn.q_a_layernorm->q_b_proj",
           "self_attn.kv_a_layernorm->kv_b_proj"]
    mlp = ["post_attention_layernorm->gate_proj/up_proj", "mlp.up_proj->down_proj"]
    for layer in run.report["layers"]:
        i = layer["layer"]
        assert list(layer["smoothing"]) == [f"model.layers.{i}.{p}" for p in mla + (mlp if i == 0 else [])]
    out, src = read_tensors(run.out), read_tensors(env.models["ds"])
    quantized = set(quantized_linears(out, 8))
    assert len(quantized) == LAYERS * 5 + 3 + (LAYERS - 1) * (3 + 3 * EXPERTS)
    for i in range(LAYERS):  # the MLA pairs fold into the three norms of every layer
        for norm in ("input_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"):
            name = f"model.layers.{i}.{norm}.weight"
            assert not torch.equal(out[name], src[name]), name
        post = f"model.layers.{i}.post_attention_layernorm.weight"
        assert torch.equal(out[post], src[post]) == (i > 0)  # dense layer 0: MLP pairs; MoE layers: none
    for name in quantized:
        assert out[name + ".weight"].dtype == torch.int8 and name + ".input_scale" not in out
    model, _ = load_fake_quant(env.models["ds"], run.out, attn="sdpa")
    emulate_dynamic_activations(model, quantized)
    check_propagation(model, run, atol=1e-5)


# -- Kimi-K2: kimi_k2 + auto_map + FP8 blocks ------------------------------------------------------------
def _float_twin(src: Path, dst: Path) -> Path:
    """The FP8 checkpoint dequantized here (w = fp8 · scale_inv per block) and saved in float32
    under model_type deepseek_v3, without quantization_config or auto_map."""
    shutil.copytree(src, dst)
    t = load_file(str(src / "model.safetensors"))
    for name in [n for n in t if n.endswith("_scale_inv")]:
        w, s = t.pop(name[: -len("_scale_inv")]), t.pop(name)
        full = s.repeat_interleave(FP8_BLOCK[0], 0)[: w.shape[0]].repeat_interleave(FP8_BLOCK[1], 1)[:, : w.shape[1]]
        t[name[: -len("_scale_inv")]] = w.float() * full
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    for k in ("quantization_config", "auto_map"):
        cfg.pop(k)
    cfg["model_type"] = "deepseek_v3"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_kimi_k2_fp8_source(env):
    from transformers import AutoModelForCausalLM

    twin = _float_twin(env.models["kimi"], env.root / "kimi_twin")
    run = job(env, "kimi", "kimi", "quant=gptq_w4a16", capture=False)
    run_twin = job(env, "kimi_twin", twin, "quant=gptq_w4a16", capture=False)
    a, b = read_tensors(run.out), read_tensors(run_twin.out)
    assert set(a) == set(b) and not any("scale_inv" in n for n in a)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    cfg = json.loads((run.out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and "auto_map" not in cfg
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg == json.loads((run_twin.out / "config.json").read_text())
    loaded, info = AutoModelForCausalLM.from_pretrained(str(run.out), dtype=torch.float32, output_loading_info=True)
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM" and not any(info.values())


# -- two ranks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, extra", [("gptq", ("quant=gptq_w4a16",)),
                                        ("w8a8", ("quant=smoothquant_w8a8", "quant.act_dynamic=true"))])
def test_two_ranks_write_the_one_rank_checkpoint(env, key, extra):
    one = job(env, key, "ds", *extra)
    two = finish(start_ranks(env.models["ds"], env.root / f"out_{key}_w2", _args(env.root, *extra), 2,
                             env.root / f"trace_{key}"))
    assert two.rc == 0, two.stderr[-4000:]
    a, b = read_tensors(one.out), read_tensors(two.out)
    assert set(a) == set(b)
    differ = [n for n in a if not (a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]))]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    assert two.report["moe"]["tokens_moved_per_layer"] > 0


def test_tokenizer_code_named_by_auto_map_is_copied_not_run(tmp_path):
    from dist_quant.run import TOKENIZER_FILES, tokenizer_code_files

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}))
    (tmp_path / "tokenization_kimi.py").write_text("raise SystemExit('must not run')\n")
    assert tokenizer_code_files(tmp_path) == ["tokenization_kimi.py"] and "tiktoken.model" in TOKENIZER_FILES
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["../evil.X", None]}}))
    assert tokenizer_code_files(tmp_path) == []
