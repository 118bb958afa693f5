"""A stage made artificially slower (``pipeline.slowdown``), as DGL's asynchronous experiments do.

After each training step the stage sleeps (factor - 1) times the step's measured time, so it
runs ``factor`` times slower on whatever hardware it has; evaluation and epoch ends are not
slowed. For experiments and tests of the buffered schedule only.
"""

from __future__ import annotations

import time

import torch

from pipeline.runtime.messages import Message, Train
from pipeline.runtime.stage_loop import Handler


class Straggler:
    def __init__(self, inner: Handler, factor: float, device: torch.device) -> None:
        self.inner, self.factor, self.device = inner, factor, device

    def handle(self, message: Message) -> Message | None:
        if not isinstance(message, Train):
            return self.inner.handle(message)
        started = time.perf_counter()
        passed = self.inner.handle(message)
        if self.device.type == "cuda":
            # The step's kernels are part of its time: wait for the compute stream only, since a
            # device-wide sync would also wait for the courier's receive pending on its link stream.
            ended = torch.cuda.Event()
            ended.record(torch.cuda.current_stream(self.device))
            ended.synchronize()
        time.sleep((self.factor - 1.0) * (time.perf_counter() - started))
        return passed


def slowed(handlers: list[Handler], factors: list[float], hosted: tuple[int, ...] | list[int],
           device: torch.device) -> list[Handler]:
    """Each hosted module's handler, slowed by its factor where that is above 1."""
    if not factors:
        return handlers
    return [Straggler(handler, factors[module], device) if factors[module] > 1.0 else handler
            for handler, module in zip(handlers, hosted)]
