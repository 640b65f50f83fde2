"""The ``moe`` section of ``quant_report.json`` (from the layers' ``record.moe``, filled by
arch/moe_block.py) and its log summary."""
from __future__ import annotations

import logging
import statistics

log = logging.getLogger("dist_quant")


def moe_report(gathered: list[dict]) -> dict:
    """The ``moe`` section of ``quant_report.json``: per sparse layer, the routed tokens of
    every expert (statistics coverage), owners, fallbacks and what each rank moved."""
    layers: dict[int, dict] = {}
    for g in gathered:
        for r in g["records"]:
            m = r.get("moe")
            if not m:
                continue
            entry = layers.setdefault(r["layer"], {
                "layer": r["layer"], "tokens_per_expert": m["tokens_per_expert"], "experts_by_rank": {},
                "fallbacks": {}, "all_tokens_gathered": m["all_tokens_gathered"], "by_rank": {}})
            entry["experts_by_rank"][g["rank"]] = m["experts_owned"]
            entry["fallbacks"].update(m["fallbacks"])
            entry["by_rank"][g["rank"]] = {k: m[k] for k in ("tokens_sent", "slots_sent", "bytes_sent",
                                                              "experts_loaded", "peak_live_experts")}
    out = []
    for i in sorted(layers):
        e = layers[i]
        e["fallbacks"] = dict(sorted(e["fallbacks"].items(), key=lambda kv: int(kv[0])))
        e["tokens_moved"] = sum(b["tokens_sent"] for b in e["by_rank"].values())
        e["bytes_moved"] = sum(sum(b["bytes_sent"].values()) for b in e["by_rank"].values())
        out.append(e)
    all_counts = [c for e in out for c in e["tokens_per_expert"]]
    return {
        "sparse_layers": len(out),
        "experts_per_layer": len(out[0]["tokens_per_expert"]) if out else 0,
        "min_tokens_per_expert": min(all_counts, default=0),
        "median_tokens_per_expert": statistics.median(all_counts) if all_counts else 0,
        "max_tokens_per_expert": max(all_counts, default=0),
        "fallbacks": sum(len(e["fallbacks"]) for e in out),
        "tokens_moved_per_layer": (sum(e["tokens_moved"] for e in out) / len(out)) if out else 0,
        "bytes_moved_per_layer": (sum(e["bytes_moved"] for e in out) / len(out)) if out else 0,
        "max_live_experts_per_rank": max((b["peak_live_experts"] for e in out for b in e["by_rank"].values()),
                                         default=0),
        "layers": out,
    }


def log_moe_summary(section: dict) -> None:
    log.info("MoE coverage: %d sparse layers x %d experts; routed tokens per expert min %d / median %g / max %d; "
             "%d expert(s) used a fallback; %.0f token rows (%.2f MB) moved between ranks per layer",
             section["sparse_layers"], section["experts_per_layer"], section["min_tokens_per_expert"],
             section["median_tokens_per_expert"], section["max_tokens_per_expert"], section["fallbacks"],
             section["tokens_moved_per_layer"], section["bytes_moved_per_layer"] / 1e6)
    for e in section["layers"]:
        for expert, kind in e["fallbacks"].items():
            log.info("MoE fallback: layer %d expert %s (%d routed tokens): %s", e["layer"], expert,
                     e["tokens_per_expert"][int(expert)], kind)
