"""Where a benchmark number came from, and caches that refuse to mix builds.

Every run file written by ``bench/run_all.py`` carries ``provenance()`` (git revision, a
hash of the code that produced it, machine, package versions) and a ``key``: the hash of
that code and of the run's arguments. :func:`cached` reuses a run file only when its key
matches, and refuses (one error line, nonzero exit) when a file of the same name was made
by other code or other arguments, instead of silently mixing builds.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a number depends on: the package, its presets, the benchmark scripts and peers.
CODE_PATHS = ("dist_quant", "conf", "bench/peers", "bench/run_all.py", "bench/provenance.py", "bench/bench_smooth.py",
              "pyproject.toml")
PACKAGES = ("torch", "transformers", "compressed-tensors", "safetensors", "tokenizers", "numpy", "hydra-core")


class CacheMismatch(Exception):
    """A run file made by other code or arguments than this run's."""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def code_revision() -> dict:
    """``HEAD`` and a hash of the code paths as they are on disk (committed or not)."""
    head = _git("rev-parse", "HEAD").strip()
    h = hashlib.sha256()
    files = _git("ls-files", "-co", "--exclude-standard", "--", *CODE_PATHS).split()
    for rel in sorted(set(files)):
        p = ROOT / rel
        if p.is_file() and "__pycache__" not in rel:
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    dirty = bool(_git("status", "--porcelain", "--", *CODE_PATHS).strip())
    return {"head": head, "code_sha256": h.hexdigest()[:20], "dirty": dirty}


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = None
    return {"node": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "mem_bytes": mem,
            "python": platform.python_version(), "platform": platform.platform()}


def versions(packages=PACKAGES) -> dict:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def venv_versions(python: str, packages) -> dict:
    """Package versions as another interpreter (a peer's virtual environment) sees them."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n"
            "    try: return m.version(n)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    proc = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()[-300:]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


def run_key(code: dict, args: dict) -> str:
    blob = json.dumps({"code": code["code_sha256"], "args": args}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached(path: Path, key: str, code: dict, args: dict, rerun: bool) -> dict | None:
    """The run file at ``path`` if it was made with ``key`` (the same code and arguments);
    ``None`` if there is none (or ``rerun``). A file made with another key is refused."""
    if not path.is_file() or rerun:
        return None
    old = json.loads(path.read_text())
    if old.get("key") == key:
        return old
    old_code = old.get("provenance", {}).get("code", {}).get("code_sha256")
    what = [f"code {old_code} (now {code['code_sha256']})"] if old_code != code["code_sha256"] else []
    what += [f"arguments {old.get('args')} (now {args})"] if old.get("args") != args else []
    raise CacheMismatch(f"error: {path} was made by other {' and '.join(what) or 'inputs'}; "
                        f"pass --rerun to replace it, or --out for a new folder")
