"""Segmentation data streamed from disk: image + label map pairs, checked, transformed, batched.

The order, seeds, workers and device transfer are FolderLoader's (pipeline/data/streaming.py),
so the (seed, epoch, batch) rule of every loader holds here too. A decoding worker reads an
image and its label map, checks the map (``read_label``: one check per way a map can be
wrong, cheap numpy on the decoded array) and applies the joint transform
(pipeline/data/joint_transforms.py). A failure travels to the training process as text and
stops the run with one line naming the file.

Batches: training crops (data.crop = [height, width]) are padded to the crop where the rescaled
image was smaller; evaluation images are whole, and where a batch's images differ in size each
is padded to the largest: image pixels with 0 after normalisation (the mean colour, as
MMSegmentation pads), label pixels with IGNORE_INDEX, so neither the loss nor the metric counts
them. Padding is always at the bottom and right. Where replicas each decode a part of such a
batch, the largest image of the whole batch is found from the files' headers, so every part
pads alike and the parts are slices of the batch one process reads. Labels reach the device as
int64 [B, H, W].
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.config.schema import DataConfig, ModelConfig
from pipeline.data.contract import training_batch
from pipeline.data.joint_transforms import JointTransform, SegmentEvalTransform, SegmentTrainTransform
from pipeline.data.segmentation_folder import MAKE_TRAIN_IDS, PairSplit, scan_pairs
from pipeline.data.specs import IGNORE_INDEX, dataset_root, segmentation_spec
from pipeline.data.streaming import UNREADABLE, Decoded, FolderLoader, Sample, unreadable
from pipeline.data.transforms import to_tensor
from pipeline.errors import BadInput

LABEL_MODES = ("L", "P")  # 8-bit single channel: grey levels or palette indices are the class ids
SHOWN_VALUES = 5

# uint8 [3, H, W] image, uint8 [H, W] label map, the least (height, width) of its padded batch
Pair = tuple[torch.Tensor, torch.Tensor, tuple[int, int]]


class PairFiles(Dataset[Pair | str]):
    """One split's pairs as a decoding worker reads them; ``classes`` bounds the label values and
    ``value_fix`` says what to do about others (it depends on the dataset)."""

    def __init__(self, split: PairSplit, transform: JointTransform, classes: int, value_fix: str) -> None:
        self.split, self.transform, self.classes, self.value_fix = split, transform, classes, value_fix

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, sample: Sample) -> Pair | str:
        image_path = os.fsdecode(self.split.images[sample.file])
        label_path = os.fsdecode(self.split.labels[sample.file])
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except UNREADABLE as err:
            return unreadable(image_path, err)
        try:
            with Image.open(label_path) as opened:
                values = read_label(opened, label_path, image_path, image.size, self.classes, self.value_fix)
        except UNREADABLE as err:
            return unreadable(label_path, err)
        if isinstance(values, str):
            return values
        pixels, label = self.transform(image, values, sample.seed)
        return to_tensor(pixels), torch.from_numpy(label), sample.canvas

    def canvas(self, files: list[int]) -> tuple[int, int]:
        """The (height, width) of the largest of ``files``, from their headers (a whole-image batch's
        padded shape, for replicas that each decode a part of it)."""
        sizes = []
        for file in files:
            path = os.fsdecode(self.split.images[file])
            try:
                with Image.open(path) as opened:
                    sizes.append(opened.size)
            except UNREADABLE as err:
                raise BadInput(unreadable(path, err)) from None
        return max(height for _, height in sizes), max(width for width, _ in sizes)


def read_label(opened: Image.Image, path: str, image_path: str, image_size: tuple[int, int], classes: int,
               value_fix: str) -> np.ndarray | str:
    """The class ids of the label map ``opened`` from ``path`` as uint8 [H, W], or what is wrong
    with it (one line). Mode and size are checked from the header, before decoding."""
    mode, size = opened.mode, opened.size
    if mode not in LABEL_MODES:
        return (f"{path} is a mode-{mode} image, not a label map; a label map is single-channel 8-bit (Pillow mode L "
                "or P) with one class id per pixel: save it as an 8-bit grayscale or palette PNG (a colour-coded "
                "map must be converted to class ids first)")
    if size != image_size:
        return (f"{path} is {size[0]}x{size[1]} but its image {image_path} is {image_size[0]}x{image_size[1]}; a label "
                "map holds one class id per image pixel: give both the same size (resize the map with nearest "
                "neighbour, never blending ids)")
    values: np.ndarray = np.array(opened, dtype=np.uint8)
    counts = np.bincount(values.ravel(), minlength=256)
    found = np.flatnonzero(counts)
    bad = found[(found >= classes) & (found != IGNORE_INDEX)]
    if len(bad):
        listed = ", ".join(str(value) for value in bad[:SHOWN_VALUES]) + (" ..." if len(bad) > SHOWN_VALUES else "")
        return (f"{path} holds label values {listed} outside the class ids 0..{classes - 1} (255 = ignore); "
                f"{value_fix}")
    return values


def collate_pairs(items: list[Pair | str], crop: tuple[int, int], pad_to_crop: bool) -> Decoded:
    """One part of a batch, each pair padded at the bottom and right to the part's largest image,
    at least to its samples' canvas, and to ``crop`` when ``pad_to_crop``; an empty part is an
    empty batch of ``crop``."""
    failures = [item for item in items if isinstance(item, str)]
    if failures:
        return Decoded(torch.empty(0), torch.empty(0), failures[0])
    pairs = [item for item in items if not isinstance(item, str)]
    if not pairs:
        return Decoded(torch.empty(0, 3, *crop, dtype=torch.uint8), torch.empty(0, *crop, dtype=torch.uint8), None)
    sizes = torch.tensor([image.shape[1:] for image, _, _ in pairs])
    least = crop if pad_to_crop else pairs[0][2]
    height, width = max(least[0], int(sizes[:, 0].max())), max(least[1], int(sizes[:, 1].max()))
    images = torch.zeros(len(pairs), 3, height, width, dtype=torch.uint8)
    labels = torch.full((len(pairs), height, width), IGNORE_INDEX, dtype=torch.uint8)
    for slot, (image, label, _) in enumerate(pairs):
        images[slot, :, : image.shape[1], : image.shape[2]] = image
        labels[slot, : label.shape[0], : label.shape[1]] = label
    padded = bool(((sizes[:, 0] < height) | (sizes[:, 1] < width)).any())
    return Decoded(images, labels, None, sizes if padded else None)


def make_segmentation_loaders(data: DataConfig, model: ModelConfig, seed: int, device: torch.device,
                              processes: int = 1) -> tuple[FolderLoader, FolderLoader]:
    """The train and val loaders of cityscapes or a segmentation folder (scanned here, once per process)."""
    spec = segmentation_spec(data, model)
    folder = scan_pairs(data.name, dataset_root(data, spec.default_root))
    batch, smallest = training_batch(data, f"{data.name} at {folder.root}", len(folder.train.images), processes)
    crop = (spec.image_size, spec.image_width)
    if data.name == "cityscapes":
        value_fix = (f"cityscapes trainIds run 0..{spec.classes - 1} (a labelIds map holds up to 33); make the "
                     f"labelTrainIds maps with {MAKE_TRAIN_IDS.format(root=folder.root)}")
    else:
        value_fix = (f"set model.classes to the number of classes (it is {spec.classes}) or map those pixels to a "
                     f"class id or to {IGNORE_INDEX}")
    evaluate = SegmentEvalTransform()
    augment: JointTransform = SegmentTrainTransform(crop) if data.augment else evaluate
    train_files = PairFiles(folder.train, augment, spec.classes, value_fix)
    train = FolderLoader(train_files, functools.partial(collate_pairs, crop=crop, pad_to_crop=data.augment), spec,
                         batch, device, seed, True, data.workers, smallest,
                         canvas=None if data.augment else train_files.canvas)
    val_files = PairFiles(folder.val, evaluate, spec.classes, value_fix)
    val = FolderLoader(val_files, functools.partial(collate_pairs, crop=crop, pad_to_crop=False), spec,
                       min(data.batch_size, len(folder.val.images)), device, seed, False, data.workers,
                       canvas=val_files.canvas)
    return train, val
