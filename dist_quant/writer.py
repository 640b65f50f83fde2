"""Rank-aware output: every rank streams the tensors it owns into its own safetensors
part files, whose layout is planned before any solve; rank 0 writes the index last.

The ``safetensors`` library writes whole dicts only, which would hold up to a part file
(gigabytes) in memory. The part files are therefore planned up front (names, dtypes and
shapes are known from the plan), their safetensors header is written first and tensor
bytes are appended as the layer loop produces them, so memory stays at one layer. Every
finished file is read back and checked with ``safetensors.safe_open``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .tensorspec import TensorSpec


@dataclass(frozen=True)
class PartFile:
    file: str
    rank: int
    tensors: tuple[TensorSpec, ...]

    def header(self) -> bytes:
        meta: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.tensors:
            meta[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                               "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(meta, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


def plan_parts(per_rank: list[list[TensorSpec]], limit: int, prefix: str = "model") -> list[PartFile]:
    """Cut each rank's ordered tensor list into parts of at most ``limit`` bytes of data
    (a single larger tensor gets a part of its own), then name parts globally."""
    chunks: list[tuple[int, list[TensorSpec]]] = []
    for rank, specs in enumerate(per_rank):
        current: list[TensorSpec] = []
        size = 0
        for spec in specs:
            if current and size + spec.nbytes > limit:
                chunks.append((rank, current))
                current, size = [], 0
            current.append(spec)
            size += spec.nbytes
        if current:
            chunks.append((rank, current))
    total = len(chunks)
    return [PartFile(f"{prefix}-{i + 1:05d}-of-{total:05d}.safetensors", rank, tuple(specs))
            for i, (rank, specs) in enumerate(chunks)]


class WriterError(RuntimeError):
    pass


class RankWriter:
    """Streams one rank's planned part files; tensors may arrive in any order within what
    is pending, and are written in plan order."""

    def __init__(self, directory: Path, parts: list[PartFile], rank: int):
        self.directory = Path(directory)
        self.parts = [p for p in parts if p.rank == rank]
        self._queue = [(part, spec) for part in self.parts for spec in part.tensors]
        self._next = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._handle = None
        self._open_part: PartFile | None = None

    @property
    def expected(self) -> set[str]:
        return {spec.name for _, spec in self._queue}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending:
            raise WriterError(f"tensor {name!r} given twice")
        tensor = tensor.detach().cpu()
        values = tensor.float() if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise WriterError(f"refusing to write {name!r}: it contains NaN or Inf")
        self._pending[name] = tensor
        self._drain()

    def _drain(self) -> None:
        while self._next < len(self._queue):
            part, spec = self._queue[self._next]
            tensor = self._pending.pop(spec.name, None)
            if tensor is None:
                return
            if not spec.matches(tensor):
                raise WriterError(f"{spec.name!r}: planned {spec.dtype}{list(spec.shape)}, got "
                                  f"{tensor.dtype}{list(tensor.shape)}")
            if self._open_part is not part:
                self._close()
                self._handle = open(self.directory / part.file, "wb")
                self._handle.write(part.header())
                self._open_part = part
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            self._handle.write(data)
            self._next += 1
            if self._next == len(self._queue) or self._queue[self._next][0] is not part:
                self._close()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
            self._verify(self._open_part)
            self._open_part = None

    def _verify(self, part: PartFile) -> None:
        with safe_open(self.directory / part.file, framework="pt") as f:
            names = set(f.keys())
        if names != {spec.name for spec in part.tensors}:
            raise WriterError(f"{part.file}: written tensors differ from the plan")

    def finish(self) -> dict[str, str]:
        """Check that everything planned was written; return this rank's tensor → file map."""
        if self._next != len(self._queue):
            raise WriterError(f"{len(self._queue) - self._next} planned tensors never arrived, "
                              f"e.g. {self._queue[self._next][1].name!r}")
        if self._pending:
            raise WriterError(f"unplanned tensors given: {sorted(self._pending)[:3]}")
        self._close()
        return {spec.name: part.file for part in self.parts for spec in part.tensors}

    def checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Make everything written so far durable (flush + fsync the open part file) and
        describe it for :meth:`restore`; also return the tensors still waiting for their turn."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        state = {"written": self._next, "open_part": self._open_part.file if self._open_part else None,
                 "offset": self._handle.tell() if self._handle is not None else 0}
        return state, dict(self._pending)

    def restore(self, state: dict, pending: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`checkpoint`: part files finished before it must be intact, the
        part file open at that time is cut back to the recorded size, later ones are rewritten."""
        written, open_file, offset = int(state["written"]), state["open_part"], int(state["offset"])
        if not 0 <= written <= len(self._queue):
            raise WriterError(f"resume state says {written} tensors written, the plan has {len(self._queue)}")
        done = {part.file for part, _ in self._queue[:written]} - {open_file}
        for part in self.parts:
            if part.file in done:
                path = self.directory / part.file
                size = path.stat().st_size if path.is_file() else None
                if size != len(part.header()) + part.nbytes:
                    raise WriterError(f"{path} should be a finished part file of "
                                      f"{len(part.header()) + part.nbytes} bytes, found {size}")
        self.abort()
        self._open_part = None
        self._next, self._pending = written, dict(pending)
        if open_file is not None:
            part = next((p for p in self.parts if p.file == open_file), None)
            path = self.directory / open_file
            if part is None or not path.is_file() or path.stat().st_size < offset:
                raise WriterError(f"part file {path} is missing or shorter than the recorded {offset} bytes")
            self._handle = open(path, "r+b")
            self._handle.truncate(offset)
            self._handle.seek(offset)
            self._open_part = part
        self._drain()

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def write_index(directory: Path, parts: list[PartFile], weight_map: dict[str, str],
                name: str = "model.safetensors.index.json") -> None:
    total = sum(p.nbytes for p in parts)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / name).write_text(json.dumps(index, indent=2) + "\n")
