"""NVFP4 (``quant=nvfp4``, W4A4) and NVFP4A16 for DeepSeek-V3 / Kimi-K2 (MLA attention, MoE) on a
tiny random model built from transformers' ``DeepseekV3Config`` (tests/tiny_deepseek.py), written as
compressed-tensors ``nvfp4-pack-quantized`` for vLLM's ``DeepseekV2ForCausalLM``:

* ``kv_b_proj`` is weight-only in W4A4 jobs: vLLM dequantizes it at load into W_UK / W_UV by running
  its quantized method on the identity matrix (``split_kv_b_proj`` → ``get_and_maybe_dequant_weights``,
  vllm/model_executor/layers/attention/mla_attention.py), which a static NVFP4 input global scale does
  not reproduce. The config has a second group (NVFP4A16, targets ``re:.*\\.self_attn\\.kv_b_proj$``,
  no input_activations), kv_b_proj has no input_global_scale, and both compressed-tensors' own
  matcher and vLLM's rule (layer-name targets before the class target) give it that group;
* the reader of tests/reference.py decodes every weight and matches the fake-quant reader; RTN
  matches the published rule; q_a_proj / kv_a_proj_with_mqa (vLLM's ``fused_qkv_a_proj``) and gate /
  up share one weight global scale (448·6 / max|w| of both) and, W4A4, one input global scale; the
  vLLM parameter tables of every layer are filled exactly;
* the hidden states after every layer equal a float model built here from the decoded weights, with
  NVFP4 inputs (tests/reference.py's rule) on every quantized linear but kv_b_proj, and are farther
  from it when kv_b_proj's input is quantized too;
* an input size that is not a multiple of 16 is refused in one line naming the linear; 2 ranks = 1.
"""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import run_main  # noqa: E402
from moe_jobs import finish, run_inprocess, start_ranks  # noqa: E402
from reference import F8, nvfp4_decode, nvfp4_input_reference, nvfp4_rtn_reference, read_tensors  # noqa: E402
from server_loaders import check_complete, load, mla_layer_modules, vllm_nvfp4, vllm_nvfp4_moe  # noqa: E402
from tiny import corpus_text  # noqa: E402
from tiny_deepseek import make_tiny_deepseek  # noqa: E402

NUM_SAMPLES, SEQ_LEN, BATCH = 16, 64, 4
LAYERS, EXPERTS = 3, 8
KV_B_TARGET = r"re:.*\.self_attn\.kv_b_proj$"
FUSED = (("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj"))  # vLLM fused_qkv_a_proj, gate_up_proj
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvfp4_deepseek")
    (root / "calib.txt").write_text(corpus_text(40_000), encoding="utf-8")
    return SimpleNamespace(root=root, model=make_tiny_deepseek(root / "ds", layers=LAYERS, experts=EXPERTS, mtp=1),
                           runs={})


def _args(root: Path, *extra: str) -> list[str]:
    return [f"calib.path={root / 'calib.txt'}", f"calib.num_samples={NUM_SAMPLES}", f"calib.seq_len={SEQ_LEN}",
            f"calib.batch_size={BATCH}", *extra]


def job(env, preset: str, solver: str):
    key = f"{preset}-{solver}"
    if key not in env.runs:
        extra = (f"quant={preset}", f"quant.weight_solver={solver}")
        env.runs[key] = run_inprocess(env.model, env.root / f"out_{key}", _args(env.root, *extra), capture=True)
    return env.runs[key]


def quantized(t: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".weight_packed")] for k in t if k.endswith(".weight_packed"))


def fused_parts(mod: str) -> list[str]:
    """``mod`` and the linears a server fuses it with (one weight global scale)."""
    parent, leaf = mod.rsplit(".", 1)
    for parts in FUSED:
        if leaf in parts:
            return [f"{parent}.{p}" for p in parts]
    return [mod]


def vllm_group(layer_name: str, groups: dict) -> str:
    """The config group vLLM's ``find_matched_target`` gives a layer (compressed_tensors/utils.py): the
    first target equal to its name or ``re:`` matching it (``re.match``), else the class target
    (``"Linear"`` is contained in every vLLM linear class name); fused layers match by their shards
    only when every shard does, which name targets here never do for q_a / kv_a."""
    for key, group in groups.items():
        for target in group["targets"]:
            if target == layer_name or (target.startswith("re:") and re.match(target[3:], layer_name)):
                return key
    return next(k for k, g in groups.items() if "Linear" in g["targets"])


