"""What every loader gives the stage loop, and the rules all loaders share.

Two loaders satisfy ``Loader``: the resident ``BatchLoader`` (small datasets as tensors on the
device) and the streaming ``FolderLoader`` (image folders decoded by worker processes). Both
follow the same batch rule, owned here: the training order of an epoch is a permutation drawn
from (seed, epoch), batch i is positions [i * batch_size, (i + 1) * batch_size) of that order,
and any randomness of a sample comes from seeds of (seed, epoch, ...). So the batches of a run
depend on nothing else — not the mode, the number of processes or workers, nor a resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput
from pipeline.runtime.metrics import say

if TYPE_CHECKING:
    from pipeline.config.schema import DataConfig


@dataclass(frozen=True)
class Part:
    """Which share of each global batch one process reads: slice ``replica`` of ``replicas``.

    The R replicas of a stage train on the R slices of the same global batch (``tensor_split``:
    slices at most one sample apart), so a streaming loader decodes only its own slice.
    """

    replica: int = 0
    replicas: int = 1

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.replicas == 1:
            return tensor
        return tensor.tensor_split(self.replicas)[self.replica]


WHOLE = Part()


class Loader(Protocol):
    spec: DatasetSpec
    batch_size: int

    def __len__(self) -> int:
        """Batches per epoch."""
        ...

    @property
    def samples(self) -> int:
        """Samples in the split."""
        ...

    def batch_samples(self, index: int) -> int:
        """Samples in global batch ``index``, all parts together (what samples/s counts)."""
        ...

    def batches(self, epoch: int, start: int = 0, part: Part = WHOLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, labels) on the device, for ``part`` of batches start, start + 1, ..."""
        ...


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several whole numbers: (seed, epoch) for an order, (seed, epoch, n) for a draw."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (1 << 63)
    return value


def batch_count(samples: int, batch_size: int, smallest_batch: int) -> int:
    """Batches per epoch; a final batch too small to train on (batch norm needs 2 samples per
    process) is dropped."""
    full, rest = divmod(samples, batch_size)
    return full + (1 if rest >= smallest_batch else 0)


def batch_span(index: int, batch_size: int, samples: int) -> range:
    """Positions in the epoch order that batch ``index`` holds."""
    return range(index * batch_size, min((index + 1) * batch_size, samples))


def epoch_order(seed: int, epoch: int, samples: int, shuffle: bool) -> torch.Tensor:
    """The sample at each position of ``epoch`` (on the host): a seeded permutation, or 0..n-1."""
    if not shuffle:
        return torch.arange(samples)
    return torch.randperm(samples, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8-valued floats in [0, 255] -> the network's normalised input (mean, std: [1, C, 1, 1])."""
    return (images / 255.0 - mean) / std


def channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A spec's per-channel mean or std, shaped to broadcast over [N, C, H, W]."""
    return torch.tensor(values, device=device).view(1, len(values), 1, 1)


def training_batch(data: DataConfig, name: str, samples: int, processes: int) -> tuple[int, int]:
    """(the training batch, the smallest final batch kept) for ``samples`` shared by ``processes``."""
    smallest = 2 * processes  # batch norm needs two samples on every process
    if samples < smallest:
        raise BadInput(
            f"{name}: the train split holds {samples} sample(s), fewer than one batch of {smallest} "
            f"(2 per process, as batch norm needs, for {processes} process(es)); use a larger data set or fewer "
            "processes"
        )
    batch = data.batch_size
    if batch > samples:
        say(f"note: data.batch_size = {batch} is more than the {samples} training samples of {name}; "
            f"training on batches of {samples}")
        batch = samples
    return batch, smallest
