"""What each dataset is: shape, classes, normalisation and augmentation (docs/reference.md)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config
from pipeline.errors import BadInput


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    classes: int
    image_size: int  # side of the square image the network sees (after any fixed padding)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int  # random-crop padding when augmenting
    pad_mode: str  # "reflect" or "constant" (zeros)
    flip: bool
    default_root: str
    how_to_get: str


_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
_TORCHVISION_HINT = "set data.download = true (needs torchvision and a network) or copy the files there"

SPECS = {
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", 1, 10, 32, (0.2860,), (0.3530,), 4, "constant", True,
        "/usr/share/datasets/fashion-mnist",
        "install Debian's package: apt-get install dataset-fashion-mnist (or set data.root to a folder with the "
        "IDX files)",
    ),
    "cifar10": DatasetSpec(
        "cifar10", 3, 10, 32, _CIFAR_MEAN, _CIFAR_STD, 4, "reflect", True, "data/cifar10", _TORCHVISION_HINT,
    ),
    "cifar100": DatasetSpec(
        "cifar100", 3, 100, 32, _CIFAR_MEAN, _CIFAR_STD, 4, "reflect", True, "data/cifar100", _TORCHVISION_HINT,
    ),
    "svhn": DatasetSpec(
        "svhn", 3, 10, 32, (0.5,) * 3, (0.5,) * 3, 2, "constant", False, "data/svhn", _TORCHVISION_HINT,
    ),
    "stl10": DatasetSpec(
        "stl10", 3, 10, 96, (0.5,) * 3, (0.5,) * 3, 4, "constant", True, "data/stl10", _TORCHVISION_HINT,
    ),
    # Placeholder until the streaming image-folder loader lands: ImageNet's shape and normalisation.
    "image_folder": DatasetSpec(
        "image_folder", 3, 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, "constant", True,
        "data/imagenet", "set data.root to a folder with train/<class>/ and val/<class>/ images",
    ),
    # Deterministic class-dependent random images: learnable, tiny, needs no files (tests).
    "synthetic": DatasetSpec(
        "synthetic", 3, 10, 32, (0.5,) * 3, (0.25,) * 3, 4, "constant", True, "", "",
    ),
}


def dataset_spec(config: Config) -> DatasetSpec:
    """The spec of config.data.name, with the synthetic set shaped by config.model."""
    spec = SPECS[config.data.name]
    model = config.model
    if spec.name == "synthetic":
        channels = model.in_channels or spec.channels
        return DatasetSpec(
            spec.name, channels, model.classes or spec.classes, spec.image_size,
            spec.mean[:1] * channels, spec.std[:1] * channels, spec.crop_pad, spec.pad_mode, spec.flip, "", "",
        )
    if model.in_channels not in (0, spec.channels):
        raise BadInput(
            f"model.in_channels = {model.in_channels} but {spec.name} images have {spec.channels} "
            f"channel(s); set model.in_channels = {spec.channels} or leave it out"
        )
    if model.classes not in (0, spec.classes):
        raise BadInput(
            f"model.classes = {model.classes} but {spec.name} has {spec.classes} classes; "
            f"set model.classes = {spec.classes} or leave it out"
        )
    return spec
