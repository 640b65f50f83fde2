"""True-sequential calibration beyond layer 0's q/k/v, and padded calibration end to end.

The calibration set is a *ragged JSONL* (samples of 9 … 64 tokens, right-padded to 64),
and the pad token's embedding row is scaled ×40, so a pad token that leaked into any
statistic would move it far outside the tolerances below.

Reference (written here, no dist_quant code): the original transformers model whose every
quantized linear carries the output's dequantized weight (tests/moe_reference.py), for
W8A8 also a pre-hook on each linear applying the output's static activation quantizer by
the published rule; the calibration ids tokenized here. One forward of that model gives, for
every linear of *layer 1*, exactly the input that true-sequential calibration must see (its
upstream quantized — for W8A8 fake-quantized, activations included). From it:

* dense GPTQ W4: the Hessian ``2 Σ x xᵀ / n`` over real tokens of o_proj, gate/up and
  down_proj of layer 1: the report's token count is the number of real tokens, its relative
  output error equals the one computed from that Hessian, and re-solving GPTQ (the solver is
  checked against a textbook reference in test_gptq.py) on it gives the output's integers;
  the same computed from the *unquantized* upstream does not match (the test has teeth);
* W8A8 static: layer 1's ``input_scale``/``input_zero_point`` equal the real-token range of
  that input (``scale = (hi − lo)/255``, ``zero = −128 − round(lo/scale)``);
* MoE: the report's routed tokens per expert equal the reference router's counts over real
  tokens only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_reference import load_fake_quant, quantized_linears, read_tensors, router_counts  # noqa: E402
from helpers import call_main, report_gptq  # noqa: E402
from reference import squared_output_error  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402
from tiny_moe import make_tiny_moe  # noqa: E402

SAMPLES, SEQ, BATCH, GROUP = 12, 64, 4, 32
LAYER = 1
STAGES = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _boost_pad_embedding(model_dir: Path, factor: float = 40.0) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    pad = cfg["pad_token_id"]
    f = model_dir / "model.safetensors"
    t = load_file(str(f))
    t["model.embed_tokens.weight"][pad] *= factor
    save_file(t, str(f), metadata={"format": "pt"})
    return pad


def _ragged_jsonl(path: Path, text: str) -> Path:
    words = text.split()
    lengths = [5, 40, 12, 60, 3, 25, 80, 9, 33, 18, 50, 7]  # words; some exceed SEQ tokens (truncated)
    lines, i = [], 0
    for n in lengths:
        lines.append(json.dumps({"text": " ".join(words[i:i + n])}))
        i += n
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def calibration(model_dir: Path, jsonl: Path):
    """Ids and mask, right-padded, tokenized here (special tokens added, truncated to SEQ)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.full((SAMPLES, SEQ), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(SAMPLES, SEQ, dtype=torch.bool)
    for i, line in enumerate(jsonl.read_text().splitlines()[:SAMPLES]):
        row = tok(json.loads(line)["text"], add_special_tokens=True)["input_ids"][:SEQ]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = True
    assert 0 < mask.sum() < mask.numel() and not (ids[mask] == tok.pad_token_id).any()
    return ids, mask


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    dense = make_tiny_model(root / "dense", layers=2)
    moe = make_tiny_moe(root / "moe", "qwen3_moe", layers=2, experts=4)
    pads = {"dense": _boost_pad_embedding(dense), "moe": _boost_pad_embedding(moe)}
    jsonl = _ragged_jsonl(root / "calib.jsonl", corpus_text(40_000))
    common = [f"calib.path={jsonl}", f"calib.num_samples={SAMPLES}", f"calib.seq_len={SEQ}",
              f"calib.batch_size={BATCH}", "runtime.threads=1"]
    jobs = {"gptq": (dense, ["quant=gptq_w4a16", f"quant.group_size={GROUP}"]),
            "w8a8": (dense, ["quant=w8a8"]),
            "moe": (moe, ["quant=gptq_w4a16", f"quant.group_size={GROUP}", "quant.observer=minmax"])}
    outs = {}
    for name, (model, extra) in jobs.items():
        out = root / f"out_{name}"
        assert call_main([f"model.path={model}", *common, *extra, f"output.dir={out}",
                          f"runtime.run_dir={out}.run"]) == 0, name
        outs[name] = out
    return SimpleNamespace(root=root, dense=dense, moe=moe, jsonl=jsonl, outs=outs, pads=pads)


def layer_inputs(model, ids, mask, layer: int) -> dict[str, torch.Tensor]:
    """Real-token inputs [tokens, features] (float64) of every linear of ``layer``."""
    got, handles = {}, []
    for rel in STAGES + ("self_attn.q_proj",):
        module = model.get_submodule(f"model.layers.{layer}.{rel}")

        def grab(mod, args, rel=rel):
            got[rel] = args[0].detach()[mask].double()
        handles.append(module.register_forward_pre_hook(grab, prepend=True))  # before any quantizer hook
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask.long())
    finally:
        for h in handles:
            h.remove()
    return got


