"""Automatic fallback (docs/fallback.md) on an MoE model: a tiny random DeepSeek-V3 layout
(MLA attention with the fused q_a/kv_a pair, one dense MLP layer, then two MoE layers with a
shared expert and routed experts).

* the sensitivity pre-pass ranks the non-expert linears only (attention, shared experts, the
  dense MLP), with the errors recomputed here from transformers' float model (hooks capture
  every non-expert linear's input; round-to-nearest from the published formulas) to 1e-5: the
  errors of the linears of the layer after an MoE layer agree too, so the MoE block propagated
  the float model's activations (router, float experts, shared expert);
* the kept linears are the top N by that error, closed over the fused partners; routed experts
  are never chosen and stay at the job's 4 bits;
* the config: ``float`` linears in ``ignore``, ``w8`` linears in ``group_1``; vLLM's and SGLang's
  matching rules, emulated, resolve every server module (``fused_qkv_a_proj``,
  ``shared_experts.gate_up_proj``, ...) to its shards' decision and the fused MoE layer
  (``CompressedTensorsMoEMethod.get_moe_method``: expert 0's gate/up/down names) to group_0;
* 2 ranks take the same decision and write the same tensors as 1 rank;
* qwen2_moe (a shared expert with its sigmoid gate, no MLA): ranked the same way.
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
from tiny import WIKI  # noqa: E402
from tiny_deepseek import make_tiny_deepseek  # noqa: E402
from tiny_moe import make_tiny_moe  # noqa: E402

SAMPLES, SEQ, GROUP, LAYERS, EXPERTS = 8, 64, 16, 3, 4
BASE = ["quant=gptq_w4a16", f"quant.group_size={GROUP}", "quant.observer=minmax"]
FUSED = {"fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"), "gate_up_proj": ("gate_proj", "up_proj")}
W8 = ("quant.fallback.max_linears=2", "quant.fallback.to=w8")
FLOAT = ("quant.fallback.max_linears=1", "quant.fallback.threshold=0.01", "quant.fallback.to=float")


def argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", *BASE, f"calib.path={WIKI}", f"calib.num_samples={SAMPLES}",
            f"calib.seq_len={SEQ}", f"output.dir={out}", f"runtime.run_dir={out}.run", "runtime.threads=1",
            *extra]


# linears made hard to quantize (a large weight in every group of 16: round-to-nearest loses the
# others); a routed expert among them, so that it would be chosen if experts were candidates
OUTLIERS = {"model.layers.1.mlp.experts.0.down_proj": 8.0, "model.layers.1.mlp.shared_experts.up_proj": 4.0,
            "model.layers.2.mlp.shared_experts.down_proj": 4.0}


def with_outliers(model: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    tensors = load_file(str(path))
    for name, factor in OUTLIERS.items():
        tensors[name + ".weight"][:, ::GROUP] *= factor
    save_file(tensors, str(path), metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fallback_moe")
    model = with_outliers(make_tiny_deepseek(root / "model", layers=LAYERS, experts=EXPERTS, mtp=0, n_group=2,
                                             topk_group=1))
    two = make_job("two", model, root / "w8-2ranks", root / "two.run", WIKI, "gptq_w4a16",
                   extra=(*BASE[1:], *W8), nproc=2, port=free_port(), num_samples=SAMPLES, seq_len=SEQ).start()
    outs = {}
    for name, extra in (("w8", W8), ("float", FLOAT)):
        code, _, stderr = run_main(argv(model, root / name, *extra))
        assert code == 0, stderr[-3000:]
        outs[name] = root / name
    outs["two"] = two.wait(600).check()
    return model, outs


def report(out: Path) -> dict:
    return json.loads((out / "quant_report.json").read_text())


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def reference_errors(model_dir: Path, group: int = GROUP, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² of RTN weights on the float model's inputs, every non-expert linear
    of the decoder layers (transformers 5 holds the routed experts fused, not as nn.Linear; the
    router is not an nn.Linear either)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(WIKI.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:SAMPLES * SEQ]
    ids = torch.tensor(ids).reshape(SAMPLES, SEQ)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n and not is_expert(n)
             and not n.endswith(skip)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    errors = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).double()
        w = model.get_submodule(name).weight.detach()
        w_hat = reference_rtn(w, 4, group, True).dequantize().double()
        errors[name] = float((x @ (w.double() - w_hat).T).pow(2).sum() / (x @ w.double().T).pow(2).sum())
    return errors


def closed(names) -> set[str]:
    """``names`` with their fused partners (same parent module, same fused server layer)."""
    out = set(names)
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        out |= {f"{parent}.{s}" for shards in FUSED.values() if leaf in shards for s in shards}
    return out


def test_pre_pass_ranks_the_non_expert_linears_on_float_inputs(jobs):
    model, outs = jobs
    ref = reference_errors(model)
    assert any(".shared_experts." in n for n in ref) and any(n.startswith("model.layers.2.self_attn") for n in ref)
    got = report(outs["w8"])["fallback"]
    assert got["pre_pass"] is not None
    assert set(got["probe_errors"]) == set(ref)  # no routed expert, no router among the candidates
    for name, e in ref.items():  # layer 2's attention reads layer 1's MoE output: propagated in float
        # (float32 throughout; with the experts quantized in the pre-pass they differ by about 1e-3)
        assert got["probe_errors"][name] == pytest.approx(e, rel=1e-5), name
    ranked = sorted(ref, key=lambda n: -ref[n])
    assert ref[ranked[1]] > 1.002 * ref[ranked[2]]  # no near tie
    assert {r["name"] for r in got["linears"]} == closed(ranked[:2])
    assert {r["name"] for r in got["linears"] if r["reason"] == "top-N"} == set(ranked[:2])
    # N=1 plus τ, float
    fl = report(outs["float"])["fallback"]
    want = {ranked[0]} | {n for n in ref if ref[n] > 0.01}
    assert len(want) == 2 and all(ref[n] < 0.0099 for n in ref if n not in want)  # τ hits one more, no near tie
    assert {r["name"] for r in fl["linears"] if r["reason"] in ("top-N", "threshold")} == want
    assert {r["name"] for r in fl["linears"]} == closed(want)
    assert all(r["to"] == "float" for r in fl["linears"])


@pytest.mark.parametrize("name", ["w8", "float"])
def test_routed_experts_stay_at_the_job_scheme_and_kept_linears_are_written_as_kept(jobs, name):
    model, outs = jobs
    out = outs[name]
    kept = {r["name"]: r["to"] for r in report(out)["fallback"]["linears"]}
    assert kept and not any(is_expert(n) for n in kept)
    # the outlier expert is harder to round than any kept linear (weight-space RTN error): it is
    # left out because experts are not candidates, not because it is easy
    src = read_tensors(model)
    rel = {n: float((src[n + ".weight"] - reference_rtn(src[n + ".weight"], 4, GROUP, True).dequantize()).pow(2).sum()
                    / src[n + ".weight"].pow(2).sum()) for n in [*kept, *OUTLIERS]}
    expert = next(n for n in OUTLIERS if is_expert(n))
    assert all(rel[expert] > rel[n] for n in kept)
    tensors = read_tensors(out)
    linears = {n[: -len(".weight_shape")] for n in tensors if n.endswith(".weight_shape")}
    experts = {n for n in linears if is_expert(n)}
    assert len(experts) == (LAYERS - 1) * EXPERTS * 3
    for n in linears:
        bits = 8 if kept.get(n) == "w8" else 4
        ql = read_quant_linear(tensors, n, bits)
        assert ql.scale.shape[1] == (1 if bits == 8 else ql.q.shape[1] // GROUP), n
    for n, to in kept.items():
        if to == "float":
            assert n + ".weight" in tensors and n not in linears, n


# -- the servers' matching (vllm/.../compressed_tensors/utils.py, compressed_tensors_moe.py; SGLang's copy)
def _match(value: str, target: str, contains: bool = False) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    return target.lower() in value.lower() if contains else target == value


def server_scheme(prefix: str, cls: str, config: dict, substring_ignore: bool):
    """should_ignore_layer over the fused shards, then find_matched_target (layer name, then
    class name by substring; ``_add_fused_moe_to_target_scheme_map`` adds ``FusedMoE`` as the
    ``Linear`` group) → the group's weights, or None (unquantized)."""
    parent, leaf = prefix.rsplit(".", 1)
    shards = [f"{parent}.{s}" for s in FUSED.get(leaf, (leaf,))]
    ignored = {any(_match(s, t, substring_ignore) for t in config["ignore"]) for s in shards}
    if len(ignored) > 1:
        raise ValueError(f"different quantization schemes for the shards of {prefix}")
    if ignored.pop():
        return None
    targets = {t: g["weights"] for g in config["config_groups"].values() for t in g["targets"]}
    if "Linear" in targets:
        targets["FusedMoE"] = targets["Linear"]
    hit = (next((t for t in targets if _match(prefix, t)), None)
           or next((t for t in targets if _match(cls, t, True)), None))
    return targets[hit]


