"""The first stage's inbox: the run's events as messages, batches read from the loaders.

It walks the same ``events`` in every mode, so every stage sees the order of the sequential
loop: train steps, then at each epoch end the test set (EVAL) and the epoch end itself; save
points every run.checkpoint_every steps, and those its ``SaveRequests`` ask for (preemption.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.data.contract import Loader, Part
from pipeline.runtime.messages import Eval, Message, Stop, Train
from pipeline.runtime.packet import Packet
from pipeline.runtime.preemption import SaveRequests
from pipeline.runtime.run_order import EpochEnd, Position, RunLength, SavePoint, events


class BatchSource:
    def __init__(self, train: Loader, test: Loader, start: Position, length: RunLength, part: Part,
                 every: int = 0, requests: SaveRequests | None = None) -> None:
        self._messages = self._generate(train, test, start, length, part, every, requests)

    def get(self) -> Message:
        return next(self._messages)

    @staticmethod
    def _generate(train: Loader, test: Loader, start: Position, length: RunLength, part: Part, every: int,
                  requests: SaveRequests | None) -> Iterator[Message]:
        epoch = 0
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        saved = start.step  # the step of the newest set: a request there writes nothing new
        for event in events(start, *length, every=every):
            if isinstance(event, (EpochEnd, SavePoint)):
                saved = event.resume_at.step
                if requests is not None:
                    requests.saved()
            if isinstance(event, SavePoint):
                yield event
                continue
            if isinstance(event, EpochEnd):
                batches = iter(())  # a streaming loader's decoding workers end before the test set's start
                for images, labels in test.batches(0, 0, part):
                    yield Eval(event.epoch, Packet.from_batch(images, labels))
                yield event
                continue
            save, stop = requests.poll(event.step) if requests is not None else (False, False)
            if save and saved < event.step - 1:
                assert requests is not None
                saved = event.step - 1
                requests.saved()
                yield SavePoint(Position(event.epoch, event.batch, saved))
            if stop:
                yield Stop(preempted=True)
                return
            if event.epoch != epoch:
                epoch, batches = event.epoch, train.batches(event.epoch, event.batch, part)
            images, labels = next(batches)
            # samples: the global batch, which every replica's count must agree on
            packet = Packet.from_batch(images, labels)
            yield Train(event.epoch, event.step, train.batch_samples(event.batch), packet, entry=event.step)
        yield Stop()
