"""Fallback of sensitive linears (docs/fallback.md): ``quant.fallback.max_linears`` /
``threshold`` / ``to`` and ``quant.disable_names``.

* the linears kept are exactly the top N by a relative output error recomputed here
  (float model's inputs from transformers hooks, round-to-nearest from the published formulas),
  closed over their fused partners;
* the mixed output (W4 group_0 + W8 per-channel group_1; float linears in ``ignore``) loads in
  transformers and its logits equal our own fake-quant model's;
* the servers' matching rules (vLLM: exact ignore, SGLang: substring ignore; both: name
  target, then class name, then fused shards) give every fused layer the scheme of its shards,
  and the tensors fill the parameters those schemes create (tests/server_loaders.py);
* 2 ranks = 1 rank; bad values refused in one line.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import free_port, make_job, run_main  # noqa: E402
from reference import read_quant_linear, read_tensors, reference_rtn  # noqa: E402
from server_loaders import F32, Param, check_complete, layer_modules, load, vllm_wna16  # noqa: E402
from tiny import WIKI, make_tiny_model  # noqa: E402

SAMPLES, SEQ, GROUP = 8, 64, 32
BASE = ["quant=gptq_w4a16", f"quant.group_size={GROUP}", "quant.observer=minmax"]
STAGES = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


def argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", *BASE, f"calib.path={WIKI}", f"calib.num_samples={SAMPLES}",
            f"calib.seq_len={SEQ}", f"output.dir={out}", f"runtime.run_dir={out}.run", "runtime.threads=1",
            *extra]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback")
    model = make_tiny_model(root / "model", layers=2)
    w8 = ("quant.fallback.max_linears=2", "quant.fallback.to=w8")
    two = make_job("two", model, root / "w8-2ranks", root / "two.run", WIKI, "gptq_w4a16",
                   extra=(*BASE[1:], *w8), nproc=2, port=free_port(), num_samples=SAMPLES, seq_len=SEQ).start()
    outs = {}
    for name, extra in (("w8", w8), ("float", ("quant.fallback.max_linears=1", "quant.fallback.to=float",
                                               "quant.disable_names=[model.layers.0.mlp.down_proj]"))):
        code, stdout, stderr = run_main(argv(model, root / name, *extra))
        assert code == 0, stderr[-3000:]
        outs[name] = root / name
    outs["two"] = two.wait(600).check()
    return model, outs


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fallback1") / "model", layers=1)


def report(out: Path) -> dict:
    return json.loads((out / "quant_report.json").read_text())


def reference_errors(model_dir: Path) -> dict[str, float]:
    """Relative output error ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² of RTN weights on the float model's own inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(WIKI.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:SAMPLES * SEQ]
    ids = torch.tensor(ids).reshape(SAMPLES, SEQ)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    errors = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).double()
        w = model.get_submodule(name).weight.detach()
        w_hat = reference_rtn(w, 4, GROUP, True).dequantize().double()
        errors[name] = float((x @ (w.double() - w_hat).T).pow(2).sum() / (x @ w.double().T).pow(2).sum())
    return errors


def closed(names) -> set[str]:
    """``names`` with their stage partners (the linears sharing their input)."""
    out = set()
    for name in names:
        layer, rel = re.fullmatch(r"(model\.layers\.\d+)\.(.+)", name).groups()
        out |= {f"{layer}.{x}" for stage in STAGES if rel in stage for x in stage}
    return out


def test_kept_linears_are_the_top_n_by_an_independent_error(jobs):
    model, outs = jobs
    ref = reference_errors(model)
    got = report(outs["w8"])["fallback"]
    ranked = sorted(ref, key=lambda n: -ref[n])
    assert ref[ranked[1]] > 1.002 * ref[ranked[2]]  # no near tie (the two errors agree to 1e-3, below)
    assert {r["name"] for r in got["linears"]} == closed(ranked[:2])
    assert {r["name"] for r in got["linears"] if r["reason"] == "top-N"} == set(ranked[:2])
    for name, e in ref.items():  # the pre-pass measured the same errors
        assert got["probe_errors"][name] == pytest.approx(e, rel=1e-3), name
    # disable_names + N=1, float: the named linear and the top one outside it
    fl = report(outs["float"])["fallback"]
    rest = [n for n in ranked if n != "model.layers.0.mlp.down_proj"]
    assert {r["name"] for r in fl["linears"]} == closed(["model.layers.0.mlp.down_proj", rest[0]])
    assert all(r["to"] == "float" and r["rel_output_error"] == 0.0 for r in fl["linears"])


