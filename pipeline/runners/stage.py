"""One pipeline stage: rank k of a torchrun job trains module k only.

Rank 0 owns the data: it walks the same ``events`` as the sequential runner, trains module 0
on each batch and sends the detached output on. Every other rank trains on what its inbox
delivers and passes its own output on; the last rank owns the final loss and the accuracy.
Evaluation batches (EVAL) and epoch ends (END_EPOCH, carrying the checkpoint position) flow
down the same links, so every stage sees the same order of events as the sequential loop.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data.loader import BatchLoader, make_loaders
from pipeline.data.specs import dataset_spec
from pipeline.distributed import World, failures_named, init_process_group, limit_cpu_threads, world_from_env
from pipeline.errors import BadInput, StageFailure
from pipeline.metrics import LossMeter, MetricsLog, Progress, StageStats, say, write_summary
from pipeline.model.network import make_layout, resolve_cuts
from pipeline.packet import Packet
from pipeline.runners.loop import EpochEnd, Position, TrainStep, events, total_steps
from pipeline.transport import Kind, Receiver, Sender
from pipeline.worker import ModuleWorker


def run_stage(config: Config) -> None:
    """Entry point of ``run.mode = "pipeline"``; ends the process on any failure of this rank."""
    started = time.perf_counter()
    world = world_from_env(config)
    modules = config.local.modules
    if world.size != modules:
        raise BadInput(
            f"pipeline mode runs one process per module: WORLD_SIZE is {world.size} but local.modules = "
            f"{modules}; launch torchrun --nproc-per-node {modules} (or set local.modules = {world.size})"
        )
    if world.device.type == "cpu":
        limit_cpu_threads(world, config.pipeline.threads_per_stage)
    # Rank 0 reads the data before joining the group, so a bad data path exits 2 at once.
    loaders = make_loaders(config, world.device) if world.rank == 0 else None
    init_process_group(world, config.pipeline.timeout_s)
    with failures_named(f"stage on rank {world.rank} (module {world.rank})"):
        Stage(config, world, loaders, started).run()
    dist.destroy_process_group()


class Stage:
    def __init__(self, config: Config, world: World, loaders: tuple[BatchLoader, BatchLoader] | None,
                 started: float) -> None:
        self.config, self.world, self.started = config, world, started
        self.rank, self.device = world.rank, world.device
        self.modules = config.local.modules
        self.last = self.rank == self.modules - 1
        self.loaders = loaders
        spec = dataset_spec(config)

        # Facts only rank 0 can know (data size; profiled cuts) are broadcast so all agree.
        facts: list[Any] = [None]
        if self.rank == 0:
            assert loaders is not None
            facts = [(resolve_cuts(config, spec, self.device), len(loaders[0]))]
        dist.broadcast_object_list(facts, src=0)
        self.cuts, self.batches_per_epoch = facts[0]
        self.layout = make_layout(config, spec, self.cuts)
        self.worker = ModuleWorker(config, self.layout, self.rank, self.device)
        self.worker.total_steps = total_steps(Position(), config.train.epochs, self.batches_per_epoch,
                                              config.train.max_steps)
        self.identity = checkpoint.identity_of(config, self.cuts)
        self.position = self._resume()

        pipe = config.pipeline
        links = [dist.new_group([k, k + 1]) for k in range(self.modules - 1)]  # every rank, same order
        wire = torch.bfloat16 if pipe.wire_dtype == "bf16" else None
        settings = (self.device, pipe.queue_depth, pipe.timeout_s, wire)
        self.inbox = Receiver(self.rank, self.rank - 1, links[self.rank - 1], *settings) if self.rank > 0 else None
        self.outbox = Sender(self.rank, self.rank + 1, links[self.rank], *settings) if not self.last else None

        self.stats = StageStats(rank=self.rank, module=self.rank, device=self.device)
        self.meter = LossMeter([self.rank])
        self.log = MetricsLog(config.run.out_dir, self.rank)
        limits = (config.train.epochs, self.batches_per_epoch, config.train.max_steps)
        self.limits = limits
        self.progress = Progress(f"stage {self.rank}", self.position.step, total_steps(self.position, *limits),
                                 config.data.batch_size)
        self.step = self.position.step
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.evaluated = 0
        self.accuracy: float | None = None
        self.epochs_done = 0

    def _resume(self) -> Position:
        position = Position()
        if self.config.run.resume:
            position = checkpoint.load(self.config.run.resume, self.worker, self.identity)
        every = [None] * self.modules
        dist.all_gather_object(every, position)
        if len(set(every)) != 1:
            raise BadInput(
                f"run.resume: the module checkpoints in {self.config.run.resume} were written at different "
                f"steps ({sorted(p.step for p in every)}); resume from a run that finished cleanly"
            )
        return position

    # ---- the two loops ------------------------------------------------------------------------

    def run(self) -> None:
        say(f"[stage {self.rank}] module {self.rank} of {self.modules} (blocks {self.layout.ranges[self.rank]}) "
            f"on {self.device}, {torch.get_num_threads()} thread(s)")
        for link in (self.inbox, self.outbox):
            if link is not None:
                link.start()
        if self.rank == 0:
            self._feed()
        else:
            self._serve()
        if self.outbox is not None:
            self.outbox.close()
        self._write_summary()

    def _feed(self) -> None:
        assert self.loaders is not None
        train, test = self.loaders
        epoch, batches = 0, iter(())
        for event in events(self.position, *self.limits):
            if isinstance(event, TrainStep):
                tick = time.perf_counter()
                if event.epoch != epoch:
                    epoch, batches = event.epoch, train.batches(event.epoch, event.batch)
                images, labels = next(batches)
                self.stats.train_s += time.perf_counter() - tick  # preparing the batch is rank 0's work too
                self._train(Packet.from_batch(images, labels), waited=0.0)
                continue
            paused = time.perf_counter()
            for images, labels in test.batches(epoch=0):
                self._eval(Packet.from_batch(images, labels))
            self._end_epoch(event)
            self.progress.exclude(time.perf_counter() - paused)
        self._forward(Kind.STOP, [])

    def _serve(self) -> None:
        assert self.inbox is not None
        has_image = self.layout.plan.carries_image(self.rank)
        while True:
            message, waited = self.inbox.get()
            if message.kind == Kind.TRAIN:
                self._train(self._packet(message.tensors, has_image), waited)
                continue
            paused = time.perf_counter() - waited
            if message.kind == Kind.EVAL:
                self._eval(self._packet(message.tensors, has_image))
            elif message.kind == Kind.END_EPOCH:
                self._end_epoch(EpochEnd.decode(message.tensors[0].tolist()))
            else:
                self._forward(Kind.STOP, [])
                return
            self.progress.exclude(time.perf_counter() - paused)

    # ---- what each message does --------------------------------------------------------------

    def _train(self, packet: Packet, waited: float) -> None:
        stats = self.stats
        tick = time.perf_counter()
        self.worker.at_step(self._epoch_of(self.step + 1), self.step + 1)
        stats.begin_compute()
        following, loss = self.worker.train_step(packet)
        stats.end_compute()
        sent = self._forward(Kind.TRAIN, following.tensors()) if following is not None else 0.0
        stats.recv_wait_s += waited
        stats.send_wait_s += sent
        stats.train_s += waited + time.perf_counter() - tick
        stats.samples += len(packet.labels)
        self.meter.add(0, loss)
        self.meter.tick()
        self.step += 1
        if self.step % self.config.run.log_every == 0:
            self._log_losses()

    def _eval(self, packet: Packet) -> None:
        result = self.worker.eval_step(packet)
        if isinstance(result, Packet):
            self._forward(Kind.EVAL, result.tensors())
        else:
            self.correct += result
            self.evaluated += len(packet.labels)

    def _end_epoch(self, event: EpochEnd) -> None:
        if self.meter.count:
            self._log_losses()
        self._forward(Kind.END_EPOCH, [torch.tensor(event.encode(), dtype=torch.int64, device=self.device)])
        checkpoint.save(self.config.run.out_dir, self.worker, event.resume_at, self.identity)
        self.epochs_done = event.completed_epochs
        if self.last:
            self.accuracy = float(self.correct) / max(self.evaluated, 1)
            self.log.write(event="eval", module=self.rank, epoch=event.epoch, step=self.step,
                           test_accuracy=self.accuracy)
            say(f"[stage {self.rank}] epoch {event.epoch} step {self.step}: test accuracy {self.accuracy:.4f}")
            self.correct.zero_()
            self.evaluated = 0

    def _forward(self, kind: Kind, tensors: list[torch.Tensor]) -> float:
        return self.outbox.put(kind, tensors) if self.outbox is not None else 0.0

    def _packet(self, tensors: list[torch.Tensor], has_image: bool) -> Packet:
        """Rebuild the packet, checking it is what this module was built for."""
        plan, expected_shape = self.layout.plan, self.layout.input_shape(self.rank)
        expected = 2 + int(has_image) + len(plan.register_sources(self.rank))
        features = tensors[1] if len(tensors) > 1 else None
        wanted = (expected_shape.channels, expected_shape.size, expected_shape.size)
        if len(tensors) != expected or features is None or tuple(features.shape[1:]) != wanted:
            got = "none" if features is None else list(features.shape)
            raise StageFailure(
                f"rank {self.rank} (module {self.rank}) got from rank {self.rank - 1} {len(tensors)} tensors with "
                f"features {got}; it expects {expected} tensors with features [batch, {', '.join(map(str, wanted))}]; "
                f"every rank must run the same config"
            )
        return Packet.from_tensors(tensors, has_image)

    def _log_losses(self) -> None:
        (loss,) = self.meter.means(self.step)
        text, rate = self.progress.line(self._epoch_of(self.step), self.step, [loss])
        say(text)
        self.log.write(event="train", module=self.rank, epoch=self._epoch_of(self.step), step=self.step, loss=loss,
                       lr=self.worker.lr, samples_per_s=round(rate, 2), window_compute_s=self.stats.window_compute_s())

    def _epoch_of(self, step: int) -> int:
        """The epoch a 1-based step belongs to: every epoch has the same number of steps."""
        return (step - 1) // max(self.batches_per_epoch, 1) + 1

    def _write_summary(self) -> None:
        report = {
            "stage": self.stats.report(),
            "samples": self.stats.samples,
            "train_s": self.stats.train_s,
            "accuracy": self.accuracy,
        }
        every: list[Any] = [None] * self.modules
        dist.all_gather_object(every, report)
        if self.rank != 0:
            return
        last = every[-1]
        write_summary(
            self.config.run.out_dir, self.config, world_size=self.world.size, cuts=self.cuts, steps=self.step,
            epochs_done=self.epochs_done, test_accuracy=last["accuracy"], train_samples=last["samples"],
            train_s=last["train_s"], wall_s=time.perf_counter() - self.started,
            stages=[item["stage"] for item in every],
        )
