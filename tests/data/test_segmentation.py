"""The segmentation loader: config and spec, the batch rule, padding, parts and the label checks.

Every dataset is written on the fly by tests/data/segmentation_files.py: 24 x 40 images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.loading import load_config
from pipeline.config.schema import Config
from pipeline.config.validation import ineffective_keys
from pipeline.data.contract import WHOLE, Part, channel_constants, normalise
from pipeline.data.loader import make_loaders
from pipeline.data.segmentation import collate_pairs
from pipeline.data.specs import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, dataset_spec
from pipeline.data.streaming import FolderLoader
from pipeline.data.transforms import to_tensor
from pipeline.errors import BadInput
from tests.data.segmentation_files import write_cityscapes, write_segmentation_folder

CPU = torch.device("cpu")
CLASSES = 3
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def seg_config(root: Path, *overrides: str, name: str = "segmentation_folder") -> Config:
    classes = [f"model.classes={CLASSES}"] if name == "segmentation_folder" else []
    return load_config(None, [f"data.name={name}", f"data.root='{root}'", *classes, "data.crop=[16, 32]",
                              "data.batch_size=2", "data.workers=0", "run.device=cpu", "model.arch=deeplabv3_resnet50",
                              *overrides])


def loaders(root: Path, *overrides: str, name: str = "segmentation_folder") -> tuple[FolderLoader, FolderLoader]:
    config = seg_config(root, *overrides, name=name)
    train, val = make_loaders(config.data, config.model, config.run.seed, CPU)
    assert isinstance(train, FolderLoader) and isinstance(val, FolderLoader)
    return train, val


def epoch(loader: FolderLoader, number: int, start: int = 0, part: Part = WHOLE) -> Batches:
    return list(loader.batches(number, start, part))


def same(a: Batches, b: Batches) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def failure(loader: FolderLoader) -> str:
    with pytest.raises(BadInput) as caught:
        epoch(loader, 0)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """6 training pairs and 3 validation pairs of 3 classes; the val images are of two sizes."""
    return write_segmentation_folder(tmp_path / "seg", CLASSES, train=6, val=3,
                                     val_sizes=((24, 40), (20, 30), (24, 40)))


# ---- config and spec ------------------------------------------------------------------------------


def test_the_spec_is_dense_at_the_crop_with_imagenet_statistics(folder: Path, tmp_path: Path) -> None:
    config = seg_config(folder)
    spec = dataset_spec(config.data, config.model)
    assert (spec.name, spec.dense, spec.classes, spec.channels) == ("segmentation_folder", True, CLASSES, 3)
    assert (spec.image_size, spec.image_width) == (16, 32)
    # MMSegmentation's mean and std on 0..255
    assert np.allclose(np.array(spec.mean) * 255, (123.675, 116.28, 103.53))
    assert np.allclose(np.array(spec.std) * 255, (58.395, 57.12, 57.375))
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    city_config = seg_config(tmp_path / "not-read", name="cityscapes")
    city = dataset_spec(city_config.data, city_config.model)  # nothing read to know it
    assert (city.classes, city.dense, city.default_root) == (19, True, "data/cityscapes")
    city_default = load_config(None, ["data.name=cityscapes", "model.arch=deeplabv3_resnet50"])
    assert dataset_spec(city_default.data, city_default.model).image_size == 512  # the default crop: 512 x 1024
    synthetic = load_config(None, ["data.name=synthetic", "model.arch=resnet8"])
    assert not dataset_spec(synthetic.data, synthetic.model).dense


def test_classes_and_crop_are_checked_at_load(folder: Path) -> None:
    with pytest.raises(BadInput, match=r"^data.name = 'segmentation_folder' needs model.classes: its label maps do "
                                       r"not say how many classes there are; set model.classes = N"):
        load_config(None, ["data.name=segmentation_folder", f"data.root='{folder}'", "model.arch=deeplabv3_resnet50"])
    with pytest.raises(BadInput, match=r"^data.name = 'cityscapes' has per-pixel labels, but model.arch = 'resnet8' "
                                       r"is a cifar classifier .*use model.arch = 'deeplabv3_resnet50'"):
        load_config(None, ["data.name=cityscapes", "model.family=cifar", "model.arch=resnet8"])
    with pytest.raises(BadInput, match=r"^model.classes = 20 but cityscapes has 19 classes"):
        seg_config(folder, "model.classes=20", name="cityscapes")
    for crop in ("[16]", "[16, 7]", "[4, 32]", "[16, 32, 3]"):
        with pytest.raises(BadInput, match=r"^data.crop = .* must be \[height, width\], two whole numbers >= 8"):
            seg_config(folder, f"data.crop={crop}")
    with pytest.raises(BadInput, match=r"^data.crop = 16.5 has the wrong type; expected an integer"):
        seg_config(folder, "data.crop=[16.5, 32]")


def test_keys_that_do_nothing_for_segmentation_are_named(folder: Path) -> None:
    notes = ineffective_keys(seg_config(folder, "data.workers=3", "data.image_size=64", "data.download=true"))
    assert any(note.startswith("data.image_size has no effect") for note in notes)
    assert any(note.startswith("data.download has no effect") for note in notes)
    assert not any(note.startswith(("data.workers", "data.crop")) for note in notes)
    others = ineffective_keys(load_config(None, ["data.name=synthetic", "model.arch=resnet8", "data.crop=[8, 8]",
                                                 "data.workers=2"]))
    assert any(note.startswith("data.crop has no effect") for note in others)
    assert any(note.startswith("data.workers has no effect") for note in others)


# ---- batches --------------------------------------------------------------------------------------


def test_batches_follow_the_seed_and_epoch_whatever_the_workers(folder: Path) -> None:
    inline, val = loaders(folder)
    parallel, parallel_val = loaders(folder, "data.workers=2")
    first = epoch(inline, 1)
    assert len(first) == 3
    for images, labels in first:
        assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 32)
        assert labels.dtype == torch.int64 and labels.shape == (2, 16, 32)
        values = set(labels.unique().tolist())
        assert values <= {0, 1, 2, IGNORE_INDEX} and values & {0, 1, 2}
    assert same(first, epoch(parallel, 1))
    assert same(epoch(val, 0), epoch(parallel_val, 0))
    assert not same(first, epoch(inline, 2))
    assert not same(first, epoch(loaders(folder, "run.seed=5")[0], 1))
    # a resumed epoch is the rest of the same epoch
    assert same(epoch(inline, 1, start=1), first[1:])


def test_parts_are_slices_of_the_whole_batch(folder: Path, tmp_path: Path) -> None:
    """Training crops, and whole images of different sizes: a part pads to its whole batch's
    largest image, not its own."""
    mixed = write_segmentation_folder(tmp_path / "mixed", CLASSES, train=4, val=3,
                                      val_sizes=((20, 30), (20, 30), (24, 40)))
    train, _ = loaders(folder, "data.batch_size=4")
    _, val = loaders(mixed, "data.batch_size=3")
    for loader, number in ((train, 0), (val, 0)):
        whole = epoch(loader, number)
        parts = [epoch(loader, number, part=Part(replica, 2)) for replica in range(2)]
        for index, (images, labels) in enumerate(whole):
            assert torch.equal(torch.cat([part[index][0] for part in parts]), images)
            assert torch.equal(torch.cat([part[index][1] for part in parts]), labels)
    assert whole[0][0].shape == (3, 3, 24, 40) and parts[0][0][0].shape == (2, 3, 24, 40)
    # three val images: a part of the last val batch (of one) is empty, shaped as the crop
    _, val = loaders(folder, "data.batch_size=2")
    empty_images, empty_labels = epoch(val, 0, part=Part(1, 2))[-1]
    assert empty_images.shape == (0, 3, 16, 32) and empty_labels.shape == (0, 16, 32)


def test_crops_larger_than_the_rescaled_image_are_padded_with_ignore(folder: Path) -> None:
    """24 x 40 images rescaled by at most 2 are at most 48 x 80: a 64 x 96 crop always pads."""
    train, _ = loaders(folder, "data.crop=[64, 96]")
    for images, labels in epoch(train, 0):
        assert images.shape == (2, 3, 64, 96) and labels.shape == (2, 64, 96)
        assert torch.all(labels[:, 48:] == IGNORE_INDEX) and torch.all(labels[:, :, 80:] == IGNORE_INDEX)
        assert torch.all(images[..., 48:, :] == 0) and torch.all(images[..., 80:] == 0)  # 0 after normalisation
        for image, label in zip(images, labels):
            rows = int((label != IGNORE_INDEX).any(1).nonzero().max()) + 1
            assert rows >= 12 and bool((image[:, :rows] != 0).any())  # the rescaled image itself is there


def test_evaluation_batches_whole_images_padded_to_the_largest(folder: Path) -> None:
    _, val = loaders(folder, "data.batch_size=3")
    ((images, labels),) = epoch(val, 0)
    assert images.shape == (3, 3, 24, 40) and labels.shape == (3, 24, 40)
    mean, std = channel_constants(IMAGENET_MEAN, CPU), channel_constants(IMAGENET_STD, CPU)
    files = sorted((folder / "val" / "images").iterdir())
    sizes = []
    for slot, file in enumerate(files):
        with Image.open(file) as opened:
            pixels = to_tensor(opened.convert("RGB"))
        height, width = pixels.shape[1:]
        sizes.append((height, width))
        with Image.open(folder / "val" / "labels" / file.name) as opened:
            expected = torch.from_numpy(np.array(opened)).long()
        assert torch.equal(images[slot, :, :height, :width], normalise(pixels[None].float(), mean, std)[0])
        assert torch.equal(labels[slot, :height, :width], expected)
        assert torch.all(images[slot, :, height:] == 0) and torch.all(images[slot, :, :, width:] == 0)
        assert torch.all(labels[slot, height:] == IGNORE_INDEX) and torch.all(labels[slot, :, width:] == IGNORE_INDEX)
    assert sizes == [(24, 40), (20, 30), (24, 40)]  # the small one was padded


def test_collate_pads_to_the_largest_or_the_crop_and_says_which_pixels_are_real() -> None:
    small = (torch.full((3, 2, 3), 7, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.uint8), (0, 0))
    large = (torch.full((3, 4, 2), 9, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8), (0, 0))
    images, labels, failure_text, sizes = collate_pairs([small, large], crop=(3, 5), pad_to_crop=False)
    assert failure_text is None and images.shape == (2, 3, 4, 3) and labels.shape == (2, 4, 3)
    assert sizes is not None and sizes.tolist() == [[2, 3], [4, 2]]
    assert torch.all(labels[0, 2:] == IGNORE_INDEX) and torch.all(labels[1, :, 2:] == IGNORE_INDEX)
    assert torch.all(images[0, :, :2, :3] == 7) and torch.all(images[0, :, 2:] == 0)
    images, labels, _, sizes = collate_pairs([small, large], crop=(3, 5), pad_to_crop=True)
    assert images.shape == (2, 3, 4, 5)
    whole = collate_pairs([large, large], crop=(3, 2), pad_to_crop=False)
    assert whole.sizes is None  # nothing padded: nothing to blank
    on_canvas = collate_pairs([(*large[:2], (6, 2)), (*large[:2], (6, 2))], crop=(3, 2), pad_to_crop=False)
    assert on_canvas.images.shape == (2, 3, 6, 2) and on_canvas.sizes is not None  # the whole batch's shape
    broken = collate_pairs([small, "x.png cannot be read"], crop=(3, 5), pad_to_crop=True)
    assert broken.failure == "x.png cannot be read"


def test_cityscapes_streams_through_make_loaders(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs", train=4, val=2)
    train, val = loaders(root, name="cityscapes")
    assert train.spec.classes == 19 and len(train) == 2 and val.samples == 2
    labels = torch.cat([labels.flatten() for _, labels in epoch(train, 0)])
    assert set(labels.unique().tolist()) <= set(range(19)) | {IGNORE_INDEX}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gpu_batches_padding_included_equal_cpu_batches(folder: Path) -> None:
    for overrides in (("data.crop=[64, 96]",), ("data.batch_size=3",)):  # padded crops; whole images of two sizes
        cpu_train, cpu_val = loaders(folder, *overrides)
        config = seg_config(folder, "data.workers=2", "run.device=cuda", *overrides)
        gpu_train, gpu_val = make_loaders(config.data, config.model, config.run.seed, torch.device("cuda"))
        for on_cpu, on_gpu in ((epoch(cpu_train, 1), list(gpu_train.batches(1))),
                               (epoch(cpu_val, 0), list(gpu_val.batches(0)))):
            assert len(on_cpu) == len(on_gpu)
            for (images, labels), (gpu_images, gpu_labels) in zip(on_cpu, on_gpu):
                assert gpu_images.is_cuda and gpu_labels.is_cuda and gpu_labels.dtype == torch.int64
                assert torch.equal(labels, gpu_labels.cpu()) and torch.allclose(images, gpu_images.cpu(), atol=1e-6)


# ---- label checks ---------------------------------------------------------------------------------


def replace_label(folder: Path, name: str, label: Image.Image) -> Path:
    path = folder / "train" / "labels" / name
    label.save(path)
    return path


def test_a_label_map_of_the_wrong_size_is_named(folder: Path) -> None:
    path = replace_label(folder, "train_002.png", Image.new("L", (40, 20)))
    message = failure(loaders(folder, "data.augment=false")[0])
    assert message.startswith(f"{path} is 40x20 but its image {folder / 'train' / 'images' / 'train_002.png'} is "
                              "40x24; a label map holds one class id per image pixel: give both the same size")


def test_a_label_map_that_is_not_single_channel_8_bit_is_named(folder: Path) -> None:
    path = replace_label(folder, "train_001.png", Image.new("RGB", (40, 24)))
    message = failure(loaders(folder, "data.workers=2")[0])  # the failure travels from a worker process as text
    assert message.startswith(f"{path} is a mode-RGB image, not a label map; a label map is single-channel 8-bit "
                              "(Pillow mode L or P)")
    replace_label(folder, "train_001.png", Image.new("I;16", (40, 24)))
    assert "is a mode-I;16 image, not a label map" in failure(loaders(folder)[0])


def test_label_values_outside_the_classes_are_listed(folder: Path, tmp_path: Path) -> None:
    values = np.zeros((24, 40), dtype=np.uint8)
    values[0, :8] = [3, 4, 5, 6, 7, 8, 9, 254]
    values[1, :2] = [IGNORE_INDEX, 2]
    path = replace_label(folder, "train_000.png", Image.fromarray(values))
    message = failure(loaders(folder)[0])
    assert message.startswith(f"{path} holds label values 3, 4, 5, 6, 7 ... outside the class ids 0..2 (255 = ignore); "
                              "set model.classes to the number of classes (it is 3)")
    assert failure(loaders(folder, "model.classes=9")[0]).startswith(f"{path} holds label values 9, 254 outside")
    # a palette map's indices are its class ids, whatever its colours
    palette = Image.fromarray(np.full((24, 40), 2, dtype=np.uint8)).convert("P")
    palette.putpalette([255, 0, 0] * 256)
    replace_label(folder, "train_000.png", palette)
    assert len(epoch(loaders(folder)[0], 0)) == 3

    root = write_cityscapes(tmp_path / "cs")
    label = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((24, 40), 26, dtype=np.uint8)).save(label)
    message = failure(loaders(root, name="cityscapes")[0])
    assert message.startswith(f"{label} holds label values 26 outside the class ids 0..18 (255 = ignore); cityscapes "
                              "trainIds run 0..18 (a labelIds map holds up to 33)")
    assert "csCreateTrainIdLabelImgs" in message


def test_an_unreadable_label_map_is_named(folder: Path) -> None:
    path = folder / "val" / "labels" / "val_000.png"
    path.write_bytes(b"not a png")
    message = failure(loaders(folder)[1])
    assert message.startswith(f"{path} cannot be read as an image (UnidentifiedImageError")