def server_modules(layer: int, sparse: bool) -> list[tuple[str, str]]:
    """(prefix, class) of vLLM's DeepseekV2DecoderLayer linears (q_lora_rank set)."""
    p = f"model.layers.{layer}."
    mods = [(p + "self_attn.fused_qkv_a_proj", "MergedColumnParallelLinear"),
            (p + "self_attn.q_b_proj", "ColumnParallelLinear"), (p + "self_attn.kv_b_proj", "ColumnParallelLinear"),
            (p + "self_attn.o_proj", "RowParallelLinear")]
    mlp = p + ("mlp.shared_experts." if sparse else "mlp.")
    return mods + [(mlp + "gate_up_proj", "MergedColumnParallelLinear"), (mlp + "down_proj", "RowParallelLinear")]


@pytest.mark.parametrize("name", ["w8", "float"])
@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_servers_resolve_kept_linears_and_the_fused_moe_layer(jobs, name, server):
    _, outs = jobs
    out = outs[name]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = {r["name"]: r["to"] for r in report(out)["fallback"]["linears"]}
    if name == "w8":
        assert qc["config_groups"]["group_1"]["weights"]["num_bits"] == 8
    else:
        assert set(kept) <= set(qc["ignore"])
    seen = set()
    for layer in range(LAYERS):
        for prefix, cls in server_modules(layer, layer >= 1):
            parent, leaf = prefix.rsplit(".", 1)
            shards = [f"{parent}.{s}" for s in FUSED.get(leaf, (leaf,))]
            want = {kept.get(s, "w4") for s in shards}
            assert len(want) == 1, prefix  # fused partners took one decision
            want = want.pop()
            weights = server_scheme(prefix, cls, qc, server == "sglang")
            assert (None if weights is None else weights["num_bits"]) == {"float": None, "w8": 8, "w4": 4}[want], prefix
            seen |= set(shards)
        if layer >= 1:  # get_moe_method: one scheme from expert 0's names, equal for gate/up/down
            experts = f"model.layers.{layer}.mlp.experts"
            schemes = [server_scheme(f"{experts}.0.{p}", "FusedMoE", qc, server == "sglang")
                       for p in ("gate_proj", "up_proj", "down_proj")]
            assert all(s is not None and s == schemes[0] and s["num_bits"] == 4 for s in schemes), experts
    assert set(kept) <= seen


