"""The end-to-end baseline: the whole network (K = 1) under DistributedDataParallel.

Every rank walks the same data order and takes its slice of each global batch; DDP averages
the ranks' gradients, which is the global batch's gradient when the slices are equal (a batch
that does not divide by N gives slices one sample apart). Batch norm stays per rank (torch's
DDP default; SyncBatchNorm is GPU-only), with running statistics broadcast from rank 0 at
each step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Config
from pipeline.distributed import failures_named, init_process_group, limit_cpu_threads, world_from_env
from pipeline.errors import BadInput
from pipeline.runners.sequential import LocalLoop


class DataParallelLoop(LocalLoop):
    label = "ddp"

    def wrap(self, module: nn.Module) -> nn.Module:  # type: ignore[override]
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def shard(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images.tensor_split(self.world_size)[self.rank], labels.tensor_split(self.world_size)[self.rank]

    def total(self, count: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(count)
        return count

    def gather_stages(self, stage: dict[str, Any]) -> list[dict[str, Any]]:
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, stage)
        return every


def run_ddp(config: Config) -> None:
    world = world_from_env(config)
    if world.device.type == "cpu":
        limit_cpu_threads(world, config.pipeline.threads_per_stage)
    if config.data.batch_size < 2 * world.size:
        raise BadInput(
            f"data.batch_size = {config.data.batch_size} leaves some of the {world.size} DDP ranks fewer than 2 "
            f"samples (batch norm needs 2); use data.batch_size >= {2 * world.size}"
        )
    init_process_group(world, config.pipeline.timeout_s)
    with failures_named(f"ddp rank {world.rank}"):
        loop = DataParallelLoop(config, world.device, world.rank, world.size)
        loop.run()
        # DDP's reducer holds the group: release it, and let every rank finish, before the teardown.
        del loop
        dist.barrier()
    dist.destroy_process_group()
