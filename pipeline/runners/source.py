"""The first stage's inbox: the run's events as messages, batches read from the loaders.

It walks the same ``events`` in every mode, so every stage sees the order of the sequential
loop: train steps, then at each epoch end the test set (EVAL) and the epoch end itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from pipeline.data.loader import BatchLoader
from pipeline.packet import Packet
from pipeline.runners.loop import EpochEnd, Position, RunLength, events
from pipeline.runners.messages import Eval, Message, Stop, Train

Shard = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class BatchSource:
    def __init__(self, train: BatchLoader, test: BatchLoader, start: Position, length: RunLength, shard: Shard) -> None:
        self._messages = self._generate(train, test, start, length, shard)

    def get(self) -> Message:
        return next(self._messages)

    @staticmethod
    def _generate(train: BatchLoader, test: BatchLoader, start: Position, length: RunLength,
                  shard: Shard) -> Iterator[Message]:
        epoch = 0
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        for event in events(start, *length):
            if isinstance(event, EpochEnd):
                for images, labels in test.batches(epoch=0):
                    yield Eval(event.epoch, Packet.from_batch(*shard(images, labels)))
                yield event
                continue
            if event.epoch != epoch:
                epoch, batches = event.epoch, train.batches(event.epoch, event.batch)
            images, labels = next(batches)
            packet = Packet.from_batch(*shard(images, labels))
            yield Train(event.epoch, event.step, len(labels), packet, entry=event.step)
        yield Stop()
