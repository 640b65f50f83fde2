"""``quant_report.html``: one self-contained page built from the report dict (the content of
``quant_report.json``): no script, no stylesheet or image from anywhere else — every figure
is a PNG embedded as a ``data:`` URI, so the page opens offline and can be mailed.

Sections: run summary; per-layer error and time (the two report PNGs, and a table);
per-linear error heat map (layers × linear kinds); MoE expert coverage heat map (layers ×
experts, routed tokens, fallbacks marked); smoothing (scales chosen per pair, and the
per-channel max |x| before / after smoothing for the worst layers); servability warnings.

The matrices are pure functions of the report (tests recompute them); drawing uses
matplotlib's Agg canvas. A figure that cannot be drawn is left out with a note.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("dist_quant")

HTML_NAME = "quant_report.html"
WORST_SMOOTH_LAYERS = 3
_LAYER = re.compile(r"^(?:.*?\.)?layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


# -- data: pure functions of the report ------------------------------------------------------------
def linear_kind(name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.experts.7.up_proj`` → (3, ``mlp.experts.*.up_proj``)."""
    m = _LAYER.match(name)
    if m is None:
        return None
    return int(m.group(1)), _EXPERT.sub(r"\1experts.*.", m.group(2))


def linear_error_matrix(report: dict) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(layers, kinds, errors[layer][kind]): the relative output error of each linear; for a
    kind that stands for several linears (routed experts) the max over them; None: no such linear."""
    cells: dict[tuple[int, str], float] = {}
    kinds: list[str] = []
    for entry in report.get("layers", []):
        for name, info in entry.get("modules", {}).items():
            lk = linear_kind(name)
            if lk is None or info.get("rel_output_error") is None:
                continue
            if lk[1] not in kinds:
                kinds.append(lk[1])
            cells[lk] = max(cells.get(lk, -math.inf), float(info["rel_output_error"]))
    layers = sorted({lk[0] for lk in cells})
    return layers, kinds, [[cells.get((i, k)) for k in kinds] for i in layers]


def expert_coverage(report: dict) -> tuple[list[int], list[list[int]], list[tuple[int, int, str]]]:
    """(sparse layers, routed tokens[layer][expert], fallbacks as (row, expert, kind))."""
    moe = report.get("moe") or {}
    layers, counts, marks = [], [], []
    for row, e in enumerate(moe.get("layers", [])):
        layers.append(int(e["layer"]))
        counts.append([int(c) for c in e["tokens_per_expert"]])
        marks += [(row, int(x), kind) for x, kind in e.get("fallbacks", {}).items()]
    return layers, counts, marks


def worst_smoothing_layers(report: dict, n: int = WORST_SMOOTH_LAYERS) -> list[int]:
    """The layers whose smoothing input had the largest outlier ratio (max / median of the
    per-channel max |x| before smoothing, over the layer's pairs)."""
    scored = []
    for entry in report.get("layers", []):
        ratios = [p.get("outlier_ratio_before") for p in (entry.get("smoothing") or {}).values()]
        ratios = [r for r in ratios if r is not None]
        if ratios:
            scored.append((max(ratios), entry["layer"]))
    return [layer for _, layer in sorted(scored, key=lambda t: (-t[0], t[1]))[:n]]


# -- figures ------------------------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def heatmap_linear_errors(report: dict) -> str | None:
    from matplotlib.colors import LogNorm

    layers, kinds, m = linear_error_matrix(report)
    if not layers:
        return None
    import numpy as np

    data = np.array([[math.nan if v is None else v for v in row] for row in m], dtype=float)
    positive = data[np.isfinite(data) & (data > 0)]
    fig = _figure(max(5.0, 0.9 * len(kinds) + 3), max(3.0, 0.22 * len(layers) + 1.8))
    ax = fig.add_subplot()
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.min() < positive.max() \
        else None
    im = ax.imshow(np.where(data > 0, data, np.nan), aspect="auto", cmap="viridis", norm=norm,
                   interpolation="nearest")
    ax.set_xticks(range(len(kinds)), [k.replace("self_attn.", "attn.") for k in kinds], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("relative output error per linear (experts: max over experts)", fontsize=10)
    fig.colorbar(im, ax=ax, label="‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖²")
    return _png(fig)


def heatmap_expert_coverage(report: dict) -> str | None:
    layers, counts, marks = expert_coverage(report)
    if not layers:
        return None
    import numpy as np

    data = np.array(counts, dtype=float)
    fig = _figure(max(8.0, 0.25 * data.shape[1] + 3), max(3.0, 0.22 * len(layers) + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
    step = max(1, data.shape[1] // 32)
    ax.set_xticks(range(0, data.shape[1], step))
    for row, expert, kind in marks:
        ax.text(expert, row, "×" if kind == "rtn" else "○", ha="center", va="center", color="cyan",
                fontsize=9, fontweight="bold")
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("routed calibration tokens per expert (○ all_tokens fallback, × rtn fallback)", fontsize=10)
    fig.colorbar(im, ax=ax, label="tokens")
    return _png(fig)


def smoothing_profile(entry: dict) -> str | None:
    pairs = {k: v for k, v in (entry.get("smoothing") or {}).items() if v.get("absmax_before")}
    if not pairs:
        return None
    fig = _figure(10.0, 2.4 * len(pairs) + 0.6)
    for j, (name, p) in enumerate(pairs.items()):
        ax = fig.add_subplot(len(pairs), 1, j + 1)
        before, after = p["absmax_before"], p["absmax_after"]
        xs = range(len(before))
        ax.bar(xs, before, width=1.0, alpha=0.5, label="before smoothing")
        ax.bar(xs, after, width=0.6, alpha=0.8, label="after (x / s)")
        if min(before + after) > 0:
            ax.set_yscale("log")
        binned = "" if len(before) == p.get("channels") else f", max over {p['channels']} channels in {len(before)} bins"
        ax.set_title(f"{name}: per-channel max |x|{binned}", fontsize=9)
        ax.set_xlabel("input channel" + (" bin" if binned else ""), fontsize=8)
        ax.legend(fontsize=7)
    return _png(fig)


def _png_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# -- page -----------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
.warn{color:#a40}.note{color:#666;font-size:.9em}"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None else (format(v, fmt) if isinstance(v, (int, float)) else _e(v))


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">' if uri else f'<p class="note">({_e(alt)}: not drawn)</p>'


def _figure_or_note(draw, report, alt: str) -> str:
    try:
        return _img(draw(report), alt)
    except Exception as exc:  # a figure is a convenience: the page still renders
        log.warning("report: could not draw %s: %s", alt, exc)
        return f'<p class="note">({_e(alt)}: could not be drawn: {_e(exc)})</p>'


def _summary(report: dict) -> str:
    s, cfg = report.get("summary", {}), report.get("config", {})
    q, c = cfg.get("quant", {}), cfg.get("calib", {})
    rows = [("model", report.get("model")), ("preset", q.get("name")),
            ("weights", f"{q.get('method')} {q.get('bits')}-bit, group size {q.get('group_size')}"),
            ("activations", f"int{q['act_bits']} {'dynamic' if q.get('act_dynamic') else 'static'}, "
                            f"smoothing {q.get('smooth')}" if q.get("act_bits") else "float (A16)"),
            ("calibration", f"{c.get('num_samples')} × {c.get('seq_len')} tokens from "
                            f"{c.get('path') or 'built-in demo text'} (format {c.get('format', 'auto')})"),
            ("smoothing set", c.get("smooth_path") or "the calibration set"),
            ("world size", report.get("world_size")), ("wall time", f"{_num(report.get('wall_seconds'), '.1f')} s"),
            ("layers / linears", f"{s.get('layers')} / {s.get('linears')}"),
            ("relative output error", f"mean {_num(s.get('error_mean'))}, max {_num(s.get('error_max'))}"),
            ("fallbacks", ", ".join(s.get("fallbacks") or []) or "none")]
    out = report.get("output")
    if out:
        rows.append(("output", f"{out.get('dir')}: {len(out.get('part_files', []))} part files, "
                               f"{out.get('bytes', 0) / 1e6:.1f} MB"))
    peaks = report.get("peak_rss_bytes_by_rank") or {}
    rows.append(("peak RSS by rank", ", ".join(f"{r}: {b / 1e9:.2f} GB" for r, b in peaks.items())))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items())))
    return "<table>" + "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>'
                               for k, v in rows) + "</table>"


def _layer_table(report: dict) -> str:
    layers = report.get("layers", [])
    phases: list[str] = []
    for e in layers:
        phases += [p for p in e.get("seconds", {}) if p not in phases]
    head = "<tr><th>layer</th><th>error mean</th><th>error max</th>" + "".join(
        f"<th>{_e(p)} s</th>" for p in phases) + "<th>total s</th></tr>"
    body = "".join(
        f"<tr><td>{e['layer']}</td><td>{_num(e.get('error_mean'))}</td><td>{_num(e.get('error_max'))}</td>"
        + "".join(f"<td>{_num(e.get('seconds', {}).get(p), '.2f')}</td>" for p in phases)
        + f"<td>{_num(sum(e.get('seconds', {}).values()), '.2f')}</td></tr>" for e in layers)
    return f"<table>{head}{body}</table>"


def _smoothing(report: dict) -> str:
    rows = []
    for e in report.get("layers", []):
        for name, p in (e.get("smoothing") or {}).items():
            rows.append(f"<tr><td>{e['layer']}</td><td class='l'>{_e(name)}</td><td>{_num(p.get('alpha'))}</td>"
                        f"<td>{_num(p.get('beta'))}</td><td>{'yes' if p.get('searched') else 'no'}</td>"
                        f"<td>{_num(p.get('rel_error'))}</td><td>{_num(p.get('scale_min'))}</td>"
                        f"<td>{_num(p.get('scale_max'))}</td><td>{_num(p.get('outlier_ratio_before'), '.3g')}</td>"
                        f"<td>{_num(p.get('outlier_ratio_after'), '.3g')}</td></tr>")
    if not rows:
        return '<p class="note">No smoothing in this run.</p>'
    table = ("<table><tr><th>layer</th><th class='l'>pair</th><th>α</th><th>β</th><th>searched</th>"
             "<th>search error</th><th>s min</th><th>s max</th><th>outliers before (max/median)</th>"
             "<th>after</th></tr>" + "".join(rows) + "</table>")
    by_layer = {e["layer"]: e for e in report.get("layers", [])}
    worst = worst_smoothing_layers(report)
    figs = "".join(f"<h3>layer {i}</h3>" + _figure_or_note(lambda r, i=i: smoothing_profile(by_layer[i]), report,
                                                            f"layer {i} activation maxima before/after smoothing")
                   for i in worst)
    return table + (f"<p>Per-channel max |x| of the smoothed linears' inputs, before and after smoothing, for "
                    f"the {len(worst)} layer(s) with the largest outlier ratio:</p>" + figs if worst else "")


def _fallback(report: dict) -> str:
    """The linears kept in higher precision (quant.fallback, quant.disable_names)."""
    fb = report.get("fallback")
    if not fb or not fb.get("linears"):
        return '<p class="note">No linear kept in higher precision.</p>'
    rule = (f"<p>max_linears {_e(fb.get('max_linears'))}, threshold {_e(fb.get('threshold'))}, to "
            f"{_e(fb.get('to'))}; pre-pass: {_e(fb.get('pre_pass') or 'none (quant.disable_names only)')}.</p>")
    rows = "".join(f"<tr><td class='l'>{_e(r['name'])}</td><td>{_e(r['to'])}</td><td class='l'>{_e(r['reason'])}</td>"
                   f"<td>{_num(r.get('probe_error'))}</td><td>{_num(r.get('rel_output_error'))}</td></tr>"
                   for r in fb["linears"])
    return (rule + "<table><tr><th class='l'>linear</th><th>kept at</th><th class='l'>why</th>"
            "<th>pre-pass error (W at the job's bits, RTN)</th><th>error as written</th></tr>" + rows + "</table>")


def _moe_summary(moe: dict) -> str:
    return (f"<p>{moe.get('sparse_layers')} sparse layers × {moe.get('experts_per_layer')} experts; routed tokens "
            f"per expert min {moe.get('min_tokens_per_expert')} / median {moe.get('median_tokens_per_expert')} / max "
            f"{moe.get('max_tokens_per_expert')}; {moe.get('fallbacks')} expert(s) used a fallback.</p>")


def _servability(report: dict) -> str:
    data = report.get("servability")
    if data is None:
        return '<p class="note">No servability check in this report.</p>'
    items = data.get("warnings", data) if isinstance(data, dict) else data
    if isinstance(items, dict):
        items = [f"{k}: {v}" for k, v in items.items()]
    if not items:
        return "<p>No servability warnings.</p>"
    lis = []
    for it in items:
        if isinstance(it, dict):
            it = "; ".join(f"{k}: {v}" for k, v in it.items())
        lis.append(f"<li class='warn'>{_e(it)}</li>")
    return "<ul>" + "".join(lis) + "</ul>"


def render_html(report: dict, directory: Path | None = None, pngs: tuple[str, ...] = ()) -> str:
    """The page. ``pngs``: names of the report's PNG files in ``directory`` to embed."""
    plots = "".join(_img(_png_file(Path(directory) / name) if directory else None, name) for name in pngs)
    moe = (_moe_summary(report["moe"]) + _figure_or_note(heatmap_expert_coverage, report, "expert coverage heat map")
           if report.get("moe") else '<p class="note">Not a MoE model.</p>')
    title = f"dist_quant report: {Path(str(report.get('model', ''))).name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<style>{CSS}</style></head><body>
<h1>{_e(title)}</h1>
<h2 id="summary">Run summary</h2>{_summary(report)}
<h2 id="layers">Per-layer error and time</h2>{plots}{_layer_table(report)}
<h2 id="linears">Per-linear error</h2>{_figure_or_note(heatmap_linear_errors, report, "per-linear error heat map")}
<h2 id="moe">MoE expert coverage</h2>{moe}
<h2 id="smoothing">Smoothing</h2>{_smoothing(report)}
<h2 id="fallback">Fallback linears</h2>{_fallback(report)}
<h2 id="servability">Servability warnings</h2>{_servability(report)}
</body></html>
"""


def write_html(directory: Path, report: dict, pngs: tuple[str, ...]) -> Path:
    path = Path(directory) / HTML_NAME
    path.write_text(render_html(report, directory, pngs), encoding="utf-8")
    return path
