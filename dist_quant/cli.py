"""Hydra's command-line conventions for the compose-API entry point: ``--help``, ``--cfg job|all``
(``--resolve``), ``--info``, ``--rerun RUN_DIR``, and the run directory's ``.hydra/`` record
(``config.yaml``, ``overrides.yaml``) that lets a run be repeated from its directory.

dist_quant composes its configuration with Hydra's compose API (one process per rank, started by
torchrun / Slurm / DeepSpeed, one run directory chosen once for all ranks), so ``@hydra.main``'s
flag parser is not in the loop; this module gives the same flags the same meaning. The key
meanings come from one place: the field docstrings in :mod:`dist_quant.config`.
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

USAGE = """\
usage: python -m dist_quant [KEY=VALUE ...] [GROUP=PRESET ...]
       torchrun --nproc_per_node=N -m dist_quant [KEY=VALUE ...]
       python -m dist_quant --help | --info | --cfg job|all [--resolve] | --rerun RUN_DIR [KEY=VALUE ...]
"""

FLAGS = """\
flags (Hydra's conventions):
  --help, -h          this help: groups, presets and every key with its default and meaning
  --cfg, -c job|all   print the composed configuration for the given overrides and stop
                      (job: the run's keys; all: the same plus the run directory record)
  --resolve           with --cfg: resolve interpolations
  --info              config search path, defaults list, overrides, composed configuration
  --rerun RUN_DIR     repeat a run: the overrides recorded in RUN_DIR/.hydra/overrides.yaml,
                      then any given on the command line (they win)
"""


class CliError(ValueError):
    """A bad flag; the message names it."""


@dataclass(frozen=True)
class Flags:
    overrides: tuple[str, ...]
    help: bool = False
    cfg: str | None = None
    resolve: bool = False
    info: bool = False
    rerun: str | None = None

    @property
    def prints_only(self) -> bool:
        return self.help or self.cfg is not None or self.info


def parse_flags(argv: Sequence[str]) -> Flags:
    """Split Hydra-style flags from ``KEY=VALUE`` overrides. Unknown ``-``/``--`` flags are errors."""
    overrides: list[str] = []
    found: dict = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg in ("--help", "-h"):
            found["help"] = True
        elif arg == "--info":
            found["info"] = True
        elif arg == "--resolve":
            found["resolve"] = True
        elif name in ("--cfg", "-c", "--rerun"):
            if not eq:
                if i + 1 >= len(args):
                    raise CliError(f"{name}: expects a value")
                i += 1
                value = args[i]
            if name == "--rerun":
                found["rerun"] = value
            else:
                if value not in ("job", "all"):
                    raise CliError(f"{name} {value!r}: expected job or all")
                found["cfg"] = value
        elif arg.startswith("-"):
            raise CliError(f"{arg}: unknown flag (known: --help, --cfg job|all, --resolve, --info, --rerun RUN_DIR)")
        else:
            overrides.append(arg)
        i += 1
    return Flags(overrides=tuple(overrides), **found)


# -- the run directory's record ---------------------------------------------------------------------
def recorded_overrides(run_dir: str | Path) -> list[str]:
    """The overrides a run was started with (``RUN_DIR/.hydra/overrides.yaml``)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise CliError(f"--rerun {str(run_dir)!r}: no {path} (not a dist_quant run directory)")
    loaded = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(loaded, list) or not all(isinstance(o, str) for o in loaded):
        raise CliError(f"--rerun {str(run_dir)!r}: {path} is not a list of overrides")
    return loaded


def with_rerun(flags: Flags) -> list[str]:
    """The overrides to compose: a rerun's recorded ones first, the command line's after (they win)."""
    if flags.rerun is None:
        return list(flags.overrides)
    return recorded_overrides(flags.rerun) + list(flags.overrides)


def write_run_record(run_dir: Path, composed, overrides: Sequence[str]) -> None:
    """``.hydra/config.yaml`` (the composed config) and ``.hydra/overrides.yaml`` (the command line),
    as a Hydra application keeps them beside its logs. Written by rank 0 only."""
    from omegaconf import OmegaConf

    hydra_dir = Path(run_dir) / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("config.yaml", OmegaConf.to_yaml(composed)),
                       ("overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))):
        tmp = hydra_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(hydra_dir / name)


# -- key meanings from the config schema --------------------------------------------------------------
def field_docs(module_file: str | Path) -> dict[str, dict[str, str]]:
    """``{class name: {field: docstring}}`` from the attribute docstrings of a module's dataclasses."""
    tree = ast.parse(Path(module_file).read_text(encoding="utf-8"))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body, found = node.body, {}
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                found[a.target.id] = " ".join(b.value.value.split())
        docs[node.name] = found
    return docs


def key_table(schema=None) -> list[tuple[str, str]]:
    """``(dotted key, meaning)`` for every leaf key of the job schema, in schema order."""
    from . import config as config_module

    schema = schema or config_module.JobConfig
    docs = field_docs(config_module.__file__)
    rows: list[tuple[str, str]] = []

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if dataclasses.is_dataclass(hints.get(f.name)):
                walk(hints[f.name], key + ".")
            else:
                rows.append((key, docs.get(cls.__name__, {}).get(f.name, "")))

    walk(schema, "")
    return rows


def presets(conf_dir: Path) -> dict[str, list[str]]:
    """Config groups (subdirectories of ``conf/``) and their presets."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(conf_dir.iterdir()) if d.is_dir()}


def defaults_list(conf_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml")).get("defaults", [])
    return [f"{k}: {v}" for entry in raw if isinstance(entry, dict) for k, v in entry.items()] + \
        [str(e) for e in raw if not isinstance(e, dict)]


def _lookup(composed, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(composed, key, default="(unset)")


def _show(value) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def help_text(conf_dir: Path, composed) -> str:
    """Groups, presets, and every key with its default (as composed for these overrides) and meaning."""
    lines = [USAGE, "Post-training quantization of LLMs across many devices (GPTQ / RTN, W4A16 / W8A16 / W8A8).",
             "Without model.path: the embedded demo model (SmolLM2-135M-Instruct) with quick demo defaults.", "",
             "config groups (GROUP=PRESET):"]
    for group, names in presets(conf_dir).items():
        lines.append(f"  {group:<9} {', '.join(names)}")
    lines += ["", "keys (KEY=VALUE; default shown as composed with the overrides given):"]
    rows = key_table()
    width = max(len(k) for k, _ in rows) + 2
    for key, meaning in rows:
        default = _show(_lookup(composed, key))
        lines.append(f"  {key:<{width}}{default}")
        if meaning:
            lines.append(f"  {'':<{width}}  {meaning}")
    lines += ["", FLAGS, "More: README.md and docs/ in the repository."]
    return "\n".join(lines) + "\n"


def info_text(conf_dir: Path, composed, overrides: Sequence[str]) -> str:
    from omegaconf import OmegaConf

    from . import __version__

    parts = [f"dist_quant {__version__}", "", "config search path:", f"  file://{conf_dir}", "",
             "defaults list:", *[f"  {d}" for d in defaults_list(conf_dir)], "",
             "overrides:", *([f"  {o}" for o in overrides] or ["  (none)"]), "",
             "composed config:", OmegaConf.to_yaml(composed)]
    return "\n".join(parts)


def cfg_text(composed, which: str, resolve: bool, overrides: Sequence[str]) -> str:
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(composed, resolve=resolve)
    if which == "all":
        record = OmegaConf.create({"run_record": {"files": [".hydra/config.yaml", ".hydra/overrides.yaml"],
                                                  "overrides": list(overrides)}})
        text += OmegaConf.to_yaml(record)
    return text
