"""The scans of segmentation data: both layouts paired file by file, and every way a pair is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.segmentation_folder import scan_pairs
from pipeline.errors import BadInput
from tests.data.segmentation_files import write_cityscapes, write_segmentation_folder


def names(paths) -> list[str]:
    return [Path(path.decode()).name for path in paths]


def bad(name: str, root: Path) -> str:
    with pytest.raises(BadInput) as caught:
        scan_pairs(name, root)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_segmentation_folder_pairs_each_image_with_the_label_map_of_its_stem(tmp_path: Path) -> None:
    root = write_segmentation_folder(tmp_path / "seg", train=5, val=2)
    (root / "train" / "images" / "notes.txt").write_text("not an image")
    (root / "train" / "images" / "._train_000.png").write_bytes(b"macOS metadata")
    (root / "train" / "labels" / "._train_000.png").write_bytes(b"macOS metadata")
    found = scan_pairs("segmentation_folder", root)
    assert names(found.train.images) == ["train_000.png", "train_001.png", "train_002.png", "train_003.png",
                                         "train_004.jpg"]
    assert names(found.train.labels) == [f"train_{index:03d}.png" for index in range(5)]
    assert all(Path(label.decode()).parent == root / "train" / "labels" for label in found.train.labels)
    assert names(found.val.images) == ["val_000.png", "val_001.png"]


def test_cityscapes_pairs_left_images_with_train_id_maps_across_cities(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs", train=4, val=2)
    (root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").write_bytes(b"other maps")
    found = scan_pairs("cityscapes", root)
    images, labels = names(found.train.images), names(found.train.labels)
    assert images == ["aachen_000000_000019_leftImg8bit.png", "aachen_000002_000019_leftImg8bit.png",
                      "bochum_000001_000019_leftImg8bit.png", "bochum_000003_000019_leftImg8bit.png"]
    assert labels == [image.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png") for image in images]
    assert len(found.val.images) == 2


def test_segmentation_folder_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    message = bad("segmentation_folder", tmp_path / "nowhere")
    assert "is not a folder" in message and "train/images/" in message
    root = write_segmentation_folder(tmp_path / "seg")
    (root / "train" / "labels" / "train_001.png").unlink()
    (root / "train" / "labels" / "train_002.png").unlink()
    message = bad("segmentation_folder", root)
    assert message.startswith(f"{root / 'train' / 'images' / 'train_001.png'} has no label map "
                              f"{root / 'train' / 'labels' / 'train_001.png'}; add it")
    assert "(1 more like it: train_002)" in message

    root = write_segmentation_folder(tmp_path / "orphan")
    (root / "val" / "images" / "val_001.png").unlink()
    message = bad("segmentation_folder", root)
    assert message.startswith(f"{root / 'val' / 'labels' / 'val_001.png'} has no image")
    assert "delete the label" in message

    root = write_segmentation_folder(tmp_path / "twice")
    images = root / "train" / "images"
    (images / "train_000.jpg").write_bytes((images / "train_000.png").read_bytes())
    assert "share the stem 'train_000'" in bad("segmentation_folder", root)

    root = write_segmentation_folder(tmp_path / "empty", val=0)
    message = bad("segmentation_folder", root)
    assert f"{root / 'val' / 'images'} holds no .jpg, .jpeg or .png images" in message

    root = write_segmentation_folder(tmp_path / "nolabels")
    for file in (root / "val" / "labels").iterdir():
        file.unlink()
    (root / "val" / "labels").rmdir()
    message = bad("segmentation_folder", root)
    assert message.startswith(f"{root / 'val' / 'labels'} does not exist") and "put the val label maps there" in message


def test_cityscapes_errors_and_how_to_make_the_train_id_maps(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs")
    for label in sorted((root / "gtFine" / "val").rglob("*_labelTrainIds.png")):
        label.rename(label.with_name(label.name.replace("labelTrainIds", "labelIds")))
    message = bad("cityscapes", root)
    wanted = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    assert message.startswith(f"{wanted} does not exist: the trainId label maps are made from the gtFine download")
    assert f"pip install cityscapesscripts, then CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs" in message

    root = write_cityscapes(tmp_path / "lost")
    (root / "gtFine" / "train" / "bochum" / "bochum_000001_000019_gtFine_labelTrainIds.png").unlink()
    message = bad("cityscapes", root)
    assert "bochum_000001_000019_leftImg8bit.png has no label map" in message
    assert "unzip gtFine_trainvaltest.zip" in message

    root = write_cityscapes(tmp_path / "extra")
    (root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png").unlink()
    assert "aachen_000000_000019_gtFine_labelTrainIds.png has no image" in bad("cityscapes", root)

    (tmp_path / "bare" / "leftImg8bit" / "train").mkdir(parents=True)
    message = bad("cityscapes", tmp_path / "bare")
    assert message.startswith(f"{tmp_path / 'bare' / 'gtFine' / 'train'} does not exist")
    assert "gtFine_trainvaltest.zip" in message
    (tmp_path / "bare" / "gtFine" / "train").mkdir(parents=True)
    assert "holds no <city>/*_leftImg8bit.png images" in bad("cityscapes", tmp_path / "bare")
