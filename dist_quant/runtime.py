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
from typing import Any, Mapping

import torch
import torch.distributed as dist

log = logging.getLogger("dist_quant")


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], *keys: str, default: int | None = None) -> int | None:
    for key in keys:
        if env.get(key, "").strip():
            return int(env[key].split("(")[0].split(",")[0])
    return default


def rank_info_from_env(env: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> RankInfo:
    """torchrun / DeepSpeed set RANK, WORLD_SIZE, LOCAL_RANK (DeepSpeed also passes
    ``--local_rank``); Slurm's srun sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        launcher = "deepspeed" if "CROSS_RANK" in env or local_rank_arg is not None else "torchrun"
        local = _int(env, "LOCAL_RANK", default=local_rank_arg if local_rank_arg is not None else 0)
        return RankInfo(_int(env, "RANK"), world, local,
                        _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world), launcher)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        return RankInfo(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", default=0),
                        _int(env, "SLURM_NTASKS_PER_NODE", default=world), "slurm")
    return RankInfo()


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif importlib.util.find_spec("torch_npu") is not None:
            requested = "npu"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("runtime.device='cuda' but torch sees no CUDA device")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "npu":
        try:
            importlib.import_module("torch_npu")
        except Exception as exc:  # ImportError, or a broken CANN install
            raise RuntimeError(f"runtime.device='npu' needs torch_npu with Ascend CANN: {exc}") from None
        torch.npu.set_device(local_rank % torch.npu.device_count())
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


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
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", "29500")
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

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._cpu_group)
