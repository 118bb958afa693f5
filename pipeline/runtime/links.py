"""What a stage loop reads from and writes to, and an in-memory link to test loops without processes.

A stage loop sees an ``Inbox`` and an ``Outbox`` only. Under torchrun they are the two ends of
the wire (pipeline/runtime/transport.py); in one process they are ``MemoryLink``s, so a test can run K
stage loops on threads and check the schedule, the control messages, deadlines and failures
the way the wire would show them.
"""

from __future__ import annotations

import contextlib
import queue
import time
from typing import Protocol

from pipeline.errors import StageFailure
from pipeline.runtime.messages import Message


class Inbox(Protocol):
    def get(self) -> Message:
        """The next message; raises StageFailure when none comes before the deadline."""
        ...


class Outbox(Protocol):
    def put(self, message: Message) -> None:
        """Hand a message on; blocks while the consumer is behind, up to the deadline."""
        ...

    def close(self) -> None:
        """Everything put has been delivered (or raise)."""
        ...


class _Broken:
    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


class MemoryLink:
    """A bounded queue between two stage loops of one process: both an Outbox and an Inbox."""

    def __init__(self, producer: int, consumer: int, depth: int, timeout_s: float) -> None:
        self.producer, self.consumer = producer, consumer
        self.timeout_s = timeout_s
        self.queue: queue.Queue[Message | _Broken] = queue.Queue(maxsize=depth)
        self.broken: BaseException | None = None

    def put(self, message: Message) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            # A consumer that failed while this end waits for room must end the wait, not the deadline.
            if self.broken is not None:
                raise StageFailure(f"stage {self.producer}: stage {self.consumer} failed") from self.broken
            try:
                self.queue.put(message, timeout=min(0.05, max(deadline - time.monotonic(), 0.001)))
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    raise StageFailure(
                        f"stage {self.producer}: stage {self.consumer} took no message for {self.timeout_s:g} s "
                        f"(pipeline.timeout_s); it is stuck or dead"
                    ) from None

    def get(self) -> Message:
        try:
            item = self.queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise StageFailure(
                f"stage {self.consumer}: no message from stage {self.producer} for {self.timeout_s:g} s "
                f"(pipeline.timeout_s); it is stuck or dead"
            ) from None
        if isinstance(item, _Broken):
            raise StageFailure(f"stage {self.consumer}: stage {self.producer} failed") from item.cause
        return item

    def close(self) -> None:
        pass  # a message put is already in the consumer's queue

    def break_with(self, cause: BaseException) -> None:
        """One end failed: the other end raises instead of waiting out the deadline.

        The wire shows a dead peer the same way (a failed send or receive), only slower.
        """
        self.broken = cause
        while True:
            try:
                self.queue.put_nowait(_Broken(cause))
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):  # what is queued will never be needed: make room
                    self.queue.get_nowait()
