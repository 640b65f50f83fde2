"""Everything about ranks lives here: rank facts from the launcher's environment, device
and backend choice, process-group setup and the few collectives the pipeline uses.

World size 1 is the same code path with collectives that return at once."""
from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from .config import ConfigError

log = logging.getLogger("dist_quant")


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"


def _int(env: Mapping[str, str], *keys: str, default: int | None = None) -> int | None:
    for key in keys:
        if env.get(key, "").strip():
            return int(env[key].split("(")[0].split(",")[0])
    return default


def rank_info_from_env(env: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> RankInfo:
    """torchrun / DeepSpeed set RANK, WORLD_SIZE, LOCAL_RANK (DeepSpeed also passes
    ``--local_rank``); Slurm's srun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID.

    A Slurm batch script or ``salloc`` shell also carries SLURM_PROCID=0 and SLURM_NTASKS=N
    but is one process: only srun's step variables (SLURM_STEP_NUM_TASKS) make it a rank
    of an N-task job, so ``python -m dist_quant`` run directly in an sbatch script is a
    single process instead of waiting for N-1 ranks that never come."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        launcher = "deepspeed" if "CROSS_RANK" in env or local_rank_arg is not None else "torchrun"
        local = _int(env, "LOCAL_RANK", default=local_rank_arg if local_rank_arg is not None else 0)
        return RankInfo(_int(env, "RANK"), world, local,
                        _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world), launcher)
    if "SLURM_PROCID" in env and env.get("SLURM_STEP_NUM_TASKS", "").strip():
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        if world == 1:
            return RankInfo(launcher="slurm")
        per_node = slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""),
                                       _int(env, "SLURM_NODEID", default=0))
        local_world = per_node or _int(env, "SLURM_NTASKS_PER_NODE", default=world)
        return RankInfo(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", default=0),
                        local_world, "slurm")
    return RankInfo()


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from Slurm's compressed count list: ``"4(x2),3"`` → 4, 4, 3."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        item = item.strip()
        if not item:
            continue
        count, _, rep = item.partition("(x")
        try:
            counts += [int(count)] * (int(rep.rstrip(")")) if rep else 1)
        except ValueError:
            return None
    return counts[node_id] if 0 <= node_id < len(counts) else None


def first_slurm_host(nodelist: str) -> str | None:
    """First host of a Slurm hostlist expression, as ``scontrol show hostnames`` would list
    it: ``"gpu[03-05,09],login1"`` → ``"gpu03"``; ``"rack[1-2]-n[7,9]"`` → ``"rack1-n7"``."""
    nodelist = nodelist.strip()
    if not nodelist or nodelist == "(null)":
        return None
    host, depth = "", 0
    for ch in nodelist:  # the first top-level comma ends the first entry
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        host += ch
    out, rest = "", host
    while "[" in rest:
        head, _, tail = rest.partition("[")
        ranges, _, rest = tail.partition("]")
        out += head + ranges.split(",")[0].split("-")[0]
    return out + rest or None


def rendezvous_env(info: RankInfo, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for ``init_process_group`` where the launcher left them unset.

    torchrun and DeepSpeed always set both. Under srun without torchrun: rank 0 runs on
    the first node of the step, so MASTER_ADDR is the first host of SLURM_STEP_NODELIST
    (or the job's node list), then SLURM_LAUNCH_NODE_IPADDR (the node srun ran on);
    MASTER_PORT is derived from SLURM_JOB_ID so that two jobs sharing a node do not
    collide. Values already in ``env`` are kept."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    if not env.get("MASTER_ADDR", "").strip():
        addr = None
        if info.launcher == "slurm":
            for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
                addr = first_slurm_host(env.get(key, ""))
                if addr:
                    break
            addr = addr or env.get("SLURM_LAUNCH_NODE_IPADDR", "").strip() or None
        out["MASTER_ADDR"] = addr or "127.0.0.1"
    if not env.get("MASTER_PORT", "").strip():
        job = _int(env, "SLURM_JOB_ID", "SLURM_JOBID") if info.launcher == "slurm" else None
        out["MASTER_PORT"] = str(15000 + job % 20000 if job is not None else 29500)
    return out


class DeviceError(ConfigError):
    """The requested device or backend is not usable on this machine (a one-line message)."""


def _import_torch_npu() -> None:
    """Import ``torch_npu`` (registers the ``npu`` device and the ``hccl`` backend)."""
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:  # ImportError, or a broken CANN install raising anything else
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DeviceError(f"runtime.device='npu' needs torch_npu with the Ascend CANN toolkit ({detail}); "
                          "install the torch_npu release matching this torch, or use runtime.device=cpu") from None
    if not torch.npu.is_available():
        raise DeviceError("runtime.device='npu' but torch_npu sees no NPU device")


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: CUDA if torch sees a GPU, else an Ascend NPU if torch_npu is installed and
    sees one, else CPU. ``torch_npu`` is imported only for ``npu`` (or ``auto`` where it
    is installed), never on CUDA or CPU runs."""
    if requested == "auto":
        requested = "cpu"
        if torch.cuda.is_available():
            requested = "cuda"
        elif importlib.util.find_spec("torch_npu") is not None:
            try:
                _import_torch_npu()
                requested = "npu"
            except DeviceError as exc:
                log.warning("runtime.device=auto: torch_npu is installed but unusable, using the CPU: %s", exc)
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("runtime.device='cuda' but torch sees no CUDA device "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "npu":
        _import_torch_npu()
        torch.npu.set_device(local_rank % torch.npu.device_count())
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto``: gloo on CPU, nccl on CUDA, hccl on NPU. An explicit backend must be able
    to run on the device (hccl counts where some package registered it, e.g. torch_npu)."""
    if requested == "auto":
        return DEFAULT_BACKEND[device.type]
    if requested == "nccl" and device.type != "cuda":
        raise DeviceError(f"runtime.backend='nccl' needs runtime.device=cuda, but the device is {device.type}")
    if requested == "hccl" and device.type != "npu" and not hasattr(dist.Backend, "HCCL"):
        raise DeviceError(f"runtime.backend='hccl' needs runtime.device=npu (torch_npu), but the device is "
                          f"{device.type}")
    return requested


DEFAULT_BACKEND = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class Comm:
    """Collectives over the job's process group. CPU tensors travel over a gloo group when
    the accelerator backend cannot carry them (nccl, hccl)."""

    def __init__(self, info: RankInfo, device: torch.device, backend: str):
        self.info = info
        self.device = device
        self.backend = backend
        self._cpu_group = None

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def init(self, timeout_s: int) -> None:
        if self.world_size == 1:
            return
        timeout = _dt.timedelta(seconds=timeout_s)
        os.environ.update(rendezvous_env(self.info))
        kwargs: dict[str, Any] = {}
        if self.device.type != "cpu":
            kwargs["device_id"] = self.device
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                timeout=timeout, **kwargs)
        self._cpu_group = (dist.new_group(backend="gloo", timeout=timeout)
                           if self.backend != "gloo" else dist.group.WORLD)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _group(self, tensor: torch.Tensor):
        return self._cpu_group if tensor.device.type == "cpu" else None

    _OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=self._OPS[op], group=self._group(tensor))
        return tensor

    def reduce_to(self, tensor: torch.Tensor, owners: set[int], op: str = "sum") -> torch.Tensor:
        """Reduce so that every rank in ``owners`` holds the result (others: undefined)."""
        if self.world_size == 1:
            return tensor
        if len(owners) == self.world_size or len(owners) > 1:
            return self.all_reduce(tensor, op)
        dist.reduce(tensor, dst=next(iter(owners)), op=self._OPS[op], group=self._group(tensor))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(tensor, src=src, group=self._group(tensor))
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self._cpu_group)
        return box[0]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self._cpu_group)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Rows ``send_splits[r]`` of ``send`` (in order) go to rank r; returns the rows
        received, rank 0's first (``recv_splits[r]`` from rank r)."""
        if self.world_size == 1:
            return send.clone()
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(out, send.contiguous(), list(recv_splits), list(send_splits),
                               group=self._group(send))
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), rank 0's first."""
        if self.world_size == 1:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self._group(tensor))
        return out

    # -- rank-0 decisions: the one place where "only rank 0" is spelled -----------------------------
    def decide(self, fn: Callable[[], Any]) -> Any:
        """Compute ``fn()`` on rank 0 only and give its result to every rank (files only one
        rank may create, clocks, anything that must not differ between ranks). An exception
        raised by ``fn`` on rank 0 is raised on every rank."""
        if self.world_size == 1:
            return fn()
        value, error = None, None
        if self.rank == 0:
            try:
                value = fn()
            except Exception as exc:  # every rank fails alike
                error = exc
        value, error = self.broadcast_object((value, error), 0)
        if error is not None:
            raise error
        return value

    def rank0(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn`` on rank 0 only, with no communication (logging, rank 0's own files);
        other ranks get None."""
        return fn(*args, **kwargs) if self.rank == 0 else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._cpu_group)
