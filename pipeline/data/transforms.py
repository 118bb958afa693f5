"""Decoding and augmenting one image file into a uint8 [3, size, size] tensor, with Pillow.

Why Pillow: its wheels install everywhere Python does (every Linux, macOS, Windows, x86 and
ARM, no system libraries), torchvision itself depends on it (so GPU machines have it), and its
JPEG decoder has a draft mode that decodes at 1/2, 1/4 or 1/8 of the size straight from the
DCT coefficients, the cheapest way to get a 224-pixel crop out of a 500-pixel photo.
torchvision's own transforms are not used: its wheel does not import against every torch build
(this CPU torch among them), and the few steps below do not need it.

Every random choice (crop box, flip) comes from a generator seeded by the caller with a
per-sample seed, so what a sample becomes depends on (seed, epoch, position) only, never on
which worker process decoded it.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import numpy as np
import torch
from PIL import Image

Box = tuple[float, float, float, float]  # left, top, right, bottom in the file's pixels


class Transform(Protocol):
    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        """The opened (not yet decoded) ``image`` as uint8 [3, size, size]."""
        ...


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) then a horizontal flip with probability 1/2.

    The crop covers a random fraction ``scale`` of the image's area at a random aspect ratio
    drawn log-uniformly from ``ratio`` (Szegedy et al.'s Inception recipe, the standard
    ImageNet augmentation), and is resized to size x size.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        draws = random.Random(seed)
        width, height = image.size
        left, top, w, h = random_crop(width, height, draws, self.scale, self.ratio)
        flip = draws.random() < 0.5
        box = (float(left), float(top), float(left + w), float(top + h))
        picture = resized_crop(image, box, self.size)
        if flip:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(picture)


class EvalTransform:
    """Resize the shorter side to ``resize``, then the central size x size crop (no randomness)."""

    def __init__(self, size: int, resize: int) -> None:
        self.size, self.resize = size, resize

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        width, height = image.size
        side = min(width, height) * self.size / self.resize  # the crop, in the file's pixels
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        return to_tensor(resized_crop(image, box, self.size))


def random_crop(width: int, height: int, draws: random.Random, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop of random area and aspect ratio; after 10 misses, the central
    crop of the whole image at the nearest allowed aspect ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * draws.uniform(*scale)
        aspect = math.exp(draws.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return draws.randint(0, width - w), draws.randint(0, height - h), w, h
    shape = width / height
    if shape < ratio[0]:
        w, h = width, min(height, round(width / ratio[0]))
    elif shape > ratio[1]:
        w, h = min(width, round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(image: Image.Image, box: Box, size: int) -> Image.Image:
    """``box`` of the file, decoded and resized (antialiased bilinear) to size x size, in RGB.

    A JPEG is decoded in draft mode at the smallest reduction that still gives the box at least
    ``size`` pixels a side, so a small crop of a large photo never decodes every pixel.
    """
    width, height = image.size
    need = (math.ceil(width * size / max(box[2] - box[0], 1e-6)), math.ceil(height * size / max(box[3] - box[1], 1e-6)))
    image.draft("RGB", need)  # no-op for PNG
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    picture = image.convert("RGB")
    scaled = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
    return picture.resize((size, size), Image.Resampling.BILINEAR, box=scaled)


def to_tensor(picture: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB image (or its uint8 [H, W, 3] pixels) as uint8 [3, H, W]."""
    return torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1).contiguous()
