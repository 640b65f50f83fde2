"""One command for the benchmark tables: dist_quant and each peer on the same job, the same
compute dtype and the same machine, back to back; one JSON file per run; the tables in
bench/README.md regenerated from those files.

    python bench/run_all.py --quick                        # smallest job (minutes): does it all work?
    python bench/run_all.py [--samples 128] [--seq-len 512] [--windows 40] [--dtype float32]
                            [--ranks 1,2] [--runs fp,rtn,gptq,llmcompressor,gptqmodel] [--rerun]
    python bench/run_all.py --smooth                       # the W8A8 / smoothing job (+ msModelSlim)
    python bench/run_all.py --tables-only                  # rewrite bench/README.md from the files

Full jobs take tens of minutes per run on 2 cores: run them on an idle machine (the load
average before and after every run is recorded in its file, and the table shows it).

Each run writes ``<out>/<job>/<run>.json`` with the git revision, a hash of the code, the
run's arguments, the machine, the load average, package versions (the peers' from their own
virtual environment), wall time, peak RSS, perplexity and, for dist_quant, the phases from
its ``quant_report.json``. A file whose code hash and arguments match is reused; one made by
other code or arguments is refused (``--rerun`` replaces it).

Peers run in their own virtual environments (bench/README.md says how to make them):
``--llmcompressor-python``, ``--gptqmodel-python``, ``--msmodelslim-python`` (defaults from
the environment variables ``LLMC_PYTHON``, ``GPTQMODEL_PYTHON``, ``MSMODELSLIM_PYTHON``). A
peer whose interpreter is missing is reported as not run and left out of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import provenance as prov  # noqa: E402

# the benchmark text: shared/ beside the checkout (or beside its parent, for a worktree)
DATA = next((d / "shared" / "data" / "wikitext-2" / "valid.txt" for d in (ROOT.parent, ROOT.parent.parent)
             if (d / "shared" / "data" / "wikitext-2" / "valid.txt").is_file()),
            ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
README = ROOT / "bench" / "README.md"
PHASE_COLUMNS = ("capture", "propagate", "solve", "reduce", "broadcast", "smooth", "act_calib", "load", "write")


@dataclass(frozen=True)
class Run:
    name: str
    tool: str  # dist_quant | fp | llmcompressor | gptqmodel | msmodelslim
    label: str
    ranks: int = 1
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    peer_script: str | None = None
    peer_packages: tuple[str, ...] = field(default=())


def gptq_runs(ranks: list[int]) -> list[Run]:
    runs = [Run("fp", "fp", "FP (bf16 weights, float32 eval)"),
            Run("rtn", "dist_quant", "`rtn_w4a16` g64", 1, "rtn_w4a16")]
    runs += [Run(f"gptq_{r}r", "dist_quant", "`gptq_w4a16` g64 (mse observer)", r, "gptq_w4a16") for r in ranks]
    runs += [Run("awq_gptq", "dist_quant", "`awq_w4a16` g64 (AWQ scales + clip, GPTQ solve)", 1, "awq_w4a16"),
             Run("awq_gptq_noclip", "dist_quant", "`awq_w4a16` g64, `quant.awq_clip=false` (GPTQ, mse observer)",
                 1, "awq_w4a16", ("quant.awq_clip=false",)),
             Run("awq_rtn", "dist_quant", "`awq_w4a16` g64, `quant.weight_solver=rtn` (AWQ scales + clip, RTN)",
                 1, "awq_w4a16", ("quant.weight_solver=rtn",))]
    runs += [Run(f"awq_gptq_{r}r", "dist_quant", "`awq_w4a16` g64 (AWQ scales + clip, GPTQ solve)", r, "awq_w4a16")
             for r in ranks if r > 1]
    runs += [Run("llmcompressor", "llmcompressor", "llm-compressor GPTQ (its defaults)",
                 peer_script="llmcompressor_gptq.py",
                 peer_packages=("llmcompressor", "torch", "transformers", "compressed-tensors")),
             Run("gptqmodel", "gptqmodel", "GPTQModel GPTQ (its defaults)", peer_script="gptqmodel_gptq.py",
                 peer_packages=("gptqmodel", "torch", "transformers"))]
    return runs


def smooth_runs(ranks: list[int]) -> list[Run]:
    dyn = ("quant.act_dynamic=true",)
    given = ("quant.alpha=0.9", "quant.beta=0.1")
    runs = [Run("fp", "fp", "FP (bf16 weights, float32 eval)"),
            Run("w8a8_static", "dist_quant", "`w8a8`, static", 1, "w8a8"),
            Run("w8a8_dynamic", "dist_quant", "`w8a8`, dynamic", 1, "w8a8", dyn),
            Run("sq_static", "dist_quant", "`smoothquant_w8a8` 0.5, static", 1, "smoothquant_w8a8"),
            Run("sq_dynamic", "dist_quant", "`smoothquant_w8a8` 0.5, dynamic", 1, "smoothquant_w8a8", dyn),
            Run("flex_given_static", "dist_quant", "`flexsmooth_w8a8` 0.9/0.1, static", 1, "flexsmooth_w8a8", given),
            Run("flex_given_dynamic", "dist_quant", "`flexsmooth_w8a8` 0.9/0.1, dynamic", 1, "flexsmooth_w8a8",
                given + dyn)]
    runs += [Run(f"flex_search_static_{r}r", "dist_quant", "`flexsmooth_w8a8` searched, static", r,
                 "flexsmooth_w8a8") for r in ranks]
    runs += [Run("flex_search_dynamic", "dist_quant", "`flexsmooth_w8a8` searched, dynamic", 1, "flexsmooth_w8a8",
                 dyn),
             Run("msmodelslim", "msmodelslim", "msModelSlim m6 + W8A8 static", peer_script="msmodelslim_flex.py",
                 peer_packages=("msmodelslim", "torch", "transformers"))]
    return runs


# -- running -------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=fh, text=True, env=env or _env())
    wall = time.time() - t0
    with open(log, "a") as fh:  # stdout too (a peer's own per-module timings, e.g. llm-compressor's)
        fh.write("\n-- stdout --\n" + (proc.stdout or ""))
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... exited {proc.returncode} (log {log}):\n{tail}")
    return wall, proc.stdout


def _phases(report: dict) -> dict:
    """Seconds by phase summed over layers: per rank, and the slowest rank per layer
    (``seconds``, what the report plots). ``other`` = the job's wall time (as the report
    measures it, from the start of the job) minus the slowest-rank phases: calibration
    loading, model skeleton, final index/config writes, and time between phases."""
    by_rank: dict[str, dict[str, float]] = {}
    for layer in report["layers"]:
        for rank, secs in layer["seconds_by_rank"].items():
            mine = by_rank.setdefault(str(rank), {})
            for p, s in secs.items():
                mine[p] = mine.get(p, 0.0) + s
    slowest = dict(report["summary"]["seconds_by_phase"])
    return {"by_rank": by_rank, "slowest_rank": slowest,
            "layer_phases_total": sum(slowest.values()),
            "other": report["wall_seconds"] - sum(slowest.values())}


def ppl(model: Path, a) -> float:
    from dist_quant.eval import evaluate

    return evaluate(model, a.data, seq_len=a.seq_len, start=0.5, end=1.0, max_windows=a.windows,
                    batch_size=4)["ppl"]


def run_dist_quant(run: Run, model: Path, out: Path, a) -> dict:
    cmd = [sys.executable, "-m", "dist_quant"] if run.ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={run.ranks}",
        f"--master_port={29731 + run.ranks}", "-m", "dist_quant"]
    cmd += [f"model.path={model}", f"model.dtype={a.dtype}", f"quant={run.preset}", *run.overrides,
            f"calib.path={a.data}", f"calib.num_samples={a.samples}", f"calib.seq_len={a.seq_len}",
            f"output.dir={out}", "output.overwrite=true", f"runtime.run_dir={out}.run"]
    if run.preset and run.preset.endswith("w4a16"):
        cmd.append(f"quant.group_size={a.group_size}")
    wall, _ = _timed(cmd, out.parent / f"{run.name}.log")
    report = json.loads((out / "quant_report.json").read_text())
    return {"command": cmd[cmd.index("dist_quant") + 1:], "wall_s": wall, "job_wall_s": report["wall_seconds"],
            "peak_rss_gb": {r: v / 2**30 for r, v in report["peak_rss_bytes_by_rank"].items()},
            "phases": _phases(report), "ppl": ppl(out, a),
            "smoothing": [(c["alpha"], c["beta"], c["scale_sha1"]) for layer in report["layers"]
                          for c in layer.get("smoothing", {}).values()]}


def run_peer(run: Run, python: str, model: Path, out: Path, a) -> dict:
    cmd = [python, str(ROOT / "bench" / "peers" / run.peer_script), str(model), a.data, str(out),
           f"--samples={a.samples}", f"--seq-len={a.seq_len}", f"--windows={a.windows}", f"--dtype={a.dtype}"]
    env = {**_env(), "GPTQMODEL_CPU_WORKERS": str(os.cpu_count() or 1)}
    wall, stdout = _timed(cmd, out.parent / f"{run.name}.log", env)
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_s_process=wall, versions=prov.venv_versions(python, run.peer_packages))
    if "ppl" not in result:  # a compressed-tensors output: the same evaluation as dist_quant's
        result["ppl"] = ppl(out, a)
    return result


def peer_python(run: Run, a) -> str | None:
    python = getattr(a, f"{run.tool}_python")
    return python if python and Path(python).is_file() else None


def execute(run: Run, job_dir: Path, model: Path, a, code: dict) -> dict | None:
    args = {"run": run.name, "tool": run.tool, "ranks": run.ranks, "preset": run.preset,
            "overrides": list(run.overrides), "samples": a.samples, "seq_len": a.seq_len, "windows": a.windows,
            "dtype": a.dtype, "group_size": a.group_size, "data_sha256": prov.file_sha256(Path(a.data)),
            "model_sha256": prov.file_sha256(next(iter(sorted(model.glob("*.safetensors")))))}
    key = prov.run_key(code, args)
    path = job_dir / f"{run.name}.json"
    old = prov.cached(path, key, code, args, a.rerun)
    if old is not None:
        print(f"{run.name}: cached ({path.name}, key {key})", flush=True)
        return old
    python = peer_python(run, a) if run.peer_script else None
    if run.peer_script and python is None:
        print(f"{run.name}: not run (no interpreter for {run.tool}; see --{run.tool}-python)", flush=True)
        return None
    load_before = prov.load_average()
    t_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = job_dir / "outputs" / run.name
    out.parent.mkdir(parents=True, exist_ok=True)
    if run.tool == "fp":
        t0 = time.time()
        result = {"ppl": ppl(model, a), "wall_s": time.time() - t0}
    elif run.tool == "dist_quant":
        result = run_dist_quant(run, model, out, a)
    else:
        result = run_peer(run, python, model, out, a)
    record = {"key": key, "args": args, "label": run.label, "started_utc": t_start,
              "load_average_before": load_before, "load_average_after": prov.load_average(),
              "provenance": {"code": code, "machine": prov.machine(), "versions": prov.versions()},
              "result": result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)  # a run file exists only once the run finished
    print(f"{run.name}: {result.get('wall_s', 0):.0f} s, ppl {result['ppl']:.3f} "
          f"(load {load_before} -> {record['load_average_after']})", flush=True)
    return record


# -- tables ---------------------------------------------------------------------------------------
def _rss(r: dict) -> str:
    v = r.get("peak_rss_gb")
    if isinstance(v, dict):
        return " / ".join(f"{x:.2f}" for x in v.values())
    return f"{v:.2f}" if v is not None else "-"


def _process_s(r: dict) -> str:
    """The whole command, process start to exit, imports included: dist_quant's ``wall_s`` is
    that already; a peer's ``wall_s`` is its own timer (load to saved), ``wall_s_process`` the
    command's."""
    v = r.get("wall_s_process", r.get("wall_s"))
    return f"{v:.0f}" if v is not None else "-"


