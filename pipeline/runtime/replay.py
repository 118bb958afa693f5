"""All K modules in one process, on a schedule: sequential mode's handler.

``run.mode = "sequential"`` hosts every module in one process and deals each module its steps
from a schedule (schedules.py): lockstep by default, which is the sequential reference; with
``pipeline.schedule = "buffered"`` the record of a pipeline run (``pipeline.replay = PATH``, its
metrics.jsonl: schedule_trace.py) or, without one, the seeded order.

Batch ``e`` on link k -> k+1 is module k's output at its own step ``e``, so a module's steps fix
every batch it sends: replaying a record ends with the parameters of the run that wrote it (the
buffered schedule's equivalence test). Only the batches still to be used are kept. ``Replay`` is
a ``Handler``: the stage loop (stage_loop.py) carries out the run around it, as in every mode.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque

from pipeline.config.schema import PipelineConfig
from pipeline.errors import BadInput
from pipeline.runtime.messages import EpochEnd, Message, Stop, Train
from pipeline.runtime.run_order import Position, RunLength
from pipeline.runtime.schedule_trace import read_schedule
from pipeline.runtime.schedules import Ended, Schedule, Step, Trained, lockstep_schedule, seeded_schedule
from pipeline.runtime.stage_loop import Handler, through


def one_process_schedule(pipe: PipelineConfig, start: Position, length: RunLength, modules: int,
                         seed: int) -> Schedule:
    """The schedule sequential mode runs: lockstep, or buffered from a record or from ``seed``."""
    if pipe.schedule != "buffered":
        return lockstep_schedule(start, length, modules)
    if pipe.replay:
        return read_schedule(pipe.replay, modules)
    return seeded_schedule(start, length, modules, pipe.slowdown, pipe.buffer_batches, pipe.max_reuse, seed)


class Replay:
    """Runs K module stages on a schedule, fed module 0's batches in the data's order; a ``Handler``."""

    def __init__(self, stages: list[Handler], schedule: Schedule) -> None:
        assert len(stages) == len(schedule), "one list of steps per module"
        self.stages = stages
        self.plans = [deque(plan) for plan in schedule]
        # Batches of link k -> k+1 still to be trained on, and how often: only those are kept.
        self.wanted = [Counter(step.entry for step in plan if isinstance(step, Trained)) for plan in schedule[1:]]
        self.kept: list[dict[int, Train]] = [{} for _ in schedule[1:]]
        self.uses: list[Counter[int]] = [Counter() for _ in schedule[1:]]

    def handle(self, message: Message) -> Message | None:
        """A data batch: module 0 trains on it, then every module takes each step it now can. A control
        (evaluation, epoch end, save point, stop) goes through every module where the schedule has it."""
        if isinstance(message, Train):
            self._expect(0, Trained(message.entry, 1))
            self._train(0, message)
            self._catch_up()
            return None
        if isinstance(message, EpochEnd):
            for module in range(len(self.stages)):
                self._expect(module, Ended(message.epoch))
        elif isinstance(message, Stop) and not message.preempted:  # a stop signal ends a schedule early
            left = [module for module, plan in enumerate(self.plans) if plan]
            if left:
                raise BadInput(self._mismatch(left[0], "steps left after the run's end"))
        return through(self.stages, message)

    def _catch_up(self) -> None:
        """Every module k >= 1 takes every step whose batch module k-1 has produced (in chain order)."""
        for module in range(1, len(self.stages)):
            plan, kept = self.plans[module], self.kept[module - 1]
            wanted, uses = self.wanted[module - 1], self.uses[module - 1]
            while plan and isinstance(plan[0], Trained) and plan[0].entry in kept:
                step = plan.popleft()
                assert isinstance(step, Trained)
                uses[step.entry] += 1
                if uses[step.entry] != step.use:
                    raise BadInput(self._mismatch(module, f"batch {step.entry} used {step.use} times, the replay "
                                                          f"counts {uses[step.entry]}"))
                wanted[step.entry] -= 1
                batch = kept[step.entry]
                if not wanted[step.entry]:  # its last use: nothing about it needs keeping
                    del kept[step.entry], wanted[step.entry], uses[step.entry]
                self._train(module, batch if batch.use == step.use else dataclasses.replace(batch, use=step.use))

    def _train(self, module: int, message: Train) -> None:
        passed = self.stages[module].handle(message)
        if isinstance(passed, Train) and self.wanted[module][passed.entry]:  # (the last module passes nothing)
            self.kept[module][passed.entry] = passed

    def _expect(self, module: int, step: Step) -> None:
        plan = self.plans[module]
        if not plan or plan[0] != step:
            found = plan[0] if plan else "the end of its record"
            raise BadInput(self._mismatch(module, f"expected {step}, the record has {found}"))
        plan.popleft()

    @staticmethod
    def _mismatch(module: int, what: str) -> str:
        return (f"pipeline.replay: module {module}: {what}; the record does not fit this config (replay a "
                f"buffered run from its start with its own config)")
