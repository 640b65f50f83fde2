"""runtime.activation_budget: a closing stage whose inputs are wider than its branch input
(down_proj's act(gate)·up) streams them batch by batch instead of holding all of a rank's
samples, and the output is bit for bit the same."""
from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_jobs import run_inprocess  # noqa: E402
from reference import read_tensors  # noqa: E402

ARGS = ["quant=gptq_w4a16", "quant.group_size=32", "calib.num_samples=8", "calib.seq_len=64",
        "calib.batch_size=2"]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(layers=2, hidden=64, intermediate=192)


def _job(model, tmp, calib, *extra):
    return run_inprocess(model, tmp, [*ARGS, f"calib.path={calib}", *extra], capture=True)


def test_streamed_down_proj_gives_the_same_bits_and_never_holds_all_batches(model, tmp_path, calib_file,
                                                                            monkeypatch):
    from dist_quant.arch import dense

    alive, peak, calls = [], [0], {"stream": 0}
    orig_stage = dense.residual_stage

    def counting_stage(ctx, xs, hs, core, stage, out):
        def tracked(h):  # count the stage inputs alive at once
            y = core(h)
            alive.append(weakref.ref(y))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            return y
        if stage != "mlp_out":
            return orig_stage(ctx, xs, hs, core, stage, out)
        if ctx.streams(stage, hs):
            calls["stream"] += 1
        return orig_stage(ctx, xs, hs, tracked, stage, out)

    monkeypatch.setattr(dense, "residual_stage", counting_stage)
    plain = _job(model, tmp_path / "plain", calib_file)
    assert calls["stream"] == 0 and peak[0] == 4  # held: all 4 batches of the rank at once
    alive.clear()
    peak[0] = 0
    streamed = _job(model, tmp_path / "streamed", calib_file, "runtime.activation_budget=1KB")

    assert calls["stream"] == 2  # mlp_out of both layers
    assert peak[0] <= 2, f"{peak[0]} down_proj input batches alive at once (4 batches per rank)"
    assert "mlp_out inputs" in streamed.log and "streamed" in streamed.log
    a, b = read_tensors(plain.out), read_tensors(streamed.out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for i in plain.xs:
        assert torch.equal(plain.xs[i], streamed.xs[i]), f"layer {i} outputs"


def test_budget_above_the_inputs_does_not_stream(model, tmp_path, calib_file):
    run = _job(model, tmp_path / "big", calib_file, "runtime.activation_budget=1GB")
    assert "streamed" not in run.log


def test_estimate_of_a_streamed_stage_holds_one_batch_of_its_inputs():
    from dist_quant.estimate import Shape, stage_total

    s = Shape(tokens=131072, batch_tokens=2048, seq_len=2048, hidden=8192, heads=64, compute_bytes=2)
    n = 28672
    held, parts = stage_total(s, n, 0, 0, 0)
    lean, lean_parts = stage_total(s, n, 0, 0, 0, streamed=True)
    assert parts["activations"] == s.tokens * (s.hidden + n) * 2
    assert lean_parts["activations"] == (2 * s.tokens * s.hidden + s.batch_tokens * n) * 2
    assert lean < held


def test_dry_run_plans_the_streamed_stage(tmp_path):
    """Llama-3-70B-shaped header-only model: the budget lowers the estimated peak of down_proj."""
    import json

    from safetensors.torch import save_file

    from dist_quant.dry_run import plan_report
    from dist_quant.settings import load_config

    root = tmp_path / "m"
    root.mkdir()
    h, inter = 1024, 3584
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 8,
           "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(cfg))
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (256, h), "lm_head.weight": (256, h), "model.norm.weight": (h,),
              p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (256, h),
              p + "self_attn.v_proj.weight": (256, h), p + "self_attn.o_proj.weight": (h, h),
              p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
              p + "mlp.down_proj.weight": (h, inter)}
    save_file({k: torch.zeros(v, dtype=torch.bfloat16) for k, v in shapes.items()}, str(root / "model.safetensors"))

    def peak(*extra):
        job = load_config([f"model.path={root}", "dry_run=true", "runtime.world_size=1", "runtime.device=cpu",
                             "model.dtype=bfloat16", "calib.num_samples=64", "calib.seq_len=2048", *extra])
        lines, _ = plan_report(job, str(root), 1)
        line = next(x for x in lines if x.startswith("peak memory of rank"))
        return line

    plain, lean = peak(), peak("runtime.activation_budget=100MB")
    assert "layer 0 mlp_out" in plain
    assert plain != lean
    gb = lambda line: float(line.split("(")[1].split(" GB")[0])  # noqa: E731
    assert gb(lean) < gb(plain)


def test_bad_budget_is_one_clear_error():
    from dist_quant.config import ConfigError
    from dist_quant.settings import load_config

    with pytest.raises(ConfigError, match=r"runtime.activation_budget='lots'"):
        load_config(["runtime.activation_budget=lots"])