def table(job_dir: Path, runs: list[Run]) -> str:
    """The Markdown table of one job, from its run files only."""
    records = {r.name: json.loads((job_dir / f"{r.name}.json").read_text()) for r in runs
               if (job_dir / f"{r.name}.json").is_file()}
    if not records:
        return "(no run files yet)"
    fp = records.get("fp", {}).get("result", {}).get("ppl")
    any_rec = next(iter(records.values()))
    a = any_rec["args"]
    heads = ["run", "ranks", "wall s", "process s", "start-up s", *PHASE_COLUMNS, "other s", "peak RSS GB", "ppl", "vs FP",
             "load avg before → after"]
    shown = [p for p in PHASE_COLUMNS if any(p in rec["result"].get("phases", {}).get("slowest_rank", {})
                                            for rec in records.values())]
    heads = [h for h in heads if h not in PHASE_COLUMNS or h in shown]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for run in runs:
        rec = records.get(run.name)
        if rec is None:
            continue
        r = rec["result"]
        ph = r.get("phases")
        cells = [run.label + (f" {rec['result'].get('versions', {}).get(run.tool, '')}" if run.peer_script else ""),
                 str(run.ranks) if run.tool != "fp" else "-",
                 f"{r['wall_s']:.0f}" if run.tool != "fp" else "-",
                 _process_s(r) if run.tool != "fp" else "-",
                 f"{r['wall_s'] - r['job_wall_s']:.0f}" if ph else "-"]
        cells += [f"{ph['slowest_rank'].get(p, 0.0):.1f}" if ph else "-" for p in shown]
        cells += [f"{ph['other']:.1f}" if ph else "-", _rss(r) if run.tool != "fp" else "-", f"{r['ppl']:.3f}",
                  f"{100 * (r['ppl'] / fp - 1):+.1f} %" if fp and run.tool != "fp" else "-",
                  f"{rec['load_average_before'][0]:.1f} → {rec['load_average_after'][0]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    code = any_rec["provenance"]["code"]
    m = any_rec["provenance"]["machine"]
    v = any_rec["provenance"]["versions"]
    lines += ["", f"Job: {a['samples']} × {a['seq_len']} calibration tokens, {a['windows']} held-out windows, "
              f"compute dtype {a['dtype']} for every tool. Code {code['head'][:10]}"
              f"{' (uncommitted changes)' if code['dirty'] else ''}, hash {code['code_sha256']}; "
              f"{m['cpus']} × {m['cpu'] or 'CPU'}; torch {v.get('torch')}, transformers {v.get('transformers')}. "
              f"Generated by `python bench/run_all.py` from `{_shown(job_dir)}/*.json`."]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_tables(readme: Path, tables: dict[str, str]) -> None:
    """Replace the text between ``<!-- run_all:NAME begin -->`` and ``<!-- run_all:NAME end -->``."""
    text = readme.read_text()
    for name, body in tables.items():
        begin, end = f"<!-- run_all:{name} begin -->", f"<!-- run_all:{name} end -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        block = f"{begin}\n{body}\n{end}"
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + f"\n{block}\n"
    readme.write_text(text)


# -- command line ---------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smallest job: 4 x 128 tokens, 4 windows, 1 rank, "
                   "runs fp,gptq_1r and the GPTQ peers")
    p.add_argument("--smooth", action="store_true", help="the W8A8 / smoothing job instead of GPTQ W4")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of every tool (dist_quant model.dtype; the peers load the model in it)")
    p.add_argument("--ranks", default="1,2", help="dist_quant world sizes of the main GPTQ / Flex run")
    p.add_argument("--runs", default="", help="comma list of run names (default: all of the job)")
    p.add_argument("--rerun", action="store_true", help="replace run files instead of refusing a mismatch")
    p.add_argument("--tables-only", action="store_true", help="only regenerate bench/README.md from the files")
    p.add_argument("--no-readme", action="store_true", help="do not touch bench/README.md")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    for tool, var in (("llmcompressor", "LLMC_PYTHON"), ("gptqmodel", "GPTQMODEL_PYTHON"),
                      ("msmodelslim", "MSMODELSLIM_PYTHON")):
        p.add_argument(f"--{tool}-python", default=os.environ.get(var), help=f"python of the {tool} venv (${var})")
    a = p.parse_args(argv)
    if a.quick:  # dist_quant GPTQ on 1 rank and the GPTQ peers, on the smallest job
        a.samples, a.seq_len, a.windows, a.ranks = 4, 128, 4, "1"
        a.runs = a.runs or "fp,gptq_1r,llmcompressor,gptqmodel"
    a.rank_list = [int(r) for r in a.ranks.split(",") if r]
    return a


