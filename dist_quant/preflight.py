"""Checks that need no weights and run before any expensive work, on every rank, so a bad
input ends the job in seconds with one line naming the problem:

* the model directory's JSON files are within the size limit and name no file outside it;
* every checkpoint tensor that the model built from ``config.json`` has must have the shape
  that the config implies (safetensors headers against a meta-device model);
* the output's file system must have room for the planned part files and the resume state
  (two copies of the activations of every rank, kept in ``<output.dir>.partial/.resume``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, JobConfig
from .failure import agree

log = logging.getLogger("dist_quant")

MARGIN_BYTES = 64 * 2**20  # besides 2 % of the need: index, config, tokenizer, logs
DTYPE_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class DiskSpaceError(ConfigError):
    """Not enough free space where the output or the run state goes."""


# JSON files that dist_quant or transformers reads from the model directory
MODEL_JSON = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "preprocessor_config.json")
PATH_KEY_SUFFIXES = ("_file", "_files", "_path", "_dir")
NOT_FOLLOWED = ("_name_or_path", "name_or_path")  # informational: never opened


def check_model_files(ckpt: Checkpoint) -> None:
    """Model-directory JSON files: not oversized, and naming no file outside the directory
    (e.g. a ``tokenizer_file`` that transformers would open)."""
    from . import checkpoint as ckpt_mod

    for name in MODEL_JSON:
        path = ckpt.root / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size > ckpt_mod.MAX_JSON_BYTES:
            raise CheckpointError(f"{name} in {str(ckpt.root)!r} is {size} bytes, over the "
                                  f"{ckpt_mod.MAX_JSON_BYTES}-byte limit")
        if name in ("tokenizer.json", "vocab.json"):
            continue  # token tables, no file names
        data = ckpt.config if name == "config.json" else ckpt_mod.read_json(path, name)
        stack = [(name, data)]
        while stack:
            where, node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for key, value in items:
                if isinstance(value, (dict, list)):
                    stack.append((f"{where}:{key}", value))
                elif (isinstance(value, str) and isinstance(key, str) and key.endswith(PATH_KEY_SUFFIXES)
                      and key not in NOT_FOLLOWED and value):
                    ckpt_mod._inside(ckpt.root, value, f"{where} key {key!r}")


def check_shapes(ckpt: Checkpoint) -> None:
    """Header shapes against the shapes of the model that ``config.json`` describes."""
    import torch
    from transformers import AutoModelForCausalLM

    from .hf_config import hf_config

    try:
        config = hf_config(ckpt.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"config.json in {str(ckpt.root)!r} does not describe a model "
                              f"transformers can build: {first}") from None
    arch = _arch_or_none(config.model_type)
    for name, tensor in model.state_dict().items():
        info = ckpt.tensors.get(name)
        if info is None and arch is not None:  # e.g. Mixtral: block_sparse_moe.* on disk, mlp.* in memory
            head, sep, rel = name.partition(f"{arch.layers_prefix}.")
            index, dot, rel = rel.partition(".")
            if sep and dot and index.isdigit():
                info = ckpt.tensors.get(f"{head}{sep}{index}.{arch.checkpoint_name(rel)}")
        if info is not None and tuple(info.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name!r} has shape {list(info.shape)} in {info.file!r}, but "
                                  f"config.json implies {list(tensor.shape)}")
        if info is None and ".layers." in name and ".experts." not in name:
            raise CheckpointError(f"checkpoint lacks {name!r}, which config.json's model has")


def _arch_or_none(model_type):
    from .arch import UnsupportedModel, get_arch

    try:
        return get_arch(model_type)
    except UnsupportedModel:
        return None


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cfg: JobConfig, ckpt: Checkpoint, parts, partial: Path) -> None:
    """Free space for the part files still to write, and for the resume state."""
    need_out = sum(len(p.header()) + p.nbytes for p in parts)
    if cfg.resume and partial.is_dir():  # what is already there counts as written
        need_out -= sum((partial / p.file).stat().st_size for p in parts if (partial / p.file).is_file())
    demands: dict[int, list] = {}  # st_dev -> [path, bytes, what]

    def demand(path: Path, nbytes: int, what: str) -> None:
        where = _existing(path)
        entry = demands.setdefault(where.stat().st_dev, [where, 0, []])
        entry[1] += max(nbytes, 0)
        entry[2].append(what)

    demand(partial.parent, need_out, "planned part files")
    hidden = ckpt.config.get("hidden_size")
    if isinstance(hidden, int):
        c = cfg.calib
        demand(partial.parent, 2 * c.num_samples * c.seq_len * hidden * DTYPE_SIZE[cfg.model.dtype],
               "resume state")
    for where, need, what in demands.values():
        need_total = int(need * 1.02) + MARGIN_BYTES
        free = shutil.disk_usage(where).free
        if free < need_total:
            raise DiskSpaceError(f"not enough free disk in {str(where)!r}: {free / 1e9:.2f} GB free, "
                                 f"{need_total / 1e9:.2f} GB needed ({' + '.join(what)} + 2 % + 64 MiB)")


def preflight(cfg: JobConfig, comm, ckpt: Checkpoint, parts, partial: Path) -> None:
    check_model_files(ckpt)
    check_shapes(ckpt)
    agree(comm, lambda: comm.rank0(check_disk, cfg, ckpt, parts, partial))
