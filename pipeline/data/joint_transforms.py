"""An image and its label map transformed together, with Pillow and numpy (segmentation).

Training follows MMSegmentation's Cityscapes pipeline: a random rescale by a ratio drawn from
[0.5, 2.0] of the image's own size (their Resize to (2048, 1024) with that ratio range is the
same thing for Cityscapes' 2048 x 1024 images), a random crop of ``crop`` = (height, width)
(redrawn, up to 10 times, while one class covers 3/4 or more of its labelled pixels: their
``cat_max_ratio``), a horizontal flip with probability 1/2 and their photometric distortion of the image alone.
The image is resampled bilinearly, the label map by nearest neighbour (a class id is never
blended). Where the rescaled image is smaller than the crop the crop is smaller too: the batch
pads it to the crop (pipeline/data/segmentation.py). Evaluation takes whole images as they are.

Every random choice comes from a generator seeded with the sample's seed, as in
pipeline/data/transforms.py, so a sample's result depends on (seed, epoch, position) only.
"""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np
from PIL import Image

from pipeline.data.specs import IGNORE_INDEX

RESCALE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75  # a crop where one class has this share of the labelled pixels is redrawn ...
CROP_TRIES = 10  # ... this many times at most; then the last one drawn is kept
# PhotoMetricDistortion's defaults: each step applied with probability 1/2.
BRIGHTNESS_DELTA = 32.0  # added to every channel, on 0..255
CONTRAST = (0.5, 1.5)  # every channel multiplied by
SATURATION = (0.5, 1.5)  # HSV saturation multiplied by
HUE_DELTA = 18  # added to the hue, in OpenCV's units of 2 degrees (a circle is 180)
PIL_HUE_CIRCLE = 256  # Pillow's HSV hue runs 0..255 around the circle


class JointTransform(Protocol):
    def __call__(self, image: Image.Image, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB ``image`` and its uint8 [H, W] class ids -> uint8 [h, w, 3] pixels and uint8 [h, w] class ids."""
        ...


class SegmentTrainTransform:
    """Rescale, crop, flip and photometric distortion (the module docstring)."""

    def __init__(self, crop: tuple[int, int]) -> None:
        self.crop = crop

    def __call__(self, image: Image.Image, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        draws = random.Random(seed)
        pixels, classes = rescaled_crop(image, label, self.crop, draws)
        return photometric(pixels, draws), classes


class SegmentEvalTransform:
    """The whole image and label map, unchanged."""

    def __call__(self, image: Image.Image, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array(image, dtype=np.uint8), label


def rescaled_crop(image: Image.Image, label: np.ndarray, crop: tuple[int, int],
                  draws: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """The random rescale, crop (at most ``crop`` = (height, width)) and flip of an image and its label map.

    Only the crop is computed, never the (up to 4x larger) rescaled image: Pillow resamples the
    crop's box of the file, placing each output pixel where a resize of the whole image would, and
    each label pixel is the file's pixel under its centre, in exact integer arithmetic.
    """
    width, height = image.size
    ratio = draws.uniform(*RESCALE)
    scaled_w, scaled_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    crop_h, crop_w = min(crop[0], scaled_h), min(crop[1], scaled_w)

    def cropped(top: int, left: int) -> np.ndarray:
        rows = _centres(top, crop_h, height, scaled_h)
        columns = _centres(left, crop_w, width, scaled_w)
        picked: np.ndarray = label[rows[:, None], columns[None, :]]
        return picked

    top, left = draws.randint(0, scaled_h - crop_h), draws.randint(0, scaled_w - crop_w)
    for _ in range(CROP_TRIES):
        classes = cropped(top, left)
        if varied(classes):
            break
        top, left = draws.randint(0, scaled_h - crop_h), draws.randint(0, scaled_w - crop_w)
    else:
        classes = cropped(top, left)
    flip = draws.random() < 0.5
    step_x, step_y = width / scaled_w, height / scaled_h
    box = (left * step_x, top * step_y, (left + crop_w) * step_x, (top + crop_h) * step_y)
    picture = np.array(image.resize((crop_w, crop_h), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
    if flip:
        picture, classes = picture[:, ::-1], classes[:, ::-1]
    return np.ascontiguousarray(picture), np.ascontiguousarray(classes)


def varied(classes: np.ndarray) -> bool:
    """Whether a crop's label map holds two or more classes, none on CAT_MAX_RATIO of its labelled pixels."""
    counts = np.bincount(classes.ravel(), minlength=IGNORE_INDEX + 1)
    counts[IGNORE_INDEX] = 0
    present = counts[counts > 0]
    return len(present) > 1 and present.max() < CAT_MAX_RATIO * present.sum()


def _centres(start: int, count: int, size: int, scaled: int) -> np.ndarray:
    """The file's pixel under the centre of rescaled pixels start .. start + count - 1 (of ``scaled``
    across ``size``): floor((i + 1/2) * size / scaled), without rounding error."""
    index = np.arange(start, start + count, dtype=np.int64)
    return (2 * index + 1) * size // (2 * scaled)


def photometric(pixels: np.ndarray, draws: random.Random) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion of uint8 [H, W, 3] RGB pixels: brightness, then
    contrast either second or last, saturation and hue in HSV between; each step with probability
    1/2 and its result rounded down to uint8 as theirs is."""
    if draws.random() < 0.5:
        pixels = _scaled(pixels, 1.0, draws.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = draws.random() < 0.5
    if contrast_first:
        pixels = _contrast(pixels, draws)
    saturation = draws.uniform(*SATURATION) if draws.random() < 0.5 else None
    hue = draws.randint(-HUE_DELTA, HUE_DELTA) if draws.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = np.array(Image.fromarray(pixels).convert("HSV"))
        if saturation is not None:
            hsv[..., 1] = _scaled(hsv[..., 1], saturation, 0.0)
        if hue is not None:
            shift = round(hue * PIL_HUE_CIRCLE / 180)
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % PIL_HUE_CIRCLE
        height, width = hsv.shape[:2]
        pixels = np.array(Image.frombytes("HSV", (width, height), hsv.tobytes()).convert("RGB"))
    if not contrast_first:
        pixels = _contrast(pixels, draws)
    return pixels


def _contrast(pixels: np.ndarray, draws: random.Random) -> np.ndarray:
    return _scaled(pixels, draws.uniform(*CONTRAST), 0.0) if draws.random() < 0.5 else pixels


def _scaled(values: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """values * alpha + beta, clipped to 0..255 and truncated to uint8."""
    scaled: np.ndarray = np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    return scaled
