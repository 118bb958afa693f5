"""The order of a run: train steps, epoch ends (evaluate + checkpoint), mid-epoch save points, where to stop.

Every mode walks the same ``events`` so they agree on when the learning rate changes, when
the test set is evaluated and where a resumed run picks up.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Position:
    """Where a run stands: the next batch to train, and the steps taken so far."""

    epoch: int = 1
    batch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class RunLength(NamedTuple):
    """How long a run is: whole epochs of ``batches`` steps, cut at ``max_steps`` (0: no cut)."""

    epochs: int
    batches: int
    max_steps: int


@dataclass(frozen=True)
class TrainStep:
    epoch: int
    batch: int
    step: int  # 1-based count of steps once this one is done


@dataclass(frozen=True)
class EpochEnd:
    epoch: int
    resume_at: Position  # what a checkpoint written now must record
    final: bool

    @property
    def completed_epochs(self) -> int:
        """Whole epochs trained once this point is reached (a run cut by max_steps ends mid-epoch)."""
        return self.epoch if self.resume_at.batch == 0 else self.epoch - 1


@dataclass(frozen=True)
class SavePoint:
    """A complete checkpoint set within an epoch, at a step every stage agrees on: it travels down the
    chain like an epoch end, but nothing is evaluated."""

    resume_at: Position


def events(start: Position, epochs: int, batches: int, max_steps: int,
           every: int = 0) -> Iterator[TrainStep | EpochEnd | SavePoint]:
    """The run from ``start``; ``every`` > 0 adds a save point after each step that is a multiple of it,
    unless an epoch end or the run's end saves there anyway."""
    step = start.step
    for epoch in range(start.epoch, epochs + 1):
        first = start.batch if epoch == start.epoch else 0
        for batch in range(first, batches):
            if max_steps and step >= max_steps:
                yield EpochEnd(epoch, Position(epoch, batch, step), final=True)
                return
            step += 1
            yield TrainStep(epoch, batch, step)
            if every and step % every == 0 and batch + 1 < batches and not (max_steps and step >= max_steps):
                yield SavePoint(Position(epoch, batch + 1, step))
        final = epoch == epochs or bool(max_steps and step >= max_steps)
        yield EpochEnd(epoch, Position(epoch + 1, 0, step), final)
        if final:
            return


def total_steps(start: Position, epochs: int, batches: int, max_steps: int) -> int:
    remaining = (epochs - start.epoch + 1) * batches - start.batch
    full = start.step + max(0, remaining)
    return min(full, max_steps) if max_steps else full
