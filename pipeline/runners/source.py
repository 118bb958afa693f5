"""The first stage's inbox: the run's events as messages, batches read from the loaders.

It walks the same ``events`` in every mode, so every stage sees the order of the sequential
loop: train steps, then at each epoch end the test set (EVAL) and the epoch end itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.data.contract import Loader, Part
from pipeline.packet import Packet
from pipeline.runners.loop import EpochEnd, Position, RunLength, events
from pipeline.runners.messages import Eval, Message, Stop, Train


class BatchSource:
    def __init__(self, train: Loader, test: Loader, start: Position, length: RunLength, part: Part) -> None:
        self._messages = self._generate(train, test, start, length, part)

    def get(self) -> Message:
        return next(self._messages)

    @staticmethod
    def _generate(train: Loader, test: Loader, start: Position, length: RunLength, part: Part) -> Iterator[Message]:
        epoch = 0
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        for event in events(start, *length):
            if isinstance(event, EpochEnd):
                batches = iter(())  # a streaming loader's decoding workers end before the test set's start
                for images, labels in test.batches(0, 0, part):
                    yield Eval(event.epoch, Packet.from_batch(images, labels))
                yield event
                continue
            if event.epoch != epoch:
                epoch, batches = event.epoch, train.batches(event.epoch, event.batch, part)
            images, labels = next(batches)
            # samples: the global batch, which every replica's count must agree on
            packet = Packet.from_batch(images, labels)
            yield Train(event.epoch, event.step, train.batch_samples(event.batch), packet, entry=event.step)
        yield Stop()
