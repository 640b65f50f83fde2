"""quant.method=autoround (dist_quant/algorithms/autoround.py, dist_quant/autoround_layer.py):

* one SignRound step on a single linear against the step recomputed here from the published
  rule with hand-derived gradients (no autograd): straight-through rounding, clip factors;
* the GPTQ initialization reproduces GPTQ's integers;
* end to end on tiny llama / qwen2 checkpoints, as real processes: 2 gloo ranks write exactly
  the tensors 1 rank writes (rtn and gptq init, symmetric and asymmetric); the tuned layer's
  output on the calibration data is closer to the float layer's than RTN's; transformers
  loads the compressed-tensors output and its logits equal those of the float model carrying
  the dequantized weights read back by our own unpacker;
* bad keys are refused in one line before any work (MoE models: tests/test_autoround_moe.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import calibration_ids, read_quant_linears, read_tensors, reference_rtn  # noqa: E402
from helpers import free_ports, make_job, run_main, small_calib_file  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant.algorithms import autoround as ar  # noqa: E402
from dist_quant.quant.qparams import QuantArgs  # noqa: E402

NUM_SAMPLES, SEQ_LEN, BATCH = 16, 64, 4
GROUP = 32
JOBS = {  # name → (model, overrides)
    "llama": ("llama", ("quant.autoround.iters=20",)),
    "qwen_gptq_asym": ("qwen", ("quant.autoround.iters=8", "quant.autoround.init=gptq", "quant.symmetric=false")),
}


# -- one step, by hand ---------------------------------------------------------------------------
def _hand_step(w, x, v, s_min, s_max, lr, mlr):
    """One SignRound step on ``y = x Wᵀ`` with loss ``mean ‖x Ŵᵀ − x Wᵀ‖²`` (symmetric 4-bit,
    groups of 8 columns), with the gradients derived by hand:
    ``∂L/∂Ŵ = 2 (Ŵ − W) XᵀX / N``; with ``u = w / s + v``, ``q = clamp(round(u), −8, 7)``, ``Ŵ = q·s``,
    straight-through: ``∂Ŵ/∂v = s`` and ``∂Ŵ/∂s = q − w/s`` where ``u`` rounds inside the grid,
    ``∂Ŵ/∂v = 0`` and ``∂Ŵ/∂s = q`` where it is clamped; ``s = max(−lo·s_min, hi·s_max) / 7.5``."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, -1, 8)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    a, b = -lo * s_min, hi * s_max
    s = torch.maximum(a, b) / 7.5
    u = g / s[..., None] + v.reshape(g.shape)
    r = torch.round(u)
    inside = (r >= -8) & (r <= 7)
    q = r.clamp(-8, 7)
    w_hat = (q * s[..., None]).reshape(w.shape)
    n_el = x.shape[0] * out_f
    d_what = (2.0 / n_el) * (w_hat - w) @ (x.T @ x)
    d = d_what.reshape(g.shape)
    dv = torch.where(inside, d * s[..., None], torch.zeros_like(d)).reshape(w.shape)
    ds = (d * torch.where(inside, q - g / s[..., None], q)).sum(-1) / 7.5
    d_smax = torch.where(b >= a, ds * hi, torch.zeros_like(ds))  # max() sends the gradient to the larger
    d_smin = torch.where(b >= a, torch.zeros_like(ds), ds * -lo)
    v1 = (v - lr * torch.sign(dv)).clamp(-0.5, 0.5)
    return v1, (s_min - mlr * torch.sign(d_smin)).clamp(0, 1), (s_max - mlr * torch.sign(d_smax)).clamp(0, 1)


def test_one_sign_step_matches_hand_derivation():
    torch.manual_seed(0)
    args = QuantArgs(bits=4, group_size=8, symmetric=True)
    w = torch.randn(6, 32, dtype=torch.float64).float()
    x = torch.randn(40, 32)
    v = (torch.rand(6, 32) - 0.5) * 0.6
    s_min, s_max = 0.8 + 0.2 * torch.rand(6, 4), 0.8 + 0.2 * torch.rand(6, 4)
    lo, hi = ar.group_range(w, args)
    p = [t.clone().requires_grad_(True) for t in (v, s_min, s_max)]
    w_hat = ar.qdq(w, *p, lo, hi, args)
    loss = (x @ w_hat.T - x @ w.T).pow(2).mean()
    grads = torch.autograd.grad(loss, p)
    got = [t.detach().clone() for t in p]
    lr, mlr = ar.lr_at(0.05, 3, 20), ar.lr_at(0.02, 3, 20)
    assert lr == pytest.approx(0.05 * 17 / 20) and mlr == pytest.approx(0.02 * 17 / 20)
    ar.sign_step_(*got, grads, lr, mlr)
    want = _hand_step(w.double(), x.double(), v.double(), s_min.double(), s_max.double(), lr, mlr)
    for name, g_, w_ in zip(("v", "s_min", "s_max"), got, want):
        same = (g_.double() - w_).abs() < 1e-6
        assert same.float().mean() > 0.995, name  # float32 vs float64 may flip a sign at ~0
        assert (g_ != (v, s_min, s_max)[("v", "s_min", "s_max").index(name)]).any(), name  # it moved
    # the integers and scales written are exactly the tuned quantizer's value
    res = ar.result(w, *got, lo, hi, args)
    torch.testing.assert_close(res.dequantize(args), ar.qdq(w, *got, lo, hi, args), rtol=0, atol=0)


