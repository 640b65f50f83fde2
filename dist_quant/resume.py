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

Every file is written to a temporary name, fsync'd and renamed into place, by a background
thread while the next layer's first stage computes; the layer becomes complete (two barriers,
progress.json) at the next layer's second stage, at a stop, or after the last layer. A rank
keeps the files of the last complete layer until the next one is complete.
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
from concurrent.futures import Future, ThreadPoolExecutor
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
# A saved layer becomes complete at this stop check after its layer_done (every rank reaches the
# checks in the same order): the next layer's start is the first, its first stage the second, so
# the files are written while that stage's statistics, solve and forward run.
FLUSH_AT_CHECK = 3

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
    _write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
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
        self._saver: ThreadPoolExecutor | None = None  # writes a layer's files meanwhile
        self._pending: tuple[int, Future] | None = None  # (layer, its write) not yet complete
        self._checks = 0  # stop checks since the last layer_done

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
        them to (see dist_quant/stop.py). Layers before ``layer`` are complete on disk when
        :class:`stop.Stopped` leaves here (the last one's files are awaited first)."""
        self._checks += 1
        if self._checks >= FLUSH_AT_CHECK:  # the saved layer's files have had a stage to be written
            self.flush()
        try:
            stop.check(self.comm, layer, self.num_layers)
        except stop.Stopped:
            self.flush()
            raise

    def layer_done(self, layer: int, xs: list[torch.Tensor], records: list) -> None:
        """Save this rank's state after ``layer``. The files are written by a background thread
        while the next layer computes (the ~38 MB residual stream of the SmolLM2 32 x 512 job
        took 80 ms a layer to serialize and fsync, 4 % of the run); the layer becomes complete
        (both barriers, progress.json, the older files removed, the hooks) at the
        ``FLUSH_AT_CHECK``-th stop check after this call (in the next layer's second stage), at
        a stop, at the next ``layer_done``, or at :meth:`flush` after the last layer. Until then
        progress.json names the layer before, whose files are kept, so a run killed meanwhile
        continues from there. What the thread writes is fixed here: the residual stream's
        tensors (never changed in place: the layer programs replace each batch,
        ``xs[j] = xs[j] + …``), a copy of the writer's held-back tensors, the serialized
        records and the writer state (its part file fsync'd now)."""
        self.flush()
        state, pending = self.writer.checkpoint()
        tensors = {f"xs.{j}": x.detach().contiguous().cpu() for j, x in enumerate(xs)}
        tensors.update({f"pending.{k}": v.detach().contiguous().clone() for k, v in pending.items()})
        meta = json.dumps({"layer": layer, "batches": len(xs), "writer": state,
                           "records": [_record_to_dict(r) for r in records]}, indent=1) + "\n"
        if self._saver is None:
            self._saver = ThreadPoolExecutor(1, thread_name_prefix="resume-save")
        self._pending = (layer, self._saver.submit(self._save, layer, tensors, meta))
        self._checks = 0

    def _save(self, layer: int, tensors: dict[str, torch.Tensor], meta: str) -> None:
        meta_path, tensors_path = self._files(layer)
        tmp = tensors_path.with_name(tensors_path.name + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp))
        _replace(tmp, tensors_path)
        _write_text_atomic(meta_path, meta)

    def flush(self) -> None:
        """Every rank: wait for the saved layer's files, then make that layer complete. A no-op
        when nothing is waiting."""
        if self._pending is None:
            return
        layer, saving = self._pending
        self._pending = None
        saving.result()  # a failed write raises here, on its rank (the watch stops the others)
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
