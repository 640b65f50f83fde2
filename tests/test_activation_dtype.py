"""``model.activation_dtype=bfloat16`` with ``model.dtype=float32``: activations held in bf16
between stages, every batch computed in float32 (dist_quant/actdtype.py).

Reference (written here from the documented rule, no dist_quant code): the transformers model
carrying the output's dequantized weights, run layer by layer by hand, rounding to bf16
exactly where the rule stores a tensor (the embedding, each norm's output, attention up to
o_proj's input, o_proj's and down_proj's outputs, each residual sum, the MLP up to
down_proj's input) and computing everything else in float32. Its layer-1 stage inputs give
the Hessians; the report's relative output errors must equal the ones computed from them,
and re-solving GPTQ on them must give the output's integers. The same from float32-held
activations must not (the test has teeth). Also: the setting equal to model.dtype changes no
bit, the dry run halves the activation memory, refusals are one line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main, report_gptq, run_main  # noqa: E402
from reference import squared_output_error  # noqa: E402
from moe_reference import load_fake_quant, quantized_linears, read_tensors  # noqa: E402
from tiny import make_tiny_model  # noqa: E402
from tiny_moe import make_tiny_moe  # noqa: E402

SAMPLES, SEQ, BATCH, GROUP = 8, 48, 4, 32
STAGES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
BF16 = torch.bfloat16


def _ids(path: Path, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (SAMPLES, SEQ), generator=g)
    path.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in ids), encoding="utf-8")
    return ids


def _job(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"calib.path={calib}", "calib.format=ids", f"calib.num_samples={SAMPLES}",
            f"calib.seq_len={SEQ}", f"calib.batch_size={BATCH}", "quant=gptq_w4a16", f"quant.group_size={GROUP}",
            "runtime.threads=1", f"output.dir={out}", f"runtime.run_dir={out}.run", *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("actdtype")
    model = make_tiny_model(root / "model", layers=2)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ids = _ids(root / "calib.jsonl", vocab)
    outs = {}
    for name, extra in {"bf16": ["model.activation_dtype=bfloat16"], "f32": [],
                        "f32_explicit": ["model.activation_dtype=float32"]}.items():
        out = root / name
        assert call_main(_job(model, root / "calib.jsonl", out, *extra)) == 0, name
        outs[name] = out
    return model, ids, outs, root


def _stage_inputs(model_dir: Path, out: Path, ids: torch.Tensor, layer: int, store) -> dict[str, torch.Tensor]:
    """The inputs [tokens, features] (float64) of layer ``layer``'s stages, by the rule above
    with ``store`` the storage rounding (bf16 or identity)."""
    fq, _ = load_fake_quant(model_dir, out, attn="sdpa")  # SDPA with no mask: causal, as the pipeline runs it
    m = fq.model
    got = {}
    with torch.no_grad():
        x = store(m.embed_tokens(ids))
        pos = m.rotary_emb(x, torch.arange(ids.shape[1])[None])
        for i, blk in enumerate(m.layers):
            attn = blk.self_attn
            h = store(blk.input_layernorm(x.float()))
            o_proj, attn.o_proj = attn.o_proj, torch.nn.Identity()
            a = store(attn(hidden_states=h.float(), position_embeddings=pos, attention_mask=None)[0])
            attn.o_proj = o_proj
            x = store(x.float() + store(o_proj(a.float())))
            h2 = store(blk.post_attention_layernorm(x.float()))
            mlp = blk.mlp
            d = store(mlp.act_fn(mlp.gate_proj(h2.float())) * mlp.up_proj(h2.float()))
            if i == layer:
                for rel, t in zip(STAGES, (h, a, h2, d)):
                    got[rel] = t.reshape(-1, t.shape[-1]).double()
                return got
            x = store(x.float() + store(mlp.down_proj(d.float())))
    raise AssertionError("layer not reached")


def test_later_layer_stage_inputs_are_held_in_bf16(env):
    from dist_quant.algorithms.gptq import gptq_quantize

    model_dir, ids, outs, _ = env
    out = outs["bf16"]
    report = json.loads((out / "quant_report.json").read_text())
    modules = report["layers"][1]["modules"]
    held = _stage_inputs(model_dir, out, ids, 1, lambda t: t.to(BF16).float())
    as_f32 = _stage_inputs(model_dir, out, ids, 1, lambda t: t)
    original, qlin = read_tensors(model_dir), quantized_linears(read_tensors(out), 4)
    args, params = report_gptq(report, GROUP)
    torch.set_num_threads(1)
    for rel in STAGES:
        name = f"model.layers.1.{rel}"
        x = held[rel]
        assert torch.equal(x, x.float().to(BF16).double()), rel  # bf16 values
        w, w_hat = original[name + ".weight"], qlin[name].dequantize()
        got = modules[name]["rel_output_error"]
        assert got == pytest.approx(squared_output_error(x, w, w_hat), rel=1e-5), name  # measured: within 1e-6
        assert got != pytest.approx(squared_output_error(as_f32[rel], w, w_hat), rel=5e-5), name  # measured: 2-4e-4 apart
        again = gptq_quantize(w.float(), 2 * x.T @ x / x.shape[0], args, params)
        differ = (again.q.long() != qlin[name].q).double().mean().item()
        other = gptq_quantize(w.float(), 2 * as_f32[rel].T @ as_f32[rel] / x.shape[0], args, params)
        differ_f32 = (other.q.long() != qlin[name].q).double().mean().item()
        print(f"{name}: {differ:.3%} differ re-solved from bf16-held inputs, {differ_f32:.3%} from float32-held")
        assert differ <= 0.005 and (again.q.long() - qlin[name].q).abs().max() <= 1, (name, differ)
        assert differ_f32 > max(0.002, 3 * differ), (name, differ, differ_f32)


def test_same_dtype_changes_no_bit_and_bf16_changes_some(env):
    _, _, outs, _ = env
    f32, explicit, bf16 = (read_tensors(outs[k]) for k in ("f32", "f32_explicit", "bf16"))
    assert f32.keys() == explicit.keys() == bf16.keys()
    assert all(torch.equal(f32[k], explicit[k]) for k in f32)
    assert any(not torch.equal(f32[k], bf16[k]) for k in f32 if k.endswith("weight_packed"))
    # the float32 computation is kept: the float tensors of the output are the checkpoint's
    for k in f32:
        if k.endswith("layernorm.weight") or k.endswith("embed_tokens.weight"):
            assert torch.equal(f32[k], bf16[k]), k


def test_dry_run_holds_activations_in_half_the_bytes(env):
    import re

    model_dir, _, _, root = env

    def activations(*extra) -> tuple[float, str]:
        code, out, err = run_main(_job(model_dir, root / "calib.jsonl", root / "dry", "dry_run=true",
                                       "runtime.world_size=1", "calib.num_samples=64", *extra))
        assert code == 0, err
        return float(re.search(r"activations ([\d.]+) MB", out).group(1)), out

    (f32, text32), (bf16, text16) = activations(), activations("model.activation_dtype=bfloat16")
    assert "activations held in bfloat16" in text16 and "activations held in" not in text32
    # the held tensors halve; one batch's float32 temporaries (gate/up) do not
    assert 0.5 <= bf16 / f32 < 0.65, (bf16, f32)


@pytest.mark.parametrize("extra, needle", [
    (["quant=w8a8", "quant.group_size=-1"], "activation / KV-cache quantization"),
    (["quant=gptq_w4a16", f"quant.group_size={GROUP}", "quant.kv_cache=fp8"], "activation / KV-cache quantization"),
    (["quant=autoround_w4a16", f"quant.group_size={GROUP}"], "quant.method=autoround"),
])
def test_refused_combinations(env, extra, needle):
    model_dir, _, _, root = env
    argv = _job(model_dir, root / "calib.jsonl", root / "refused", "model.activation_dtype=bfloat16")
    argv = [a for a in argv if not a.startswith("quant=") and not a.startswith("quant.group_size")] + extra
    code, out, err = run_main(argv)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert any("model.activation_dtype=bfloat16" in line and needle in line for line in lines), err
    assert not (root / "refused").exists()


def test_refused_for_moe(tmp_path):
    model = make_tiny_moe(tmp_path / "moe", "qwen3_moe", layers=1, experts=4)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    _ids(tmp_path / "calib.jsonl", vocab)
    code, _, err = run_main(_job(model, tmp_path / "calib.jsonl", tmp_path / "out", "model.activation_dtype=bfloat16"))
    assert code != 0 and "only dense (Llama-style) layers" in err and "qwen3_moe" in err, err


def test_bad_value_is_one_clear_error(env):
    model_dir, _, _, root = env
    code, _, err = run_main(_job(model_dir, root / "calib.jsonl", root / "bad", "model.activation_dtype=int8"))
    assert code != 0 and "model.activation_dtype" in err and "int8" in err, err
