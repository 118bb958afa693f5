"""When the first stage asks for a checkpoint set of its own: a stop signal, or run.checkpoint_minutes.

Sets every run.checkpoint_every steps are in the run's order itself (run_order.py ``events``), agreed by
construction. A signal or a clock is not: it reaches each process at its own moment. So only the
first stage asks (``SaveRequests.poll``, before each training step) and its save point travels
down the chain like an epoch end; the replicas of the first stage agree first with one small
sum over their group every AGREE_EVERY steps, so all of them save, or stop, before the same step
(each step would cost a device synchronisation on GPUs; a signal waits at most that many steps).

A stop signal (run.stop_signal; SIGTERM is what Slurm, Kubernetes and torchrun send first) lets
every stage finish its step; the first stage then sends a save point and a preempted stop, and
the process exits with EXIT_PREEMPTED. A second signal, sent StopFlag.REPEAT_AFTER_S or more
after the first, ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import torch

from pipeline.cli import EXIT_PREEMPTED

EXIT_SIGNALLED_TWICE = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended
AGREE_EVERY = 8  # steps between the first stage's replicas' agreements (R > 1)


class StopFlag:
    """Set by the first stop signal; a second one, sent at least REPEAT_AFTER_S later, ends the process.

    One stop often arrives twice within milliseconds: Slurm signals every process of the step,
    torchrun's agent among them, and the agent passes the signal on to its workers. Only a repeat
    that comes later is someone insisting.
    """

    REPEAT_AFTER_S = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.raised = threading.Event()
        self.clock = clock
        self.first = 0.0

    def __bool__(self) -> bool:
        return self.raised.is_set()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.raised.is_set():
            if self.clock() - self.first >= self.REPEAT_AFTER_S:
                os._exit(EXIT_SIGNALLED_TWICE)  # the person (or the scheduler) means it: no set, no teardown
            return
        self.first = self.clock()
        self.raised.set()
        print(f"{signal.Signals(signum).name}: finishing this step, then a checkpoint set and exit "
              f"{EXIT_PREEMPTED} (send it again after {self.REPEAT_AFTER_S:g} s to stop at once)",
              file=sys.stderr, flush=True)


@contextmanager
def stop_signal(name: str) -> Iterator[StopFlag]:
    """While the block runs, ``name`` (SIGTERM, SIGUSR1, ...) sets the yielded flag instead of ending the
    process. Only the main thread may install handlers: elsewhere (tests on threads) the flag stays unset."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    number = signal.Signals[name]
    previous = signal.signal(number, flag.handle)
    try:
        yield flag
    finally:
        signal.signal(number, previous)


class SaveRequests:
    """Asked by the first stage before each step: (save a set now, then stop?)."""

    def __init__(self, stop: StopFlag, minutes: float, agree: Callable[[torch.Tensor], torch.Tensor] | None,
                 device: torch.device, clock: Callable[[], float] = time.monotonic) -> None:
        self.stop, self.seconds, self.agree, self.device, self.clock = stop, minutes * 60.0, agree, device, clock
        self.last = clock()

    def saved(self) -> None:
        """A set was just written (an epoch end, a save point): the clock starts again."""
        self.last = self.clock()

    def poll(self, step: int) -> tuple[bool, bool]:
        """Before training ``step`` (1-based)."""
        if self.agree is not None and step % AGREE_EVERY:
            return False, False
        stop = bool(self.stop)
        save = stop or bool(self.seconds and self.clock() - self.last >= self.seconds)
        if self.agree is not None:  # replicas of the first stage: any one's request is every one's
            votes = self.agree(torch.tensor([int(save), int(stop)], device=self.device))
            save, stop = bool(votes[0]), bool(votes[1])
        return save, stop
