"""Row split in real processes: on 2 ranks the lone linears of a stage (``o_proj``,
``down_proj``) are solved half by each rank from the same reduced Hessian, assembled on
every rank, written once by the first owner, and the output matches the 1-rank job;
the dry run shows the split."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import free_ports, make_job, run_main  # noqa: E402
from reference import quantized_linears, read_quant_linear, read_tensors  # noqa: E402
from tiny import WIKI, corpus_text, make_tiny_model  # noqa: E402

HIDDEN, INTER = 256, 512  # o_proj 256 rows and down_proj 256 rows: two pieces of 128 (MIN_PIECE_ROWS)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rowsplit")
    model = make_tiny_model(root / "model", layers=1, hidden=HIDDEN, intermediate=INTER, heads=4, kv_heads=2)
    calib = root / "calib.txt"
    calib.write_text(WIKI.read_text(encoding="utf-8")[:40_000] if WIKI.is_file() else corpus_text(40_000))
    extra = ("quant.group_size=64", "calib.batch_size=4")
    port = free_ports(1)[0]
    two = make_job("w2", model, root / "out2", root / "run2", calib, "gptq_w4a16", extra, nproc=2, port=port,
                   num_samples=8, seq_len=64).start()
    one = make_job("w1", model, root / "out1", root / "run1", calib, "gptq_w4a16", extra,
                   num_samples=8, seq_len=64)
    code, out, err = run_main(one.argv[one.argv.index("dist_quant") + 1:])
    one.returncode, one.stdout, one.stderr = code, out, err
    two.wait()
    dry = run_main([f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=64",
                    "quant.group_size=64", f"output.dir={root / 'dry'}", "dry_run=true", "runtime.world_size=2"])
    return one, two, dry


def test_split_linears_are_solved_by_both_ranks_and_match_one_rank(jobs):
    one, two, _ = jobs
    report = json.loads((two.check() / "quant_report.json").read_text())
    modules = {m: i for layer in report["layers"] for m, i in layer["modules"].items()}
    for rel in ("self_attn.o_proj", "mlp.down_proj"):
        info = modules[f"model.layers.0.{rel}"]
        assert info["rows"] == [[info["rank"], 0, 128], [1 - info["rank"], 128, 256]], (rel, info)
        assert info["tokens"] == 8 * 64
    for rel in ("self_attn.q_proj", "mlp.gate_proj"):  # as many linears as ranks: not split
        assert "rows" not in modules[f"model.layers.0.{rel}"]
    a, b = read_tensors(one.check()), read_tensors(two.check())
    assert set(a) == set(b)
    same = total = 0
    for lin in quantized_linears(a):
        qa, qb = read_quant_linear(a, lin, 4), read_quant_linear(b, lin, 4)
        assert (qa.q - qb.q).abs().max() <= 1, lin
        same += int((qa.q == qb.q).sum())
        total += qa.q.numel()
        assert torch.allclose(qa.scale.double(), qb.scale.double(), rtol=1e-5), lin
    assert same / total >= 0.999, same / total
    first = {m: i["rel_output_error"] for layer in json.loads((one.out / "quant_report.json").read_text())["layers"]
             for m, i in layer["modules"].items()}
    for m, info in modules.items():  # the split linears' errors: summed over both pieces
        assert info["rel_output_error"] == pytest.approx(first[m], rel=1e-3, abs=1e-9), m


def test_dry_run_shows_the_split(jobs):
    code, out, err = jobs[2]
    assert code == 0, err
    assert "row split: 2 linear(s) solved by several ranks" in out
    layer0 = next(ln for ln in out.splitlines() if ln.strip().startswith("layer 0:"))
    items = dict(item.rsplit("->", 1) for item in layer0.split(":", 1)[1].split())
    assert sorted(items["self_attn.o_proj"].split(",")) == ["0", "1"]
    assert sorted(items["mlp.down_proj"].split(",")) == ["0", "1"]
    assert "," not in items["self_attn.q_proj"]
