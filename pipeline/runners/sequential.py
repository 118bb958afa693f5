"""The reference semantics: one process, every batch through module 0, 1, ..., K-1 in turn.

Module k trains on batch t with its weights after t-1 updates, on module k-1's output for
batch t computed before module k-1's update t. The pipeline computes exactly this.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data.loader import BatchLoader, make_loaders
from pipeline.distributed import resolve_device
from pipeline.errors import BadInput
from pipeline.metrics import LossMeter, MetricsLog, Progress, StageStats, say, write_summary
from pipeline.model.network import make_layout, resolve_cuts
from pipeline.packet import Packet
from pipeline.runners.loop import EpochEnd, Position, TrainStep, events, total_steps
from pipeline.worker import ModuleWorker


def build_workers(config: Config, train: BatchLoader, device: torch.device) -> tuple[list[int], list[ModuleWorker]]:
    cuts = resolve_cuts(config, train.spec, device)
    layout = make_layout(config, train.spec, cuts)
    return cuts, [ModuleWorker(config, layout, index, device) for index in range(config.local.modules)]


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


def evaluate(workers: list[ModuleWorker], test: BatchLoader) -> float:
    correct: torch.Tensor | int = 0
    for images, labels in test.batches(epoch=0):
        result: Any = Packet.from_batch(images, labels)
        for worker in workers:
            result = worker.eval_step(result)
        correct = correct + result
    return float(correct) / test.samples


def run_sequential(config: Config) -> dict[str, Any]:
    started = time.perf_counter()
    device = resolve_device(config)
    train, test = make_loaders(config, device)
    cuts, workers = build_workers(config, train, device)
    position = resume_all(config, workers, cuts)
    out_dir, modules = config.run.out_dir, config.local.modules
    identity = checkpoint.identity_of(config, cuts)
    log = MetricsLog(out_dir, rank=0)
    stats = StageStats(rank=0, module="all")
    limits = (config.train.epochs, len(train), config.train.max_steps)
    progress = Progress(config.run.mode, position.step, total_steps(position, *limits), config.data.batch_size)
    meter = LossMeter(modules)
    say(f"[sequential] {modules} module(s), cuts after blocks {cuts}, {len(train)} batches/epoch on {device}")

    accuracy, epochs_done, step, epoch = None, 0, position.step, 0
    batches = iter(())
    epoch_started = time.perf_counter()
    for event in events(position, *limits):
        if isinstance(event, TrainStep):
            if event.epoch != epoch:
                epoch, epoch_started = event.epoch, time.perf_counter()
                batches = train.batches(epoch, event.batch)
                for worker in workers:
                    worker.start_epoch(epoch)
            images, labels = next(batches)
            tick = time.perf_counter()
            packet: Packet | None = Packet.from_batch(images, labels)
            for worker in workers:
                assert packet is not None
                packet, loss = worker.train_step(packet)
                meter.add(worker.index, loss)
            stats.compute_s += time.perf_counter() - tick
            stats.samples += len(labels)
            meter.tick()
            step = event.step
            if step % config.run.log_every == 0:
                _log_losses(log, progress, meter, workers, epoch, step)
            continue
        assert isinstance(event, EpochEnd)
        if epoch == event.epoch:
            stats.train_s += time.perf_counter() - epoch_started
        if meter.count:
            _log_losses(log, progress, meter, workers, event.epoch, step)
        accuracy = evaluate(workers, test)
        epochs_done = event.completed_epochs
        log.write(event="eval", module=modules - 1, epoch=event.epoch, step=step, test_accuracy=accuracy)
        say(f"[sequential] epoch {event.epoch} step {step}: test accuracy {accuracy:.4f}")
        for worker in workers:
            checkpoint.save(out_dir, worker, event.resume_at, identity)

    stage = stats.report(device)
    return write_summary(
        out_dir, config, world_size=1, cuts=cuts, steps=step, epochs_done=epochs_done,
        test_accuracy=accuracy, train_samples=stats.samples, train_s=stats.train_s,
        wall_s=time.perf_counter() - started, stages=[stage],
    )


def _log_losses(log: MetricsLog, progress: Progress, meter: LossMeter, workers: list[ModuleWorker],
                epoch: int, step: int) -> None:
    losses = meter.means()
    text, rate = progress.line(epoch, step, losses)
    say(text)
    for worker, loss in zip(workers, losses):
        log.write(event="train", module=worker.index, epoch=epoch, step=step, loss=loss, lr=worker.lr,
                  samples_per_s=round(rate, 2))
