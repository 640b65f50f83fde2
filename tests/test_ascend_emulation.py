"""Ascend W8A8_DYNAMIC and W8A16 outputs against an independent emulation of what the
Ascend kernels compute, exactly where the arithmetic is exact:

* W8A8_DYNAMIC (RTN weights): the stored int8 weights and fp32 scales are the documented
  per-channel symmetric RTN of the original weights (``scale = max|w| / 127.5``,
  ``q = clamp(round(w / scale))``, offset 0), ``torch.equal``; and an emulated forward —
  every W8A8_DYNAMIC linear as the per-token kernel runs it: ``s_x = max|x| / 127`` per
  token, ``x_q = clamp(round(x / s_x))``, an exact int64 ``x_q · W_qᵀ``, then
  ``· s_x · weight_scale`` — gives the hidden states the calibration propagated, layer by
  layer (float32 rounding apart), while the same emulation with ``÷127.5`` does not;
* W8A16 (GPTQ weights): the same job written as compressed-tensors and as Ascend holds the
  same integers and scales, read by our own readers (the int32 unpacker of
  tests/reference.py and plain safetensors), ``torch.equal``, with ``weight_offset = −zero``; and
  ``(q + offset) · scale`` (CANN's antiquant, ``npu_weight_quant_batchmatmul``) propagates like the
  calibration did.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_jobs import run_inprocess  # noqa: E402
from reference import read_quant_linears  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

CALIB = ["calib.num_samples=8", "calib.seq_len=32", "calib.batch_size=4"]
ATOL = RTOL = 2e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ascend")
    (root / "calib.txt").write_text(corpus_text(30_000), encoding="utf-8")
    model = make_tiny_model(root / "llama", layers=2)
    args = [f"calib.path={root / 'calib.txt'}", *CALIB]
    runs = {
        "dyn": run_inprocess(model, root / "dyn", args, "quant=w8a8", "quant.weight_solver=rtn",
                             "quant.act_dynamic=true", "output.format=ascend", capture=True),
        "w16": run_inprocess(model, root / "w16", args, "quant=gptq_w8a16", "output.format=ascend", capture=True),
        "w16_ct": run_inprocess(model, root / "w16_ct", args, "quant=gptq_w8a16"),
    }
    return SimpleNamespace(root=root, model=model, runs=runs)


def ascend_tensors(out: Path) -> tuple[dict, dict]:
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())["weight_map"]
    t = {}
    for f in sorted(set(index.values())):
        with safe_open(out / f, "pt") as fh:
            t.update({k: fh.get_tensor(k) for k in fh.keys()})
    return t, json.loads((out / "quant_model_description.json").read_text())


def linears_of(desc: dict, kind: str) -> list[str]:
    return sorted(k[: -len(".weight")] for k, v in desc.items() if k.endswith(".weight") and v == kind)


def dynamic_kernel(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, divisor: float) -> torch.Tensor:
    """Per-token int8 activations × int8 weights, exact integer accumulation."""
    xf = x.double()
    s_x = xf.abs().amax(dim=-1, keepdim=True) / divisor
    s_x = torch.where(s_x == 0, torch.full_like(s_x, torch.finfo(torch.float32).eps), s_x)
    s_x = s_x.float().double()  # the kernel's per-token scale is fp32
    xq = torch.round(xf / s_x).clamp(-128, 127).to(torch.int64)
    acc = xq @ wq.to(torch.int64).T
    return (acc.double() * s_x * w_scale.double().reshape(1, -1)).to(x.dtype)


def emulated_hidden_states(model_dir: Path, t: dict, desc: dict, kind: str, ids: torch.Tensor, divisor: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    for name in linears_of(desc, kind):
        module = model.get_submodule(name)
        wq, scale, offset = t[name + ".weight"], t[name + ".weight_scale"], t[name + ".weight_offset"]
        if kind == "W8A8_DYNAMIC":
            assert (offset == 0).all()
            module.forward = lambda x, wq=wq, s=scale: dynamic_kernel(x, wq, s, divisor)
        else:  # W8A16: CANN antiquant (q + offset) · scale per output channel, activations float
            w = (wq.float() + offset) * scale
            with torch.no_grad():
                module.weight.copy_(w)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    return model, hs


def check_propagation(run, model, hs, atol=ATOL, rtol=RTOL) -> float:
    """Largest relative deviation of the emulated hidden states from the propagated ones."""
    worst = 0.0
    n = len(run.xs)
    for i in range(n):
        got = run.xs[i].reshape(hs[0].shape)
        want = model.model.norm(got) if i == n - 1 else got
        ref = hs[-1] if i == n - 1 else hs[i + 1]
        worst = max(worst, float((want - ref).abs().max() / ref.abs().max()))
        if atol is not None:
            torch.testing.assert_close(want, ref, atol=atol * float(ref.abs().max()), rtol=rtol, msg=f"layer {i}")
    return worst


def test_w8a8_dynamic_weights_are_the_documented_rtn(env):
    from transformers import AutoModelForCausalLM

    t, desc = ascend_tensors(env.runs["dyn"].out)
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"
    original = dict(AutoModelForCausalLM.from_pretrained(str(env.model), dtype=torch.float32).named_parameters())
    names = linears_of(desc, "W8A8_DYNAMIC")
    assert len(names) == 14
    for name in names:
        w = original[name + ".weight"].detach()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
        q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
        assert t[name + ".weight_scale"].dtype == torch.float32 and t[name + ".weight_scale"].shape == scale.shape
        assert torch.equal(t[name + ".weight_scale"], scale), name
        assert torch.equal(t[name + ".weight"], q), name
        assert torch.equal(t[name + ".weight_offset"], torch.zeros_like(scale)), name


def test_w8a8_dynamic_per_token_kernel_emulation_divides_by_127(env):
    run = env.runs["dyn"]
    t, desc = ascend_tensors(run.out)
    ids = run.calib.input_ids
    model, hs = emulated_hidden_states(env.model, t, desc, "W8A8_DYNAMIC", ids, 127.0)
    close = check_propagation(run, model, hs)
    _, hs_ct = emulated_hidden_states(env.model, t, desc, "W8A8_DYNAMIC", ids, 127.5)
    other = check_propagation(run, model, hs_ct, atol=None)
    assert other > 20 * max(close, ATOL), (close, other)  # the divisor is visible at this tolerance


def test_w8a16_ascend_holds_the_compressed_tensors_integers_and_propagates(env):
    run = env.runs["w16"]
    t, desc = ascend_tensors(run.out)
    assert desc["model_quant_type"] == "W8A16"
    ct, _ = read_quant_linears(env.runs["w16_ct"].out, 8)
    names = linears_of(desc, "W8A16")
    assert sorted(ct) == names and len(names) == 14
    for name in names:
        assert t[name + ".weight"].dtype == torch.int8
        assert torch.equal(t[name + ".weight"].long(), ct[name].q), name
        assert torch.equal(t[name + ".weight_scale"], ct[name].scale.float()), name
        assert torch.equal(t[name + ".weight_offset"].long(), -ct[name].zero), name
    model, hs = emulated_hidden_states(env.model, t, desc, "W8A16", run.calib.input_ids, 127.0)
    check_propagation(run, model, hs)
