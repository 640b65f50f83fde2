"""AutoRound quality on SmolLM2-135M (W4 symmetric g64, 128 x 512 calibration tokens from the
start of WikiText-2 valid, as bench/bench_gptq.py): dist_quant's ``quant=autoround_w4a16``
against Intel's auto-round (bench/peers/autoround_peer.py) at the same iterations.

    # the runs (see bench/README.md for the exact commands), then:
    python bench/bench_autoround.py --ours OUT_DIR [--ours-log LOG] --peer PEER_DIR --peer-log PEER_LOG \\
        [--windows 40] [--json results.json]

Reads each dist_quant output's ``quant_report.json`` (per-layer tuning loss: first batch at the
start, best) and the peer's log lines ``loss iter 0: A -> iter K: B`` (the same quantities), and
measures held-out perplexity with ``dist_quant.eval`` on the second half of the file (the
windows of bench_gptq.py) for every directory that holds a finished checkpoint. A peer run
that has not finished contributes its per-layer losses only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
PEER_LOSS = re.compile(r"loss iter 0: ([0-9.e+-]+) -> iter (\d+): ([0-9.e+-]+)")


def our_losses(out: Path) -> list[tuple[float, float]]:
    report = json.loads((out / "quant_report.json").read_text())
    rows = []
    for layer in report["layers"]:
        info = next(m["autoround"] for m in layer["modules"].values() if "autoround" in m)
        rows.append((info["loss_init"], info["loss_best"]))
    return rows


def peer_losses(log: Path, tokens: int) -> list[tuple[float, float]]:
    """auto-round 0.16 logs ``MSELoss(mean)(batch) / valid tokens of the batch`` (its
    ``total_loss += loss.item() / num_elm`` with ``num_elm`` the mask count: 8 samples x 511
    positions, the last one of each sample being masked); times ``tokens`` it is the mean
    squared error dist_quant reports."""
    text = log.read_text(errors="replace")
    return [(float(a) * tokens, float(b) * tokens) for a, _, b in PEER_LOSS.findall(text)]


def ppl(model: Path, windows: int, data: Path) -> float:
    from dist_quant.eval import evaluate

    return evaluate(model, data, seq_len=512, start=0.5, end=1.0, max_windows=windows, batch_size=4)["ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", type=Path, required=True)
    p.add_argument("--peer", type=Path)
    p.add_argument("--peer-log", type=Path, required=True)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--peer-tokens", type=int, default=8 * 511, help="valid tokens of one peer batch")
    p.add_argument("--json", type=Path)
    p.add_argument("--data", type=Path, default=DATA, help="the WikiText-2 valid.txt of the job")
    a = p.parse_args()
    ours, peer = our_losses(a.ours), peer_losses(a.peer_log, a.peer_tokens)
    n = min(len(ours), len(peer))
    result = {"layers_compared": n,
              "ours": {"loss_init": [o[0] for o in ours], "loss_best": [o[1] for o in ours]},
              "peer": {"loss_init": [q[0] for q in peer], "loss_best": [q[1] for q in peer]},
              "best_loss_ratio_ours_over_peer": [ours[i][1] / peer[i][1] for i in range(n)]}
    if n:
        result["sum_best_loss_first_n"] = {"ours": sum(o[1] for o in ours[:n]), "peer": sum(q[1] for q in peer[:n])}
    result["ppl_ours"] = ppl(a.ours, a.windows, a.data)
    if a.peer is not None and (a.peer / "config.json").is_file():
        result["ppl_peer"] = ppl(a.peer, a.windows, a.data)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