def static_act_hooks(model, tensors: dict) -> None:
    """Each quantized linear sees its input through the stored static int8 quantizer:
    ``q = clamp(round(x / s + z), -128, 127)``, ``x̂ = (q − z) · s``."""
    for name, module in model.named_modules():
        if name + ".input_scale" in tensors:
            s = tensors[name + ".input_scale"].float().item()
            z = tensors[name + ".input_zero_point"].float().item()

            def fq(mod, args, s=s, z=z):
                x = args[0]
                q = torch.round(x.float() / s + z).clamp(-128, 127)
                return ((q - z) * s).to(x.dtype),
            module.register_forward_pre_hook(fq)


def test_later_layer_hessians_come_from_the_quantized_upstream_real_tokens_only(env):
    from transformers import AutoModelForCausalLM

    from dist_quant.algorithms.gptq import gptq_quantize

    out = env.outs["gptq"]
    report = json.loads((out / "quant_report.json").read_text())
    modules = report["layers"][LAYER]["modules"]
    ids, mask = calibration(env.dense, env.jsonl)
    fq, _ = load_fake_quant(env.dense, out)
    fp = AutoModelForCausalLM.from_pretrained(str(env.dense), dtype=torch.float32).eval()
    seq_x, fp_x = layer_inputs(fq, ids, mask, LAYER), layer_inputs(fp, ids, mask, LAYER)
    original = read_tensors(env.dense)
    qlin = quantized_linears(read_tensors(out), 4)
    args, params = report_gptq(report, GROUP)
    torch.set_num_threads(1)
    for rel in STAGES:
        name = f"model.layers.{LAYER}.{rel}"
        w, w_hat = original[name + ".weight"], qlin[name].dequantize()
        x = seq_x[rel]
        assert modules[name]["tokens"] == int(mask.sum()) == x.shape[0]  # no pad token counted
        want = squared_output_error(x, w, w_hat)
        assert modules[name]["rel_output_error"] == pytest.approx(want, rel=1e-4), name
        assert abs(squared_output_error(fp_x[rel], w, w_hat) / want - 1) > 1e-2, f"{name}: upstream makes no difference"
        h = 2 * x.T @ x / x.shape[0]
        again = gptq_quantize(w.float(), h, args, params)
        # float64 here vs float32 GEMMs there: a few near-tied roundings may flip, one step
        differ = (again.q.long() != qlin[name].q).double().mean().item()
        assert differ <= 0.005 and (again.q.long() - qlin[name].q).abs().max() <= 1, (name, differ)
        h_fp = 2 * fp_x[rel].T @ fp_x[rel] / fp_x[rel].shape[0]
        other = gptq_quantize(w.float(), h_fp, args, params)
        differ_fp = (other.q.long() != qlin[name].q).double().mean().item()
        print(f"{name}: {differ:.4%} of integers differ re-solved from the quantized upstream, "
              f"{differ_fp:.2%} from the unquantized upstream")
        assert differ_fp > max(0.02, 5 * differ), f"{name}: the upstream makes no difference"


def test_later_layer_static_input_scales_are_the_fake_quantized_upstream_range(env):
    out = env.outs["w8a8"]
    t = read_tensors(out)
    ids, mask = calibration(env.dense, env.jsonl)
    fq, _ = load_fake_quant(env.dense, out)
    static_act_hooks(fq, t)
    xs = layer_inputs(fq, ids, mask, LAYER)  # raw inputs: upstream fake-quantized, this linear's not yet
    for rel in STAGES:
        name = f"model.layers.{LAYER}.{rel}"
        x = xs[rel]
        lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        scale = t[name + ".input_scale"].float().item()
        assert scale == pytest.approx((hi - lo) / 255, rel=1e-5), name
        assert t[name + ".input_zero_point"].item() == -128 - round(lo / scale), name


def test_moe_routing_counts_real_tokens_only(env):
    out = env.outs["moe"]
    report = json.loads((out / "quant_report.json").read_text())
    ids, mask = calibration(env.moe, env.jsonl)
    model, _ = load_fake_quant(env.moe, out)
    counts = router_counts(model, ids, mask)
    all_counts = router_counts(model, ids)
    for layer in report["moe"]["layers"]:
        i = layer["layer"]
        assert layer["tokens_per_expert"] == counts[i].tolist(), i
        assert sum(layer["tokens_per_expert"]) == 2 * int(mask.sum())  # top-2 of the real tokens
        assert counts[i].tolist() != all_counts[i].tolist()  # pads would have changed the counts
