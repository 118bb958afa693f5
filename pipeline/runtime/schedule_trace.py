"""The buffered schedule's record: per module and step, which buffered batch it trained on.

Each module writes one ``schedule`` line to metrics.jsonl per training step (``module``, its own
``step``, the batch's ``entry`` id on its link and its ``use`` count) and one per epoch end
(``epoch_end``: where in its own steps it took the epoch end). Read back, they are the recorded
schedule (schedules.py), which one process replays (replay.py): this file owns writing and reading them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import BadInput
from pipeline.runtime.messages import Train
from pipeline.runtime.metrics import MetricsLog
from pipeline.runtime.metrics_files import METRICS, metrics_files
from pipeline.runtime.run_order import EpochEnd
from pipeline.runtime.schedules import Ended, Schedule, Step, Trained

EVENT = "schedule"


class StepTrace:
    """One module's own step count in the buffered schedule, and its record (where it speaks)."""

    def __init__(self, module: int, first_step: int, log: MetricsLog | None) -> None:
        self.module, self.steps, self.log = module, first_step, log

    def trained(self, message: Train) -> int:
        """Count and record a step; returns its number, the id of the batch it sends on."""
        self.steps += 1
        if self.log is not None:
            self.log.write(event=EVENT, module=self.module, step=self.steps, entry=message.entry, use=message.use)
        return self.steps

    def ended(self, message: EpochEnd) -> None:
        if self.log is not None:
            self.log.write(event=EVENT, module=self.module, step=self.steps, epoch_end=message.epoch)


def read_schedule(path: str | Path, modules: int) -> Schedule:
    """Each module's steps and epoch ends, in order, from a run's metrics.jsonl."""
    where = f"pipeline.replay: {path}"
    path = Path(path)
    # A job over several hosts logged one file per host; each module's lines are all in one of them.
    paths = metrics_files(path.parent) if path.name == METRICS and path.is_file() else [path]
    try:
        lines = [(f"pipeline.replay: {part}", number, line) for part in paths
                 for number, line in enumerate(part.read_text().splitlines(), 1)]
    except OSError as err:
        raise BadInput(f"{where} cannot be read ({err.strerror or type(err).__name__}); name the metrics.jsonl "
                       f"of a run with pipeline.schedule = 'buffered'") from err
    schedule: Schedule = [[] for _ in range(modules)]
    steps = [-1] * modules
    for where, number, line in lines:
        try:
            event = json.loads(line)
            if event.get("event") != EVENT:
                continue
            module, step = int(event["module"]), int(event["step"])
            recorded: Step = Ended(int(event["epoch_end"])) if "epoch_end" in event else \
                Trained(int(event["entry"]), int(event["use"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise BadInput(f"{where} line {number} is not a schedule record ({type(err).__name__}: {err}); "
                           f"name an unedited metrics.jsonl") from err
        if not 0 <= module < modules:
            raise BadInput(f"{where} line {number} names module {module}, but local.modules = {modules}; replay "
                           f"with the config of the run that wrote it")
        if isinstance(recorded, Trained):
            if steps[module] >= 0 and step != steps[module] + 1:
                raise BadInput(f"{where} line {number}: module {module} step {step} does not follow step "
                               f"{steps[module]}; a resumed or merged run cannot be replayed, only one from its start")
            steps[module] = step
        schedule[module].append(recorded)
    if not any(schedule):
        raise BadInput(f"pipeline.replay: {path} holds no schedule records; name the metrics.jsonl of a run with "
                       f"pipeline.schedule = 'buffered'")
    return schedule
