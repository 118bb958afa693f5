"""An image folder on disk: root/train/<class>/* and root/val/<class>/*, scanned into file lists.

The layout is ImageNet's and most users' own: one folder per class, the same class folders in
both splits, class index = position in the sorted folder names. Files are .jpg, .jpeg or .png
in any case (ImageNet's are .JPEG); anything else in a class folder, and any hidden file, is
left alone. The scan is the only place that walks the folders; the loader reads its lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.errors import BadInput

FOLDER_LAYOUT = "train/<class>/ and val/<class>/ folders of .jpg, .jpeg or .png images (ImageNet's layout)"

EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val")


class FolderSplit(NamedTuple):
    # Paths as one numpy bytes array, not a list of str: forked decoding workers read them without
    # touching per-object reference counts, so the pages stay shared (1.28 M ImageNet paths).
    files: np.ndarray
    labels: np.ndarray  # int64, the class index of each file


class ImageFolder(NamedTuple):
    root: Path
    classes: tuple[str, ...]
    train: FolderSplit
    val: FolderSplit


def class_names(root: Path) -> tuple[str, ...]:
    """The sorted class folders, once both splits exist and hold the same ones."""
    if not root.is_dir():
        raise BadInput(f"data.root = {str(root)!r} is not a folder; set data.root to a folder holding {FOLDER_LAYOUT}")
    found = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise BadInput(f"{folder} does not exist: an image folder holds {FOLDER_LAYOUT}; put the "
                           f"{'training' if split == 'train' else 'evaluation'} images under {folder}/<class>/")
        found[split] = sorted(entry.name for entry in os.scandir(folder)
                              if entry.is_dir() and not entry.name.startswith("."))
        if not found[split]:
            raise BadInput(f"{folder} holds no class folders; put each class's images in its own folder, "
                           f"{folder}/<class>/")
    train, val = set(found["train"]), set(found["val"])
    if train != val:
        raise BadInput(f"{root / 'train'} and {root / 'val'} hold different classes (only in train: "
                       f"{few_names(train - val)}; only in val: {few_names(val - train)}); give both splits the same "
                       "class folders")
    return tuple(found["train"])


def scan(root: Path) -> ImageFolder:
    """Every image of both splits; a class folder without images is an error (its class could
    never be learned or scored)."""
    classes = class_names(root)
    splits = []
    for split in SPLITS:
        files: list[bytes] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            folder = root / split / name
            images = sorted(entry.name for entry in os.scandir(folder) if is_image_file(entry))
            if not images:
                raise BadInput(f"{folder} holds no .jpg, .jpeg or .png images; add its images or remove the "
                               f"class folder from both {root / 'train'} and {root / 'val'}")
            files += [os.fsencode(folder / image) for image in images]
            labels += [label] * len(images)
        splits.append(FolderSplit(np.array(files), np.array(labels, dtype=np.int64)))
    return ImageFolder(root, classes, *splits)


def is_image_file(entry: os.DirEntry[str]) -> bool:
    """An image file by its name; hidden files are not (macOS copies leave "._NAME.jpg" metadata)."""
    return not entry.name.startswith(".") and entry.name.lower().endswith(EXTENSIONS) and entry.is_file()


def few_names(names: set[str], shown: int = 5) -> str:
    listed = sorted(names)
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return (", ".join(listed[:shown]) or "none") + more
