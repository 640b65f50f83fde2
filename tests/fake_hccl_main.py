"""Test-only entry point: ``dist_quant`` with a fake ``hccl`` process-group backend.

Registers a backend named ``hccl`` for CPU tensors whose process groups are plain gloo
groups (what torch_npu registers on an Ascend machine, minus the NPU), then runs
``dist_quant.__main__.main()``. Started once per rank (torchrun runs this file), so the
registration happens inside every rank process. Lets the CPU-only tests exercise the
``runtime.backend=hccl`` path: process group on hccl, CPU-tensor collectives on the extra
gloo group that ``Comm`` keeps."""
from __future__ import annotations

import sys

import torch.distributed as dist

MARKER = "fake hccl process group"


def _create_fake_hccl(store, rank, world_size, timeout):
    print(f"{MARKER}: rank {rank} of {world_size}", file=sys.stderr, flush=True)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def register() -> None:
    if not hasattr(dist.Backend, "HCCL"):
        dist.Backend.register_backend("hccl", _create_fake_hccl, devices=["cpu"])


if __name__ == "__main__":
    register()
    from dist_quant.__main__ import main

    sys.exit(main())
