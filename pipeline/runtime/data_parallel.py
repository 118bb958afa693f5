"""How the R replicas of a stage share its work: batch parts, gradient averaging, count sums.

Replica r reads part r of every global batch (pipeline/data/contract.py's ``Part``: slices at
most one sample apart), DistributedDataParallel averages the replicas' gradients of each
module, and counts (correct predictions) are summed over them. With one replica every step is the identity, so
sequential and single-chain pipeline runs go through the same code untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.data.contract import Part
from pipeline.errors import BadInput
from pipeline.runtime.topology import Topology


class DataParallel:
    def __init__(self, topology: Topology, sync_batchnorm: bool = False) -> None:
        self.topology = topology
        self.replicas, self.replica = topology.replicas, topology.replica
        if sync_batchnorm and topology.replicas > 1 and topology.device.type != "cuda":
            raise BadInput("pipeline.sync_batchnorm = true needs GPUs (torch's SyncBatchNorm is CUDA-only); "
                           "set it to false on CPU, where each replica keeps its own batch statistics")
        self.sync_batchnorm = sync_batchnorm
        self.part = Part(self.replica, self.replicas)  # what this replica reads of each global batch

    def wrap(self, module: nn.Module) -> nn.Module:
        """What the training step calls: the module, or DDP around it when replicas share it."""
        if self.replicas == 1:
            return module
        device = self.topology.device
        if self.sync_batchnorm:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=self.topology.replica_group)
        ids = [device.index] if device.type == "cuda" else None
        # gradient_as_bucket_view: gradients live in DDP's buckets, no copy between them per step.
        return DistributedDataParallel(module, device_ids=ids, process_group=self.topology.replica_group,
                                       gradient_as_bucket_view=True)

    def adopt_replica_0_buffers(self, module: nn.Module) -> None:
        """Before evaluating after training: every replica takes replica 0's buffers.

        Evaluation runs the bare module, not DDP. DDP broadcasts replica 0's buffers before each
        training forward, so after the last training step every replica's batch-norm statistics
        have moved on with its own shard; this makes every replica evaluate (and a resumed run
        continue) with the statistics replica 0 checkpoints.
        """
        for buffer in module.buffers():
            self.topology.comm.broadcast_over_replicas(buffer)

    def total(self, count: torch.Tensor) -> torch.Tensor:
        return self.topology.comm.sum_over_replicas(count)
