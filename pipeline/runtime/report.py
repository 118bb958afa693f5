"""What a process reports while it runs, once for every mode: losses, progress, accuracy, summary.

Each process has one ``RunReport`` for the modules it hosts: all K in sequential mode, one in
a pipeline stage or a DDP rank. Losses stay on the device until a log step; a diverged loss
stops the run there. Replica 0 of each stage writes its metrics lines; rank 0 the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.config.schema import Config, RunConfig
from pipeline.runtime.messages import Train
from pipeline.runtime.metrics import LossMeter, MetricsLog, Progress, StageStats, say, write_summary
from pipeline.runtime.run_order import EpochEnd, Position, RunLength, total_steps
from pipeline.runtime.scoring import Scoring, score_line
from pipeline.runtime.topology import Topology
from pipeline.runtime.worker import ModuleWorker


class RunReport:
    FIRST_LINE_S = 10.0  # a person should see the run move within this many seconds
    LINE_EVERY_S = 30.0  # and a line at least this often after it, however slow the steps (log_every counts steps)

    def __init__(self, label: str, run: RunConfig, topology: Topology, workers: list[ModuleWorker],
                 start: Position, length: RunLength, total: Callable[[torch.Tensor], torch.Tensor],
                 started: float) -> None:
        self.label, self.topology, self.workers = label, topology, workers
        self.total = total  # sums a count over the replicas of the last stage
        self.started = started  # the process's start: wall_s counts set-up too
        self.log_every = run.log_every
        self.speaks = topology.writer
        self.meter = LossMeter([worker.index for worker in workers])
        sink = None
        if run.tensorboard:
            from pipeline.runtime.tensorboard import TensorBoardSink

            sink = TensorBoardSink(run.out_dir, topology.rank, start_step=start.step)
        self.log = MetricsLog(run.out_dir, topology.rank, sink, node=topology.node)
        whole = len(topology.hosted) == topology.stages
        self.stats = StageStats(rank=topology.rank, module="all" if whole else topology.stage, device=topology.device)
        self.progress = Progress(label, start.step, total_steps(start, *length))
        self.steps, self.epochs_done = start.step, 0
        self.scores: dict[str, Any] = {}  # the last evaluation's (pipeline/runtime/scoring.py)
        self.eval_s = 0.0  # evaluation seconds this epoch, as this process saw them
        self.lines = 0
        self.preempted = False  # the run ended at a stop signal's save point, before its end

    # ---- training ---------------------------------------------------------------------------

    def loss(self, slot: int, loss: torch.Tensor) -> None:
        self.meter.add(slot, loss)

    def trained(self, message: Train, seconds: float, waited: float, sent: float) -> None:
        """One training message went through this process's modules."""
        stats = self.stats
        stats.recv_wait_s += waited
        stats.send_wait_s += sent
        stats.train_s += seconds
        stats.samples += message.samples
        self.progress.advance(message.samples)
        # This process's own steps: the data's steps in lockstep, fewer or more for a buffered module.
        self.steps += 1
        # A first line within seconds of the start, then every log_every steps or LINE_EVERY_S, whichever comes first.
        since = self.progress.seconds_since_line()
        due = since >= (self.LINE_EVERY_S if self.lines else self.FIRST_LINE_S)
        if self.steps % self.log_every == 0 or due:
            self._log_losses(message.epoch, self.steps)

    def paused(self, seconds: float, evaluating: bool) -> None:
        """Time outside training (evaluation, epoch ends) leaves the next rate alone."""
        self.progress.exclude(seconds)
        if evaluating:
            self.eval_s += seconds

    def epoch_end(self, event: EpochEnd) -> None:
        if self.meter.count:
            self._log_losses(event.epoch, event.resume_at.step)
        self.epochs_done = event.completed_epochs

    def evaluated(self, event: EpochEnd, scoring: Scoring, counts: torch.Tensor, images: int) -> None:
        """The last module's test counts for this epoch, summed over its replicas."""
        total = self.total(counts)
        images = int(self.total(torch.tensor(images, device=counts.device)))
        self.scores = scoring.scores(total, images)
        if self.speaks:
            self.log.write(event="eval", module=self.topology.stages - 1, epoch=event.epoch,
                           step=event.resume_at.step, **self.scores, eval_s=round(self.eval_s, 3))
            say(f"[{self.label}] epoch {event.epoch} step {event.resume_at.step}: {score_line(self.scores)} "
                f"({images} images, {self.eval_s:.1f} s)")
        self.eval_s = 0.0

    def _log_losses(self, epoch: int, step: int) -> None:
        losses = self.meter.means(step)  # every process checks its losses, whether or not it speaks
        text, rate = self.progress.line(epoch, step, losses)
        self.lines += 1
        compute = self.stats.window_compute_s()
        if not self.speaks:
            return
        say(text)
        for worker, loss in zip(self.workers, losses):
            self.log.write(event="train", module=worker.index, epoch=epoch, step=step, loss=loss, lr=worker.lr,
                           samples_per_s=round(rate, 2), window_compute_s=compute)

    # ---- the end ----------------------------------------------------------------------------

    def summary(self, config: Config, cuts: list[int]) -> dict[str, Any] | None:
        """Gather every process's figures; rank 0 writes summary.json and returns it."""
        topology = self.topology
        stage = {**self.stats.report(), "stage": topology.stage, "replica": topology.replica}
        if self.speaks:
            for worker in self.workers:
                self.log.write(event="stage", module=worker.index, step=self.steps,
                               busy_fraction=stage["busy_fraction"], samples_per_s=stage["samples_per_s"])
        self.log.close()
        mine = {"stage": stage, "samples": self.stats.samples, "train_s": self.stats.train_s,
                "scores": self.scores, "steps": self.steps, "epochs": self.epochs_done}
        every = topology.comm.gather(mine)
        if topology.rank != 0:
            return None
        last = every[topology.last_rank]
        return write_summary(
            config.run.out_dir, config, world_size=topology.size, cuts=cuts, steps=last["steps"],
            epochs_done=last["epochs"], scores=last["scores"], train_samples=last["samples"],
            train_s=last["train_s"], wall_s=time.perf_counter() - self.started,
            stages=[item["stage"] for item in every],
        )