def test_mixed_groups_load_in_transformers_and_match_fake_quant(jobs):
    from transformers import AutoModelForCausalLM

    model_dir, outs = jobs
    out = outs["w8"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = {r["name"] for r in report(out)["fallback"]["linears"]}
    g1 = cfg["config_groups"]["group_1"]
    assert g1["weights"]["num_bits"] == 8 and g1["weights"]["strategy"] == "channel"
    tensors = read_tensors(out)
    fake = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in fake.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                ql = read_quant_linear(tensors, name, 8 if name in kept else 4)
                assert ql.scale.shape[1] == (1 if name in kept else mod.in_features // GROUP), name
                mod.weight.copy_(ql.dequantize())
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for name in kept:  # compressed-tensors resolved the name target over "Linear"
        assert loaded.get_submodule(name).quantization_scheme.weights.num_bits == 8, name
    ids = torch.arange(3, 99).reshape(2, 48)
    with torch.no_grad():
        got, want = loaded(ids).logits, fake(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


# -- the servers' matching (vllm/.../compressed_tensors/utils.py; SGLang's copy) -----------------
def _match(value: str, target: str, contains: bool = False) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    return target.lower() in value.lower() if contains else target == value


FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def server_scheme(prefix: str, cls: str, config: dict, substring_ignore: bool):
    """should_ignore_layer, then find_matched_target → the group's weights (None: unquantized)."""
    ignore = config["ignore"]
    leaf = prefix.rsplit(".", 1)[1]
    shards = [prefix[: -len(leaf)] + s for s in FUSED.get(leaf, [leaf])]
    ignored = {any(_match(s, t, substring_ignore) for t in ignore) for s in shards}
    if len(ignored) > 1:
        raise ValueError(f"different quantization schemes for the shards of {prefix}")
    if ignored.pop():
        return None
    targets = {t: g["weights"] for g in config["config_groups"].values() for t in g["targets"]}
    hit = (next((t for t in targets if _match(prefix, t)), None)
           or next((t for t in targets if _match(cls, t, True)), None))
    return targets[hit]


@pytest.mark.parametrize("name", ["w8", "float"])
@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_servers_resolve_every_fused_layer_and_tensors_fill_it(jobs, name, server):
    _, outs = jobs
    out = outs[name]
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    kept = {r["name"]: r["to"] for r in report(out)["fallback"]["linears"]}
    tensors = read_tensors(out)
    classes = {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear"}
    for layer in range(config["num_hidden_layers"]):
        pd = torch.float32
        tables = {bits: layer_modules(config, layer, lambda o, i, b=bits: vllm_wna16(o, i, b, GROUP if b == 4 else -1,
                                                                                    True, pd), None, False, pd)
                  for bits in (4, 8)}
        floats = layer_modules(config, layer, lambda o, i: {"weight": Param(F32, (o, i))}, None, False, pd)
        modules = []
        for k, mod in enumerate(floats):
            leaf = mod.name.rsplit(".", 1)[1]
            weights = server_scheme(mod.name, classes.get(leaf, "RowParallelLinear"), qc, server == "sglang")
            shards = [s for s, _ in mod.shards]
            want = {kept.get(s, "w4") for s in shards}
            assert len(want) == 1, mod.name  # fused partners took one decision
            want = want.pop()
            if weights is None:
                assert want == "float", mod.name
                modules.append(mod)
            else:
                assert weights["num_bits"] == (8 if want == "w8" else 4), mod.name
                modules.append(tables[weights["num_bits"]][k])
        mine = {n: t for n, t in tensors.items() if n.startswith(f"model.layers.{layer}.") and "layernorm" not in n}
        loaded = load(modules, mine)
        check_complete(modules, loaded)
        assert set(mine) == loaded.consumed


def test_two_ranks_take_the_same_decision_and_write_the_same_tensors(jobs):
    _, outs = jobs
    one, two = report(outs["w8"])["fallback"], report(outs["two"])["fallback"]
    assert [(r["name"], r["to"], r["reason"]) for r in one["linears"]] == \
           [(r["name"], r["to"], r["reason"]) for r in two["linears"]]
    for n, e in one["probe_errors"].items():
        assert two["probe_errors"][n] == pytest.approx(e, rel=1e-5)
    a, b = read_tensors(outs["w8"]), read_tensors(outs["two"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_choose_is_top_n_with_ties_by_name_plus_threshold():
    from dist_quant.fallback import choose

    errors = {"b": 0.3, "a": 0.3, "c": 0.1, "d": 0.05}
    assert choose(errors, 1, None) == {"a": "top-N"}
    assert choose(errors, 2, 0.06) == {"a": "top-N", "b": "top-N", "c": "threshold"}
    assert choose(errors, 0, None) == {}


@pytest.mark.parametrize("override, key", [
    ("quant.fallback.max_linears=-1", "quant.fallback.max_linears=-1"),
    ("quant.fallback.threshold=1.5", "quant.fallback.threshold=1.5"),
    ("quant.fallback.threshold=0", "quant.fallback.threshold=0"),
    ("quant.fallback.to=fp16", "quant.fallback.to='fp16'"),
    ("quant.disable_names=[no_such_proj]", "quant.disable_names=['no_such_proj']"),
])
def test_bad_values_are_refused_in_one_line(one_layer, tmp_path, override, key):
    model = one_layer
    code, _, stderr = run_main(argv(model, tmp_path / "out", override))
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and key in lines[0], stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_w8_fallback_of_an_8_bit_job_is_refused(one_layer, tmp_path):
    model = one_layer
    code, _, stderr = run_main(argv(model, tmp_path / "out", "quant.bits=8", "quant.fallback.max_linears=1",
                                    "quant.fallback.to=w8"))
    assert code == 2 and "quant.fallback.to='w8'" in stderr and "quant.bits=8" in stderr, stderr[-2000:]


def test_html_report_lists_every_fallback(jobs):
    _, outs = jobs
    page = (outs["w8"] / "quant_report.html").read_text()
    section = page[page.index('id="fallback"'):]
    for r in report(outs["w8"])["fallback"]["linears"]:
        assert r["name"] in section and f"{r['probe_error']:.4g}" in section


def test_ascend_description_marks_float_fallbacks_float(one_layer, tmp_path):
    from dist_quant.formats import ascend

    model = one_layer
    out = tmp_path / "out"
    code, _, stderr = run_main([f"model.path={model}", "quant=rtn_w8a16", "quant.group_size=-1", "output.format=ascend",
                                f"calib.path={WIKI}", f"calib.num_samples={SAMPLES}", f"calib.seq_len={SEQ}",
                                f"output.dir={out}", f"runtime.run_dir={out}.run", "runtime.threads=1",
                                "quant.fallback.max_linears=1", "quant.fallback.to=float"])
    assert code == 0, stderr[-3000:]
    desc = json.loads((out / ascend.DESCRIPTION).read_text())
    kept = {r["name"] for r in report(out)["fallback"]["linears"]}
    assert kept
    for stage in STAGES:
        for rel in stage:
            name = f"model.layers.0.{rel}"
            assert desc[name + ".weight"] == ("FLOAT" if name in kept else "W8A16"), name
            assert (name + ".weight_scale" in desc) == (name not in kept), name


def test_w8_fallback_of_a_w8a8_job_is_w8a16_in_the_ascend_description(one_layer, tmp_path):
    """W8A8 (static activations) with quant.fallback.to=w8: the kept linears are W8A16 (int8
    weights, float activations: no input_scale / deq_scale), the others W8A8, and vLLM-Ascend's
    per-module lookup (fused shards must agree) finds one type per server module."""
    from dist_quant.formats import ascend
    from server_loaders import ascend_quant_type

    out = tmp_path / "out"
    code, _, stderr = run_main([f"model.path={one_layer}", "quant=w8a8", "output.format=ascend",
                                f"calib.path={WIKI}", f"calib.num_samples={SAMPLES}", f"calib.seq_len={SEQ}",
                                f"output.dir={out}", f"runtime.run_dir={out}.run", "runtime.threads=1",
                                "quant.fallback.max_linears=1", "quant.fallback.to=w8"])
    assert code == 0, stderr[-3000:]
    desc = json.loads((out / ascend.DESCRIPTION).read_text())
    kept = {r["name"] for r in report(out)["fallback"]["linears"]}
    assert kept and len(kept) < 7
    for stage in STAGES:
        for rel in stage:
            name = f"model.layers.0.{rel}"
            assert desc[name + ".weight"] == ("W8A16" if name in kept else "W8A8"), name
            assert (name + ".input_scale" in desc) == (name not in kept), name
    config = json.loads((out / "config.json").read_text())
    for prefix in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        shard = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}.get(prefix.split(".")[1], prefix.split(".")[1])
        want = "W8A16" if f"model.layers.0.{prefix.split('.')[0]}.{shard}" in kept else "W8A8"
        assert ascend_quant_type(desc, f"model.layers.0.{prefix}", config["model_type"], "linear") == want


def test_w8_fallback_of_a_compressed_tensors_w8a8_job_is_refused(one_layer, tmp_path):
    code, _, stderr = run_main(argv(one_layer, tmp_path / "out", "quant=w8a8", "quant.group_size=-1",
                                    "quant.fallback.max_linears=1",
                                    "quant.fallback.to=w8"))
    assert code == 2 and "output.format=ascend" in stderr, stderr[-2000:]