def test_sampler_draws_like_auto_round():
    s = ar.IndexSampler(10, 4, seed=3)
    first = [s.next_batch() for _ in range(2)]
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))  # one permutation
    third = s.next_batch()  # 2 left < 4: reshuffled
    assert len(third) == 4 and s.index == 4
    again = ar.IndexSampler(10, 4, seed=3)
    assert [again.next_batch() for _ in range(3)] == [*first, third]


def test_stratified_sampler_spreads_every_batch_over_the_ranks():
    n, batch = 128, 8
    s = ar.StratifiedSampler(n, batch, seed=5)
    passes = [[s.next_batch() for _ in range(n // batch)] for _ in range(2)]
    for batches in passes:  # a pass draws every sample once, one from each stratum of 16 per batch
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(sorted(i // 16 for i in b) == list(range(batch)) for b in batches)
        for world in (1, 2, 4, 8):  # contiguous rank slices: batch / world samples each
            share = n // world
            assert all(sum(1 for i in b if r * share <= i < (r + 1) * share) == batch // world
                       for b in batches for r in range(world))
    assert passes[0] != passes[1]  # reshuffled for the second pass
    again = ar.StratifiedSampler(n, batch, seed=5)
    assert [again.next_batch() for _ in range(n // batch)] == passes[0]  # seeded: every rank draws the same
    odd = ar.StratifiedSampler(10, 4, seed=0)  # strata 3, 3, 2, 2: two batches a pass
    first = [odd.next_batch() for _ in range(2)]
    assert all(len(b) == 4 for b in first) and len({i for b in first for i in b}) == 8
    odd.next_batch()  # the smallest strata are used up: a new pass
    assert odd.index == 1
    with pytest.raises(ValueError, match="batch size 5"):
        ar.StratifiedSampler(4, 5, seed=0)


def test_error_samples_are_spread_over_the_set():
    from dist_quant.autoround_layer import ERROR_SAMPLES, error_samples

    ids = torch.arange(128)
    chosen = ids[error_samples(ids, 128)].tolist()
    assert chosen == list(range(0, 128, 8)) and len(chosen) == ERROR_SAMPLES
    assert [int(error_samples(ids[r * 64:(r + 1) * 64], 128).sum()) for r in (0, 1)] == [8, 8]  # 2 ranks share it
    assert error_samples(torch.arange(10), 10).all()  # fewer samples than 16: all of them
    assert int(error_samples(torch.arange(40), 40).sum()) == ERROR_SAMPLES  # stride 2, the first 32


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_init_reproduces_gptq_integers(symmetric):
    from dist_quant.algorithms.gptq import GPTQParams, gptq_quantize_

    torch.manual_seed(1)
    args = QuantArgs(bits=4, group_size=16, symmetric=symmetric)
    w = torch.randn(24, 64)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs: GPTQ moves far from RTN
    h = 2 * x.T @ x / x.shape[0]
    gptq = gptq_quantize_(w.clone(), h.clone(), args, GPTQParams(act_order=False))
    lo, hi = ar.group_range(w, args)
    v, s_min, s_max = ar.init_from_result(w, gptq, lo, hi, args)
    assert v.abs().max() <= 0.5 and 0 <= s_min.min() and s_max.max() <= 1
    res = ar.result(w, v, s_min, s_max, lo, hi, args)
    same_scale = (res.scale == gptq.scale).float().mean()
    same_q = (res.q == gptq.q).float().mean()
    rtn_q = ar.result(w, torch.zeros_like(w), torch.ones_like(lo), torch.ones_like(hi), lo, hi, args).q
    same_rtn = (rtn_q == gptq.q).float().mean()
    assert same_q > 0.93 and same_rtn < 0.8, (float(same_scale), float(same_q), float(same_rtn))


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoround")
    source = root / "wiki.txt"
    source.write_text(corpus_text(60_000), encoding="utf-8")
    calib = small_calib_file(root / "calib.txt", source, 40_000)
    models = {"llama": make_tiny_model(root / "llama", arch="llama", layers=2),
              "qwen": make_tiny_model(root / "qwen", arch="qwen2", layers=2, tied=True)}
    ports = iter(free_ports(len(JOBS)))
    jobs = {}
    for name, (model, extra) in JOBS.items():
        extra = (*extra, f"quant.group_size={GROUP}", f"calib.batch_size={BATCH}")
        for nproc in (1, 2):
            key = f"{name}-w{nproc}"
            jobs[key] = make_job(key, models[model], root / "out" / key, root / "runs" / key, calib,
                                 "autoround_w4a16", extra, nproc=nproc,
                                 port=next(ports) if nproc == 2 else None,
                                 num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
            if nproc == 2:  # real torchrun launches in the background ...
                jobs[key].start()
    for key, job in jobs.items():  # ... while the one-rank references run in this process
        if key.endswith("-w1"):
            job.returncode, job.stdout, job.stderr = run_main(job.argv[job.argv.index("dist_quant") + 1:])
    for job in jobs.values():
        job.wait()
    return SimpleNamespace(root=root, calib=calib, models=models, jobs=jobs)


@pytest.mark.parametrize("name", list(JOBS))
def test_two_ranks_write_the_tensors_of_one_rank(runs, name):
    one = read_tensors(runs.jobs[f"{name}-w1"].check())
    two = read_tensors(runs.jobs[f"{name}-w2"].check())
    assert one.keys() == two.keys()
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differ, differ[:5]
    report = json.loads((runs.jobs[f"{name}-w2"].out / "quant_report.json").read_text())
    ranks = {m["rank"] for layer in report["layers"] for m in layer["modules"].values()}
    assert ranks == {0, 1}  # both ranks wrote linears they own


def _layer0_outputs(model_dir: Path, ids: torch.Tensor, weights: dict[str, torch.Tensor] | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w in (weights or {}).items():
            model.get_submodule(name).weight.copy_(w)
        return model(ids, output_hidden_states=True).hidden_states[1]


def test_tuned_layer_is_closer_to_float_than_rtn(runs):
    """Layer 0 sees the float embeddings in every model, so its output error on the calibration
    samples is exactly what the tuning minimized; RTN is recomputed here (min/max, the tuning's start)."""
    out = runs.jobs["llama-w1"].check()
    linears, _ = read_quant_linears(out, 4)
    original = read_tensors(runs.models["llama"])
    layer0 = [n for n in linears if n.startswith("model.layers.0.")]
    assert len(layer0) == 7
    ids = calibration_ids(runs.models["llama"], runs.calib, NUM_SAMPLES, SEQ_LEN)
    ref = _layer0_outputs(runs.models["llama"], ids, None)
    tuned = _layer0_outputs(runs.models["llama"], ids, {n: linears[n].dequantize() for n in layer0})
    rtn = _layer0_outputs(runs.models["llama"], ids, {
        n: reference_rtn(original[n + ".weight"], 4, GROUP, True).dequantize() for n in layer0})
    err_tuned, err_rtn = (tuned - ref).pow(2).mean().item(), (rtn - ref).pow(2).mean().item()
    assert err_tuned < 0.8 * err_rtn, (err_tuned, err_rtn)
    report = json.loads((out / "quant_report.json").read_text())
    info = report["layers"][0]["modules"]["model.layers.0.self_attn.q_proj"]["autoround"]
    assert info["loss_best"] < info["loss_init"] and info["steps"] == 20
    # the report's initial loss is RTN's layer-0 mean squared error on a batch of samples
    assert info["loss_init"] == pytest.approx(err_rtn, rel=0.5)


@pytest.mark.parametrize("name", ["llama"])  # transformers' compressed-tensors loader sizes a packed
def test_transformers_loads_output_and_matches_fake_quant(runs, name):  # 4-bit zero point wrongly (asym)
    from transformers import AutoModelForCausalLM

    model_dir = runs.models[JOBS[name][0]]
    out = runs.jobs[f"{name}-w1"].check()
    linears, _ = read_quant_linears(out, 4)
    quantized = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    float_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for lin, ql in linears.items():
            reference.get_submodule(lin).weight.copy_(ql.dequantize())
        ids = calibration_ids(model_dir, runs.calib, 2, 48)
        got, want, unq = quantized(ids).logits, reference(ids).logits, float_model(ids).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale
    assert (unq - want).abs().max().item() > 100 * 1e-4 * scale


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("quant.autoround.init=awq", "quant.autoround.init='awq'"),
    ("quant.autoround.iters=0", "quant.autoround.iters=0"),
    ("quant.autoround.lr=-1", "quant.autoround.lr=-1"),
])
def test_bad_keys_refused(override, words):
    code, out, err = run_main(["quant=autoround_w4a16", override, "dry_run=true"])
    assert code != 0 and words in out + err
