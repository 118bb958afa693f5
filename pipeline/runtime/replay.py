"""The buffered schedule in one process: replay which batch each module trained on, step by step.

``run.mode = "sequential"`` with ``pipeline.schedule = "buffered"`` runs all K modules in one
process on a schedule: each module's list of steps (the id and use count of the buffered batch
it trained on) and epoch ends. The schedule is either recorded by a pipeline run
(``pipeline.replay = PATH``, its metrics.jsonl: schedule_trace.py) or drawn from a seeded order
of steps in which module k takes ``pipeline.slowdown[k]`` times as long per step (a jittered
virtual clock, the same ReplayBuffer rule as the pipeline's inbox).

Batch ``e`` on link k -> k+1 is module k's output at its own step ``e``, so a module's history
fixes every batch it sends: replaying the record ends with the parameters of the run that wrote
it (the buffered schedule's equivalence test). Only the batches still to be used are kept.
Evaluation and epoch ends go through every module in turn, at the step each took them at.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter, deque
from collections.abc import Callable

from pipeline.errors import BadInput
from pipeline.runtime.links import Inbox
from pipeline.runtime.messages import Eval, Stop, Train
from pipeline.runtime.replay_buffer import ReplayBuffer, Taken
from pipeline.runtime.report import RunReport
from pipeline.runtime.run_order import EpochEnd, Position, RunLength, SavePoint, TrainStep, events
from pipeline.runtime.schedule_trace import Ended, Item, Trained
from pipeline.runtime.stage_loop import Handler, through

JITTER = 0.2  # each simulated step lasts its module's factor times a uniform draw in [1 - JITTER, 1 + JITTER]


@dataclasses.dataclass(frozen=True)
class _Closed:
    """The seeded order's stop: no more messages on this link."""


def seeded_schedule(start: Position, length: RunLength, modules: int, slowdown: list[float], capacity: int,
                    max_reuse: int, seed: int) -> list[list[Item]]:
    """What each module trains on when module k's steps take slowdown[k] (jittered) on one virtual clock."""
    rng = random.Random(seed)
    factors = slowdown or [1.0] * modules
    buffers: list[ReplayBuffer[None, Ended | _Closed]] = [ReplayBuffer(capacity, max_reuse)
                                                          for _ in range(modules - 1)]
    # Messages in flight on each link: (arrival time, entry id or control); arrival order is time order.
    flight: list[deque[tuple[float, int | Ended | _Closed, bool]]] = [deque() for _ in range(modules - 1)]
    clock = [0.0] * modules
    steps = [start.step] * modules
    done = [False] * modules
    plans: list[list[Item]] = [[] for _ in range(modules)]
    source = events(start, *length)

    def step_time(module: int) -> float:
        return factors[module] * rng.uniform(1 - JITTER, 1 + JITTER)

    def send(module: int, what: int | Ended | _Closed, pauses: bool = False) -> None:
        if module < modules - 1:
            flight[module].append((clock[module], what, pauses))

    while not all(done):
        module = min((k for k in range(modules) if not done[k]), key=lambda k: (clock[k], k))
        if module == 0:
            event = next(source, None)
            if event is None:
                done[0] = True
                send(0, _Closed(), pauses=True)
            elif isinstance(event, TrainStep):
                steps[0] += 1
                plans[0].append(Trained(event.step, 1))
                clock[0] += step_time(0)
                send(0, steps[0])
            elif isinstance(event, EpochEnd):  # (no save points: the schedule is events' without them)
                plans[0].append(Ended(event.epoch))
                send(0, Ended(event.epoch), pauses=event.final)
            continue
        buffer, arriving = buffers[module - 1], flight[module - 1]
        while arriving and arriving[0][0] <= clock[module]:
            _, what, pauses = arriving.popleft()
            if isinstance(what, int):
                buffer.put(what, None)
            else:
                buffer.put_control(what, pauses)
        taken = buffer.take()
        if taken is None:  # wait for the next arrival, or for upstream to move on
            clock[module] = max(clock[module], arriving[0][0] if arriving else clock[module - 1])
        elif isinstance(taken, Taken):
            steps[module] += 1
            plans[module].append(Trained(taken.entry, taken.use))
            clock[module] += step_time(module)
            send(module, steps[module])
        elif isinstance(taken, Ended):
            plans[module].append(taken)
            send(module, taken, pauses=buffer.paused)
        else:
            done[module] = True
            send(module, taken, pauses=True)
    return plans


