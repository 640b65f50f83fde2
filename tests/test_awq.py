"""AWQ (quant=awq_w4a16; dist_quant/awq.py, algorithms/awq.py, formats/awq.py): the scale search
and the clipping search against a direct token-by-token recomputation of AutoAWQ's rule; the
folded model computes what the float model computes before quantization; 2 gloo ranks choose
the same scales (and write the same tensors) as 1 rank; the AutoAWQ GEMM output unpacked by an
independent unpacker equals the compressed-tensors output of the same job, and a float model
built from it matches transformers' compressed-tensors model; transformers' own AWQ loader
(needs gptqmodel) runs it when gptqmodel is installed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.algorithms.awq import (CLIP_RATIOS, awq_scales, candidate_errors, choose, clip_ratios,  # noqa: E402
                                       grid, weight_mean)
from dist_quant.config import ConfigError  # noqa: E402
from dist_quant.quant.qparams import QuantArgs  # noqa: E402
from dist_quant.settings import load_config  # noqa: E402
from helpers import free_port, run_main  # noqa: E402
from reference import read_quant_linears, read_tensors  # noqa: E402

CALIB = ["calib.num_samples=8", "calib.seq_len=48", "calib.batch_size=2"]
ARGS = QuantArgs(4, 16, True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tiny import corpus_text, make_tiny_model

    base = tmp_path_factory.mktemp("awq")
    calib = base / "calib.txt"
    calib.write_text(corpus_text())
    return {"base": base, "calib": calib,
            "llama": make_tiny_model(base / "llama", arch="llama", layers=2),
            "qwen2": make_tiny_model(base / "qwen2", arch="qwen2", layers=2)}  # GQA 4/2, q/k/v biases


def overrides(env, model, out, extra):
    return [f"model.path={env[model]}", f"calib.path={env['calib']}", *CALIB, f"output.dir={out}",
            f"runtime.run_dir={out}.run", "runtime.threads=1", "quant=awq_w4a16", "quant.group_size=32", *extra]


def quantize(env, model, name, *extra) -> Path:
    out = env["base"] / "out" / name
    if not out.exists():
        rc, _, err = run_main(overrides(env, model, out, extra))
        assert rc == 0, err[-3000:]
    return out


# -- the math against a direct recomputation ---------------------------------------------------------

def _data(seed=0, tokens=400, n=64, out=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * torch.linspace(0.2, 3, n)
    x[:, 5] *= 25  # an outlier channel: AWQ should protect it
    w = torch.randn(out, n, generator=g)
    return x, w


def _fake_quant_rows(w, group, ratio=None):
    """Independent symmetric 4-bit group RTN: scale = ratio · max|w_g| / 7.5, q = clamp(round(w/scale), -8, 7)."""
    out_f, n = w.shape
    wg = w.reshape(out_f, n // group, group)
    amax = wg.abs().amax(dim=2, keepdim=True)
    if ratio is not None:
        amax = amax * ratio[:, :, None]
    scale = (amax / 7.5).clamp(min=torch.finfo(torch.float32).eps)
    return (torch.round(wg / scale).clamp(-8, 7) * scale).reshape(out_f, n)


def test_scale_search_is_autoawq_rule_on_tokens():
    x, w = _data()
    x_mean = x.abs().mean(dim=0)
    # AutoAWQ's w_mean: |w| / group max, mean over rows
    wg = w.abs().reshape(-1, 16)
    w_mean = (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(dim=0)
    torch.testing.assert_close(weight_mean(w, 16), w_mean)
    alphas = grid(20)
    assert alphas[0] == 0.0 and alphas[-1] == 0.95 and len(alphas) == 20
    ref_err = []
    for a in alphas:
        s = (x_mean ** a / (w_mean ** (1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        torch.testing.assert_close(awq_scales(x_mean, w_mean, a), s)
        w_hat = _fake_quant_rows(w * s, 16) / s
        ref_err.append(float(((x @ w.T - x @ w_hat.T).double() ** 2).sum()))
    num, den = candidate_errors(w, (x.double().T @ x.double()), lambda a: awq_scales(x_mean, w_mean, a), alphas,
                                QuantArgs(4, 16, True, mse=True))  # the search quantizes min-max whatever the observer
    torch.testing.assert_close(num, torch.tensor(ref_err, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(den, ((x @ w.T).double() ** 2).sum(), rtol=1e-6, atol=0)
    best = min(range(len(alphas)), key=lambda i: (ref_err[i], i))
    alpha, err, idx = choose((num / den).tolist(), alphas)
    assert idx == best and alpha == alphas[best] and alpha > 0  # the outlier channel gets scaled
    assert ref_err[best] < 0.95 * ref_err[0]  # and that beats no scaling (alpha = 0 with duo: weights only)
    # the grid split over "ranks" (candidate c on rank c % 2) and over threads gives the same
    # numbers bit for bit (what the SUM all-reduce of the ranks' shares relies on)
    h = x.double().T @ x.double()
    scales_of = lambda a: awq_scales(x_mean, w_mean, a)  # noqa: E731
    n0, _ = candidate_errors(w, h, scales_of, alphas, ARGS, mine=lambda c: c % 2 == 0)
    n1, _ = candidate_errors(w, h, scales_of, alphas, ARGS, mine=lambda c: c % 2 == 1, workers=3)
    assert torch.equal(n0 + n1, num) and bool((n0[1::2] == 0).all()) and bool((n1[0::2] == 0).all())


def test_clip_search_is_autoawq_rule_on_tokens():
    x, w = _data(1)
    h = x.double().T @ x.double()
    got = clip_ratios(w, h.float(), ARGS)
    assert got.shape == (48, 4) and set(got.unique().tolist()) <= set(torch.tensor(CLIP_RATIOS).tolist())
    assert (got < 1).any()  # some groups are clipped
    # direct: per row and group, the ratio minimizing that group's output error on the tokens
    xg = x.reshape(x.shape[0], 4, 16)
    best_err = torch.full((48, 4), float("inf"), dtype=torch.float64)
    expect = torch.ones(48, 4)
    for r in CLIP_RATIOS:
        w_hat = _fake_quant_rows(w, 16, torch.full((48, 4), r))
        d = (w - w_hat).reshape(48, 4, 16)
        err = torch.einsum("tgi,ogi->tog", xg.double(), d.double()).pow(2).sum(dim=0)
        better = err < best_err * (1 - 1e-9)
        best_err, expect = torch.where(better, err, best_err), torch.where(better, torch.tensor(r), expect)
    assert (got == expect).float().mean() >= 0.99  # ties within float rounding may differ


# -- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, key", [
    (["quant=awq_w4a16", "quant.act_bits=8", "quant.bits=8", "quant.group_size=-1"], "quant.smooth='awq'"),
    (["quant=awq_w4a16", "quant.beta=0.3"], "quant.beta=0.3"),
    (["quant=awq_w4a16", "quant.awq_grid=0"], "quant.awq_grid=0"),
    (["quant=flexsmooth_w8a8", "quant.smooth=awq"], "quant.smooth='awq'"),
])
def test_bad_awq_values_are_config_errors(extra, key):
    with pytest.raises(ConfigError) as exc:
        load_config(extra)
    assert key in str(exc.value)


def test_preset():
    q = load_config(["quant=awq_w4a16"]).quant
    assert (q.smooth, q.method, q.bits, q.act_bits, q.awq_grid, q.awq_clip) == ("awq", "gptq", 4, None, 20, True)
    assert load_config(["quant=awq_w4a16", "quant.weight_solver=rtn"]).quant.method == "rtn"


@pytest.mark.parametrize("extra, key", [
    (["output.format=awq", "quant.bits=8", "quant.group_size=32", "quant.observer=minmax"], "quant.bits=8"),
    (["output.format=awq", "output.dtype=bfloat16"], "output.dtype='bfloat16'"),
])
def test_awq_format_refuses_what_it_cannot_hold(env, extra, key):
    out = env["base"] / "out" / f"bad-{len(extra)}-{key[:8]}"
    rc, _, err = run_main(overrides(env, "llama", out, extra))
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and key in errors[0], err[-2000:]
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


# -- end to end ---------------------------------------------------------------------------------------

def ids_for(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer
    from tiny import corpus_text

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return torch.tensor(tok(corpus_text(200_000)[150_000:])["input_ids"][:96]).reshape(2, 48)


def test_report_records_every_pair(env):
    out = quantize(env, "qwen2", "rank1", "quant.weight_solver=rtn")
    report = json.loads((out / "quant_report.json").read_text())
    for layer in report["layers"]:
        assert len(layer["smoothing"]) == 4  # norm→qkv, v→o (GQA), norm→gate/up, up→down
        for c in layer["smoothing"].values():
            assert c["searched"] and 0 <= c["alpha"] < 1 and c["rel_error"] > 0


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Independent unpacker: int32 [rows, cols/8] → codes [rows, cols]; nibble i of word c holds
    column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i] (AutoAWQ's reverse order on unpacking)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows, n = words.shape
    out = torch.empty(rows, n * 8, dtype=torch.int64)
    for i, col in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
        out[:, col::8] = (words >> (4 * i)) & 0xF
    return out


def _awq_dequant(t: dict, name: str) -> torch.Tensor:
    q = _unpack_awq(t[name + ".qweight"])  # [in, out]
    z = _unpack_awq(t[name + ".qzeros"])  # [groups, out]
    s = t[name + ".scales"].float()  # [groups, out]
    group = q.shape[0] // s.shape[0]
    w_t = (q - z.repeat_interleave(group, dim=0)).float() * s.repeat_interleave(group, dim=0)
    return w_t.T.contiguous()


def test_awq_gemm_output_matches_compressed_tensors_and_the_fake_quant_model(env):
    from transformers import AutoModelForCausalLM

    extra = ("quant.weight_solver=gptq",)
    ct = quantize(env, "qwen2", "ct-gptq", *extra, "output.dtype=float16")
    aw = quantize(env, "qwen2", "awq-gptq", *extra, "output.format=awq")
    cfg = json.loads((aw / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    assert cfg["torch_dtype"] == "float16"
    lin_ct, _ = read_quant_linears(ct, 4)
    t = read_tensors(aw)
    assert lin_ct and len(lin_ct) == 14
    for name, lin in lin_ct.items():
        out_f, in_f = lin.shape
        # vLLM AWQLinearMethod.create_weights: qweight [in, out/8] int32, qzeros [in/G, out/8] int32,
        # scales [in/G, out] (float16)
        assert t[name + ".qweight"].shape == (in_f, out_f // 8) and t[name + ".qweight"].dtype == torch.int32
        assert t[name + ".qzeros"].shape == (in_f // 32, out_f // 8) and t[name + ".qzeros"].dtype == torch.int32
        assert t[name + ".scales"].shape == (in_f // 32, out_f) and t[name + ".scales"].dtype == torch.float16
        assert name + ".weight" not in t
        assert torch.equal(_unpack_awq(t[name + ".qzeros"]), torch.full((in_f // 32, out_f), 8))  # symmetric
        assert torch.equal(_awq_dequant(t, name), lin.dequantize()), name
    # a float model from the unpacked AWQ tensors computes what transformers' compressed-tensors model does
    served = AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.float32).eval()
    fake = AutoModelForCausalLM.from_pretrained(str(env["qwen2"]), dtype=torch.float32).eval()
    state = {k: v.float() for k, v in t.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    state.update({name + ".weight": _awq_dequant(t, name) for name in lin_ct})
    missing, unexpected = fake.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ids = ids_for(aw)
    with torch.no_grad():
        a, b = fake(input_ids=ids).logits, served(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-3


def test_transformers_awq_loader_runs_the_output(env):
    pytest.importorskip("gptqmodel", reason="transformers' AWQ loader needs gptqmodel (not installed here)")
    pytest.importorskip("accelerate", reason="transformers' AWQ loader needs accelerate")
    from transformers import AutoModelForCausalLM

    aw = quantize(env, "qwen2", "awq-gptq", "quant.weight_solver=gptq", "output.format=awq")
    t = read_tensors(aw)
    model = AutoModelForCausalLM.from_pretrained(str(aw), dtype=torch.float16).eval()
    fake = AutoModelForCausalLM.from_pretrained(str(env["qwen2"]), dtype=torch.float32).eval()
    names = [n[:-len(".qweight")] for n in t if n.endswith(".qweight")]
    state = {k: v.float() for k, v in t.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    state.update({n + ".weight": _awq_dequant(t, n) for n in names})
    fake.load_state_dict(state, strict=False)
    ids = ids_for(aw)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), fake(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) < 2e-2


def test_two_ranks_choose_the_same_scales_as_one(env):
    import subprocess

    extra = ("quant.weight_solver=rtn",)
    one = quantize(env, "qwen2", "rank1", *extra)
    two = env["base"] / "out" / "rank2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_quant",
           *overrides(env, "qwen2", two, extra)]
    from helpers import job_env

    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600, env=job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1 = json.loads((one / "quant_report.json").read_text())
    r2 = json.loads((two / "quant_report.json").read_text())
    assert r2["world_size"] == 2
    for l1, l2 in zip(r1["layers"], r2["layers"]):
        assert len(l1["smoothing"]) == 4
        for pair, c1 in l1["smoothing"].items():
            c2 = l2["smoothing"][pair]
            assert (c1["alpha"], c1["scale_sha1"]) == (c2["alpha"], c2["scale_sha1"]), pair
            assert c1["rel_error"] == pytest.approx(c2["rel_error"], rel=1e-9)
    t1, t2 = read_tensors(one), read_tensors(two)
    assert t1.keys() == t2.keys()
    for name in t1:
        assert torch.equal(t1[name], t2[name]), name
    files = json.loads((two / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(files.values())) >= 2  # both ranks wrote
