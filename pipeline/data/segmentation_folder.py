"""Segmentation data on disk: each image paired with its label map, scanned into file lists.

Two layouts, splits train and val:

- cityscapes (the official one): ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``, the label maps cityscapesScripts'
  ``csCreateTrainIdLabelImgs`` makes (the download has only the labelIds maps and polygons);
- segmentation_folder: ``<split>/images/<stem>.jpg|.jpeg|.png`` with ``<split>/labels/<stem>.png``.

Every image needs its label map and every label map its image: a pair missing a half is an
error, not a file to skip, since a silently smaller split changes what the run measures. Hidden
files and other names are left alone. The scan is the only place that walks these folders; the
loader (pipeline/data/segmentation.py) reads its lists, and the decoding workers check what is in
the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.data.image_folder import SPLITS, few_names, is_image_file
from pipeline.data.specs import CITYSCAPES_LAYOUT, SEGMENTATION_LAYOUT
from pipeline.errors import BadInput

CITYSCAPES_IMAGE = "_leftImg8bit.png"
CITYSCAPES_LABEL = "_gtFine_labelTrainIds.png"
# What the gtFine download holds before the trainId maps are made from it.
CITYSCAPES_SOURCES = ("_gtFine_labelIds.png", "_gtFine_polygons.json")
MAKE_TRAIN_IDS = "pip install cityscapesscripts, then CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs"
LABEL_EXTENSION = ".png"  # lossless: a JPEG would blur class ids at every edge


class PairSplit(NamedTuple):
    # Paths as numpy bytes arrays, for the reason image_folder.FolderSplit gives.
    images: np.ndarray
    labels: np.ndarray  # the label map of each image


class PairFolder(NamedTuple):
    root: Path
    train: PairSplit
    val: PairSplit


def scan_pairs(name: str, root: Path) -> PairFolder:
    """Both splits of the segmentation dataset ``name`` (cityscapes or segmentation_folder) at ``root``."""
    layout = CITYSCAPES_LAYOUT if name == "cityscapes" else SEGMENTATION_LAYOUT
    if not root.is_dir():
        raise BadInput(f"data.root = {str(root)!r} is not a folder; set data.root to a folder holding {layout}")
    scan_split = _cityscapes_split if name == "cityscapes" else _folder_split
    return PairFolder(root, *(scan_split(root, split) for split in SPLITS))


def _cityscapes_split(root: Path, split: str) -> PairSplit:
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder, download in ((image_dir, "leftImg8bit_trainvaltest.zip"), (label_dir, "gtFine_trainvaltest.zip")):
        if not folder.is_dir():
            raise BadInput(f"{folder} does not exist: cityscapes at {root} holds {CITYSCAPES_LAYOUT}; unzip "
                           f"{download} into {root}")
    images = _city_files(image_dir, CITYSCAPES_IMAGE)
    labels = _city_files(label_dir, CITYSCAPES_LABEL)
    if not images:
        raise BadInput(f"{image_dir} holds no <city>/*{CITYSCAPES_IMAGE} images; unzip leftImg8bit_trainvaltest.zip "
                       f"into {root}")

    def no_label(key: str) -> str:
        wanted = label_dir / f"{key}{CITYSCAPES_LABEL}"
        if any((label_dir / f"{key}{source}").is_file() for source in CITYSCAPES_SOURCES):
            return (f"{wanted} does not exist: the trainId label maps are made from the gtFine download; run "
                    f"{MAKE_TRAIN_IDS.format(root=root)}")
        return f"{images[key]} has no label map {wanted}; unzip gtFine_trainvaltest.zip into {root}"

    def no_image(key: str) -> str:
        return (f"{labels[key]} has no image {image_dir / (key + CITYSCAPES_IMAGE)}; unzip "
                f"leftImg8bit_trainvaltest.zip into {root} or delete the label map")

    return _paired(images, labels, no_label, no_image)


def _city_files(folder: Path, suffix: str) -> dict[str, Path]:
    """``<city>/<name>`` -> the file ``folder/<city>/<name><suffix>``, for every city folder."""
    found = {}
    for city in sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")):
        for entry in os.scandir(folder / city):
            if entry.name.endswith(suffix) and not entry.name.startswith(".") and entry.is_file():
                found[f"{city}/{entry.name[: -len(suffix)]}"] = Path(entry.path)
    return found


def _folder_split(root: Path, split: str) -> PairSplit:
    image_dir, label_dir = root / split / "images", root / split / "labels"
    for folder, what in ((image_dir, "images"), (label_dir, "label maps")):
        if not folder.is_dir():
            raise BadInput(f"{folder} does not exist: a segmentation folder holds {SEGMENTATION_LAYOUT}; put the "
                           f"{split} {what} there")
    images: dict[str, Path] = {}
    for entry in sorted(os.scandir(image_dir), key=lambda entry: entry.name):
        if is_image_file(entry):
            stem = Path(entry.name).stem
            if stem in images:
                raise BadInput(f"{images[stem]} and {entry.path} share the stem {stem!r}, so the label map "
                               f"{label_dir / (stem + LABEL_EXTENSION)} would belong to both; rename or remove one")
            images[stem] = Path(entry.path)
    labels = {Path(entry.name).stem: Path(entry.path) for entry in os.scandir(label_dir)
              if entry.name.lower().endswith(LABEL_EXTENSION) and not entry.name.startswith(".") and entry.is_file()}
    if not images:
        raise BadInput(f"{image_dir} holds no .jpg, .jpeg or .png images; put the {split} images there, each with "
                       f"its label map {label_dir}/<stem>.png")

    def no_label(stem: str) -> str:
        return (f"{images[stem]} has no label map {label_dir / (stem + LABEL_EXTENSION)}; add it (a PNG of class ids, "
                "255 = ignore) or remove the image")

    def no_image(stem: str) -> str:
        return (f"{labels[stem]} has no image {image_dir}/{stem}.jpg, .jpeg or .png; add the image or delete the "
                "label map")

    return _paired(images, labels, no_label, no_image)


def _paired(images: dict[str, Path], labels: dict[str, Path], no_label: Callable[[str], str],
            no_image: Callable[[str], str]) -> PairSplit:
    """The pairs in key order; the first image without its label map (or the reverse) is an error
    that also says how many more there are."""
    for unmatched, message in ((images.keys() - labels.keys(), no_label), (labels.keys() - images.keys(), no_image)):
        if unmatched:
            first = min(unmatched)
            others = unmatched - {first}
            more = f" ({len(others)} more like it: {few_names(others)})" if others else ""
            raise BadInput(message(first) + more)
    keys = sorted(images)
    return PairSplit(np.array([os.fsencode(images[key]) for key in keys]),
                     np.array([os.fsencode(labels[key]) for key in keys]))
