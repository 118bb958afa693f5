"""FolderLoader: files streamed from disk, decoded and augmented by worker processes.

What a sample decodes to is the files object's business (``FolderFiles``: an image folder's
image and class; pipeline/data/segmentation.py: an image and its label map) and so is how a
batch is put together (its collate); the order, the seeds, the workers and the trip to the
device are the same for every kind and live here.

The batch order is the resident loader's (pipeline/data/contract.py): the (seed, epoch)
permutation, cut into consecutive batches, resumed at any batch. Each sample's augmentation is
drawn from the seed of (seed, epoch, its position in the epoch), so a batch is the same whatever
the number of workers, replicas or processes. torch's DataLoader runs ``data.workers``
processes that each decode whole batches ahead (its prefetch), into pinned memory on a GPU, so
the copy to the device is asynchronous; normalisation then runs on the device. The workers
live for one pass (an epoch's training batches, or the test set): starting them is cheap next to
the minutes an ImageNet epoch takes.

A file that cannot be read or decoded stops the run with its path (docs/failures.md says why
it is not skipped).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, cast

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.config.schema import DataConfig, ModelConfig
from pipeline.data.contract import (
    WHOLE,
    Part,
    batch_count,
    batch_span,
    channel_constants,
    epoch_order,
    mix_seed,
    normalise,
    training_batch,
)
from pipeline.data.image_folder import FolderSplit, scan
from pipeline.data.specs import DatasetSpec, folder_root, folder_spec
from pipeline.data.transforms import EvalTransform, TrainTransform, Transform
from pipeline.errors import BadInput

# What Pillow raises for a file it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data, damaged headers or chunks, and images above its decompression-bomb limit.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
PREFETCH_BATCHES = 2  # per worker: DataLoader's default, enough to hide a slow file


class Sample(NamedTuple):
    file: int  # index into the split's files
    seed: int  # of its augmentation
    # The least (height, width) its part pads to: the whole batch's, where parts must agree on a
    # padded shape (FolderLoader's ``canvas``); (0, 0) where nothing needs it.
    canvas: tuple[int, int] = (0, 0)


class Decoded(NamedTuple):
    """A batch as a worker hands it over: a failure travels as text, not as an exception, since
    DataLoader re-raises a worker's exception with its traceback folded into the message."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N] classes, or uint8 [N, H, W] label maps
    failure: str | None
    # (height, width) of each image where the batch pads some to its shape (padding is blanked on
    # the device, after normalisation); None: nothing padded.
    sizes: torch.Tensor | None = None


class SampleFiles(Protocol):
    """The files of one split, as the decoding workers read them: a sample -> what it decodes to,
    or a failure as text."""

    def __len__(self) -> int:
        ...

    def __getitem__(self, sample: Sample) -> Any:
        ...


def unreadable(path: str, err: BaseException) -> str:
    """The failure of a file Pillow cannot decode (one of UNREADABLE)."""
    return (f"{path} cannot be read as an image ({type(err).__name__}: {err}); replace it with a readable image or "
            "delete it")


class FolderFiles(Dataset[tuple[torch.Tensor, int] | str]):
    def __init__(self, split: FolderSplit, transform: Transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, sample: Sample) -> tuple[torch.Tensor, int] | str:
        path = os.fsdecode(self.split.files[sample.file])
        try:
            with Image.open(path) as image:
                return self.transform(image, sample.seed), int(self.split.labels[sample.file])
        except UNREADABLE as err:
            return unreadable(path, err)


def collate(items: list[tuple[torch.Tensor, int] | str], size: int) -> Decoded:
    failures = [item for item in items if isinstance(item, str)]
    if failures:
        return Decoded(torch.empty(0), torch.empty(0), failures[0])
    decoded = [item for item in items if not isinstance(item, str)]
    # A part may be empty (a last test batch smaller than the replicas): an empty batch of the right shape.
    images = torch.stack([image for image, _ in decoded]) if decoded else torch.empty(0, 3, size, size,
                                                                                       dtype=torch.uint8)
    return Decoded(images, torch.tensor([label for _, label in decoded], dtype=torch.int64), None)


