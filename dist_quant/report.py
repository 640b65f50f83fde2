"""The run report: ``quant_report.json`` next to the quantized weights, and two plots.

Built on rank 0 from what every rank gathered (its layer records and peak memory):

* ``quant_report.json``: the fields documented in docs/report.md;
* ``quant_report_error.png``: per layer, mean and max relative output error of its linears;
* ``quant_report_time.png``: per layer, seconds by phase (stacked; slowest rank per phase);
* ``quant_report.html``: one self-contained page with all of it and more (report_html.py).

Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state); a plot that
fails is logged and skipped, never failing the run.
"""
from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .pipeline import PHASES

log = logging.getLogger("dist_quant")

REPORT_NAME = "quant_report.json"
ERROR_PLOT = "quant_report_error.png"
TIME_PLOT = "quant_report_time.png"


def peak_device_bytes(device: torch.device) -> int | None:
    """Peak accelerator memory allocated by this process (None on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "npu":
        return int(torch.npu.max_memory_allocated(device))
    return None


def _versions() -> dict[str, str]:
    import compressed_tensors
    import transformers

    return {"dist_quant": "0.1.0", "torch": torch.__version__, "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__, "python": platform.python_version()}


def build_report(cfg, plan, owners, gathered, seconds, model_path, parts=None, output_dir=None) -> dict[str, Any]:
    """The report dict. ``gathered``: one dict per rank with ``rank``, ``records`` (layer,
    seconds by phase, modules), ``peak_rss_bytes`` and optionally ``peak_device_bytes``."""
    layers: dict[int, dict] = {}
    for g in sorted(gathered, key=lambda g: g["rank"]):
        for r in g["records"]:
            entry = layers.setdefault(r["layer"], {"layer": r["layer"], "seconds_by_rank": {}, "modules": {}})
            entry["seconds_by_rank"][g["rank"]] = dict(r["seconds"])
            entry["modules"].update(r["modules"])
            if r.get("smoothing"):
                entry["smoothing"] = r["smoothing"]
    ordered = [layers[i] for i in sorted(layers)]
    for entry in ordered:
        # the layer's wall time per phase is set by the slowest rank in that phase
        by_rank = entry["seconds_by_rank"].values()
        phases = [p for p in PHASES if any(p in s for s in by_rank)]
        phases += sorted({p for s in by_rank for p in s} - set(phases))
        entry["seconds"] = {p: max(s.get(p, 0.0) for s in by_rank) for p in phases}
        errors = [m["rel_output_error"] for m in entry["modules"].values()]
        entry["error_mean"] = sum(errors) / len(errors) if errors else None
        entry["error_max"] = max(errors) if errors else None
    errors = [m["rel_output_error"] for e in ordered for m in e["modules"].values()]
    by_phase: dict[str, float] = {}
    for entry in ordered:
        for p, s in entry["seconds"].items():
            by_phase[p] = by_phase.get(p, 0.0) + s
    report: dict[str, Any] = {
        "model": model_path,
        "config": asdict(cfg),
        "wall_seconds": seconds,
        "world_size": owners.world_size,
        "summary": {
            "layers": len(ordered),
            "linears": len(errors),
            "error_mean": sum(errors) / len(errors) if errors else None,
            "error_max": max(errors) if errors else None,
            "fallbacks": sorted(name for e in ordered for name, m in e["modules"].items() if m.get("fallback")),
            "seconds_by_phase": by_phase,
        },
        "peak_rss_bytes_by_rank": {g["rank"]: g["peak_rss_bytes"] for g in gathered},
        "owner_plan": {lin.name: owners.owner[lin.name] for lin in plan.linears},
        "layers": ordered,
        "versions": _versions(),
    }
    device_peaks = {g["rank"]: g.get("peak_device_bytes") for g in gathered}
    if any(v is not None for v in device_peaks.values()):
        report["peak_device_bytes_by_rank"] = device_peaks
    if parts is not None:
        report["output"] = {
            "dir": str(output_dir) if output_dir is not None else None,
            "bytes": sum(p.nbytes for p in parts),
            "part_files": [{"file": p.file, "rank": p.rank, "bytes": p.nbytes, "tensors": len(p.tensors)}
                           for p in parts],
        }
    return report


def write_report(directory: Path, report: dict) -> list[Path]:
    """Write ``quant_report.json`` and the plots into ``directory``; returns the files written."""
    directory = Path(directory)
    path = directory / REPORT_NAME
    path.write_text(json.dumps(report, indent=2) + "\n")
    written = [path]
    for name, draw in ((ERROR_PLOT, plot_errors), (TIME_PLOT, plot_times)):
        try:
            draw(report, directory / name)
            written.append(directory / name)
        except Exception as exc:  # a plot is a convenience: never fail a finished run for it
            log.warning("report: could not draw %s: %s", name, exc)
    try:
        from .report_html import write_html

        written.append(write_html(directory, report, tuple(p.name for p in written[1:])))
    except Exception as exc:  # the page is a convenience too
        log.warning("report: could not write the HTML page: %s", exc)
    return written


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_errors(report: dict, path: Path) -> None:
    layers = [e for e in report["layers"] if e.get("error_mean") is not None]
    fig = _figure(max(6.0, 0.12 * len(layers) + 4), 3.6)
    ax = fig.add_subplot()
    xs = [e["layer"] for e in layers]
    ax.plot(xs, [e["error_max"] for e in layers], marker="v", linewidth=1, label="max over the layer's linears")
    ax.plot(xs, [e["error_mean"] for e in layers], marker="o", linewidth=1, label="mean")
    if layers and min(min(e["error_mean"], e["error_max"]) for e in layers) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative output error  ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖²")
    cfg = report.get("config", {}).get("quant", {})
    ax.set_title(f"{Path(str(report.get('model', ''))).name}: {cfg.get('name', '')} "
                 f"(group size {cfg.get('group_size', '?')})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _integer_x(ax)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_times(report: dict, path: Path) -> None:
    layers = report["layers"]
    phases = [p for p in PHASES if any(p in e["seconds"] for e in layers)]
    phases += sorted({p for e in layers for p in e["seconds"]} - set(phases))
    fig = _figure(max(6.0, 0.12 * len(layers) + 4), 3.6)
    ax = fig.add_subplot()
    xs = [e["layer"] for e in layers]
    bottom = [0.0] * len(layers)
    for phase in phases:
        heights = [e["seconds"].get(phase, 0.0) for e in layers]
        ax.bar(xs, heights, bottom=bottom, label=phase, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("layer")
    ax.set_ylabel("seconds (slowest rank per phase)")
    ax.set_title(f"time by phase, world size {report.get('world_size')}, "
                 f"{report.get('wall_seconds', 0):.1f} s in all", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    _integer_x(ax)
    fig.savefig(path)
