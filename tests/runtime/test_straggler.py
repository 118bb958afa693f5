"""A slowed stage sleeps (factor - 1) x its step's time after training steps, and only after them."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.runtime.messages import Message, Train
from pipeline.runtime.packet import Packet
from pipeline.runtime.run_order import EpochEnd, Position
from pipeline.runtime.stage_loop import Handler
from pipeline.runtime.straggler import Straggler, slowed

STEP_S = 0.05


class Busy:
    def __init__(self) -> None:
        self.seen: list[Message] = []

    def handle(self, message: Message) -> Message | None:
        self.seen.append(message)
        if isinstance(message, Train):
            time.sleep(STEP_S)
        return message


def timed(handler: Handler, message: Message) -> float:
    started = time.perf_counter()
    assert handler.handle(message) is message
    return time.perf_counter() - started


def test_a_training_step_takes_factor_times_as_long() -> None:
    inner = Busy()
    straggler = Straggler(inner, 3.0, torch.device("cpu"))
    train = Train(1, 1, 2, Packet(torch.zeros(2), torch.zeros(2, 1)))
    assert 3 * STEP_S <= timed(straggler, train) < 3 * STEP_S + 0.1
    assert timed(straggler, EpochEnd(1, Position(2, 0, 1), final=True)) < 0.02  # epoch ends are not slowed
    assert len(inner.seen) == 2


def test_only_stages_with_a_factor_above_one_are_wrapped() -> None:
    handlers: list[Handler] = [Busy(), Busy()]
    assert slowed(handlers, [], (0, 1), torch.device("cpu")) == handlers
    wrapped = slowed(handlers, [1.0, 1.0, 2.0], (1, 2), torch.device("cpu"))  # this process hosts modules 1 and 2
    assert wrapped[0] is handlers[0] and isinstance(wrapped[1], Straggler) and wrapped[1].factor == 2.0


def test_on_a_gpu_the_step_waits_for_the_compute_stream_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mocked torch.cuda: the step's end is an event on the compute stream, never a device-wide
    synchronize, which would also wait for the courier's pending receive on the link stream."""
    calls: list[str] = []

    class Event:
        def record(self, stream: str) -> None:
            calls.append(f"record on {stream}")

        def synchronize(self) -> None:
            calls.append("wait for the event")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: "the compute stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("device-wide sync"))
    straggler = Straggler(Busy(), 2.0, torch.device("cuda", 0))
    assert 2 * STEP_S <= timed(straggler, Train(1, 1, 2, Packet(torch.zeros(2), torch.zeros(2, 1)))) < 2 * STEP_S + 0.1
    assert calls == ["record on the compute stream", "wait for the event"]
