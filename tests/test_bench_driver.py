"""bench/run_all.py without running a benchmark: the run-file cache reuses only a file made
by the same code and arguments and refuses any other with one line naming the file; a
table row's start-up, phases and "other" add up to the run's wall time; the README's
tables are replaced between their markers and nothing else changes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import provenance as prov  # noqa: E402
import run_all  # noqa: E402


def test_cache_reuses_a_match_and_refuses_other_code_or_arguments(tmp_path):
    code = {"head": "a" * 40, "code_sha256": "c1", "dirty": False}
    args = {"run": "gptq_1r", "samples": 4}
    path = tmp_path / "gptq_1r.json"
    key = prov.run_key(code, args)
    assert prov.cached(path, key, code, args, rerun=False) is None  # nothing yet
    path.write_text(json.dumps({"key": key, "args": args, "provenance": {"code": code}, "result": {"ppl": 1.0}}))
    assert prov.cached(path, key, code, args, rerun=False)["result"] == {"ppl": 1.0}
    assert prov.cached(path, key, code, args, rerun=True) is None
    other_code = {**code, "code_sha256": "c2"}
    with pytest.raises(prov.CacheMismatch, match=r"gptq_1r\.json was made by other code c1 \(now c2\)"):
        prov.cached(path, prov.run_key(other_code, args), other_code, args, rerun=False)
    other_args = {**args, "samples": 8}
    with pytest.raises(prov.CacheMismatch, match=r"other arguments .*'samples': 4.*now.*'samples': 8"):
        prov.cached(path, prov.run_key(code, other_args), code, other_args, rerun=False)
    assert prov.run_key(code, args) != prov.run_key(other_code, args) != prov.run_key(code, other_args)


def test_code_revision_hashes_the_code_on_disk():
    rev = prov.code_revision()
    assert len(rev["head"]) == 40 and len(rev["code_sha256"]) == 20 and isinstance(rev["dirty"], bool)
    assert prov.code_revision() == rev  # deterministic


def _record(name, wall, job_wall, phases, ppl, load=(1.0, 1.0, 1.0)):
    result = {"wall_s": wall, "ppl": ppl}
    if phases is not None:
        result.update(job_wall_s=job_wall, peak_rss_gb={"0": 1.5},
                      phases={"slowest_rank": phases, "other": job_wall - sum(phases.values())})
    return {"key": "k", "args": {"samples": 4, "seq_len": 128, "windows": 4, "dtype": "float32"},
            "label": name, "load_average_before": list(load), "load_average_after": list(load),
            "provenance": {"code": {"head": "b" * 40, "code_sha256": "c", "dirty": False},
                           "machine": {"cpus": 2, "cpu": "test cpu"}, "versions": {"torch": "x"}},
            "result": result}


def test_table_rows_add_up_to_the_wall_time(tmp_path):
    phases = {"capture": 10.0, "propagate": 20.0, "solve": 30.5, "write": 4.5}
    (tmp_path / "fp.json").write_text(json.dumps(_record("fp", 5.0, None, None, 20.0)))
    (tmp_path / "gptq_1r.json").write_text(json.dumps(_record("gptq", 100.0, 80.0, phases, 22.0)))
    text = run_all.table(tmp_path, run_all.gptq_runs([1]))
    head, _, *rows = text.split("\n\n")[0].splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    row = dict(zip(cols, (c.strip() for c in next(r for r in rows if "gptq" in r).strip("|").split("|"))))
    shown = [p for p in run_all.PHASE_COLUMNS if p in cols]
    assert shown == ["capture", "propagate", "solve", "write"]
    total = float(row["start-up s"]) + sum(float(row[p]) for p in shown) + float(row["other s"])
    assert total == pytest.approx(float(row["wall s"]), abs=1.0)
    assert row["vs FP"] == "+10.0 %" and row["ppl"] == "22.000"
    assert "rtn" not in text and "llm-compressor" not in text  # runs without a file are left out


def test_tables_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- run_all:x begin -->\nold\n<!-- run_all:x end -->\noutro\n")
    run_all.write_tables(readme, {"x": "new table", "y": "added"})
    text = readme.read_text()
    assert text.startswith("intro\n<!-- run_all:x begin -->\nnew table\n<!-- run_all:x end -->\noutro\n")
    assert "old" not in text and text.rstrip().endswith("<!-- run_all:y begin -->\nadded\n<!-- run_all:y end -->")
