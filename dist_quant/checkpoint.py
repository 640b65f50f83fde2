"""Lazy, validated access to a local Hugging Face checkpoint: config.json plus
safetensors weights (one file or sharded with an index). Only headers are read until a
tensor is asked for; tensors are read one at a time with ``safe_open``."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

MAX_JSON_BYTES = 64 * 2**20  # config/index files larger than this are refused


class CheckpointError(ValueError):
    """The model directory or its files are missing, malformed or unsafe."""


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {str(path)!r}")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} {str(path)!r} is {size} bytes, over the {MAX_JSON_BYTES}-byte limit")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} must hold a JSON object")
    return data


def _inside(root: Path, name: str, what: str) -> Path:
    # judged on the normalized name, not the resolved one: hub caches link files into ../blobs
    path = root / name
    normalized = os.path.normpath(name)
    if os.path.isabs(name) or normalized == ".." or normalized.startswith(".." + os.sep):
        raise CheckpointError(f"{what} names {name!r}, a path outside the model directory {str(root)!r}")
    return path


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: F32, BF16, F16, I32, ...
    file: str  # file name relative to the model dir

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def tensor_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def _weight_files(root: Path) -> dict[str, list[str] | None]:
    """File name → tensor names it should hold (None: take whatever it holds)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"weight index {str(index)!r} has no weight_map")
        files: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"weight index maps {tensor!r} to {fname!r}, not a file name")
            _inside(root, fname, "weight index")
            files.setdefault(fname, []).append(tensor)
        return files
    single = sorted(p.name for p in root.glob("*.safetensors"))
    if single:
        return {name: None for name in single}
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(
            f"{str(root)!r} holds only pickle weights ({', '.join(pickles[:3])}); pickle files can "
            "execute code when loaded and are not read (convert them to safetensors first)")
    raise CheckpointError(f"no safetensors weights in {str(root)!r}")


class Checkpoint:
    """A model directory: its config and a name → :class:`TensorInfo` table from headers."""

    def __init__(self, path: str | os.PathLike):
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"model.path={str(path)!r} is not a directory")
        self.root = root
        self.config = read_json(root / "config.json", "config.json")
        self.tensors: dict[str, TensorInfo] = {}
        for fname, expected in _weight_files(root).items():
            fpath = root / fname
            if not fpath.is_file():
                raise CheckpointError(f"weight file {fname!r} named by the index is missing from {str(root)!r}")
            try:
                with safe_open(fpath, framework="pt") as f:
                    names = list(f.keys())
                    for name in names:
                        sl = f.get_slice(name)
                        self.tensors[name] = TensorInfo(name, tuple(sl.get_shape()), sl.get_dtype(), fname)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"weight file {str(fpath)!r} is unreadable or corrupt: {exc}") from None
            missing = sorted(set(expected or ()) - set(names))
            if missing:
                raise CheckpointError(f"weight file {fname!r} lacks {len(missing)} tensor(s) the index names, e.g. {missing[0]!r}")
            self._check_size(fpath)
        self._handles: dict[str, object] = {}

    def _check_size(self, fpath: Path) -> None:
        """A truncated file still parses its header; compare the data size with the header's claim."""
        with open(fpath, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if fpath.stat().st_size < 8 + header_len + end:
            raise CheckpointError(f"weight file {str(fpath)!r} is truncated ({fpath.stat().st_size} bytes, "
                                  f"header promises {8 + header_len + end})")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (a fresh CPU tensor)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {str(self.root)!r}")
        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(self.root / info.file, framework="pt")
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