def test_two_ranks_take_the_same_decision_and_write_the_same_tensors(jobs):
    _, outs = jobs
    one, two = report(outs["w8"])["fallback"], report(outs["two"])["fallback"]
    assert [(r["name"], r["to"], r["reason"]) for r in one["linears"]] == \
           [(r["name"], r["to"], r["reason"]) for r in two["linears"]]
    assert one["probe_errors"].keys() == two["probe_errors"].keys()
    for n, e in one["probe_errors"].items():
        assert two["probe_errors"][n] == pytest.approx(e, rel=1e-5)
    a, b = read_tensors(outs["w8"]), read_tensors(outs["two"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qwen2_moe_shared_expert_is_ranked_on_float_inputs(tmp_path):
    """qwen2_moe: the shared expert (``mlp.shared_expert.*``, behind ``shared_expert_gate``, which
    stays float with the router: ``quant.moe_ignore``) and the attention are ranked; the errors of
    layer 1 read layer 0's MoE output."""
    model = make_tiny_moe(tmp_path / "model", "qwen2_moe", layers=2, experts=4)
    out = tmp_path / "out"
    code, _, stderr = run_main(argv(model, out, "quant.fallback.max_linears=1"))
    assert code == 0, stderr[-3000:]
    ref = reference_errors(model, skip=("mlp.gate", "shared_expert_gate"))
    assert any(".mlp.shared_expert.down_proj" in n for n in ref) and len(ref) == 2 * 7
    got = report(out)["fallback"]
    assert set(got["probe_errors"]) == set(ref)
    for name, e in ref.items():
        assert got["probe_errors"][name] == pytest.approx(e, rel=1e-5), name
    top = max(ref, key=ref.get)
    assert {r["name"] for r in got["linears"] if r["reason"] == "top-N"} == {top}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert closed([top]) <= set(qc["ignore"]) and not any(is_expert(n) for n in qc["ignore"])
