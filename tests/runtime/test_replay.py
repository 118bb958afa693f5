"""One process carries out a schedule: mock modules on the lists, through the stage loop, in milliseconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.runtime.buffered_inbox import BufferedInbox
from pipeline.runtime.links import Inbox, MemoryLink
from pipeline.runtime.messages import EpochEnd, Eval, Message, Stop, Train
from pipeline.runtime.metrics import MetricsLog, StageStats
from pipeline.runtime.packet import Packet
from pipeline.runtime.replay import Replay
from pipeline.runtime.run_order import Position, RunLength, TrainStep, events
from pipeline.runtime.schedule_trace import StepTrace, read_schedule
from pipeline.runtime.schedules import (
    Ended,
    Schedule,
    Trained,
    buffered_schedule,
    lockstep_schedule,
    seeded_schedule,
)
from pipeline.runtime.stage_loop import StageLoop

LENGTH = RunLength(epochs=2, batches=5, max_steps=0)


def packet(value: float) -> Packet:
    return Packet(torch.zeros(1, dtype=torch.int64), torch.full((1, 1), value))


class Source:
    """The first stage's inbox for ``length``: data batches, one test batch and the end of each epoch; save
    points ``every`` so many steps."""

    def __init__(self, length: RunLength, every: int = 0) -> None:
        self.messages = self._generate(length, every)

    @staticmethod
    def _generate(length: RunLength, every: int) -> Iterator[Message]:
        for event in events(Position(), *length, every=every):
            if isinstance(event, TrainStep):
                yield Train(event.epoch, event.step, 1, packet(event.step), entry=event.step)
            elif isinstance(event, EpochEnd):
                yield Eval(event.epoch, packet(0.0))
                yield event
            else:
                yield event
        yield Stop()

    def get(self) -> Message:
        return next(self.messages)


class Module:
    """A mock module: records what it trains on (the batch id, its use, the batch's content) and sends
    its own step count on, as a module of the buffered schedule does (recorded where it has a trace)."""

    def __init__(self, index: int, last: bool, order: list[tuple[int, int]], trace: StepTrace | None = None,
                 step_s: float = 0.0) -> None:
        self.index, self.last, self.order, self.trace, self.step_s = index, last, order, trace, step_s
        self.steps = 0
        self.seen: list[tuple[Any, ...] | str] = []

    def handle(self, message: Message) -> Message | None:
        if isinstance(message, Train):
            self.steps += 1
            if self.trace is not None:
                self.trace.trained(message)
            self.order.append((self.index, message.entry))
            self.seen.append((message.entry, message.use, int(message.packet.features[0, 0])))
            time.sleep(self.step_s)
            following = Train(message.epoch, message.step, message.samples, packet(self.steps), self.steps)
            return None if self.last else following
        if isinstance(message, Eval):
            self.seen.append(("eval", message.epoch))
            return None if self.last else message
        if isinstance(message, EpochEnd) and self.trace is not None:
            self.trace.ended(message)
        self.seen.append(type(message).__name__)
        return message


def modules_for(count: int, order: list[tuple[int, int]]) -> list[Module]:
    return [Module(index, index == count - 1, order) for index in range(count)]


class Report:
    """The loop's report, counting: what the one loop books for the schedule it carries out."""

    def __init__(self) -> None:
        self.stats = StageStats(rank=0, module="all")
        self.trained_steps: list[int] = []
        self.ends: list[int] = []
        self.preempted = False

    def trained(self, message: Train, seconds: float, waited: float, sent: float) -> None:
        self.trained_steps.append(message.step)

    def paused(self, seconds: float, evaluating: bool) -> None:
        pass

    def epoch_end(self, event: EpochEnd) -> None:
        self.ends.append(event.epoch)


def run(schedule: Schedule, length: RunLength = LENGTH, every: int = 0,
        order: list[tuple[int, int]] | None = None) -> tuple[list[Module], Report, list[int]]:
    """``schedule`` on mock modules in one process, through the stage loop of every mode."""
    modules = modules_for(len(schedule), [] if order is None else order)
    report, commits = Report(), []
    replay = Replay(modules, schedule)  # type: ignore[arg-type]
    StageLoop(Source(length, every=every), [replay], None, report,  # type: ignore[arg-type]
              lambda position: commits.append(position.step)).run()
    # Nothing left over: a batch and its counts go after its last use.
    assert replay.kept == [{}] * (len(schedule) - 1) and not any(replay.wanted) and not any(replay.uses)
    return modules, report, commits


def trains(module: Module) -> list[tuple[Any, ...]]:
    return [seen for seen in module.seen if isinstance(seen, tuple) and isinstance(seen[0], int)]


def controls(module: Module) -> list[tuple[Any, ...] | str]:
    return [seen for seen in module.seen if not (isinstance(seen, tuple) and isinstance(seen[0], int))]


SCHEDULES = {
    "lockstep": lockstep_schedule(Position(), LENGTH, 3),
    "fast-downstream": buffered_schedule(Position(), LENGTH, 3, 3, 0, lambda module: [1.0, 0.4, 0.3][module]),
    "slow-middle": buffered_schedule(Position(), LENGTH, 3, 2, 2, lambda module: [1.0, 2.5, 1.0][module]),
    "seeded": seeded_schedule(Position(), LENGTH, 4, [1.0, 1.5, 0.7, 2.0], 3, 0, seed=11),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_module_trains_on_what_its_list_names_made_by_the_step_it_names(name: str) -> None:
    schedule = SCHEDULES[name]
    modules, report, commits = run(schedule)
    for module, plan in zip(modules, schedule):
        # The batch's content is the upstream module's step that made it: the id is that step.
        assert trains(module) == [(step.entry, step.use, step.entry) for step in plan if isinstance(step, Trained)]
        assert controls(module) == [("eval", 1), "EpochEnd", ("eval", 2), "EpochEnd", "Stop"]
    assert report.trained_steps == list(range(1, 11)) and report.ends == [1, 2] and commits == [5, 10]


def test_lockstep_takes_each_batch_through_every_module_before_the_next() -> None:
    order: list[tuple[int, int]] = []
    run(lockstep_schedule(Position(), LENGTH, 3), order=order)
    assert order == [(module, step) for step in range(1, 11) for module in range(3)]


def test_an_epoch_end_finds_every_module_at_its_place_in_the_list() -> None:
    """Module 1 takes its epoch end before the last batch of the epoch: it must not train on it first."""
    schedule: Schedule = [
        [Trained(1, 1), Trained(2, 1), Ended(1), Trained(3, 1), Ended(2)],
        [Trained(1, 1), Ended(1), Trained(2, 1), Trained(3, 1), Trained(3, 2), Ended(2)],
    ]
    modules, _, _ = run(schedule, RunLength(2, 2, 3))
    assert modules[1].seen == [(1, 1, 1), ("eval", 1), "EpochEnd", (2, 1, 2), (3, 1, 3), (3, 2, 3), ("eval", 2),
                               "EpochEnd", "Stop"]


def test_save_points_go_through_every_module_and_are_committed() -> None:
    _, _, commits = run(lockstep_schedule(Position(), LENGTH, 2), every=2)
    assert commits == [2, 4, 5, 6, 8, 10]


@pytest.mark.parametrize("schedule, message", [
    ([[Trained(1, 1), Ended(1)], [Trained(2, 1), Ended(1)]], r"module 1: expected Ended\(epoch=1\), the record has "
                                                             r"Trained\(entry=2, use=1\)"),
    ([[Trained(1, 1), Ended(1)], [Trained(1, 2), Ended(1)]], "module 1: batch 1 used 2 times, the replay counts 1"),
    ([[Trained(2, 1), Ended(1)], [Ended(1)]], r"module 0: expected Trained\(entry=1, use=1\)"),
    ([[Trained(1, 1), Ended(1), Trained(2, 1)], [Trained(1, 1), Ended(1)]], "module 0: steps left after the run's end"),
    ([[Trained(1, 1), Ended(1)], [Ended(1), Ended(2)]], "module 1: steps left after the run's end"),
])
def test_a_schedule_that_does_not_fit_the_run_is_refused(schedule: Schedule, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        run(schedule, RunLength(1, 1, 0))


def test_a_buffered_chain_on_threads_replays_from_its_record(tmp_path: Path) -> None:
    """The live rule (buffered inboxes on threads, a slow middle module) writes a record; one process
    carrying the record out gives every module the same batches, uses and controls in the same order:
    the buffered schedule's equivalence, on mock modules."""
    count, log = 3, MetricsLog(tmp_path, 0)
    links = [MemoryLink(k, k + 1, 4, 5.0) for k in range(count - 1)]
    live = [Module(k, k == count - 1, [], StepTrace(k, 0, log), step_s=[0.002, 0.006, 0.0][k]) for k in range(count)]
    errors: list[BaseException] = []

    def stage(k: int) -> None:
        inbox: Inbox = Source(LENGTH) if k == 0 else BufferedInbox(links[k - 1], k, 2, 3, 5.0, torch.device("cpu"))
        try:
            StageLoop(inbox, [live[k]], links[k] if k < count - 1 else None, Report()).run()  # type: ignore[arg-type]
        except BaseException as err:  # noqa: BLE001 -- the test reports it, and the neighbours end with it
            errors.append(err)
            for link in links[max(k - 1, 0):k + 1]:
                link.break_with(err)

    threads = [threading.Thread(target=stage, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a stage loop hangs"
    assert errors == []
    schedule = read_schedule(tmp_path / "metrics.jsonl", count)
    replayed, _, _ = run(schedule)
    assert [module.seen for module in replayed] == [module.seen for module in live]
    assert max(use for _, use, _ in trains(live[2])) > 1  # not lockstep: the fast last module reuses batches
