"""The embedded demo: built-in text shipped in the package, demo defaults that explicit
overrides beat, and the before/after summary (run here on a tiny model: the real demo takes
minutes on a CPU)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, run_main  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant import demo_data  # noqa: E402
from dist_quant.settings import DEMO_DEFAULTS, load_config  # noqa: E402


def test_demo_text_is_package_data_with_attribution():
    data = REPO / "dist_quant" / "data"
    text = demo_data.demo_text()
    assert 250_000 < len(text.encode()) < 400_000
    assert text == (data / demo_data.DEMO_TEXT).read_text(encoding="utf-8")
    note = (data / "DEMO_TEXT_LICENSE.md").read_text()
    assert "CC BY-SA 3.0" in note and "WikiText" in note and "Merity" in note
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject[pyproject.index("[tool.setuptools.package-data]"):]
    patterns = re.findall(r'"([^"]+)"', section[section.index("dist_quant ="):].splitlines()[0])
    assert any(Path("data/demo_text.txt").match(p) for p in patterns)
    assert any(Path("data/DEMO_TEXT_LICENSE.md").match(p) for p in patterns)


def test_calibration_and_heldout_text_are_disjoint_lines():
    calib, held = demo_data.demo_calibration_text(), demo_data.demo_heldout_text()
    text = demo_data.demo_text()
    assert text.startswith(calib) and text.endswith(held)
    assert len(calib) > 8 * len(held) > 0
    assert text.index(held) >= len(calib)  # held-out text starts after the calibration text ends


def test_demo_defaults_apply_only_without_model_path():
    cfg = load_config([], demo_defaults=True)
    assert (cfg.model.path, cfg.quant.group_size, cfg.calib.num_samples, cfg.calib.seq_len) == (
        None, DEMO_DEFAULTS["quant.group_size"], DEMO_DEFAULTS["calib.num_samples"],
        DEMO_DEFAULTS["calib.seq_len"])
    assert 576 % cfg.quant.group_size == 0  # SmolLM2's hidden size
    # without the flag (library use) and with a model, the plain defaults
    assert load_config([]).quant.group_size == 128
    cfg = load_config(["model.path=/m"], demo_defaults=True)
    assert (cfg.quant.group_size, cfg.calib.num_samples) == (128, 128)


@pytest.mark.parametrize("overrides,expected", [
    (["quant.group_size=32"], (32, 32, 512)),
    (["calib.num_samples=8", "calib.seq_len=64"], (64, 8, 64)),
    (["quant=rtn_w8a16"], (-1, 32, 512)),  # a per-channel preset keeps its -1
    (["quant=rtn_w4a16", "quant.group_size=-1"], (-1, 32, 512)),
    (["++calib.seq_len=128"], (64, 32, 128)),
])
def test_explicit_overrides_beat_demo_defaults(overrides, expected):
    cfg = load_config(overrides, demo_defaults=True)
    assert (cfg.quant.group_size, cfg.calib.num_samples, cfg.calib.seq_len) == expected


def test_demo_summary_on_a_tiny_run(tmp_path):
    from dist_quant.demo import demo_summary

    model = make_tiny_model(tmp_path / "model", layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text(40_000))
    out = tmp_path / "out"
    code, _, err = run_main([f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
                             "quant.group_size=32", f"output.dir={out}", f"runtime.run_dir={tmp_path / 'run'}"])
    assert code == 0, err
    lines = demo_summary(out, 12.5)
    text = "\n".join(lines)
    assert lines[0].startswith("demo summary: model, gptq_w4a16 (group size 32), calibration 8 x 32 tokens")
    assert "12.5 s in all" in text
    m = re.search(r"size +([\d.]+) MB -> ([\d.]+) MB", text)
    assert m and float(m.group(2)) < float(m.group(1))  # 4-bit linears: smaller
    m = re.search(r"perplexity +([\d.]+) -> ([\d.]+) \(([+-][\d.]+) %\) on (\d+) x 512 held-out tokens", text)
    assert m, text
    fp, q = float(m.group(1)), float(m.group(2))
    assert 1 < fp < 1e4 and 1 < q < 1e4 and int(m.group(4)) >= 1
    assert f"output      {out}" in text
