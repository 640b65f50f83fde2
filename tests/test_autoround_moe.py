"""quant.method=autoround on MoE models (dist_quant/autoround_moe.py): qwen2_moe (shared expert
with its sigmoid gate), mixtral (``block_sparse_moe`` names), glm4_moe (a dense first layer,
shared experts without a gate, the sigmoid router with its correction bias) and deepseek_v3 (MLA
attention, a dense first layer, shared experts, the sigmoid group-limited router), checked against
independent references:

* the hidden states the quantized chain propagates equal the transformers model carrying the
  output's dequantized weights (tests/moe_reference.py, our own unpacker): routing, shared
  expert and the routed experts' weighting are the model's;
* 2 gloo ranks (experts split over owners, tokens dispatched) write exactly 1 rank's tensors;
* the tuned sparse layer 0 (it sees the float embeddings in every model, so its error is what
  the tuning minimized) is closer to the float layer than round-to-nearest recomputed here;
* every routed expert's report entry: tuned steps and the routed tokens the router counts;
* transformers loads the output and its logits equal the fake-quant reference;
* GPTQ initialization (``quant.autoround.init=gptq``): with one step (the best-loss parameters
  are then the start) layer 0's integers are the GPTQ job's (run here with the same observer)
  as far as the parameterization reproduces them, for attention, shared and every routed
  expert; 2 ranks write 1 rank's tensors;
* a quantized router is refused in one line before any work.
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
from moe_jobs import run_inprocess  # noqa: E402
from moe_reference import QLinear, load_fake_quant, quantized_linears, router_counts  # noqa: E402
from reference import assert_layers_match_model, read_tensors, reference_rtn  # noqa: E402
from tiny import corpus_text  # noqa: E402
from tiny_deepseek import make_tiny_deepseek  # noqa: E402
from tiny_moe import make_tiny_moe  # noqa: E402
from test_glm4_moe import make_tiny_glm4_moe  # noqa: E402

NUM_SAMPLES, SEQ_LEN, BATCH, ITERS = 16, 64, 4, 12
ARCHS = {"qwen2_moe": 32, "mixtral": 32, "glm4_moe": 32, "deepseek_v3": 16}  # → group size (deepseek: q_b_proj reads 48)
ATOL = 1e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoround_moe")
    calib = root / "calib.txt"
    calib.write_text(corpus_text(40_000), encoding="utf-8")
    models = {"qwen2_moe": make_tiny_moe(root / "m_qwen2_moe", "qwen2_moe", layers=2, experts=4),
              "mixtral": make_tiny_moe(root / "m_mixtral", "mixtral", layers=2, experts=5),
              "glm4_moe": make_tiny_glm4_moe(root / "m_glm4_moe"),
              "deepseek_v3": make_tiny_deepseek(root / "m_deepseek_v3", layers=3, experts=8)}
    extra = {arch: (f"quant.group_size={g}", f"quant.autoround.iters={ITERS}", f"calib.batch_size={BATCH}")
             for arch, g in ARCHS.items()}
    ports = iter(free_ports(len(ARCHS)))
    two = {}
    for arch in ARCHS:  # 2 real gloo ranks in the background ...
        two[arch] = make_job(f"{arch}-w2", models[arch], root / f"out2_{arch}", root / f"run2_{arch}", calib,
                             "autoround_w4a16", extra[arch], nproc=2, port=next(ports),
                             num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
        two[arch].start()
    one = {}  # ... while 1 rank runs in this process, its hidden states captured per layer
    for arch in ARCHS:
        args = ["quant=autoround_w4a16", f"calib.path={calib}", f"calib.num_samples={NUM_SAMPLES}",
                f"calib.seq_len={SEQ_LEN}", "output.part_file_size=100KB", *extra[arch]]
        one[arch] = run_inprocess(models[arch], root / f"out1_{arch}", args, capture=True)
    for job in two.values():
        job.wait()
    return SimpleNamespace(root=root, calib=calib, models=models, one=one, two=two)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_chain_is_the_fake_quant_model(env, arch):
    run = env.one[arch]
    model, replaced = load_fake_quant(env.models[arch], run.out)
    assert any(".experts." in n for n in replaced) and any("self_attn" in n for n in replaced)
    assert run.calib.mask.all()
    assert_layers_match_model(model, run.calib.input_ids, [run.xs[i] for i in sorted(run.xs)], ATOL,
                              label=f"{arch} ")


@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_write_the_tensors_of_one_rank(env, arch):
    one, two = read_tensors(env.one[arch].out), read_tensors(env.two[arch].check())
    assert one.keys() == two.keys()
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differ, differ[:5]
    report = json.loads((env.two[arch].out / "quant_report.json").read_text())
    owners = {m["rank"] for layer in report["layers"] for n, m in layer["modules"].items() if ".experts." in n}
    assert owners == {0, 1}  # the experts were split over both ranks
    moved = [layer["tokens_moved"] for layer in report["moe"]["layers"]]
    assert all(m > 0 for m in moved)  # tokens crossed ranks to their experts' owners


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_tuned_sparse_layer_is_closer_to_float_than_rtn(env, arch):
    run, model_dir, group = env.one[arch], env.models[arch], ARCHS[arch]
    tensors = read_tensors(run.out)
    original = read_tensors(model_dir)
    rtn = {}
    for name, t in original.items():  # layer 0's quantized linears by round-to-nearest, min/max
        base = name[:-len(".weight")]
        if name.startswith("model.layers.0.") and base + ".weight_packed" in tensors:
            r = reference_rtn(t, 4, group, True)
            rtn[base] = QLinear(r.q, r.scale, None)
    assert any(".experts." in n for n in rtn) and any("self_attn" in n for n in rtn)
    tuned, _ = load_fake_quant(model_dir, run.out)
    rounded, _ = load_fake_quant(model_dir, run.out, qlinears=rtn)
    floatm, _ = load_fake_quant(model_dir, run.out, qlinears={})
    ids = run.calib.input_ids
    with torch.no_grad():
        h = {k: m(ids, output_hidden_states=True).hidden_states[1] for k, m in
             (("tuned", tuned), ("rtn", rounded), ("float", floatm))}
    err_tuned = (h["tuned"] - h["float"]).pow(2).mean().item()
    err_rtn = (h["rtn"] - h["float"]).pow(2).mean().item()
    assert err_tuned < 0.9 * err_rtn, (err_tuned, err_rtn)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_every_expert_is_tuned_on_its_routed_tokens(env, arch):
    run = env.one[arch]
    model, _ = load_fake_quant(env.models[arch], run.out)
    counts = router_counts(model, run.calib.input_ids)
    section = run.report["moe"]
    assert [layer["layer"] for layer in section["layers"]] == sorted(counts)
    for layer in section["layers"]:
        i = layer["layer"]
        assert layer["tokens_per_expert"] == counts[i].tolist()
        modules = run.report["layers"][i]["modules"]
        for e, routed in enumerate(layer["tokens_per_expert"]):
            entries = [m for n, m in modules.items() if f".experts.{e}." in n]
            assert len(entries) == 3 and all(m["routed_tokens"] == routed for m in entries)
            if routed:
                assert all(m["autoround"]["steps"] == ITERS and m["autoround"]["loss_best"] <= m["autoround"]
                           ["loss_init"] for m in entries)
                assert all(0 < m["rel_output_error"] < 1 for m in entries)
        shared = [m for n, m in modules.items() if ".shared_expert" in n]
        assert shared and all(m["autoround"]["steps"] == ITERS for m in shared)


def test_transformers_loads_output_with_fake_quant_logits(env):
    from transformers import AutoModelForCausalLM

    arch = "qwen2_moe"
    out = env.one[arch].out
    loaded, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager",
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref, _ = load_fake_quant(env.models[arch], out)
    torch.manual_seed(1)
    ids = torch.randint(0, ref.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def gptq_env(env):
    """``init=gptq`` jobs: 1 step (the start is the result) beside a GPTQ job with the tuning's
    observer, for the two families whose layer 0 is sparse; 4 steps on 1 and 2 ranks."""
    root = env.root
    common = [f"calib.path={env.calib}", f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}",
              f"calib.batch_size={BATCH}", "output.part_file_size=100KB"]
    init = ("quant=autoround_w4a16", "quant.autoround.init=gptq")
    two_archs = ("qwen2_moe", "deepseek_v3")
    ports = iter(free_ports(len(two_archs)))
    two = {}
    for arch in two_archs:
        extra = (f"quant.group_size={ARCHS[arch]}", "quant.autoround.iters=4", "quant.autoround.init=gptq",
                 f"calib.batch_size={BATCH}")
        two[arch] = make_job(f"{arch}-gi2", env.models[arch], root / f"gi2_{arch}", root / f"gi2run_{arch}",
                             env.calib, "autoround_w4a16", extra, nproc=2, port=next(ports),
                             num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
        two[arch].start()
    start, gptq, one = {}, {}, {}
    for arch in ("qwen2_moe", "mixtral"):
        g = f"quant.group_size={ARCHS[arch]}"
        start[arch] = run_inprocess(env.models[arch], root / f"gi_start_{arch}",
                                    [*init, "quant.autoround.iters=1", g, *common])
        gptq[arch] = run_inprocess(env.models[arch], root / f"gi_gptq_{arch}",
                                   ["quant=gptq_w4a16", "quant.observer=minmax", g, *common])
    for arch in two_archs:
        one[arch] = run_inprocess(env.models[arch], root / f"gi1_{arch}",
                                  [*init, "quant.autoround.iters=4", f"quant.group_size={ARCHS[arch]}", *common])
    for job in two.values():
        job.wait()
    return SimpleNamespace(start=start, gptq=gptq, one=one, two=two)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_gptq_init_starts_from_the_gptq_integers(env, gptq_env, arch):
    group = ARCHS[arch]
    start = quantized_linears(read_tensors(gptq_env.start[arch].out), 4)
    gptq = quantized_linears(read_tensors(gptq_env.gptq[arch].out), 4)
    original = read_tensors(env.models[arch])
    layer0 = [n for n in gptq if n.startswith("model.layers.0.")]
    assert any(".experts." in n for n in layer0) and any("self_attn" in n for n in layer0)
    if arch == "qwen2_moe":
        assert any(".shared_expert." in n for n in layer0)
    for name in layer0:  # layer 0 sees the float embeddings in both jobs: the same GPTQ problem
        ref = gptq[name]
        rtn = reference_rtn(original[name + ".weight"], 4, group, True, torch.bfloat16)
        rtn_hat = rtn.q.float() * rtn.scale.float().repeat_interleave(group, dim=1)
        agree = (start[name].q == ref.q).float().mean().item()
        assert agree >= 0.95 and agree > (rtn.q == ref.q).float().mean().item() + 0.05, (name, agree)
        d_start = (start[name].dequantize() - ref.dequantize()).norm()
        assert d_start < 0.5 * (rtn_hat - ref.dequantize()).norm(), name
    modules = gptq_env.start[arch].report["layers"][0]["modules"]
    assert all(m["autoround"]["steps"] == 1 for m in modules.values())  # the tuning's own entries, not GPTQ's


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_gptq_init_two_ranks_write_the_tensors_of_one_rank(gptq_env, arch):
    one, two = read_tensors(gptq_env.one[arch].out), read_tensors(gptq_env.two[arch].check())
    assert one.keys() == two.keys()
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("override, words", [
    ("quant.moe_ignore=[shared_expert_gate]", "must list 'gate'"),
])
def test_refused_before_work(tmp_path, override, words):
    model = make_tiny_moe(tmp_path / "moe", "qwen3_moe")
    code, out, err = run_main([f"model.path={model}", "quant=autoround_w4a16", "quant.group_size=32", override,
                               f"output.dir={tmp_path / 'o'}", f"runtime.run_dir={tmp_path / 'r'}"])
    assert code != 0 and words in out + err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