def job_name(a) -> str:
    return f"{'smooth' if a.smooth else 'gptq'}-{a.samples}x{a.seq_len}-{a.dtype}"


def main(argv=None) -> int:
    a = parse(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the in-process evaluations' progress bars
    if not Path(a.data).is_file():
        print(f"error: --data={a.data!r}: file not found", file=sys.stderr)
        return 2
    runs = (smooth_runs if a.smooth else gptq_runs)(a.rank_list)
    job_dir = Path(a.out) / job_name(a)
    job_dir.mkdir(parents=True, exist_ok=True)
    if not a.tables_only:
        from dist_quant.demo_model import ensure_demo_checkpoint

        model = ensure_demo_checkpoint()
        code = prov.code_revision()
        only = set(filter(None, a.runs.split(",")))
        unknown = only - {r.name for r in runs}
        if unknown:
            print(f"error: --runs: unknown run(s) {sorted(unknown)}; this job has {[r.name for r in runs]}",
                  file=sys.stderr)
            return 2
        try:
            for run in runs:
                if not only or run.name in only:
                    execute(run, job_dir, model, a, code)
        except prov.CacheMismatch as exc:
            print(exc, file=sys.stderr)
            return 2
    body = table(job_dir, runs)
    print("\n" + body)
    if not a.no_readme:
        write_tables(README, {job_name(a): body})
    return 0


if __name__ == "__main__":
    sys.exit(main())
