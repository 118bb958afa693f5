"""The buffered schedule's inbox: a link drained into a ReplayBuffer, read by its rule.

A thread moves every message from the link (the wire's receiving end, or a MemoryLink in the
threaded tests) into the buffer as soon as it arrives, so the sending stage never waits for this
one; ``get`` returns what the buffer's rule picks (replay_buffer.py), each training message
stamped with its use count so the stage can record it.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from pipeline.errors import StageFailure
from pipeline.runtime.links import Inbox
from pipeline.runtime.messages import EpochEnd, Eval, Message, Stop, Train
from pipeline.runtime.replay_buffer import ReplayBuffer, Taken


def pauses_training(message: Message) -> bool:
    """Evaluation sees one set of weights (no training from the first test batch to the epoch end),
    and nothing trains after the final epoch end: the checkpoint it writes is the run's result."""
    return isinstance(message, (Eval, Stop)) or (isinstance(message, EpochEnd) and message.final)


class BufferedInbox:
    def __init__(self, link: Inbox, module: int, capacity: int, max_reuse: int, timeout_s: float,
                 device: torch.device) -> None:
        self.link, self.module, self.timeout_s, self.device = link, module, timeout_s, device
        self.buffer: ReplayBuffer[Train, Message] = ReplayBuffer(capacity, max_reuse)
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fill, daemon=True, name=f"ReplayFill-{module}")
        self.thread.start()

    def _fill(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # a new thread starts on GPU 0
            while True:
                message = self.link.get()
                with self.changed:
                    if isinstance(message, Train):
                        self.buffer.put(message.entry, message)
                    else:
                        self.buffer.put_control(message, pauses_training(message))
                    self.changed.notify_all()
                if isinstance(message, Stop):
                    return
        except BaseException as err:  # noqa: BLE001 -- the stage must raise it, not wait for its deadline
            with self.changed:
                self.error = err
                self.changed.notify_all()

    def get(self) -> Message:
        """The next control, else the batch the rule picks; waits up to the deadline for one."""
        deadline = time.monotonic() + self.timeout_s
        with self.changed:
            while True:
                if self.error is not None:  # an upstream failure ends this stage too, buffered batches or not
                    raise StageFailure(str(self.error)) from self.error
                taken = self.buffer.take()
                if isinstance(taken, Taken):
                    return dataclasses.replace(taken.item, use=taken.use)
                if taken is not None:
                    return taken
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StageFailure(
                        f"module {self.module}: nothing to train on and no message from module {self.module - 1} "
                        f"for {self.timeout_s:g} s (pipeline.timeout_s; every buffered batch used "
                        f"pipeline.max_reuse times); module {self.module - 1} is stuck or dead"
                    )
                self.changed.wait(left)
