"""The dataset as uint8 tensors on the training device, batched and augmented with tensor ops.

Data order and augmentation come from generators seeded by (seed, epoch[, batch]), never
from a process's global random state, so any process — sequential, pipeline rank 0, every DDP
rank — and any resumed run sees exactly the same batches. ``make_loaders`` builds these, or for
an image folder or segmentation data the streaming loader (pipeline/data/streaming.py,
pipeline/data/segmentation.py); all follow pipeline/data/contract.py.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config.schema import DataConfig, ModelConfig
from pipeline.data.contract import (
    WHOLE,
    Loader,
    Part,
    batch_count,
    batch_span,
    channel_constants,
    epoch_order,
    mix_seed,
    normalise,
    training_batch,
)
from pipeline.data.readers import READERS, RawDataset, Split, make_synthetic
from pipeline.data.segmentation import make_segmentation_loaders
from pipeline.data.specs import DatasetSpec, dataset_root, dataset_spec, require_data_root
from pipeline.data.streaming import make_folder_loaders
from pipeline.errors import BadInput
from pipeline.model.arch import SEGMENTATION_DATASETS


def load_raw(data: DataConfig, model: ModelConfig, seed: int) -> tuple[DatasetSpec, RawDataset]:
    """Read (or, with data.download, fetch then read) the dataset data.name names (``seed``, run.seed,
    draws the synthetic one)."""
    spec = dataset_spec(data, model)
    if spec.name == "synthetic":
        return spec, make_synthetic(spec, seed)
    root = dataset_root(data, spec.default_root)
    if data.download:
        _download(spec, root)
    try:
        raw = READERS[spec.name](root, spec)
    except (OSError, EOFError, ValueError, KeyError, IndexError, struct.error, zlib.error) as err:
        raise BadInput(f"{spec.name}: the files under {str(root)!r} are damaged or not in the expected format "
                       f"({type(err).__name__}: {err}); {spec.how_to_get}") from None
    for name, split in (("train", raw.train), ("test", raw.test)):
        if len(split.images) != len(split.labels) or len(split.labels) == 0:
            raise BadInput(f"{spec.name}: the {name} split under {str(root)!r} has {len(split.images)} images and "
                           f"{len(split.labels)} labels; {spec.how_to_get}")
    return spec, raw


def _download(spec: DatasetSpec, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception:  # noqa: BLE001 -- the PyPI wheel may fail to import against this torch: any failure means "not usable"
        raise BadInput(
            f"data.download = true needs torchvision, which does not import here; "
            f"put the {spec.name} files under {str(root)!r} yourself and set data.download = false"
        ) from None
    fetchers = {
        "cifar10": lambda train: tvd.CIFAR10(str(root), train=train, download=True),
        "cifar100": lambda train: tvd.CIFAR100(str(root), train=train, download=True),
        "svhn": lambda train: tvd.SVHN(str(root), split="train" if train else "test", download=True),
        "stl10": lambda train: tvd.STL10(str(root), split="train" if train else "test", download=True),
    }
    if spec.name not in fetchers:
        raise BadInput(f"data.download is not available for {spec.name}; {spec.how_to_get}")
    try:
        for train in (True, False):
            fetchers[spec.name](train)
    except Exception as err:  # noqa: BLE001 -- network, checksum and archive errors all mean the same to the user
        raise BadInput(f"{spec.name}: download into {str(root)!r} failed ({type(err).__name__}: {err}); "
                       f"copy the files there instead") from None


class BatchLoader:
    """Batches of one split, resident on ``device``; ``batches(epoch, start)`` resumes mid-epoch."""

    def __init__(self, split: Split, spec: DatasetSpec, batch_size: int, device: torch.device,
                 seed: int, train: bool, augment: bool, smallest_batch: int = 1) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.spec = spec
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.train = train
        self.augment = augment and train
        self.smallest_batch = smallest_batch
        self.mean = channel_constants(spec.mean, device)
        self.std = channel_constants(spec.std, device)

    def __len__(self) -> int:
        return batch_count(self.samples, self.batch_size, self.smallest_batch)

    @property
    def samples(self) -> int:
        return len(self.labels)

    def batch_samples(self, index: int) -> int:
        return len(batch_span(index, self.batch_size, self.samples))

    def order(self, epoch: int) -> torch.Tensor:
        return self._upload(epoch_order(self.seed, epoch, self.samples, self.train))

    def batches(self, epoch: int, start: int = 0, part: Part = WHOLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch)
        for index in range(start, len(self)):
            span = batch_span(index, self.batch_size, self.samples)
            picked = order[span.start : span.stop]
            images = self.images[picked].float()
            if self.augment:
                # Drawn for the whole global batch, then sliced: every part sees the draws of one run.
                images = self._augment(images, mix_seed(self.seed, epoch, index + 1))
            yield self.normalise(part.take(images)), part.take(self.labels[picked])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8-valued floats in [0, 255] -> the network's normalised input."""
        return normalise(images, self.mean, self.std)

    def _upload(self, indices: torch.Tensor) -> torch.Tensor:
        """Random indices drawn on the host (the CPU generator: the same draws on every device and
        process) to the device. GPU: from pinned memory with non_blocking, so the copy is queued on
        the stream and the host never waits (a pageable copy would); CPU: the tensor itself."""
        if self.device.type != "cuda":
            return indices
        return indices.pin_memory().to(self.device, non_blocking=True)

    def _augment(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """Random crop after padding, and a random horizontal flip, in one gather."""
        spec = self.spec
        count, channels, height, width = images.shape
        generator = torch.Generator().manual_seed(seed)
        pad = spec.crop_pad
        top = torch.randint(0, 2 * pad + 1, (count, 1), generator=generator)
        left = torch.randint(0, 2 * pad + 1, (count, 1), generator=generator)
        flip = torch.rand(count, 1, generator=generator) < 0.5 if spec.flip else torch.zeros(count, 1, dtype=torch.bool)
        rows = top + torch.arange(height)
        columns = left + torch.where(flip, torch.arange(width - 1, -1, -1), torch.arange(width))
        padded = F.pad(images, (pad, pad, pad, pad), mode=spec.pad_mode)
        # One host-to-device copy per batch for all the random indices, queued without a host wait.
        rows, columns = self._upload(torch.cat([rows, columns], 1)).split([height, width], 1)
        return padded[
            torch.arange(count, device=self.device)[:, None, None, None],
            torch.arange(channels, device=self.device)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]


def make_loaders(data: DataConfig, model: ModelConfig, seed: int, device: torch.device,
                 processes: int = 1) -> tuple[Loader, Loader]:
    """Train and test loaders, ordered and augmented from ``seed`` (run.seed); ``processes`` share each
    training batch (replicas, DDP).

    A data.batch_size larger than a split is clamped to the split, so each loader's
    ``batch_size`` is the batch it really yields (what samples/s must be computed from).
    """
    require_data_root(data, model)
    if data.name == "image_folder":
        return make_folder_loaders(data, model, seed, device, processes)
    if data.name in SEGMENTATION_DATASETS:
        return make_segmentation_loaders(data, model, seed, device, processes)
    spec, raw = load_raw(data, model, seed)
    batch, smallest = training_batch(data, spec.name, len(raw.train.labels), processes)
    train = BatchLoader(raw.train, spec, batch, device, seed, True, data.augment, smallest_batch=smallest)
    test = BatchLoader(raw.test, spec, min(data.batch_size, len(raw.test.labels)), device, seed, False, False)
    return train, test
