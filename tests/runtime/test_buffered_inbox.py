"""The buffered inbox: the sender never waits for the consumer, the rule picks, deadlines and failures hold."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.errors import StageFailure
from pipeline.runtime.buffered_inbox import BufferedInbox
from pipeline.runtime.links import MemoryLink
from pipeline.runtime.messages import Eval, Stop, Train
from pipeline.runtime.packet import Packet
from pipeline.runtime.run_order import EpochEnd, Position


def train(entry: int) -> Train:
    return Train(1, entry, 2, Packet(torch.zeros(2), torch.zeros(2, 1)), entry)


def inbox(link: MemoryLink, max_reuse: int = 0, timeout_s: float = 5.0) -> BufferedInbox:
    return BufferedInbox(link, 1, capacity=3, max_reuse=max_reuse, timeout_s=timeout_s, device=torch.device("cpu"))


def test_the_sender_never_waits_and_the_freshest_goes_first() -> None:
    link = MemoryLink(0, 1, depth=1, timeout_s=0.5)  # a queue of one: without the buffer the 2nd put would wait
    buffered = inbox(link)
    started = time.perf_counter()
    for entry in range(1, 11):
        link.put(train(entry))
    assert time.perf_counter() - started < 0.5
    deadline = time.monotonic() + 5
    while 10 not in buffered.buffer.entries:  # the fill thread has moved everything
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sorted(buffered.buffer.entries) == [8, 9, 10]  # M = 3: the older ones were overwritten
    taken = [buffered.get() for _ in range(4)]
    assert [(m.entry, m.use) for m in taken if isinstance(m, Train)] == [(10, 1), (9, 1), (8, 1), (10, 2)]


def test_evaluation_sees_no_training_and_controls_pass_in_order() -> None:
    link = MemoryLink(0, 1, depth=8, timeout_s=1.0)
    buffered = inbox(link, timeout_s=0.3)
    end = EpochEnd(1, Position(2, 0, 1), final=True)
    for message in (train(1), Eval(1, train(1).packet), end, Stop()):
        link.put(message)
    assert isinstance(buffered.get(), Eval)  # a control goes before the buffered batch that arrived before it
    assert buffered.get() == end
    assert isinstance(buffered.get(), Stop)
    with pytest.raises(StageFailure, match="nothing to train on"):  # after the final epoch end nothing trains
        buffered.get()


def test_a_spent_buffer_waits_until_the_deadline() -> None:
    link = MemoryLink(0, 1, depth=2, timeout_s=5.0)
    buffered = inbox(link, max_reuse=1, timeout_s=0.2)
    link.put(train(1))
    assert isinstance(buffered.get(), Train)
    started = time.perf_counter()
    with pytest.raises(StageFailure, match=r"module 1: nothing to train on .* for 0.2 s"):
        buffered.get()
    assert 0.15 < time.perf_counter() - started < 2.0


def test_an_upstream_failure_ends_the_consumer_even_with_batches_left() -> None:
    link = MemoryLink(0, 1, depth=2, timeout_s=5.0)
    buffered = inbox(link)
    link.put(train(1))
    link.break_with(RuntimeError("stage 0 died"))
    deadline = time.monotonic() + 5
    while buffered.error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(StageFailure, match="stage 0 failed"):
        buffered.get()
