"""Lazy, validated access to a local Hugging Face checkpoint: config.json plus
safetensors weights (one file or sharded with an index). Only headers are read until a
tensor is asked for (with plain reads: no file is memory-mapped, so a file larger than free
memory is fine); tensors are read one at a time into fresh buffers."""
from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from . import fp8

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
    # FP8 release weights: the stored float8 dtype and the scale tensor read with it (``dtype`` is
    # then what :meth:`Checkpoint.get` returns, the dequantized float32 tensor)
    stored_dtype: str | None = None
    scale: TensorInfo | None = None
    write_dtype: str | None = None  # written through unquantized in this dtype (FP8: the model's float dtype)
    offset: int = -1  # safetensors: byte offset of the data in the file (-1: not a safetensors tensor)

    @property
    def out_dtype(self) -> str:
        """The dtype of the tensor where an output writes it through unquantized."""
        return self.write_dtype or self.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as :meth:`Checkpoint.get` returns it (and as it is written back)."""
        return tensor_nbytes(self.shape, self.dtype)

    @property
    def read_bytes(self) -> int:
        """Bytes read from disk for it (an FP8 weight: its float8 data and its scales)."""
        if self.stored_dtype is None:
            return self.nbytes
        return tensor_nbytes(self.shape, self.stored_dtype) + (self.scale.nbytes if self.scale else 0)


def tensor_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
FP8_READ_DTYPE = "F32"  # FP8 release weights are dequantized to this


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")  # trainer files


def _index_files(root: Path, index: Path) -> dict[str, list[str]]:
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


def _weight_files(root: Path, allow_pickle: bool = False) -> tuple[dict[str, list[str] | None], bool]:
    """File name → tensor names it should hold (None: take whatever it holds), and whether the
    files are pickles (only with ``allow_pickle``; safetensors are preferred when both exist)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return _index_files(root, index), False
    single = sorted(p.name for p in root.glob("*.safetensors"))
    if single:
        return {name: None for name in single}, False
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES
                     and not p.name.startswith(NOT_WEIGHTS))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{str(root)!r} holds only pickle weights ({', '.join(pickles[:3])}); pickle files can "
            "execute code when loaded and are not read (convert them to safetensors, or set "
            "model.allow_pickle=true to load them with torch.load(weights_only=True))")
    if pickles:
        if (root / PICKLE_INDEX).is_file():
            return _index_files(root, root / PICKLE_INDEX), True
        return {name: None for name in pickles}, True
    raise CheckpointError(f"no safetensors weights in {str(root)!r}")


def _load_pickle(fpath: Path) -> dict[str, torch.Tensor]:
    """A state dict from a pickle file with ``torch.load(weights_only=True, mmap=True)``: only
    tensors and plain containers are unpickled (no code runs), and tensor data stays on disk
    until read."""
    import pickle
    import zipfile

    try:
        data = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weight file {str(fpath)!r} holds more than tensors and is refused "
                              f"(torch.load weights_only=True: {first})") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weight file {str(fpath)!r} is unreadable, corrupt or in the legacy "
                              f"(non-zip) format that cannot be memory-mapped: {first}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise CheckpointError(f"weight file {str(fpath)!r} is not a state dict of named tensors")
    return data


MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself applies


def read_safetensors_header(fpath: Path, fname: str) -> list[TensorInfo]:
    """The tensors a safetensors file declares, from its header only (8-byte little-endian
    length, then JSON), read with ordinary reads: the file is never memory-mapped, whatever
    its size. Raises ValueError on a malformed header."""
    size = fpath.stat().st_size
    with open(fpath, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header")
        header_len = int.from_bytes(head, "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ValueError(f"header length {header_len} is invalid for a {size}-byte file")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has a malformed header entry {entry!r}") from None
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end) \
                or end - start != tensor_nbytes(tuple(shape), dtype):
            raise ValueError(f"tensor {name!r} has data_offsets {[start, end]} that do not match "
                             f"its shape {shape} and dtype {dtype}")
        infos.append(TensorInfo(name, tuple(shape), dtype, fname, offset=8 + header_len + start))
    return sorted(infos, key=lambda t: t.offset)


def read_tensor(fpath: Path, info: TensorInfo) -> torch.Tensor:
    """One tensor of a safetensors file, read into a fresh CPU buffer (no memory map: the
    RSS holds this tensor only, not the file's pages)."""
    dtype = TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        raise CheckpointError(f"tensor {info.name!r} has dtype {info.dtype}, which cannot be read as a torch tensor")
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(fpath, "rb", buffering=0) as fh:
        fh.seek(info.offset)
        view, done = memoryview(buf.numpy()), 0
        while done < info.nbytes:
            got = fh.readinto(view[done:])
            if not got:
                raise CheckpointError(f"weight file {str(fpath)!r} ended inside tensor {info.name!r}")
            done += got
    return buf.view(dtype).reshape(info.shape)


