"""Durable progress, so that a killed, preempted or requeued job continues after its last
completed layer and writes the same bytes as an uninterrupted run. The state lives with the
unfinished output, in ``<output.dir>.partial/.resume/``: rerunning the identical command
(whatever its ``runtime.run_dir``) with ``resume=true`` continues it, ``resume=auto``
continues it when it exists and starts fresh otherwise, ``resume=false`` starts over::

    fingerprint.json               rank 0, fresh start: model, config and world size of the run
    rank{r}.layer{i:05d}.json      rank r after layer i: writer state and the per-layer records
    rank{r}.layer{i:05d}.safetensors   rank r's residual stream entering layer i+1 ("xs.{j}")
                                   and the tensors its writer held back ("pending.{name}")
    progress.json                  rank 0, once every rank has saved layer i: layer i is complete

The directory is removed just before ``<output.dir>.partial`` becomes ``<output.dir>``.

Every file is written to a temporary name, fsync'd and renamed into place. A rank keeps the
files of the last complete layer until the next one is complete (two barriers per layer).
On resume, each rank cuts its open part file back to the recorded size (see
:meth:`RankWriter.restore`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, JobConfig
from . import stop
from .failure import agree
from .runtime import Comm
from .writer import RankWriter, WriterError

log = logging.getLogger("dist_quant")


STATE_DIR = ".resume"  # inside <output.dir>.partial

# Called as ``hook(rank, layer)`` once layer ``layer`` is complete on every rank (its state is
# on disk and named by progress.json). An extension point for observers; the tests' fault
# injection (tests/faults.py) installs one. Nothing in dist_quant installs any.
LAYER_DONE_HOOKS: list[Callable[[int, int], None]] = []


class ResumeError(ConfigError):
    """``resume`` cannot continue the recorded run (it differs, or its state is gone)."""


def state_dir(partial: Path) -> Path:
    return Path(partial) / STATE_DIR


def discard_state(partial: Path) -> None:
    """The output is complete: drop the resume state before ``partial`` is moved into place."""
    shutil.rmtree(state_dir(partial), ignore_errors=True)


# -- what must not change between the interrupted run and its resumption ------------------------
def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(cfg: JobConfig, ckpt, world_size: int, calib=None) -> dict:
    """Model (dir, config/index hashes, weight file sizes), the typed config without
    ``resume``/``runtime.run_dir``/``runtime.prefetch`` (none changes the output), the world size
    and (when given) the calibration tokens."""
    config = asdict(cfg)
    config.pop("resume", None)
    config["runtime"].pop("run_dir", None)
    config["runtime"].pop("prefetch", None)
    root = Path(ckpt.root)
    files = sorted({info.file for info in ckpt.tensors.values()})
    model = {"dir": str(root.resolve()),
             "config.json sha256": _sha256(root / "config.json"),
             "index sha256": {name: _sha256(root / name) for name in
                              ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                              if (root / name).is_file()},
             "file sizes": {f: (root / f).stat().st_size for f in files}}
    fp: dict[str, Any] = {"model": model, "config": config, "world size": world_size}
    if calib is not None:
        digest = hashlib.sha256(calib.input_ids.contiguous().numpy().tobytes())
        digest.update(calib.mask.contiguous().numpy().tobytes())
        fp["calibration tokens sha256"] = digest.hexdigest()
    return json.loads(json.dumps(fp))  # as it reads back from disk


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    if not d and prefix:
        out[prefix] = {}
    return out


def differences(recorded: dict, current: dict, limit: int = 5) -> list[str]:
    a, b = _flatten(recorded), _flatten(current)
    diffs = [f"{key}: recorded {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}"
             for key in sorted(set(a) | set(b)) if a.get(key, "<absent>") != b.get(key, "<absent>")]
    return diffs[:limit] + ([f"and {len(diffs) - limit} more"] if len(diffs) > limit else [])


# -- atomic files ------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    _replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ResumeError(f"resume state file {str(path)!r} is unreadable: {exc}") from None


# -- the state of one rank after a layer ---------------------------------------------------------
@dataclass
class Restored:
    layer: int  # last completed layer
    xs: list[torch.Tensor]  # residual stream entering layer + 1 (CPU)
    records: list  # LayerRecord of layers 0..layer computed by this rank


def _record_to_dict(record) -> dict:
    return {"layer": record.layer, "seconds": dict(record.seconds), "modules": record.modules,
            "smoothing": getattr(record, "smoothing", {}), "moe": getattr(record, "moe", {})}


def _record_from_dict(d: dict):
    from .pipeline import LayerRecord

    return LayerRecord(d["layer"], defaultdict(float, d["seconds"]), d["modules"],
                       smoothing=d.get("smoothing", {}), moe=d.get("moe", {}))


class Progress:
    """Per-layer durable checkpoints of one rank, and their restoration."""

    def __init__(self, partial: Path, comm: Comm, writer: RankWriter, num_layers: int):
        self.partial = Path(partial)
        self.dir = state_dir(partial)
        self.comm, self.writer, self.num_layers = comm, writer, num_layers
        self.restored: Restored | None = None
        self._kept: int | None = None  # layer whose files this rank keeps

    def _files(self, layer: int) -> tuple[Path, Path]:
        stem = f"rank{self.comm.rank}.layer{layer:05d}"
        return self.dir / f"{stem}.json", self.dir / f"{stem}.safetensors"

    def _own_files(self) -> list[Path]:
        return sorted(self.dir.glob(f"rank{self.comm.rank}.layer*")) if self.dir.is_dir() else []

    # -- start: fresh, or continue the recorded run ------------------------------------------------
    def begin(self, resume: bool | str, fp: dict) -> int:
        """``resume``: True, False or ``"auto"``. Prepare ``partial`` and the state directory;
        return the first layer to compute."""
        if resume is False:
            self._fresh(fp)
            return 0
        key = "resume=auto" if resume == "auto" else "resume=true"
        fp_rec, progress = self.comm.decide(
            lambda: (_read_json(self.dir / "fingerprint.json"), _read_json(self.dir / "progress.json")))
        if fp_rec is None:
            if resume != "auto":
                raise ResumeError(f"resume=true: no resumable run for this output.dir ({str(self.dir)!r} "
                                  "holds no fingerprint.json); use resume=auto to continue one when it "
                                  "exists and start fresh otherwise")
            log.info("resume=auto: no earlier run of this job in %s; starting fresh", self.partial)
            self._fresh(fp)
            return 0
        diffs = differences(fp_rec, fp)
        if diffs:
            raise ResumeError(f"{key} refused, this run differs from the one recorded in "
                              f"{str(self.dir)!r}: " + "; ".join(diffs)
                              + " (use the same command, or resume=false to start over)")
        if progress is None:
            log.info("%s: no layer was complete in %s; starting at layer 0", key, self.partial)
            self._fresh(fp)
            return 0
        agree(self.comm, lambda: self._restore(int(progress["layer"])))
        log.info("%s: layers 0..%d complete in %s; continuing with layer %d of %d", key,
                 self.restored.layer, self.partial, self.restored.layer + 1, self.num_layers)
        return self.restored.layer + 1

    def _fresh(self, fp: dict) -> None:
        if self.comm.rank == 0:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.dir.mkdir(parents=True)
            write_json_atomic(self.dir / "fingerprint.json", fp)
        self.comm.barrier()

    def _restore(self, layer: int) -> None:
        meta_path, tensors_path = self._files(layer)
        meta = _read_json(meta_path)
        if meta is None or not tensors_path.is_file():
            raise ResumeError(f"resume: rank {self.comm.rank}'s state for layer {layer} "
                              f"({str(meta_path)!r}) is missing")
        try:
            tensors = load_file(str(tensors_path))
            xs = [tensors[f"xs.{j}"] for j in range(int(meta["batches"]))]
            pending = {k[len("pending."):]: v for k, v in tensors.items() if k.startswith("pending.")}
            self.writer.restore(meta["writer"], pending)
        except (OSError, KeyError, ValueError, WriterError) as exc:
            raise ResumeError(f"resume: rank {self.comm.rank}'s state for layer {layer} is "
                              f"unusable: {exc}") from None
        self.restored = Restored(layer, xs, [_record_from_dict(r) for r in meta["records"]])
        self._kept = layer
        for path in self._own_files():  # a later layer's files that never became complete
            if path not in self._files(layer):
                path.unlink(missing_ok=True)

    # -- during and after each layer ---------------------------------------------------------------
    def check_stop(self, layer: int) -> None:
        """Every rank, same points: stop all ranks if the launcher or scheduler asked any of
        them to (see dist_quant/stop.py). Layers before ``layer`` are complete on disk."""
        stop.check(self.comm, layer, self.num_layers)

    def layer_done(self, layer: int, xs: list[torch.Tensor], records: list) -> None:
        state, pending = self.writer.checkpoint()
        meta_path, tensors_path = self._files(layer)
        tensors = {f"xs.{j}": x.detach().contiguous().cpu() for j, x in enumerate(xs)}
        tensors.update({f"pending.{k}": v.contiguous() for k, v in pending.items()})
        tmp = tensors_path.with_name(tensors_path.name + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp))
        _replace(tmp, tensors_path)
        write_json_atomic(meta_path, {"layer": layer, "batches": len(xs), "writer": state,
                                      "records": [_record_to_dict(r) for r in records]})
        self.comm.barrier()  # every rank's layer-`layer` state is on disk
        if self.comm.rank == 0:
            write_json_atomic(self.dir / "progress.json", {"layer": layer, "num_layers": self.num_layers,
                                                           "world_size": self.comm.world_size})
        self.comm.barrier()  # progress.json names `layer`: older files are no longer needed
        if self._kept is not None and self._kept != layer:
            for path in self._files(self._kept):
                path.unlink(missing_ok=True)
        self._kept = layer
        for hook in LAYER_DONE_HOOKS:
            hook(self.comm.rank, layer)
