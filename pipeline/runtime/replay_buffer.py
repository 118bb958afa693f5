"""The buffered schedule's rule: which batch a module trains on next (DGL's asynchronous setting).

The receiving end of each link keeps the last ``capacity`` batches (M); a new batch overwrites
the oldest, so the sender never waits. The consumer takes the least-used batch, the freshest
among equals (DGL's priority-LIFO: eugenium/DGL, buffer_experiments), and never one used
``max_reuse`` times (0: no limit): when none is left it waits for new data.

Control messages (evaluation, epoch ends, the stop) keep their order relative to the data: a
control is taken as soon as it is the oldest thing not yet taken, and data that arrived after it
enter the buffer only once it has been taken, so what a module trains on before an epoch end is
exactly what its upstream trained before it. A control may pause training (an evaluation until
its epoch end, the final epoch end, the stop): then only controls are taken until one that does
not pause.

Pure data structure: no threads, no tensors, no torch.distributed. The pipeline's inbox
(buffered_inbox.py) and the buffered schedule on a virtual clock (schedules.py) share it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
C = TypeVar("C")


@dataclass(frozen=True)
class Taken(Generic[T]):
    entry: int  # the batch's id on its link
    use: int  # how many times it has now been trained on, this one included
    item: T


@dataclass
class _Entry(Generic[T]):
    item: T
    uses: int = 0


@dataclass(frozen=True)
class _Control(Generic[C]):
    item: C
    pauses: bool


class ReplayBuffer(Generic[T, C]):
    def __init__(self, capacity: int, max_reuse: int = 0) -> None:
        if capacity < 1 or max_reuse < 0:
            raise ValueError(f"a replay buffer needs capacity >= 1 and max_reuse >= 0 (got {capacity}, {max_reuse})")
        self.capacity, self.max_reuse = capacity, max_reuse
        self.entries: dict[int, _Entry[T]] = {}  # insertion order: the first is the oldest
        self.waiting: deque[_Control[C] | tuple[int, T]] = deque()  # from the first control not yet taken on
        self.paused = False

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, entry: int, item: T) -> None:
        """A batch arrived; it may overwrite the oldest one."""
        if self.waiting:
            self.waiting.append((entry, item))
        else:
            self._admit(entry, item)

    def put_control(self, control: C, pauses: bool) -> None:
        """A control arrived; ``pauses``: no training from when it is taken until a control that does not pause."""
        self.waiting.append(_Control(control, pauses))

    def take(self) -> Taken[T] | C | None:
        """The next control, else the batch to train on; None: nothing may be taken now (wait for more)."""
        if self.waiting:
            head = self.waiting.popleft()
            assert isinstance(head, _Control), "data wait only behind a control"
            while self.waiting and not isinstance(self.waiting[0], _Control):
                arrived = self.waiting.popleft()
                assert not isinstance(arrived, _Control)
                self._admit(*arrived)
            self.paused = head.pauses
            return head.item
        if self.paused:
            return None
        usable = [(entry, slot) for entry, slot in self.entries.items()
                  if not self.max_reuse or slot.uses < self.max_reuse]
        if not usable:
            return None
        # Least used first; among equals the freshest (entries are in arrival order: the last wins).
        fewest = min(slot.uses for _, slot in usable)
        entry, slot = [(entry, slot) for entry, slot in usable if slot.uses == fewest][-1]
        slot.uses += 1
        if self.max_reuse and slot.uses >= self.max_reuse:
            del self.entries[entry]  # spent: its place goes to the next arrival
        return Taken(entry, slot.uses, slot.item)

    def _admit(self, entry: int, item: T) -> None:
        if entry in self.entries:
            raise ValueError(f"batch {entry} arrived twice; ids on a link are unique")
        self.entries[entry] = _Entry(item)
        while len(self.entries) > self.capacity:
            del self.entries[next(iter(self.entries))]