# -- the plan, the config groups and the tensors -------------------------------------------------------
def test_kv_b_proj_is_weight_only_in_w4a4_jobs(env):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.utils.match import match_targets
    from torch import nn

    from dist_quant.checkpoint import Checkpoint
    from dist_quant.config import QuantConfig
    from dist_quant.plan import inspect_model

    ckpt = Checkpoint(env.model)
    w4a4 = QuantConfig(name="nvfp4", weight_type="nvfp4", bits=4, group_size=16, act_bits=4, act_type="nvfp4",
                       act_dynamic=False)
    plan = inspect_model(ckpt, w4a4)
    assert {lin.name for lin in plan.linears if lin.weight_only} == {
        f"model.layers.{i}.self_attn.kv_b_proj" for i in range(LAYERS)}
    a16 = inspect_model(ckpt, QuantConfig(name="nvfp4a16", weight_type="nvfp4", bits=4, group_size=16))
    assert not any(lin.weight_only for lin in a16.linears)

    run = job(env, "nvfp4", "rtn")
    config = json.loads((run.out / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert list(groups) == ["group_0", "group_1"]
    for key, preset, targets in (("group_0", "NVFP4", ["Linear"]), ("group_1", "NVFP4A16", [KV_B_TARGET])):
        want = preset_name_to_scheme(preset, targets).model_dump(mode="json")
        got = groups[key]
        assert got["targets"] == targets and got["weights"] == want["weights"], key
        assert got.get("input_activations") == want.get("input_activations"), key
    assert groups["group_1"]["input_activations"] is None and groups["group_0"]["input_activations"] is not None

    # which group each attention linear gets: compressed-tensors' matcher (transformers) and vLLM's rule
    targets = [tg for g in groups.values() for tg in g["targets"]]
    for i in range(LAYERS):
        for leaf in ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj"):
            name = f"model.layers.{i}.self_attn.{leaf}"
            assert match_targets(name, nn.Linear(16, 16), targets)[0] == (
                KV_B_TARGET if leaf == "kv_b_proj" else "Linear"), name
        for m in mla_layer_modules(config, i, lambda *a: {}, lambda *a: {}):
            assert vllm_group(m.name, groups) == ("group_1" if m.name.endswith(".kv_b_proj") else "group_0"), m.name

    t = read_tensors(run.out)
    mods = quantized(t)
    assert len(mods) == LAYERS * 5 + 3 + (LAYERS - 1) * (3 + 3 * EXPERTS)
    for mod in mods:  # kv_b_proj: NVFP4A16 tensors; every other linear (experts too): W4A4
        assert (mod + ".input_global_scale" in t) == (not mod.endswith(".kv_b_proj")), mod
    assert not any(k.startswith(f"model.layers.{LAYERS}.") and "weight_packed" in k for k in t)  # MTP: float


def test_kimi_k2_plan_marks_kv_b_proj_too(tmp_path):
    from dist_quant.checkpoint import Checkpoint
    from dist_quant.config import QuantConfig
    from dist_quant.plan import inspect_model, weight_only_targets

    kimi = make_tiny_deepseek(tmp_path / "kimi", layers=2, experts=4, mtp=0, n_group=1, topk_group=1,
                              fp8_block=(16, 16), kimi=True)
    plan = inspect_model(Checkpoint(kimi), QuantConfig(name="nvfp4", weight_type="nvfp4", bits=4, group_size=16,
                                                       act_bits=4, act_type="nvfp4", act_dynamic=False))
    assert plan.arch.name == "kimi_k2"
    assert [lin.name for lin in plan.linears if lin.weight_only] == [f"model.layers.{i}.self_attn.kv_b_proj"
                                                                      for i in range(2)]
    assert weight_only_targets(plan) == [KV_B_TARGET]


# -- the weights by an independent reader, fused scales, the vLLM tables ---------------------------------
@pytest.mark.parametrize("preset,solver", [("nvfp4", "rtn"), ("nvfp4a16", "rtn"), ("nvfp4", "gptq")])
def test_weights_by_an_independent_reader_and_the_vllm_tables(env, preset, solver):
    from dist_quant.fakequant import _linear_plan_ct  # the fake-quant reader, compared below

    run = job(env, preset, solver)
    config = json.loads((run.out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    t, src = read_tensors(run.out), read_tensors(env.model)
    w4a4 = preset == "nvfp4"
    reader = _linear_plan_ct(t, config)
    for mod in quantized(t):
        kv_b = mod.endswith(".kv_b_proj")
        assert t[mod + ".weight_scale"].dtype == F8 and t[mod + ".weight_global_scale"].dtype == torch.float32
        w_hat = nvfp4_decode(t, mod)
        assert torch.equal(reader[mod][0].float(), w_hat), mod
        assert reader[mod][1][0] == ("nvfp4" if w4a4 and not kv_b else "none"), mod
        parts = fused_parts(mod)  # one global scale 448·6 / max|w| over the fused parts (RTN and GPTQ)
        amax = max(float(src[n + ".weight"].abs().max()) for n in parts)
        assert float(t[mod + ".weight_global_scale"]) == pytest.approx(448 * 6 / amax, rel=1e-6), mod
        for n in parts:
            assert torch.equal(t[n + ".weight_global_scale"], t[mod + ".weight_global_scale"]), n
            if w4a4 and not kv_b:
                assert torch.equal(t[n + ".input_global_scale"], t[mod + ".input_global_scale"]), n
        if solver == "rtn":
            assert torch.equal(w_hat, nvfp4_rtn_reference(src[mod + ".weight"], t[mod + ".weight_global_scale"])), mod

    for i in range(LAYERS):  # vLLM's parameters for every layer (a differing fused-shard scale fails the load)
        modules = mla_layer_modules(config, i, lambda name, o, n: vllm_nvfp4(o, n, w4a4 and not name.endswith("kv_b_proj")),
                                    lambda e, h, n: vllm_nvfp4_moe(e, h, n, w4a4))
        layer = {k: v for k, v in t.items() if k.startswith(f"model.layers.{i}.")}
        loaded = load(modules, layer)
        check_complete(modules, loaded)
        left = {k for k in layer if k not in loaded.consumed}
        assert all(k.endswith(("layernorm.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
                   for k in left), left


# -- the model the pipeline calibrated ----------------------------------------------------------------------
def _served_model(env, t: dict[str, torch.Tensor], quantize_kv_b: bool):
    """The float model with the decoded NVFP4 weights and NVFP4 inputs (tests/reference.py) on every
    quantized linear: kv_b_proj's only with ``quantize_kv_b`` (with q_b_proj's input global scale,
    kv_b_proj having none). Routed experts: an expert loop of our own around the fused parameters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(env.model), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    params = dict(model.named_parameters())
    gs13, gs2 = {}, {}  # layer → per-expert input global scales
    with torch.no_grad():
        for mod in quantized(t):
            w = nvfp4_decode(t, mod)
            m = _EXPERT.match(mod)
            if m is None:
                params[mod + ".weight"].copy_(w)
                gs = t.get(mod + ".input_global_scale")
                if mod.endswith(".kv_b_proj") and quantize_kv_b:
                    gs = t[mod.replace("kv_b_proj", "q_b_proj") + ".input_global_scale"]
                if gs is not None:
                    model.get_submodule(mod).register_forward_pre_hook(
                        lambda _, args, gs=gs: (nvfp4_input_reference(args[0], gs), *args[1:]))
                continue
            layer, e, role = m.group(1), int(m.group(2)), m.group(3)
            if role == "down_proj":
                params[f"{layer}.mlp.experts.down_proj"][e].copy_(w)
                gs2.setdefault(layer, {})[e] = t[mod + ".input_global_scale"]
            else:
                fused = params[f"{layer}.mlp.experts.gate_up_proj"][e]
                inter = fused.shape[0] // 2
                (fused[:inter] if role == "gate_proj" else fused[inter:]).copy_(w)
                gs13.setdefault(layer, {})[e] = t[mod + ".input_global_scale"]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            tok, slot = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            x = nvfp4_input_reference(hidden_states[tok], self.gs13[e])
            gate, up = torch.nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            a = nvfp4_input_reference(self.act_fn(gate) * up, self.gs2[e])
            y = torch.nn.functional.linear(a, self.down_proj[e]) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    for layer in gs13:
        experts = model.get_submodule(layer + ".mlp.experts")
        experts.gs13, experts.gs2 = gs13[layer], gs2[layer]
        experts.forward = types.MethodType(forward, experts)
    return model


def _layer_gaps(model, run) -> list[float]:
    """Per decoder layer: max |pipeline hidden state − model's| / max |model's|."""
    with torch.no_grad():
        hs = model(run.calib.input_ids, output_hidden_states=True).hidden_states
        gaps = []
        for i in range(LAYERS):
            got, want = run.xs[i].reshape(hs[0].shape), hs[i + 1]
            if i == LAYERS - 1:  # transformers applies the final norm to the last hidden state
                got = model.model.norm(got)
            gaps.append(float((got - want).abs().max() / want.abs().max()))
    return gaps


def test_hidden_states_are_the_model_with_a_weight_only_kv_b_proj(env):
    run = job(env, "nvfp4", "rtn")
    t = read_tensors(run.out)
    served = _layer_gaps(_served_model(env, t, quantize_kv_b=False), run)
    other = _layer_gaps(_served_model(env, t, quantize_kv_b=True), run)
    assert max(served) < 1e-5, served  # observed: 0.0 (the same operations on the same values)
    assert min(other) > 100 * max(served) and min(other) > 1e-3, (served, other)


# -- refusals, the dry run, two ranks -------------------------------------------------------------------------
def test_input_sizes_off_the_nvfp4_group_are_refused_in_one_line(env, tmp_path):
    model = make_tiny_deepseek(tmp_path / "q40", layers=2, experts=4, q_lora_rank=40, mtp=0)
    out = tmp_path / "out"
    code, _, err = run_main([f"model.path={model}", *_args(env.root, "quant=nvfp4"), f"output.dir={out}",
                             f"runtime.run_dir={out}.run"])
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code != 0 and len(lines) == 1, err[-2000:]
    assert "model.layers.0.self_attn.q_b_proj has 40 input features" in lines[0] and "16" in lines[0], lines[0]
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_dry_run_plans_the_written_tensors(env, monkeypatch):
    """The dry run's output plan (the specs it sizes the part files from) names exactly the tensors a
    run writes: kv_b_proj without input_global_scale."""
    import dist_quant.writer as writer
    from dist_quant.dry_run import plan_report
    from dist_quant.settings import load_config

    run = job(env, "nvfp4", "rtn")
    seen = []
    real = writer.plan_parts
    monkeypatch.setattr(writer, "plan_parts", lambda specs, *a, **k: seen.append(specs) or real(specs, *a, **k))
    cfg = load_config([f"model.path={env.model}", *_args(env.root, "quant=nvfp4"), "dry_run=true",
                       "runtime.world_size=2", "runtime.device=cpu"])
    plan_report(cfg, str(env.model), 2)
    planned = {spec.name for rank in seen[0] for spec in rank}
    assert planned == set(read_tensors(run.out))
    assert not any(n.endswith("kv_b_proj.input_global_scale") for n in planned)


def test_two_ranks_write_the_one_rank_checkpoint(env):
    one = job(env, "nvfp4", "gptq")
    extra = ("quant=nvfp4", "quant.weight_solver=gptq")
    two = finish(start_ranks(env.model, env.root / "out_nvfp4_w2", _args(env.root, *extra), 2, env.root / "trace"))
    assert two.rc == 0, two.stderr[-4000:]
    a, b = read_tensors(one.out), read_tensors(two.out)
    assert set(a) == set(b)
    same = lambda x, y: x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.dtype == F8 else x,  # noqa: E731
                                                           y.view(torch.uint8) if y.dtype == F8 else y)
    differ = [n for n in a if not same(a[n], b[n])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    assert json.loads((one.out / "config.json").read_text()) == json.loads((two.out / "config.json").read_text())
    assert two.report["moe"]["tokens_moved_per_layer"] > 0