class FolderLoader:
    """Batches of one split of ``files`` on ``device``; ``batches(epoch, start, part)``.

    ``collate`` makes the items of one part of a batch (or their first failure) a ``Decoded``;
    it runs in the worker, so it must be picklable (a module-level function or a partial of one).
    ``canvas``, for files of different sizes that a batch pads to one: the files of a whole
    batch -> the (height, width) it pads to, so that the parts of a batch decoded by replicas
    pad alike and stay slices of the batch one process would read.
    """

    def __init__(self, files: SampleFiles, collate: Callable[[list[Any]], Decoded], spec: DatasetSpec,
                 batch_size: int, device: torch.device, seed: int, train: bool, workers: int,
                 smallest_batch: int = 1, canvas: Callable[[list[int]], tuple[int, int]] | None = None) -> None:
        self.files, self.collate, self.canvas = files, collate, canvas
        self.spec, self.batch_size, self.device, self.seed = spec, batch_size, device, seed
        self.train, self.workers, self.smallest_batch = train, workers, smallest_batch
        self.mean = channel_constants(spec.mean, device)
        self.std = channel_constants(spec.std, device)

    def __len__(self) -> int:
        return batch_count(self.samples, self.batch_size, self.smallest_batch)

    @property
    def samples(self) -> int:
        return len(self.files)

    def batch_samples(self, index: int) -> int:
        return len(batch_span(index, self.batch_size, self.samples))

    def plan(self, epoch: int, start: int = 0, part: Part = WHOLE) -> Iterator[list[Sample]]:
        """The samples this part decodes for each batch from ``start`` on, with their seeds."""
        order = epoch_order(self.seed, epoch, self.samples, self.train).tolist()
        for index in range(start, len(self)):
            span = batch_span(index, self.batch_size, self.samples)
            positions = part.take(torch.arange(span.start, span.stop)).tolist()
            canvas = (0, 0)
            if self.canvas is not None and part.replicas > 1:  # a part alone is the batch: its largest is the batch's
                canvas = self.canvas([order[position] for position in span])
            yield [Sample(order[position], mix_seed(self.seed, epoch, position), canvas) for position in positions]

    def batches(self, epoch: int, start: int = 0, part: Part = WHOLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gpu = self.device.type == "cuda"
        # DataLoader needs only __getitem__ and __len__; torch annotates that as its Dataset class
        files = cast("Dataset[Any]", self.files)
        stream: DataLoader[Any] = DataLoader(files, batch_sampler=_Plan(self, epoch, start, part),
                                             num_workers=self.workers, collate_fn=self.collate, pin_memory=gpu,
                                             prefetch_factor=PREFETCH_BATCHES if self.workers else None,
                                             worker_init_fn=ignore_stop_signals if self.workers else None)
        with stop_signals_blocked():
            batches = iter(stream)  # its workers start here
        for images, labels, failure, sizes in batches:
            if failure is not None:
                raise BadInput(failure)
            images = normalise(images.to(self.device, non_blocking=gpu).float(), self.mean, self.std)
            if sizes is not None:
                images = blank_padding(images, sizes.to(self.device, non_blocking=gpu))
            # int64 on the device: label maps travel as uint8, an eighth of the bytes
            yield images, labels.to(self.device, non_blocking=gpu).long()


def blank_padding(images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Zero (the mean colour, once normalised) every pixel beyond each image's own (height, width):
    padding as MMSegmentation pads, after normalisation."""
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device) < sizes[:, :1]  # [N, H]
    columns = torch.arange(width, device=images.device) < sizes[:, 1:]  # [N, W]
    inside = rows[:, None, :, None] & columns[:, None, None, :]
    return images.masked_fill(~inside, 0.0)


class _Plan:
    """``FolderLoader.plan`` as the re-iterable, sized batch sampler DataLoader expects."""

    def __init__(self, loader: FolderLoader, epoch: int, start: int, part: Part) -> None:
        self.loader, self.epoch, self.start, self.part = loader, epoch, start, part

    def __iter__(self) -> Iterator[list[Sample]]:
        return self.loader.plan(self.epoch, self.start, self.part)

    def __len__(self) -> int:
        return max(0, len(self.loader) - self.start)


def make_folder_loaders(data: DataConfig, model: ModelConfig, seed: int, device: torch.device,
                        processes: int = 1) -> tuple[FolderLoader, FolderLoader]:
    """The train and val loaders of the image folder at data.root (scanned here, once per process)."""
    folder = scan(folder_root(data))
    spec = folder_spec(data, model, len(folder.classes))
    batch, smallest = training_batch(data, f"image folder {folder.root}", len(folder.train.labels), processes)
    evaluate = EvalTransform(data.image_size, data.eval_resize)
    augment: Transform = TrainTransform(data.image_size) if data.augment else evaluate
    stack = functools.partial(collate, size=spec.image_size)
    train = FolderLoader(FolderFiles(folder.train, augment), stack, spec, batch, device, seed, True,
                         data.workers, smallest)
    val = FolderLoader(FolderFiles(folder.val, evaluate), stack, spec, min(data.batch_size, len(folder.val.labels)),
                       device, seed, False, data.workers)
    return train, val


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # every run.stop_signal, and Ctrl-C


def ignore_stop_signals(worker: int) -> None:
    """In a decoding worker: a stop signal is the training process's to handle.

    torchrun's agent signals a worker's whole process group, and Slurm every process of the step:
    a worker the signal ended would fail the step (or the checkpoint set) that the stop lets the
    training process finish. The workers still end with their parent. A worker starts with the stop
    signals blocked (``stop_signals_blocked``), so one that comes before this runs waits and is then
    dropped, instead of ending a worker that is still starting (at each epoch's start).
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """This thread blocks the stop signals while it starts decoding workers, which inherit the mask. The training
    process loses none: another of its threads takes a signal meanwhile, or it waits until the block ends."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