class Checkpoint:
    """A model directory: its config and a name → :class:`TensorInfo` table from headers.

    Weights are safetensors files, or, with ``allow_pickle``, pickle files (``.bin``/``.pt``)
    read with ``torch.load(weights_only=True, mmap=True)`` behind the same interface.

    FP8 block releases (``quantization_config.quant_method: fp8``, see dist_quant/fp8.py) are
    read as float: each float8 ``weight`` is listed as a float32 tensor and dequantized with its
    ``weight_scale_inv`` when it is read (one tensor at a time); the ``*_scale_inv`` tensors are
    not listed. :attr:`config` is the source config as written; :meth:`output_config` is the
    one a quantized output starts from (without the source's quantization_config)."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False):
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"model.path={str(path)!r} is not a directory")
        self.root = root
        self.config = read_json(root / "config.json", "config.json")
        try:
            self.fp8_source = fp8.source_quantization(self.config, repr(str(root)))
        except fp8.SourceQuantError as exc:
            raise CheckpointError(str(exc)) from None
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self._ranges: dict[str, tuple[int, int]] = {}  # safetensors: name -> byte range in its file
        self._raw: dict[str, TensorInfo] = {}  # safetensors: the header's entry (stored dtype, offset)
        self._prefetcher: Prefetcher | None = None
        files, pickled = _weight_files(root, allow_pickle)
        for fname, expected in files.items():
            fpath = root / fname
            if not fpath.is_file():
                raise CheckpointError(f"weight file {fname!r} named by the index is missing from {str(root)!r}")
            names = self._read_pickle(fpath, fname) if pickled else self._read_header(fpath, fname)
            missing = sorted(set(expected or ()) - set(names))
            if missing:
                raise CheckpointError(f"weight file {fname!r} lacks {len(missing)} tensor(s) the index names, e.g. {missing[0]!r}")
            if not pickled:
                self._check_size(fpath, fname)
        self._fold_fp8_scales()
        self._handles: dict[str, object] = {}

    def _fold_fp8_scales(self) -> None:
        """List each float8 weight as its float32 dequantized self, its scale inside it."""
        f8 = [n for n, t in self.tensors.items() if t.dtype in fp8.FP8_DTYPES]
        scales = {n for n in self.tensors if n.endswith(fp8.SCALE_SUFFIX)}
        if f8 and self.fp8_source is None:
            raise CheckpointError(f"tensor {f8[0]!r} is {self.tensors[f8[0]].dtype} but config.json in "
                                  f"{str(self.root)!r} has no quantization_config with quant_method 'fp8' "
                                  "(its block size is unknown)")
        for name in sorted(f8):
            info, scale = self.tensors[name], self.tensors.get(fp8.scale_name(name))
            try:
                fp8.check_scale(name, info.shape, scale.shape if scale else None, scale.dtype if scale else None,
                                self.fp8_source)
            except fp8.SourceQuantError as exc:
                raise CheckpointError(str(exc)) from None
            self.tensors[name] = TensorInfo(name, info.shape, FP8_READ_DTYPE, info.file, info.dtype, scale,
                                            self._float_dtype())
            scales.discard(scale.name)
            del self.tensors[scale.name]
        if self.fp8_source is not None and scales:
            stray = sorted(scales)[0]
            raise CheckpointError(f"{stray!r} is a scale without the float8 tensor "
                                  f"{stray[:-len(fp8.SCALE_SUFFIX)]!r} it belongs to")

    def _float_dtype(self) -> str:
        """The release's float dtype (config ``torch_dtype``/``dtype``; BF16 when not said): an FP8
        weight that is written through unquantized (DeepSeek-V3's MTP layer) is written in it,
        as DeepSeek's own fp8_cast_bf16.py converts the release."""
        name = self.config.get("torch_dtype") or self.config.get("dtype")
        return {"float16": "F16", "float32": "F32"}.get(name, "BF16")

    def for_output(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (read with :meth:`get`) in the dtype the output stores ``name`` in."""
        want = TORCH_DTYPES[self.tensors[name].out_dtype]
        return tensor if tensor.dtype == want else tensor.to(want)

    def output_config(self) -> dict:
        """The source config less what described the source's own storage (an FP8 release's
        quantization_config) and remote code, mapped to a built-in class (dist_quant/hf_config.py):
        what an output's config.json starts from."""
        from .hf_config import output_config

        return output_config(self.config)

    def _read_header(self, fpath: Path, fname: str) -> list[str]:
        try:
            infos = read_safetensors_header(fpath, fname)
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"weight file {str(fpath)!r} is unreadable or corrupt: {exc}") from None
        for info in infos:
            self.tensors[info.name] = self._raw[info.name] = info
            self._ranges[info.name] = (info.offset, info.offset + info.nbytes)
        return [info.name for info in infos]

    def _read_pickle(self, fpath: Path, fname: str) -> list[str]:
        data = _load_pickle(fpath)
        for name, t in data.items():
            dtype = SAFETENSORS_DTYPES.get(t.dtype)
            if dtype is None:
                raise CheckpointError(f"tensor {name!r} in {str(fpath)!r} has unsupported dtype {t.dtype}")
            self.tensors[name] = TensorInfo(name, tuple(t.shape), dtype, fname)
        self._pickled[fname] = data
        return list(data)

    def _check_size(self, fpath: Path, fname: str) -> None:
        """A truncated file still parses its header; compare the data size with the header's claim."""
        ends = [t.offset + t.nbytes for t in self.tensors.values() if t.file == fname]
        end = max(ends, default=0)
        if fpath.stat().st_size < end:
            raise CheckpointError(f"weight file {str(fpath)!r} is truncated ({fpath.stat().st_size} bytes, "
                                  f"header promises {end})")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (a fresh CPU tensor)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {str(self.root)!r}")
        if info.file in self._pickled:
            return self._pickled[info.file][name].clone()
        if info.stored_dtype is not None:
            return fp8.dequantize_block(self._read(info.file, name), self._read(info.scale.file, info.scale.name),
                                        self.fp8_source.block, TORCH_DTYPES[info.dtype])
        return self._read(info.file, name)

    def _read(self, file: str, name: str) -> torch.Tensor:
        """The tensor as stored (header dtype), read without a memory map."""
        return read_tensor(self.root / file, self._raw[name])

    def release(self) -> None:
        """Nothing stays open between reads (tensors are read with plain reads into fresh
        buffers, so no file page is mapped into this process); kept for the layer loop."""
        self._handles.clear()

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading these tensors' bytes from disk in a background thread and return at
        once, so that a later :meth:`get` finds them in the page cache. The bytes pass through
        one small buffer: the process's memory does not grow (the pages are the kernel's cache,
        reclaimable). A new call supersedes what an earlier one has not read yet. Pickle
        weights are not prefetched."""
        extents: dict[Path, list[tuple[int, int]]] = {}
        for name in names:
            info, span = self.tensors.get(name), self._ranges.get(name)
            if info is not None and span is not None:
                extents.setdefault(self.root / info.file, []).append(span)
        if not extents:
            return
        if self._prefetcher is None:
            self._prefetcher = Prefetcher()
        self._prefetcher.submit({path: merge_extents(spans) for path, spans in extents.items()})

    @property
    def prefetched_bytes(self) -> int:
        return self._prefetcher.bytes_read if self._prefetcher is not None else 0

    def close(self) -> None:
        self.release()
        self._pickled.clear()
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None


def merge_extents(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with touching or overlapping byte ranges joined."""
    out: list[list[int]] = []
    for begin, end in sorted(spans):
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([begin, end])
    return [(b, e) for b, e in out]


