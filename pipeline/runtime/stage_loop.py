"""The stage loop: take a message from the inbox, run it through this process's modules, pass it on.

The loop knows no communication: its inbox and outbox are whatever the bootstrap gives it
(the wire under torchrun, the data for the first stage, in-memory links in a test). The same
loop is the sequential reference (one process, every module, no outbox: its one handler deals
each module its steps from a schedule, replay.py), a pipeline stage (one module) and a DDP rank
(one module with replicas): that sharing is what makes them equal. It alone books what a run
reports (at each epoch end, save point and stop) and commits each epoch end and save point, whatever the
schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from torch import nn

from pipeline.runtime.links import Inbox, Outbox
from pipeline.runtime.messages import EpochEnd, Eval, Message, SavePoint, Stop, Train
from pipeline.runtime.packet import Packet
from pipeline.runtime.report import RunReport
from pipeline.runtime.run_order import Position
from pipeline.runtime.schedule_trace import StepTrace
from pipeline.runtime.worker import ModuleWorker


class Handler(Protocol):
    def handle(self, message: Message) -> Message | None:
        """Do this module's part for ``message``; what goes on to the next module (None: nothing)."""
        ...


class ModuleStage:
    """What one module does with each message; returns what goes on to the next module."""

    def __init__(self, worker: ModuleWorker, slot: int, report: RunReport,
                 save: Callable[[ModuleWorker, Position], object] | None,
                 before_evaluation: Callable[[nn.Module], None] | None = None,
                 trace: StepTrace | None = None) -> None:
        self.worker, self.slot, self.report, self.save = worker, slot, report, save
        self.before_evaluation = before_evaluation  # replicas agree on batch-norm statistics first
        self.trace = trace  # buffered schedule: this module's own steps, recorded
        self.counts = worker.scoring.zeros(worker.device)  # the test set's, summed batch by batch
        self.evaluated = 0

    def handle(self, message: Message) -> Message | None:
        worker = self.worker
        if isinstance(message, Train):
            worker.at_step(message.epoch, message.step)
            following, loss = worker.train_step(message.packet)
            self.report.loss(self.slot, loss)
            # Buffered: the batch sent on is known downstream by this module's own step (lockstep: the data's).
            entry = message.entry if self.trace is None else self.trace.trained(message)
            return None if following is None else Train(message.epoch, message.step, message.samples, following, entry)
        if isinstance(message, Eval):
            if worker.module.training and self.before_evaluation is not None:  # the first test batch
                self.before_evaluation(worker.module)
            result = worker.eval_step(message.packet)
            if isinstance(result, Packet):
                return Eval(message.epoch, result)
            self.counts += result
            self.evaluated += len(message.packet.labels)
            return None
        if isinstance(message, SavePoint):
            if self.save is not None:
                self.save(worker, message.resume_at)
            return message
        if isinstance(message, EpochEnd):
            if self.trace is not None:
                self.trace.ended(message)
            if self.save is not None:
                self.save(worker, message.resume_at)
            if worker.last:
                self.report.evaluated(message, worker.scoring, self.counts, self.evaluated)
                self.counts.zero_()
                self.evaluated = 0
        return message


def through(stages: Sequence[Handler], message: Message) -> Message | None:
    """``message`` through this process's modules in order; None once one keeps it (the last
    module keeps train batches; every module keeps its test batches)."""
    passed: Message | None = message
    for stage in stages:
        assert passed is not None
        passed = stage.handle(passed)
        if passed is None:
            break
    return passed


class StageLoop:
    def __init__(self, inbox: Inbox, stages: Sequence[Handler], outbox: Outbox | None, report: RunReport,
                 commit: Callable[[Position], object] | None = None) -> None:
        self.inbox, self.stages, self.outbox, self.report = inbox, stages, outbox, report
        # The last stage of replica 0, at each epoch end and save point: mark the checkpoint set complete.
        self.commit = commit

    def run(self) -> None:
        """Until STOP has gone through; every wait is bounded by the links' deadlines."""
        report, stats = self.report, self.report.stats
        while True:
            tick = time.perf_counter()
            message = self.inbox.get()
            arrived = time.perf_counter()
            training = isinstance(message, Train)
            if training:
                stats.begin_compute()
            passed = through(self.stages, message)
            if training:
                stats.end_compute()
            computed = time.perf_counter()
            if passed is not None and self.outbox is not None:
                self.outbox.put(passed)
            done = time.perf_counter()
            if isinstance(message, Train):
                report.trained(message, done - tick, arrived - tick, done - computed)
                continue
            if isinstance(message, EpochEnd):
                report.epoch_end(message)
            if isinstance(message, (EpochEnd, SavePoint)) and self.commit is not None:
                self.commit(message.resume_at)  # every module upstream saved before passing it on
            report.paused(time.perf_counter() - tick, evaluating=isinstance(message, Eval))
            if isinstance(message, Stop):
                report.preempted = message.preempted
                break
        if self.outbox is not None:
            self.outbox.close()
