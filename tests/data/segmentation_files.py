"""Small segmentation datasets written on the fly, for any test that needs image/label files.

``write_segmentation_folder`` writes the segmentation_folder layout, ``write_cityscapes`` the
official Cityscapes one. Label maps are blocks of random class ids with some IGNORE_INDEX
pixels; each image is its label map's class colour plus noise, so a network can learn it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.specs import IGNORE_INDEX

BLOCK = 4  # pixels a side of one random label block
IGNORED = 0.05  # fraction of label pixels set to IGNORE_INDEX


def sample_pair(rng: np.random.Generator, classes: int, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """An RGB image of ``size`` = (height, width) and its mode-L label map."""
    height, width = size
    blocks = rng.integers(0, classes, ((height + BLOCK - 1) // BLOCK, (width + BLOCK - 1) // BLOCK))
    label = np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=np.int64))[:height, :width].astype(np.uint8)
    colours = np.random.default_rng(classes).integers(30, 226, (classes, 3))  # one colour per class
    noise = rng.integers(-20, 21, (height, width, 3))
    image = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
    label[rng.random((height, width)) < IGNORED] = IGNORE_INDEX
    return Image.fromarray(image), Image.fromarray(label)


def write_segmentation_folder(root: Path, classes: int = 3, train: int = 4, val: int = 2,
                              size: tuple[int, int] = (24, 40), val_sizes: tuple[tuple[int, int], ...] = (),
                              seed: int = 0) -> Path:
    """root/<split>/images/<stem>.png + root/<split>/labels/<stem>.png for train and val.

    Images are ``size`` = (height, width); ``val_sizes`` gives the val images their own sizes
    (whole-image evaluation of mixed sizes). The last training image is a JPEG (any extension is
    paired by stem). Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            shape = val_sizes[index] if split == "val" and index < len(val_sizes) else size
            image, label = sample_pair(rng, classes, shape)
            suffix = ".jpg" if split == "train" and index == count - 1 else ".png"
            image.save(root / split / "images" / f"{split}_{index:03d}{suffix}", quality=95)
            label.save(root / split / "labels" / f"{split}_{index:03d}.png")
    return root


def write_cityscapes(root: Path, classes: int = 19, train: int = 4, val: int = 2, size: tuple[int, int] = (24, 40),
                     seed: int = 0) -> Path:
    """The official layout: leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and
    gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png (train in two cities). Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for index in range(count):
            city = ("aachen", "bochum")[index % 2] if split == "train" else "frankfurt"
            name = f"{city}_{index:06d}_000019"
            image, label = sample_pair(rng, classes, size)
            for kind, suffix, picture in (("leftImg8bit", "_leftImg8bit.png", image),
                                          ("gtFine", "_gtFine_labelTrainIds.png", label)):
                folder = root / kind / split / city
                folder.mkdir(parents=True, exist_ok=True)
                picture.save(folder / f"{name}{suffix}")
    return root
