"""K stage loops of one config on threads of this process, linked by in-memory queues.

The same ``assemble`` as under torchrun builds each stage; only the links (MemoryLink) and the
collectives (a barrier-based exchange between threads) differ. A failing stage breaks its
links and the exchange, as a dying process breaks its sockets.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from pipeline.config.schema import Config
from pipeline.data.loader import make_loaders
from pipeline.runtime.assemble import assemble
from pipeline.runtime.links import MemoryLink
from pipeline.runtime.topology import Topology


class Exchange:
    """Shared slots and a barrier: all_gather for threads."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.barrier = threading.Barrier(size, timeout=timeout_s)
        self.slots: list[Any] = [None] * size


class ThreadCollectives:
    def __init__(self, exchange: Exchange, rank: int) -> None:
        self.exchange, self.rank = exchange, rank

    def gather(self, item: Any) -> list[Any]:
        exchange = self.exchange
        exchange.barrier.wait()
        exchange.slots[self.rank] = item
        exchange.barrier.wait()
        every = list(exchange.slots)
        exchange.barrier.wait()
        return every

    def broadcast(self, item: Any, source: int) -> Any:
        return self.gather(item)[source]

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # one replica

    def broadcast_over_replicas(self, tensor: torch.Tensor) -> None:
        pass  # one replica


def run_threaded(config: Config,
                 timeout_s: float = 60.0) -> tuple[list[dict[str, Any] | None], list[BaseException | None]]:
    """Run config as a K-stage pipeline on K threads; (summaries by rank, errors by rank)."""
    stages = config.local.modules
    exchange = Exchange(stages, timeout_s)
    links = [MemoryLink(k, k + 1, config.pipeline.queue_depth, config.pipeline.timeout_s) for k in range(stages - 1)]
    loaders = make_loaders(config.data, config.model, config.run.seed, torch.device("cpu"))
    summaries: list[dict[str, Any] | None] = [None] * stages
    errors: list[BaseException | None] = [None] * stages

    def stage(rank: int) -> None:
        inbox = links[rank - 1] if rank > 0 else None
        outbox = links[rank] if rank < stages - 1 else None
        topology = Topology(rank, stages, torch.device("cpu"), stages, 1, (rank,),
                            comm=ThreadCollectives(exchange, rank))
        try:
            loop, report, cuts = assemble(config, topology, loaders if rank == 0 else None, time.perf_counter(),
                                          lambda layout: (inbox, outbox))
            loop.run()
            summaries[rank] = report.summary(config, cuts)
        except BaseException as err:  # noqa: BLE001 -- the harness reports every failure
            errors[rank] = err
            for link in (inbox, outbox):
                if link is not None:
                    link.break_with(err)
            exchange.barrier.abort()

    threads = [threading.Thread(target=stage, args=(rank,), name=f"stage-{rank}") for rank in range(stages)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s * 4)
        assert not thread.is_alive(), f"{thread.name} is still running: a stage loop hangs"
    return summaries, errors
