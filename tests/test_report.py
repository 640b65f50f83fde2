"""The run report (``quant_report.json`` + ``quant_report_error.png`` / ``quant_report_time.png``)
and the per-layer progress output."""
from __future__ import annotations

import io
import json
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import LINEARS  # noqa: E402
from helpers import run_main  # noqa: E402
from tiny import corpus_text, make_tiny_model  # noqa: E402

from dist_quant.pipeline import PHASES  # noqa: E402
from dist_quant.progress import LayerProgress  # noqa: E402
from dist_quant.report import ERROR_PLOT, REPORT_NAME, TIME_PLOT, build_report, write_report  # noqa: E402
from dist_quant.report_html import HTML_NAME  # noqa: E402

LAYERS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-rank job run in this process (the code path of ``python -m dist_quant``)."""
    root = tmp_path_factory.mktemp("report")
    model = make_tiny_model(root / "model", layers=LAYERS)
    calib = root / "calib.txt"
    calib.write_text(corpus_text(40_000))
    out = root / "out"
    argv = [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
            "quant.group_size=32", f"output.dir={out}", f"runtime.run_dir={root / 'run'}", "runtime.threads=1",
            "output.part_file_size=100KB"]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stderr
    report = json.loads((out / REPORT_NAME).read_text())
    return SimpleNamespace(root=root, model=model, out=out, report=report, stdout=stdout, stderr=stderr)


def test_report_fields(run):
    r = run.report
    assert set(r) >= {"model", "config", "wall_seconds", "world_size", "summary", "peak_rss_bytes_by_rank",
                      "owner_plan", "layers", "versions", "output"}
    assert r["model"] == str(run.model) and r["world_size"] == 1
    assert r["config"]["quant"]["group_size"] == 32 and r["config"]["calib"]["num_samples"] == 8
    assert 0 < r["wall_seconds"] < 600
    assert set(r["versions"]) >= {"dist_quant", "torch", "transformers", "compressed_tensors", "python"}
    assert r["versions"]["torch"] == torch.__version__
    # peak RSS of this process: more than torch alone, less than the machine
    assert 50e6 < r["peak_rss_bytes_by_rank"]["0"] < 64e9
    names = {f"model.layers.{i}.{rel}" for i in range(LAYERS) for rel in LINEARS}
    assert set(r["owner_plan"]) == names and set(r["owner_plan"].values()) == {0}


def test_report_layers_errors_and_times(run):
    r = run.report
    assert [layer["layer"] for layer in r["layers"]] == list(range(LAYERS))
    all_errors = []
    for layer in r["layers"]:
        assert set(layer["modules"]) == {f"model.layers.{layer['layer']}.{rel}" for rel in LINEARS}
        errors = [m["rel_output_error"] for m in layer["modules"].values()]
        assert all(math.isfinite(e) and 0 < e < 0.1 for e in errors)
        assert layer["error_mean"] == pytest.approx(sum(errors) / len(errors))
        assert layer["error_max"] == max(errors) >= layer["error_mean"]
        for info in layer["modules"].values():
            assert info["tokens"] == 8 * 32 and info["rank"] == 0 and info["fallback"] is None
        assert set(layer["seconds_by_rank"]) == {"0"}
        assert set(layer["seconds"]) <= set(PHASES) and {"load", "capture", "solve"} <= set(layer["seconds"])
        assert all(s >= 0 for s in layer["seconds"].values())
        assert layer["seconds"] == layer["seconds_by_rank"]["0"]  # one rank: its own times
        all_errors += errors
    s = r["summary"]
    assert s["layers"] == LAYERS and s["linears"] == LAYERS * len(LINEARS)
    assert s["error_mean"] == pytest.approx(sum(all_errors) / len(all_errors))
    assert s["error_max"] == max(all_errors) and s["fallbacks"] == []
    total = sum(sum(layer["seconds"].values()) for layer in r["layers"])
    assert sum(s["seconds_by_phase"].values()) == pytest.approx(total)
    assert total <= r["wall_seconds"]


def test_report_output_section_lists_the_part_files(run):
    out = run.report["output"]
    files = sorted(p.name for p in run.out.glob("*.safetensors"))
    assert [p["file"] for p in out["part_files"]] == files and len(files) > 1
    assert out["bytes"] == sum(p["bytes"] for p in out["part_files"])
    assert all(p["rank"] == 0 and p["tensors"] > 0 for p in out["part_files"])
    assert out["dir"] == str(run.out)
    index = json.loads((run.out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == out["bytes"]


@pytest.mark.parametrize("name", [ERROR_PLOT, TIME_PLOT])
def test_plots_are_valid_png_images(run, name):
    import matplotlib.image

    path = run.out / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 400
    assert float(image[..., :3].std()) > 0.01  # something is drawn


def test_progress_is_one_plain_line_per_layer_when_not_a_terminal(run):
    """stderr was not a TTY: no tqdm bar, no carriage returns, one line per finished layer."""
    assert "\r" not in run.stderr
    for i in range(1, LAYERS + 1):
        assert run.stderr.count(f"layer {i}/{LAYERS} done in") == 1
    line = next(ln for ln in run.stderr.splitlines() if f"layer {LAYERS}/{LAYERS} done" in ln)
    assert "elapsed" in line and "ETA 0:00" in line
    assert any(f"({phase} " in line for phase in PHASES)  # the layer's time by phase (those ≥ 0.05 s)
    log = (run.root / "run" / "rank0.log").read_text()
    assert log.count(" done in ") == LAYERS


@pytest.fixture
def dq_log(caplog):
    """caplog for the "dist_quant" logger (which does not propagate once main() configured it)."""
    logger = logging.getLogger("dist_quant")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    caplog.handler.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _drive(progress: LayerProgress, layers: int) -> None:
    for i in range(layers):
        for phase in ("load", "capture", "solve", "write"):
            progress.set_postfix_str(f"layer {i} {phase}", refresh=False)
        progress.update(1)
    progress.close()


def test_progress_log_lines_with_phases_and_eta(dq_log):
    stream = _Stream(tty=False)
    _drive(LayerProgress(4, rank=0, stream=stream), 4)
    assert stream.getvalue() == ""  # nothing drawn
    lines = [r.getMessage() for r in dq_log.records]
    assert all(r.levelno == logging.INFO for r in dq_log.records)
    assert [ln.split(" done")[0] for ln in lines] == [f"layer {i}/4" for i in range(1, 5)]
    assert all("elapsed" in ln and "ETA" in ln for ln in lines)


def test_progress_bar_on_a_terminal_for_rank_0_only(dq_log, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    tty = _Stream(tty=True)
    _drive(LayerProgress(3, rank=0, stream=tty), 3)
    drawn = tty.getvalue()
    assert "\r" in drawn and "quantize" in drawn and "3/3" in drawn and "layer 2" in drawn
    assert len(dq_log.records) == 3  # the log file keeps the lines (DEBUG: not on the console)
    assert all(r.levelno == logging.DEBUG for r in dq_log.records)
    other = _Stream(tty=True)
    dq_log.clear()
    _drive(LayerProgress(3, rank=1, stream=other), 3)
    assert other.getvalue() == ""  # other ranks never draw; they log (to their files)
    assert len([r for r in dq_log.records if "done in" in r.getMessage()]) == 3


def test_a_failing_plot_does_not_fail_the_report(tmp_path, monkeypatch, dq_log):
    import dist_quant.report as report_mod

    def boom(report, path):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report_mod, "plot_errors", boom)
    report = {"model": "m", "world_size": 2, "wall_seconds": 1.0, "config": {},
              "layers": [{"layer": 0, "seconds": {"load": 0.5, "solve": 1.5}, "error_mean": 0.01,
                          "error_max": 0.02, "modules": {}}]}
    written = write_report(tmp_path, report)
    assert [p.name for p in written] == [REPORT_NAME, TIME_PLOT, HTML_NAME]
    assert json.loads((tmp_path / REPORT_NAME).read_text()) == report
    assert "no fonts" in dq_log.text


def test_build_report_takes_the_slowest_rank_per_phase(monkeypatch):
    cfg = SimpleNamespace()
    plan = SimpleNamespace(linears=[SimpleNamespace(name="a"), SimpleNamespace(name="b")])
    owners = SimpleNamespace(world_size=2, owner={"a": 0, "b": 1})
    gathered = [
        {"rank": 1, "peak_rss_bytes": 2, "records": [{"layer": 0, "seconds": {"solve": 3.0, "load": 0.1},
                                                       "modules": {"b": {"rel_output_error": 0.3}}}]},
        {"rank": 0, "peak_rss_bytes": 1, "records": [{"layer": 0, "seconds": {"solve": 1.0, "load": 0.2},
                                                       "modules": {"a": {"rel_output_error": 0.1}}}]},
    ]
    import dist_quant.report as report_mod

    monkeypatch.setattr(report_mod, "asdict", lambda c: {})
    r = build_report(cfg, plan, owners, gathered, 5.0, "m")
    layer = r["layers"][0]
    assert layer["seconds"] == {"load": 0.2, "solve": 3.0}
    assert layer["error_mean"] == pytest.approx(0.2) and layer["error_max"] == 0.3
    assert r["summary"]["seconds_by_phase"] == {"load": 0.2, "solve": 3.0}
    assert r["peak_rss_bytes_by_rank"] == {1: 2, 0: 1} and "peak_device_bytes_by_rank" not in r
