"""Automatic fallback (docs/fallback.md): held-out perplexity vs output size for
``quant.fallback.max_linears`` = N on SmolLM2-135M-Instruct, GPTQ W4 symmetric group 64.

Calibration: the first ``--samples`` x ``--seq-len`` tokens of WikiText-2 valid; perplexity
with ``dist_quant.eval`` on the second half (``start=0.5``, 512-token windows, the first
``--windows``), as in bench/bench_gptq.py. One JSON file per N in ``--out``; a finished N is
reused. Prints the markdown table of bench/README.md ("Automatic fallback").

    python bench/bench_fallback.py [--n 0,2,4,8] [--samples 32] [--to float] [--out bench/out/fallback]
                                   [--names-from OUT/n8-float/quant_report.json]

``--names-from``: skip the pre-pass of each N by naming its decision: the top N of that run's
``probe_errors`` (the same rule, dist_quant.fallback.choose) go to ``quant.disable_names``, which
keeps the same linears (and fused partners) as ``quant.fallback.max_linears=N`` on the same job.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_gptq import DATA, ppl, quantize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", default="0,2,4,8")
    p.add_argument("--to", default="float")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "fallback"))
    p.add_argument("--names-from", default=None, help="a quant_report.json whose probe_errors name the top N")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from dist_quant.demo_model import ensure_demo_checkpoint

    model = ensure_demo_checkpoint()
    fp_file = out / "fp.json"
    if not fp_file.is_file():
        fp_file.write_text(json.dumps({"ppl": ppl(model, args)}))
    fp = json.loads(fp_file.read_text())["ppl"]
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        f = out / f"n{n}-{args.to}.json"
        if not f.is_file():
            extra = [f"quant.fallback.max_linears={n}", f"quant.fallback.to={args.to}"] if n else []
            if n and args.names_from:
                from dist_quant.fallback import choose

                errors = json.loads(Path(args.names_from).read_text())["fallback"]["probe_errors"]
                extra = [f"quant.disable_names=[{','.join(sorted(choose(errors, n, None)))}]",
                         f"quant.fallback.to={args.to}"]
            qdir = out / f"n{n}-{args.to}"
            r = quantize(model, qdir, 1, "gptq_w4a16", args, extra)
            report = json.loads((qdir / "quant_report.json").read_text())
            r.update(n=n, to=args.to, ppl=ppl(qdir, args), bytes=report["output"]["bytes"],
                     fallbacks=report.get("fallback", {}).get("linears", []))
            f.write_text(json.dumps(r, indent=2))
        rows.append(json.loads(f.read_text()))
        print(f"N={n} done", flush=True)
    print(f"\nFP perplexity {fp:.3f}\n")
    print("| N | to | linears kept | output MB | ppl | vs FP |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kept = ", ".join(x["name"].replace("model.layers.", "L") for x in r["fallbacks"]) or "-"
        print(f"| {r['n']} | {r['to']} | {kept} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / fp - 1):+.2f} % |")


if __name__ == "__main__":
    main()
