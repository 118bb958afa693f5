"""One image file prepared as a run's evaluation prepared its test images, for predictions.

An image folder's evaluation is decoded by transforms.EvalTransform (shorter side to data.eval_resize,
central data.image_size crop); the resident datasets are arrays of one size, so a file is resized to
that size (Fashion-MNIST's 28 pixels, then the same zero padding to 32 as its reader). Both are then
normalised with the dataset's mean and std. The recipe is recorded in the exported model, so a
prediction needs no config and no dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.config.schema import DataConfig
from pipeline.data.contract import channel_constants, normalise
from pipeline.data.readers import FASHION_MNIST_SIDE
from pipeline.data.specs import DatasetSpec
from pipeline.data.transforms import EvalTransform, to_tensor
from pipeline.errors import BadInput, clip

CENTRE_CROP, RESIZE = "centre_crop", "resize"


@dataclass(frozen=True)
class Preprocess:
    kind: str  # CENTRE_CROP (image folders) or RESIZE (the resident datasets)
    size: int  # the side the file is brought to: the crop, or the dataset's own image side
    resize: int  # CENTRE_CROP: the shorter side before the crop
    pad: int  # zero padding on each side after the resize (Fashion-MNIST: 28 -> 32)
    channels: int  # 1: grey, 3: RGB
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocess:
        return cls(str(values["kind"]), int(values["size"]), int(values["resize"]), int(values["pad"]),
                   int(values["channels"]), tuple(values["mean"]), tuple(values["std"]))

    def __call__(self, path: str | Path) -> torch.Tensor:
        """The normalised [C, H, W] input of the image file at ``path``; a file that does not decode is BadInput."""
        try:
            with Image.open(path) as image:
                if self.kind == CENTRE_CROP:
                    pixels = EvalTransform(self.size, self.resize)(image, 0)
                else:
                    mode = "L" if self.channels == 1 else "RGB"
                    picture = image.convert(mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
                    array = np.array(picture, dtype=np.uint8)
                    pixels = to_tensor(array[:, :, None] if array.ndim == 2 else array)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise BadInput(f"--images: {clip(str(path), 200)!r} is not an image this can read "
                           f"({type(err).__name__}: {clip(str(err), 120)}); pass .jpg, .png or other files "
                           "Pillow decodes") from None
        pixels = pixels.float()
        if self.pad:
            pixels = torch.nn.functional.pad(pixels, (self.pad,) * 4)
        device = torch.device("cpu")
        mean, std = channel_constants(self.mean, device), channel_constants(self.std, device)
        return normalise(pixels[None], mean, std)[0]


def evaluation_preprocess(data: DataConfig, spec: DatasetSpec) -> Preprocess:
    """How a run's evaluation of ``data`` prepares an image; segmentation has no per-image class to predict."""
    if data.name == "image_folder":
        return Preprocess(CENTRE_CROP, spec.image_size, data.eval_resize, 0, spec.channels, spec.mean, spec.std)
    side = FASHION_MNIST_SIDE if spec.name == "fashion_mnist" else spec.image_size
    return Preprocess(RESIZE, side, side, (spec.image_size - side) // 2, spec.channels, spec.mean, spec.std)
