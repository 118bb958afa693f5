"""Schedules as data: what each module trains on, step by step, and where it takes each epoch end.

A schedule is one list of steps per module. ``Trained(entry, use)``: the module trains on batch
``entry`` of the link before it for the ``use``-th time, where batch e on link k-1 -> k is module
k-1's output at its own step e (on the data's link, the data's step e). ``Ended(epoch)``: the
module takes that epoch end (evaluation, checkpoint) after the steps listed before it.

- lockstep: every module trains on every batch once, in order (the default schedule);
- buffered: DGL's priority-LIFO rule (replay_buffer.py) on one virtual clock, given how long each
  module's next step lasts;
- seeded: buffered, with module k's steps lasting ``pipeline.slowdown[k]`` times a jittered unit
  drawn from ``run.seed``;
- recorded: read back from a buffered pipeline run's metrics.jsonl (schedule_trace.py).

In a pipeline each stage's inbox delivers its module's steps (a lockstep link in order, a buffered
one by the rule as batches arrive); in one process ``Replay`` (replay.py) deals them out from these
lists. Plain data, no torch: the tests check a schedule in milliseconds.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Callable

from pipeline.runtime.replay_buffer import ReplayBuffer, Taken
from pipeline.runtime.run_order import EpochEnd, Position, RunLength, TrainStep, events

JITTER = 0.2  # a seeded step lasts its module's factor times a uniform draw in [1 - JITTER, 1 + JITTER]


@dataclasses.dataclass(frozen=True, slots=True)
class Trained:
    """One step: the module trained on batch ``entry`` of its link for the ``use``-th time."""

    entry: int
    use: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ended:
    """The module took the end of ``epoch`` here (after its steps before it, before those after)."""

    epoch: int


Step = Trained | Ended
Schedule = list[list[Step]]  # one list per module, in chain order


def lockstep_schedule(start: Position, length: RunLength, modules: int) -> Schedule:
    """Every module trains on every batch once, in the data's order."""
    steps: list[Step] = [Trained(event.step, 1) if isinstance(event, TrainStep) else Ended(event.epoch)
                         for event in events(start, *length) if isinstance(event, (TrainStep, EpochEnd))]
    return [list(steps) for _ in range(modules)]


@dataclasses.dataclass(frozen=True)
class _Closed:
    """The end of a link: no more messages on it."""


def buffered_schedule(start: Position, length: RunLength, modules: int, capacity: int, max_reuse: int,
                      step_time: Callable[[int], float]) -> Schedule:
    """What each module trains on when module k's next step lasts ``step_time(k)`` on one virtual clock,
    each link read by the replay buffer's rule (``capacity`` batches, each used at most ``max_reuse``
    times, 0: no limit). A module that finds nothing to take waits for the next arrival."""
    buffers: list[ReplayBuffer[None, Ended | _Closed]] = [ReplayBuffer(capacity, max_reuse)
                                                          for _ in range(modules - 1)]
    # Messages in flight on each link: (arrival time, entry id or control, pauses); arrival order is time order.
    flight: list[deque[tuple[float, int | Ended | _Closed, bool]]] = [deque() for _ in range(modules - 1)]
    clock = [0.0] * modules
    steps = [start.step] * modules
    done = [False] * modules
    schedule: Schedule = [[] for _ in range(modules)]
    source = events(start, *length)  # no save points: they change nothing a module trains on

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
                schedule[0].append(Trained(event.step, 1))
                clock[0] += step_time(0)
                send(0, steps[0])
            elif isinstance(event, EpochEnd):
                schedule[0].append(Ended(event.epoch))
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
            schedule[module].append(Trained(taken.entry, taken.use))
            clock[module] += step_time(module)
            send(module, steps[module])
        elif isinstance(taken, Ended):
            schedule[module].append(taken)
            send(module, taken, pauses=buffer.paused)
        else:
            done[module] = True
            send(module, taken, pauses=True)
    return schedule


def seeded_schedule(start: Position, length: RunLength, modules: int, slowdown: list[float], capacity: int,
                    max_reuse: int, seed: int) -> Schedule:
    """The buffered schedule when module k's steps take ``slowdown[k]`` (none: 1), jittered from ``seed``."""
    rng = random.Random(seed)
    factors = slowdown or [1.0] * modules
    return buffered_schedule(start, length, modules, capacity, max_reuse,
                             lambda module: factors[module] * rng.uniform(1 - JITTER, 1 + JITTER))
