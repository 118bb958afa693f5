"""Who does what in a run: rank, device, which modules a process trains, its groups and collectives.

Every mode is K stages x R replicas. Sequential is K x 1 in one process (it hosts every
module); pipeline is K x R under torchrun, one module per process; ddp is 1 x R.

Placement (``pipeline.placement``) fixes which rank holds which (stage, replica):
- "chain" (the default): rank r holds stage r % K of replica r // K, so each replica's chain of
  K stages is K consecutive ranks — on one node when a node has K or more devices, where the
  links stay on NVLink/PCIe and only the per-stage gradient all-reduce crosses nodes;
- "stage": rank r holds stage r // R of replica r % R, so a stage's R replicas are neighbours —
  for nodes with fewer devices than K, where the all-reduce is the heavier traffic.
The modes get a Topology and never call torch.distributed themselves (the links send on the groups
made here); the classic pipeline (tools/classic_pp.py) joins through ``joined`` and its
torch.distributed.pipelining schedule sends on the default group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d  # the stores' typed home: torch.distributed re-exports them untyped

from pipeline.config.schema import PipelineConfig, RunConfig
from pipeline.errors import BadInput
from pipeline.runtime.host import limit_cpu_threads, resolve_device


class Collectives(Protocol):
    """The few collectives a run needs, over every process of the job."""

    def gather(self, item: Any) -> list[Any]:
        """Every process's ``item``, in rank order."""
        ...

    def broadcast(self, item: Any, source: int) -> Any:
        """Rank ``source``'s ``item`` on every process."""
        ...

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed in place over the processes that hold the same module."""
        ...

    def broadcast_over_replicas(self, tensor: torch.Tensor) -> None:
        """Replica 0's ``tensor`` in place on every replica of this process's module."""
        ...


class Solo:
    """One process: every collective is the identity."""

    def gather(self, item: Any) -> list[Any]:
        return [item]

    def broadcast(self, item: Any, source: int) -> Any:
        return item

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_over_replicas(self, tensor: torch.Tensor) -> None:
        pass


class TorchCollectives:
    """torch.distributed over the default group; sums over the replica group of this stage."""

    def __init__(self, size: int, replica_group: dist.ProcessGroup | None, replica_0: int) -> None:
        self.size, self.replica_group, self.replica_0 = size, replica_group, replica_0

    def gather(self, item: Any) -> list[Any]:
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, item)
        return every

    def broadcast(self, item: Any, source: int) -> Any:
        box: list[Any] = [item]
        dist.broadcast_object_list(box, src=source)
        return box[0]

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.replica_group is not None:
            dist.all_reduce(tensor, group=self.replica_group)
        return tensor

    def broadcast_over_replicas(self, tensor: torch.Tensor) -> None:
        if self.replica_group is not None:
            dist.broadcast(tensor, self.replica_0, group=self.replica_group)


@dataclass
class Topology:
    rank: int
    size: int
    device: torch.device
    stages: int  # K
    replicas: int  # R
    hosted: tuple[int, ...]  # the modules this process trains, in chain order
    local_rank: int = 0
    local_size: int = 1
    placement: str = "chain"
    comm: Collectives = field(default_factory=Solo)
    links: dict[int, dist.ProcessGroup] = field(default_factory=dict, repr=False)  # module k -> group of k -> k+1
    replica_group: dist.ProcessGroup | None = field(default=None, repr=False)  # the module's replicas (R > 1)
    processes: list[tuple[str, int]] = field(default_factory=list, repr=False)  # (host, pid) by rank

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def stage(self) -> int:
        return self.hosted[0]

    @property
    def replica(self) -> int:
        return place(self.rank, self.stages, self.replicas, self.placement)[1] if self.size > 1 else 0

    @property
    def writer(self) -> bool:
        """Replica 0 writes its modules' checkpoints and metrics lines (rank 0 also the summary)."""
        return self.replica == 0

    @property
    def first(self) -> bool:
        """This process reads the data: it holds module 0."""
        return self.hosted[0] == 0

    @property
    def last(self) -> bool:
        """This process holds the last module: it owns the final loss and the accuracy."""
        return self.hosted[-1] == self.stages - 1

    def rank_of(self, stage: int, replica: int) -> int:
        if self.size == 1:
            return 0
        return replica * self.stages + stage if self.placement == "chain" else stage * self.replicas + replica

    @property
    def last_rank(self) -> int:
        """The rank that holds the last module in replica 0: its figures are the run's."""
        return self.rank_of(self.stages - 1, 0)

    @property
    def node(self) -> int:
        """This process's host among the job's hosts, numbered in rank order (rank 0's is 0)."""
        hosts = list(dict.fromkeys(host for host, _ in self.processes))
        return hosts.index(self.processes[self.rank][0]) if hosts else 0

    def describe(self) -> str:
        """How the failure line names this process."""
        if self.stages == 1:
            return f"ddp rank {self.rank}"
        suffix = f", replica {self.replica}" if self.replicas > 1 else ""
        return f"stage on rank {self.rank} (module {self.stage}{suffix})"