class Prefetcher:
    """One daemon thread that reads byte ranges of files with ``os.preadv`` (which releases the
    GIL) into a reused buffer, filling the page cache. Only the newest request is worked on."""

    CHUNK = 8 << 20

    def __init__(self):
        self._requests: queue.Queue = queue.Queue()
        self._generation = 0
        self.bytes_read = 0
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="dist_quant-prefetch", daemon=True)
        self._thread.start()

    def submit(self, extents: dict[Path, list[tuple[int, int]]]) -> None:
        self._generation += 1
        self._requests.put((self._generation, extents))

    def stop(self) -> None:
        self._generation += 1
        self._requests.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        buf = memoryview(bytearray(self.CHUNK))
        while True:
            item = self._requests.get()
            if item is None:
                return
            generation, extents = item
            t0 = time.perf_counter()
            for path, spans in extents.items():
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    for begin, end in spans:
                        pos = begin
                        while pos < end and generation == self._generation:
                            n = os.preadv(fd, [buf[:min(self.CHUNK, end - pos)]], pos)
                            if n <= 0:
                                break
                            pos += n
                            self.bytes_read += n
                except OSError:
                    pass  # only a hint: the reader will see the real error, if any
                finally:
                    os.close(fd)
            self.seconds += time.perf_counter() - t0
