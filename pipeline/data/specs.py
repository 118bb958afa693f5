"""What each dataset is: shape, classes, normalisation and augmentation (docs/reference.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.image_folder import FOLDER_LAYOUT, class_names
from pipeline.errors import BadInput
from pipeline.model.arch import SEGMENTATION_DATASETS

if TYPE_CHECKING:  # the schema reads a dataset's spec from here
    from pipeline.config.schema import DataConfig, ModelConfig


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    classes: int
    image_size: int  # side of the square image the network sees (after any fixed padding); dense: crop height
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int  # random-crop padding when augmenting
    pad_mode: str  # "reflect" or "constant" (zeros)
    flip: bool
    default_root: str
    how_to_get: str
    dense: bool = False  # labels are per-pixel class maps (segmentation), IGNORE_INDEX where unlabelled
    image_width: int = 0  # 0: square images of image_size; else image_size is the height, this the width

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of a training image as the network sees it."""
        return self.image_size, self.image_width or self.image_size

    def refuse_segmentation(self, tool: str, instead: str) -> None:
        """A tool for classification networks refuses this data set, in one line, where it is segmentation.

        ``tool`` says what the tool does to them ("pipeline.classic_pp times"), ``instead`` what to do.
        """
        if self.dense:
            raise BadInput(f"{tool} classification networks, and {self.name} is segmentation; {instead}")


# The label of a pixel that no loss or metric counts (MMSegmentation's and Cityscapes' convention).
IGNORE_INDEX = 255

_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
# The ImageNet statistics every torchvision-style ImageNet network is trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_DEFAULT_ROOT = "data/imagenet"
CITYSCAPES_CLASSES = 19  # the trainIds 0..18 of cityscapesScripts' labels.py
CITYSCAPES_LAYOUT = ("leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/"
                     "*_gtFine_labelTrainIds.png for the splits train and val (the official layout)")
SEGMENTATION_LAYOUT = ("train/images/ and val/images/ (<stem>.jpg, .jpeg or .png) with train/labels/ and val/labels/ "
                       "(<stem>.png label maps: class ids, 255 = ignore)")
SEGMENTATION_DEFAULT_ROOTS = {"cityscapes": "data/cityscapes", "segmentation_folder": "data/segmentation"}
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
    # Deterministic class-dependent random images: learnable, tiny, needs no files (tests).
    "synthetic": DatasetSpec(
        "synthetic", 3, 10, 32, (0.5,) * 3, (0.25,) * 3, 4, "constant", True, "", "",
    ),
}


def dataset_spec(data: DataConfig, model: ModelConfig) -> DatasetSpec:
    """The spec of data.name, with the synthetic set shaped by model.

    An image folder's classes are model.classes where set (the scan of a run checks the folder
    against it), else its class folders, listed from data.root. In a run, the first stage takes
    the spec from its full scan and hands it to the others.
    """
    spec = SPECS.get(data.name)
    if data.name in SEGMENTATION_DATASETS:
        return segmentation_spec(data, model)
    if spec is None:  # image_folder
        return folder_spec(data, model, model.classes or len(class_names(folder_root(data))))
    if spec.name == "synthetic":
        channels = model.in_channels or spec.channels
        return DatasetSpec(
            spec.name, channels, model.classes or spec.classes, spec.image_size,
            spec.mean[:1] * channels, spec.std[:1] * channels, spec.crop_pad, spec.pad_mode, spec.flip, "", "",
        )
    return _fitted(spec, model)


def folder_spec(data: DataConfig, model: ModelConfig, classes: int) -> DatasetSpec:
    """An image folder of ``classes`` classes, seen at data.image_size, ImageNet-normalised."""
    spec = DatasetSpec("image_folder", 3, classes, data.image_size, IMAGENET_MEAN, IMAGENET_STD, 0,
                       "constant", True, FOLDER_DEFAULT_ROOT, f"data.root must hold {FOLDER_LAYOUT}")
    return _fitted(spec, model)


def segmentation_spec(data: DataConfig, model: ModelConfig) -> DatasetSpec:
    """cityscapes or a segmentation folder: 3-channel images, class-id label maps, the training
    crop data.crop. Normalised with the ImageNet statistics, as MMSegmentation's Cityscapes
    configs (mean 123.675, 116.28, 103.53 and std 58.395, 57.12, 57.375 on 0..255 are these / 255)."""
    name = data.name
    if name == "cityscapes":
        classes, layout = CITYSCAPES_CLASSES, CITYSCAPES_LAYOUT
    else:
        classes, layout = model.classes, SEGMENTATION_LAYOUT
        if classes == 0:
            raise BadInput("data.name = 'segmentation_folder' needs model.classes: its label maps do not say how many "
                           "classes there are; set model.classes = N (label pixels 0..N-1, 255 = ignore)")
    height, width = data.crop
    spec = DatasetSpec(name, 3, classes, height, IMAGENET_MEAN, IMAGENET_STD, 0, "constant", True,
                       SEGMENTATION_DEFAULT_ROOTS[name], f"data.root must hold {layout}", dense=True, image_width=width)
    return _fitted(spec, model)


def dataset_root(data: DataConfig, default_root: str) -> Path:
    """Where a dataset's files are: data.root, or the dataset's default (data/<name> and the like)."""
    return Path(data.root or default_root).expanduser()


def folder_root(data: DataConfig) -> Path:
    """The image folder: data.root, or data/imagenet (read before its spec exists: the spec's classes
    come from its folders)."""
    return dataset_root(data, FOLDER_DEFAULT_ROOT)


def require_data_root(data: DataConfig, model: ModelConfig) -> None:
    """The dataset's folder exists: what can be said of the data without reading it (--check, and a
    run before it reads). data.download fetches a missing one; synthetic data has none."""
    name = data.name
    if name == "synthetic" or (data.download and name in SPECS):
        return
    spec = folder_spec(data, model, model.classes) if name == "image_folder" else dataset_spec(data, model)
    root = dataset_root(data, spec.default_root)
    if not root.is_dir():
        raise BadInput(f"{name}: the folder {str(root)!r} does not exist (data.root = {data.root!r}); "
                       f"{spec.how_to_get}")


def check_model_fits(data: DataConfig, model: ModelConfig) -> None:
    """What a config load checks of model against data, on every process and without reading an
    image folder (a process that does not read it may not see it; its scan checks the classes)."""
    if data.name == "image_folder":
        folder_spec(data, model, model.classes)  # its classes are unknown here: the channels are checked
    else:
        dataset_spec(data, model)


def _fitted(spec: DatasetSpec, model: ModelConfig) -> DatasetSpec:
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