def place(rank: int, stages: int, replicas: int, placement: str) -> tuple[int, int]:
    """rank -> (stage, replica) under ``placement`` (see the module's docstring)."""
    return (rank % stages, rank // stages) if placement == "chain" else (rank // replicas, rank % replicas)


def single_process(run: RunConfig, modules: int, amp: str = "none") -> Topology:
    """Sequential mode: this process trains every module."""
    return Topology(0, 1, resolve_device(run.device, amp=amp), modules, 1, tuple(range(modules)))


def from_env(mode: str, run: RunConfig, pipe: PipelineConfig, modules: int, amp: str = "none") -> Topology:
    """Read torchrun's environment (no process group yet); a missing one: not run under torchrun.

    A node that cannot host the job (more processes than GPUs, bf16 without bf16 GPUs) is bad
    input here, before any process group exists (``resolve_device``).
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise BadInput(
            f"run.mode = {mode!r} must be launched by torchrun ({', '.join(missing)} not set): "
            f"torchrun --nproc-per-node N -m pipeline.train --config FILE --set run.mode={mode}"
        )
    rank, size, local_rank, local_size = (int(os.environ[name]) for name in names)
    replicas = layout_replicas(size, modules, pipe.replicas)
    stage, _ = place(rank, modules, replicas, pipe.placement)
    device = resolve_device(run.device, local_rank, local_size, amp)
    topology = Topology(rank, size, device, modules, replicas, (stage,), local_rank, local_size, pipe.placement)
    if device.type == "cpu":
        limit_cpu_threads(local_rank, local_size, pipe.threads_per_stage)
    return topology


def layout_replicas(size: int, modules: int, replicas: int) -> int:
    """R of a job of ``size`` processes over K = ``modules`` stages; bad input where they do not fit."""
    if size % modules != 0:
        raise BadInput(
            f"WORLD_SIZE is {size}, not a multiple of local.modules = {modules}: a job runs K stages x R replicas; "
            f"launch torchrun with {modules} x R processes (R = 1, 2, ...) or change local.modules"
        )
    if replicas and replicas * modules != size:
        raise BadInput(
            f"pipeline.replicas = {replicas} x local.modules = {modules} needs WORLD_SIZE = {replicas * modules}, "
            f"but it is {size}; launch {replicas * modules} processes or set pipeline.replicas = 0 (derive it)"
        )
    return size // modules


def attempt_store(timeout: datetime.timedelta) -> c10d.Store | None:
    """Under torchrun, this attempt's own keys in the agent's store; None elsewhere (torch's env:// store).

    torchrun's agent keeps one TCPStore for the whole job (TORCHELASTIC_USE_AGENT_STORE) and its
    workers join it at MASTER_ADDR:MASTER_PORT with the same keys on every restart: the new attempt
    can read what the killed one left (a dead rank's address: "Gloo connectFullMesh failed ...
    Connection refused"; barrier counters already counted). Each attempt's keys under its
    TORCHELASTIC_RESTART_COUNT keep the attempts apart; every agent of a job counts its restarts
    alike, since a failure anywhere restarts every node's workers.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = c10d.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return c10d.PrefixStore(f"localpipe/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


GROUP_MARGIN_S = 60.0


def join_job(device: torch.device, rank: int, size: int, timeout_s: float) -> datetime.timedelta:
    """Join the job's default group on ``device`` (NCCL on a GPU, gloo on CPU); the groups' timeout.

    On a GPU the device is set and bound to the group first: NCCL's object collectives and
    barriers otherwise run on the current device, GPU 0, on every rank of a node.

    The groups get pipeline.timeout_s plus ``GROUP_MARGIN_S``: the links' own deadline is
    timeout_s, and at the same figure NCCL's watchdog would often abort the process first,
    before the failure line names the stuck peer and ``stop_stuck_peer`` stops it.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s + GROUP_MARGIN_S)
    dist.init_process_group(backend, store=attempt_store(timeout), rank=rank, world_size=size, timeout=timeout,
                            device_id=device if backend == "nccl" else None)
    return timeout


def warm_links(topology: Topology) -> None:
    """One element over each of this process's links, in chain order, before training.

    NCCL creates a 2-rank communicator for a pair's first plain send/recv, lazily, blocking the
    host: done inside the courier it would take a step's time with no deadline of the link's,
    and its buffers would appear after the memory figures start. Receiving from module k-1
    before sending to k+1 cannot deadlock: module 0 only sends, and each link waits on the one
    before it (docs/design.md, "One communication thread per rank").
    """
    stage, replica = topology.stage, topology.replica
    token = torch.zeros(1, device=topology.device)
    if stage - 1 in topology.links:
        dist.recv(token, topology.rank_of(stage - 1, replica), group=topology.links[stage - 1])
    if stage in topology.links:
        dist.send(token, topology.rank_of(stage + 1, replica), group=topology.links[stage])


@contextlib.contextmanager
def joined(topology: Topology, timeout_s: float) -> Iterator[datetime.timedelta]:
    """Join the job's default group (``join_job``: yields the groups' timeout), its collectives in
    ``topology.comm``, and leave it at the end. All the classic pipeline needs: its schedule sends on it.

    Left only after a clean run: on a failure the process leaves at once, without tearing the
    group down, since peers may be blocked talking to it. DDP's reducer must see every rank
    finish first.
    """
    timeout = join_job(topology.device, topology.rank, topology.size, timeout_s)
    topology.comm = TorchCollectives(topology.size, None, topology.rank)
    yield timeout
    dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def process_groups(topology: Topology, timeout_s: float) -> Iterator[Topology]:
    """Join the job (``joined``: NCCL on GPUs, gloo on CPU), make the link and replica groups.

    Every process creates every group in the same order, as torch.distributed requires. The
    timeout (``join_job``) turns a dead peer into an error instead of a hang.
    """
    if not topology.distributed:
        yield topology
        return
    with joined(topology, timeout_s) as timeout:
        make_groups(topology, timeout)
        warm_links(topology)
        topology.comm = TorchCollectives(topology.size, topology.replica_group, topology.rank_of(topology.stage, 0))
        # Where every process runs: a rank that finds a neighbour stuck can stop it on its own host.
        topology.processes = [tuple(item) for item in topology.comm.gather((socket.gethostname(), os.getpid()))]
        yield topology


def make_groups(topology: Topology, timeout: datetime.timedelta) -> None:
    """The link group of each pair of neighbouring stages and, with replicas, the replica group of each stage."""
    stages, replicas = topology.stages, topology.replicas
    for replica in range(replicas):
        for module in range(stages - 1):
            pair = [topology.rank_of(module, replica), topology.rank_of(module + 1, replica)]
            group = dist.new_group(pair, timeout=timeout)
            if topology.rank in pair:
                topology.links[module] = group
    if replicas > 1:
        for stage in range(stages):
            members = [topology.rank_of(stage, replica) for replica in range(replicas)]
            group = dist.new_group(members, timeout=timeout) if stages > 1 else dist.group.WORLD
            if topology.rank in members:
                topology.replica_group = group