class ReplayLoop:
    """Runs K module stages in one process on a schedule (recorded or seeded); a ``Loop``."""

    def __init__(self, source: Inbox, stages: list[Handler], plans: list[list[Item]], report: RunReport,
                 commit: Callable[[Position], object] | None = None) -> None:
        self.source, self.stages, self.report, self.commit = source, stages, report, commit
        self.plans = [deque(plan) for plan in plans]
        # Batches of link k -> k+1 still to be trained on, and how often: only those are kept.
        self.wanted = [Counter(item.entry for item in plan if isinstance(item, Trained)) for plan in plans[1:]]
        self.kept: list[dict[int, Train]] = [{} for _ in plans[1:]]
        self.uses: list[Counter[int]] = [Counter() for _ in plans[1:]]

    def run(self) -> None:
        stats = self.report.stats
        while True:
            tick = time.perf_counter()
            message = self.source.get()
            if isinstance(message, Train):
                stats.begin_compute()
                self._expect(0, Trained(message.entry, 1))
                self._train(0, message)
                self._catch_up()
                stats.end_compute()
                self.report.trained(message, time.perf_counter() - tick, 0.0, 0.0)
                continue
            # Evaluation and epoch ends find every module at the step it took them at in the record.
            self._catch_up()
            if isinstance(message, EpochEnd):
                for module in range(len(self.stages)):
                    self._expect(module, Ended(message.epoch))
            elif isinstance(message, Stop) and not message.preempted:  # a stop signal ends a record early
                left = [module for module, plan in enumerate(self.plans) if plan]
                if left:
                    raise BadInput(self._mismatch(left[0], "steps left after the run's end"))
            through(self.stages, message)
            if isinstance(message, EpochEnd):
                self.report.epoch_end(message)
            if isinstance(message, (EpochEnd, SavePoint)) and self.commit is not None:
                self.commit(message.resume_at)
            self.report.paused(time.perf_counter() - tick, evaluating=isinstance(message, Eval))
            if isinstance(message, Stop):
                self.report.preempted = message.preempted
                return

    def _catch_up(self) -> None:
        """Every module k >= 1 takes every step whose batch module k-1 has produced (in chain order)."""
        for module in range(1, len(self.stages)):
            plan, kept = self.plans[module], self.kept[module - 1]
            while plan and isinstance(plan[0], Trained) and plan[0].entry in kept:
                item = plan.popleft()
                assert isinstance(item, Trained)
                self.uses[module - 1][item.entry] += 1
                if self.uses[module - 1][item.entry] != item.use:
                    raise BadInput(self._mismatch(module, f"batch {item.entry} used {item.use} times, the replay "
                                                          f"counts {self.uses[module - 1][item.entry]}"))
                self.wanted[module - 1][item.entry] -= 1
                batch = kept[item.entry] if self.wanted[module - 1][item.entry] else kept.pop(item.entry)
                self._train(module, dataclasses.replace(batch, use=item.use))

    def _train(self, module: int, message: Train) -> None:
        passed = self.stages[module].handle(message)
        if isinstance(passed, Train) and self.wanted[module][passed.entry]:
            self.kept[module][passed.entry] = passed

    def _expect(self, module: int, item: Item) -> None:
        plan = self.plans[module]
        if not plan or plan[0] != item:
            found = plan[0] if plan else "the end of its record"
            raise BadInput(self._mismatch(module, f"expected {item}, the record has {found}"))
        plan.popleft()

    @staticmethod
    def _mismatch(module: int, what: str) -> str:
        return (f"pipeline.replay: module {module}: {what}; the record does not fit this config (replay a "
                f"buffered run from its start with its own config)")
