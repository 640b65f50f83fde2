"""Calibration activations kept in host memory on an accelerator (``runtime.offload``).

A layer program holds, per calibration batch, the residual stream and each stage's inputs
(dist_quant/arch/dense.py). On a GPU / NPU with more samples than its memory takes, those
lists live in **pinned host memory** and stream through the device one batch at a time:

* :class:`HostBatches` is the list the programs already use (``for x in xs``, ``xs[j] = …``,
  ``len``, ``clear``): reading a batch copies it to the device (``non_blocking`` from pinned
  memory, ordered on the current stream before the kernels that use it), storing one copies it
  into a *new* pinned buffer (never into the old one in place: a background resume write or a
  copy still in flight may read it). So at most the batch being computed, its result and the
  layer's weights are on the device; the widest stage (``down_proj``'s input, intermediate-size
  wide) is never resident with all of a rank's samples.
* :func:`hold` is where a program materializes a list of batches: a plain list, or a
  :class:`HostBatches` when offloading, filled one batch at a time from a generator (each
  batch leaves the device as soon as it is computed).

``runtime.offload``: ``auto`` (default) offloads on an accelerator when the rank's residual
stream alone exceeds ``runtime.activation_budget`` (and never without a budget or on CPU,
where host and device memory are the same); ``host`` always offloads (on CPU the copies are
plain copies: the mode exists there to test the path); ``none`` never. Dense (Llama-style)
layers with weight-only methods (the same programs ``model.activation_dtype`` is wired for),
AutoRound included: its float chain and tuning targets are host-held like the residual stream,
and its tuning reads them one sample at a time (:func:`samples`).
The outputs do not change: the device computes the same batches in the same order.
"""
from __future__ import annotations

from collections.abc import Iterable, MutableSequence
from typing import Iterator

import torch

def _accelerator(device: torch.device) -> bool:
    return device.type != "cpu"  # cuda, npu (torch_npu), ...


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    out.copy_(t, non_blocking=pin)
    return out


class HostBatches(MutableSequence):
    """Per-batch tensors held on the host and handed out on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device, items: Iterable[torch.Tensor] = ()):
        self.device = torch.device(device)
        self.pin = _accelerator(self.device)
        self._host: list[torch.Tensor] = []
        for t in items:
            self.append(t)

    # -- the list protocol the layer programs use --------------------------------------------
    def __len__(self) -> int:
        return len(self._host)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return self._host[j].to(self.device, non_blocking=self.pin)

    def __setitem__(self, j, t: torch.Tensor) -> None:
        self._host[j] = _to_host(t, self.pin)

    def __delitem__(self, j) -> None:
        del self._host[j]

    def insert(self, j: int, t: torch.Tensor) -> None:
        self._host.insert(j, _to_host(t, self.pin))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for j in range(len(self)):
            yield self[j]

    # -- host-side views ---------------------------------------------------------------------
    def host(self) -> list[torch.Tensor]:
        """The host tensors, complete (waits for copies still in flight to the host)."""
        synchronize(self.device)
        return list(self._host)

    @property
    def shapes(self) -> list[torch.Size]:
        return [t.shape for t in self._host]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host)

    def sample(self, j: int, r: int) -> torch.Tensor:
        """Row ``r`` of batch ``j`` (``[1, ...]``) on the device: one sample crosses, not its batch."""
        return self._host[j][r:r + 1].to(self.device, non_blocking=self.pin)

    def copy(self) -> "HostBatches":
        """Another list of the same host tensors (never written in place, so they can be shared)."""
        out = HostBatches(self.device)
        out._host = list(self._host)
        return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type == "npu":  # torch_npu registers torch.npu (imported by the runtime on NPU jobs)
        torch.npu.current_stream(device).synchronize()


def copy(batches):
    """A new list of the same batches (host-held ones stay on the host)."""
    return batches.copy() if isinstance(batches, HostBatches) else list(batches)


def rows(batches) -> int:
    """Samples in a list of batches (without copying host-held ones to the device)."""
    shapes = batches.shapes if isinstance(batches, HostBatches) else [b.shape for b in batches]
    return sum(int(s[0]) for s in shapes)


def samples(batches) -> "list[torch.Tensor] | _Samples":
    """Per-sample ``[1, ...]`` tensors of a list of batches, in order: views of the batches, or
    (host-held batches) each sample copied to the device when it is read."""
    if isinstance(batches, HostBatches):
        return _Samples(batches)
    return [b[i:i + 1] for b in batches for i in range(b.shape[0])]


class _Samples:
    """The samples of host-held batches, read one at a time (see :func:`samples`)."""

    def __init__(self, batches: HostBatches):
        self.batches = batches
        self.index = [(j, r) for j, s in enumerate(batches.shapes) for r in range(int(s[0]))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batches.sample(*self.index[i])


def host_tensors(batches) -> list[torch.Tensor]:
    """The tensors of a batch list as host-side code (resume state) may read them."""
    return batches.host() if isinstance(batches, HostBatches) else list(batches)


def wanted(mode: str, device: torch.device, residual_bytes: int, budget: int | None) -> bool:
    """Whether a job offloads (``runtime.offload``, see the module docstring)."""
    if mode == "host":
        return True
    if mode == "none" or budget is None or not _accelerator(device):
        return False
    return residual_bytes > budget


def unsupported(cfg, plan) -> str | None:
    """Why this job cannot hold its activations on the host (None: it can)."""
    if plan.arch.moe is not None or plan.arch.program.__module__ != "dist_quant.arch.dense":
        return f"only dense (Llama-style) layers are supported so far, not {plan.arch.name}"
    if cfg.quant.smooth != "none" or cfg.quant.act_bits is not None or cfg.quant.kv_cache is not None:
        return "smoothing, activation and KV-cache quantization are not supported with it yet"
    return None


def applies(cfg, plan, device, residual_bytes: int) -> tuple[bool, str | None]:
    """(whether ``runtime.offload`` asks for host memory here, why the job cannot; None: it can):
    the one rule of the layer loop (``LayerwiseQuantizer._offload``) and the dry run."""
    if not wanted(cfg.runtime.offload, device, residual_bytes, cfg.runtime.activation_budget_bytes):
        return False, None
    return True, unsupported(cfg, plan)


def check(cfg, plan) -> None:
    """``runtime.offload=host`` on a job it is not wired for: one ConfigError line, before any work
    (``auto`` decides later, from the device and the calibration size, and only warns)."""
    problem = unsupported(cfg, plan) if cfg.runtime.offload == "host" else None
    if problem is not None:
        from .config import ConfigError

        raise ConfigError(f"runtime.offload=host: {problem}")


def hold(batches: Iterable[torch.Tensor], device: torch.device | None) -> list[torch.Tensor] | HostBatches:
    """Materialize a sequence of batches: a list, or (``device`` given: offloading) host-held
    batches filled one at a time."""
    if device is None:
        return list(batches)
    if isinstance(batches, HostBatches):
        return batches
    return HostBatches(device, batches)
