"""The reference semantics: one process, every batch through module 0, 1, ..., K-1 in turn.

Module k trains on batch t with its weights after t-1 updates, on module k-1's output for
batch t computed before module k-1's update t. The pipeline computes exactly this.
``LocalLoop`` is also the body of the DDP baseline, which only changes how a batch is shared
out, how counts are summed and who writes files.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data.loader import make_loaders
from pipeline.distributed import resolve_device
from pipeline.errors import BadInput
from pipeline.metrics import LossMeter, MetricsLog, Progress, StageStats, say, write_summary
from pipeline.model.network import make_layout, resolve_cuts
from pipeline.packet import Packet
from pipeline.runners.loop import EpochEnd, Position, TrainStep, events, total_steps
from pipeline.worker import ModuleWorker


def resume_all(config: Config, workers: list[ModuleWorker], cuts: list[int]) -> Position:
    if not config.run.resume:
        return Position()
    identity = checkpoint.identity_of(config, cuts)
    positions = {checkpoint.load(config.run.resume, worker, identity) for worker in workers}
    if len(positions) != 1:
        raise BadInput(
            f"run.resume: the module checkpoints in {config.run.resume} were written at different "
            f"steps ({sorted(p.step for p in positions)}); resume from a run that finished cleanly"
        )
    return positions.pop()


class LocalLoop:
    """Trains every module of the config in this process, batch by batch."""

    label = "sequential"

    def __init__(self, config: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        self.started = time.perf_counter()
        self.config, self.device = config, device
        self.rank, self.world_size = rank, world_size
        self.train, self.test = make_loaders(config, device, processes=world_size)
        self.cuts = resolve_cuts(config, self.train.spec, device)
        layout = make_layout(config, self.train.spec, self.cuts)
        self.workers = [
            ModuleWorker(config, layout, index, device, wrap=self.wrap) for index in range(config.local.modules)
        ]
        self.position = resume_all(config, self.workers, self.cuts)
        length = total_steps(Position(), config.train.epochs, len(self.train), config.train.max_steps)
        for worker in self.workers:
            worker.total_steps = length
        self.stats = StageStats(rank=rank, module="all", device=device)

    # ---- what the DDP baseline changes ----------------------------------------------------------

    wrap = None  # no wrapper around the modules

    def shard(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's part of a global batch: all of it."""
        return images, labels

    def total(self, count: torch.Tensor) -> torch.Tensor:
        """A count summed over the processes of the run."""
        return count

    def gather_stages(self, stage: dict[str, Any]) -> list[dict[str, Any]]:
        return [stage]

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any] | None:
        config, modules = self.config, self.config.local.modules
        writer = self.rank == 0
        out_dir = config.run.out_dir
        identity = checkpoint.identity_of(config, self.cuts)
        log = MetricsLog(out_dir, rank=self.rank)
        limits = (config.train.epochs, len(self.train), config.train.max_steps)
        progress = Progress(self.label, self.position.step, total_steps(self.position, *limits), config.data.batch_size)
        meter = LossMeter(list(range(modules)))
        stats = self.stats
        if writer:
            say(f"[{self.label}] {modules} module(s), cuts after blocks {self.cuts}, {len(self.train)} "
                f"batches/epoch on {self.device} x {self.world_size}")

        accuracy, epochs_done, step, epoch = None, 0, self.position.step, 0
        batches: Any = iter(())
        epoch_started = time.perf_counter()
        for event in events(self.position, *limits):
            if isinstance(event, TrainStep):
                if event.epoch != epoch:
                    epoch, epoch_started = event.epoch, time.perf_counter()
                    batches = self.train.batches(epoch, event.batch)
                for worker in self.workers:
                    worker.at_step(epoch, event.step)
                images, labels = next(batches)
                stats.samples += len(labels)
                images, labels = self.shard(images, labels)
                stats.begin_compute()
                packet: Packet | None = Packet.from_batch(images, labels)
                for worker in self.workers:
                    assert packet is not None
                    packet, loss = worker.train_step(packet)
                    meter.add(worker.index, loss)
                stats.end_compute()
                meter.tick()
                step = event.step
                if step % config.run.log_every == 0:
                    self._log_losses(log, progress, meter, epoch, step, writer)
                continue
            assert isinstance(event, EpochEnd)
            paused = time.perf_counter()
            if epoch == event.epoch:
                stats.train_s += time.perf_counter() - epoch_started
            if meter.count:
                self._log_losses(log, progress, meter, event.epoch, step, writer)
            accuracy = self.evaluate()
            epochs_done = event.completed_epochs
            if writer:
                log.write(event="eval", module=modules - 1, epoch=event.epoch, step=step, test_accuracy=accuracy)
                say(f"[{self.label}] epoch {event.epoch} step {step}: test accuracy {accuracy:.4f}")
                for worker in self.workers:
                    checkpoint.save(out_dir, worker, event.resume_at, identity)
            progress.exclude(time.perf_counter() - paused)

        stages = self.gather_stages(stats.report())
        if not writer:
            return None
        return write_summary(
            out_dir, config, world_size=self.world_size, cuts=self.cuts, steps=step, epochs_done=epochs_done,
            test_accuracy=accuracy, train_samples=stats.samples, train_s=stats.train_s,
            wall_s=time.perf_counter() - self.started, stages=stages,
        )

    def evaluate(self) -> float:
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for images, labels in self.test.batches(epoch=0):
            result: Any = Packet.from_batch(*self.shard(images, labels))
            for worker in self.workers:
                result = worker.eval_step(result)
            correct += result
        return float(self.total(correct)) / self.test.samples

    def _log_losses(self, log: MetricsLog, progress: Progress, meter: LossMeter, epoch: int, step: int,
                    writer: bool) -> None:
        losses = meter.means(step)
        text, rate = progress.line(epoch, step, losses)
        compute = self.stats.window_compute_s()
        if not writer:
            return
        say(text)
        for worker, loss in zip(self.workers, losses):
            log.write(event="train", module=worker.index, epoch=epoch, step=step, loss=loss, lr=worker.lr,
                      samples_per_s=round(rate, 2), window_compute_s=compute)


def run_sequential(config: Config) -> dict[str, Any]:
    summary = LocalLoop(config, resolve_device(config)).run()
    assert summary is not None
    return summary
