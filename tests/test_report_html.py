"""``quant_report.html`` (dist_quant/report_html.py): its figures' data recomputed from the
report and the checkpoint, and the page opened in a real headless Chromium with every
image decoded. Chromium comes from Debian's ``chromium`` package (``apt-get install -y
chromium``); without it the browser test is skipped and says so."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main  # noqa: E402

from dist_quant.report_html import (HTML_NAME, expert_coverage, linear_error_matrix, render_html,  # noqa: E402
                                    worst_smoothing_layers)

N, L = 8, 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A W8A8 SmoothQuant run of a tiny qwen2_moe: smoothing, experts and the per-layer records
    in one report. Top-2 of 4 experts over 8 x 32 tokens: 128 slots per expert on average, so
    calib.min_expert_tokens=129 puts at least one expert of each layer under the threshold."""
    from tiny import corpus_text
    from tiny_moe import make_tiny_moe

    root = tmp_path_factory.mktemp("html")
    model = make_tiny_moe(root / "moe", "qwen2_moe", layers=2)
    calib = root / "calib.txt"
    calib.write_text(corpus_text(40_000))
    out = root / "out"
    assert call_main([f"model.path={model}", f"calib.path={calib}", f"calib.num_samples={N}", f"calib.seq_len={L}",
                      "calib.batch_size=4", "quant=smoothquant_w8a8", "quant.act_dynamic=true",
                      "quant.weight_solver=rtn", "calib.min_expert_tokens=129", f"output.dir={out}",
                      f"runtime.run_dir={root / 'run'}", "runtime.threads=1"]) == 0
    return {"root": root, "model": model, "calib": calib, "out": out,
            "report": json.loads((out / "quant_report.json").read_text())}


def test_per_linear_matrix_is_the_reports_errors(run):
    r = run["report"]
    layers, kinds, m = linear_error_matrix(r)
    expect: dict[tuple[int, str], float] = {}
    for entry in r["layers"]:
        for name, info in entry["modules"].items():
            parts = name.split(".")
            i = parts.index("layers")
            rel = parts[i + 2:]
            if "experts" in rel:
                rel[rel.index("experts") + 1] = "*"
            key = (int(parts[i + 1]), ".".join(rel))
            expect[key] = max(expect.get(key, 0.0), info["rel_output_error"])
    got = {(layer, k): m[a][b] for a, layer in enumerate(layers) for b, k in enumerate(kinds) if m[a][b] is not None}
    assert got == expect
    assert "mlp.experts.*.down_proj" in kinds and "self_attn.q_proj" in kinds and layers == [0, 1]


def test_expert_coverage_is_the_routed_tokens_with_fallbacks(run):
    r = run["report"]
    layers, counts, marks = expert_coverage(r)
    assert layers == [e["layer"] for e in r["moe"]["layers"]]
    assert counts == [e["tokens_per_expert"] for e in r["moe"]["layers"]]
    # top-2 routing of every real token: each layer's counts sum to 2 · N · L
    assert all(sum(row) == 2 * N * L for row in counts)
    below = {(row, x) for row, c in enumerate(counts) for x, n in enumerate(c) if n < 129}
    assert {(row, x) for row, x, _ in marks} == below and below, "the run should have under-covered experts"


def test_smoothing_profile_is_the_norm_outputs_channel_maxima(run):
    """Layer 0's input_layernorm → q/k/v pair: the recorded per-channel max |x| before
    smoothing is RMSNorm(embed(calibration tokens)) with the checkpoint's norm, and after it
    the same with the stored (smoothed) norm weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_quant.fakequant import read_tensors

    r = run["report"]
    pair = r["layers"][0]["smoothing"]["model.layers.0.input_layernorm->q_proj/k_proj/v_proj"]
    tok = AutoTokenizer.from_pretrained(str(run["model"]))
    ids = torch.tensor(tok(run["calib"].read_text(), add_special_tokens=False)["input_ids"][: N * L]).reshape(N, L)
    fp = AutoModelForCausalLM.from_pretrained(str(run["model"]), dtype=torch.float32)
    norm = fp.model.layers[0].input_layernorm
    with torch.no_grad():
        before = norm(fp.model.embed_tokens(ids)).abs().amax(dim=(0, 1))
        norm.weight.copy_(read_tensors(run["out"], "model.safetensors.index.json")["model.layers.0.input_layernorm.weight"])
        after = norm(fp.model.embed_tokens(ids)).abs().amax(dim=(0, 1))
    assert pair["channels"] == 64 == len(pair["absmax_before"])  # 64 channels: no binning
    assert torch.allclose(torch.tensor(pair["absmax_before"]), before, rtol=1e-5)
    assert torch.allclose(torch.tensor(pair["absmax_after"]), after, rtol=1e-4)
    assert pair["outlier_ratio_before"] == pytest.approx(float(before.max() / before.median()), rel=1e-5)
    assert pair["outlier_ratio_after"] < pair["outlier_ratio_before"]  # smoothing flattened the outliers


def test_worst_layers_rank_by_outlier_ratio():
    report = {"layers": [{"layer": i, "smoothing": {"p": {"outlier_ratio_before": v}}}
                         for i, v in enumerate([2.0, 9.0, 1.0, 5.0])] + [{"layer": 4}]}
    assert worst_smoothing_layers(report, 2) == [1, 3]


CHECK = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-check', "
         "JSON.stringify([...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0, i.naturalWidth, "
         "i.naturalHeight]))));</script>")


def open_in_chromium(page: Path, tmp_path: Path) -> tuple[list, str]:
    """Load a copy of ``page`` (plus a script that lists its images; the page's own policy
    only gains inline scripts: images still may come from data: URIs only) and return
    [alt, decoded, width, height] per image and the DOM."""
    exe = shutil.which("chromium")
    text = page.read_text(encoding="utf-8")
    assert "default-src 'none'" in text
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
                     .replace("</body>", CHECK + "</body>"), encoding="utf-8")
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert m, f"chromium printed no checked DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1))), proc.stdout


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_page_renders_in_chromium_with_every_image(run, tmp_path):
    page = run["out"] / HTML_NAME
    text = page.read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(?!data:)', text) and "http" not in text.split("</head>")[1]
    worst = worst_smoothing_layers(run["report"])
    images, dom = open_in_chromium(page, tmp_path)
    alts = [a for a, *_ in images]
    assert alts[:2] == ["quant_report_error.png", "quant_report_time.png"]  # the PNGs, embedded
    assert "per-linear error heat map" in alts and "expert coverage heat map" in alts
    assert [a for a in alts if "smoothing" in a] == [f"layer {i} activation maxima before/after smoothing"
                                                      for i in worst] and worst
    assert len(images) == 4 + len(worst)
    for alt, ok, w, h in images:
        assert ok and w > 100 and h > 100, alt
    for s in ("Run summary", "smoothquant_w8a8", "MoE expert coverage", "input_layernorm-&gt;q_proj/k_proj/v_proj"):
        assert s in dom


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_servability_warnings_listed(run, tmp_path):
    report = dict(run["report"], servability={"warnings": [
        "vLLM: <lm_head> kept float", {"server": "sglang", "message": "group size 32 unsupported"}]})
    page = tmp_path / HTML_NAME
    page.write_text(render_html(report, run["out"], ("quant_report_error.png",)), encoding="utf-8")
    images, dom = open_in_chromium(page, tmp_path)
    assert all(ok for _, ok, *_ in images)
    assert "<li class=\"warn\">vLLM: &lt;lm_head&gt; kept float</li>" in dom
    assert "server: sglang; message: group size 32 unsupported" in dom
