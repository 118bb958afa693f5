"""Image folders: the scan and its errors, the streaming loader's order, parts and transforms.

Every folder is written on the fly: real JPEG and PNG files of 40 x 32 pixels in 3 classes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from pipeline.config.loading import load_config
from pipeline.data.contract import WHOLE, Part
from pipeline.data.image_folder import scan
from pipeline.data.loader import make_loaders
from pipeline.data.specs import IMAGENET_MEAN, IMAGENET_STD, dataset_spec
from pipeline.data.streaming import FolderLoader, ignore_stop_signals, make_folder_loaders, stop_signals_blocked
from pipeline.data.throughput import main as throughput_main
from pipeline.data.throughput import write_folder
from pipeline.data.transforms import EvalTransform, TrainTransform, random_crop
from pipeline.errors import BadInput

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
CLASSES = 3


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """20 training images (every third a PNG) and 3 validation images in 3 classes."""
    root = tmp_path / "images"
    write_folder(root, 20, CLASSES, size=(40, 32), png_every=3)
    return root


def folder_config(root: Path, *overrides: str):
    return load_config(None, ["data.name=image_folder", f"data.root='{root}'", "data.image_size=16",
                              "data.eval_resize=20", "data.batch_size=6", "data.workers=0", "run.device=cpu",
                              "model.arch=resnet50", *overrides])  # resnet50: a network of every model family


def loaders(root: Path, *overrides: str) -> tuple[FolderLoader, FolderLoader]:
    config = folder_config(root, *overrides)
    return make_folder_loaders(config.data, config.model, config.run.seed, CPU)


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def epoch(loader: FolderLoader, number: int, start: int = 0, part: Part = WHOLE) -> Batches:
    return list(loader.batches(number, start, part))


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


# ---- the scan ---------------------------------------------------------------------------------------


def test_scan_finds_sorted_classes_and_every_image(folder: Path) -> None:
    (folder / "train" / "class_001" / "notes.txt").write_text("not an image")
    (folder / "train" / "class_001" / "._upper.JPEG").write_bytes(b"macOS metadata, not an image")
    Image.new("RGB", (40, 32)).save(folder / "train" / "class_001" / "upper.JPEG")
    found = scan(folder)
    assert found.classes == ("class_000", "class_001", "class_002")
    assert len(found.train.files) == 21 and len(found.val.files) == CLASSES
    names = [Path(file.decode()).name for file in found.train.files]
    assert "upper.JPEG" in names and "notes.txt" not in names and "._upper.JPEG" not in names
    assert sum(name.endswith(".png") for name in names) == 6
    # labels follow the class folder each file sits in
    for file, label in zip(found.train.files, found.train.labels):
        assert Path(file.decode()).parent.name == found.classes[label]
    config = folder_config(folder)
    spec = dataset_spec(config.data, config.model)
    assert (spec.classes, spec.channels, spec.image_size, spec.mean, spec.std) == (3, 3, 16, IMAGENET_MEAN,
                                                                                     IMAGENET_STD)


def bad(root: Path) -> str:
    with pytest.raises(BadInput) as caught:
        scan(root)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_scan_errors_name_the_problem_and_the_fix(folder: Path, tmp_path: Path) -> None:
    assert "is not a folder" in bad(tmp_path / "nowhere") and "train/<class>/" in bad(tmp_path / "nowhere")
    empty = folder / "train" / "class_001"
    for file in empty.iterdir():
        file.unlink()
    message = bad(folder)
    assert str(empty) in message and "holds no .jpg, .jpeg or .png images" in message
    (folder / "train" / "class_003").mkdir()
    message = bad(folder)
    assert "only in train: class_003" in message and "same class folders" in message
    (tmp_path / "bare" / "train").mkdir(parents=True)
    assert "holds no class folders" in bad(tmp_path / "bare")


def test_a_missing_split_is_named(folder: Path) -> None:
    for file in sorted((folder / "val").rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    (folder / "val").rmdir()
    message = bad(folder)
    assert f"{folder / 'val'} does not exist" in message and "evaluation images" in message


def test_model_classes_stand_for_the_folder_until_its_scan_checks_them(folder: Path, tmp_path: Path) -> None:
    elsewhere = folder_config(tmp_path / "not-here", "model.classes=5")
    # nothing read: a config of the published rows checks offline
    assert dataset_spec(elsewhere.data, elsewhere.model).classes == 5
    with pytest.raises(BadInput, match=r"^model.classes = 5 but image_folder has 3 classes; set model.classes = 3"):
        loaders(folder, "model.classes=5")
    assert loaders(folder, "model.classes=3")[0].spec.classes == 3


def test_the_default_root_and_sizes_that_do_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.name=image_folder", "model.arch=resnet50"])  # loads without the folder
    with pytest.raises(BadInput, match=r"^data.root = 'data/imagenet' is not a folder; set data.root to a folder"):
        dataset_spec(config.data, config.model)
    with pytest.raises(BadInput, match="data.eval_resize = 100 must be >= data.image_size"):
        load_config(None, ["data.name=image_folder", "data.root=x", "data.eval_resize=100"])
    with pytest.raises(BadInput, match="model.in_channels = 1"):
        load_config(None, ["data.name=image_folder", "data.root=x", "model.arch=resnet50", "model.in_channels=1"])


def test_decoding_workers_outlive_a_stop_signal(folder: Path) -> None:
    """torchrun and Slurm signal every process: the stage that finishes its step must keep its workers."""
    train, _ = loaders(folder, "data.workers=2")
    batches = train.batches(1)
    next(batches)
    workers = psutil.Process().children()
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    assert len(list(batches)) == len(train) - 1  # the rest of the epoch decodes as if nothing happened


def _starting_worker(started: multiprocessing.synchronize.Event) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler this test process may have: SIGTERM ends it
    started.set()
    time.sleep(0.5)  # a worker still starting: its init function has not run yet
    ignore_stop_signals(0)


@pytest.mark.parametrize("blocked", [True, False])
def test_a_stop_signal_to_a_worker_still_starting_waits_for_its_init(blocked: bool) -> None:
    """Workers start with the stop signals blocked (as the loader starts them), so a signal that comes before
    ignore_stop_signals runs is dropped then; without the block it ends the worker (the race at an epoch's start)."""
    context = multiprocessing.get_context("fork")  # how the DataLoader starts its workers here
    started = context.Event()
    with stop_signals_blocked() if blocked else contextlib.nullcontext():
        worker = context.Process(target=_starting_worker, args=(started,))
        worker.start()
    assert started.wait(30)
    os.kill(worker.pid, signal.SIGTERM)  # type: ignore[arg-type]
    worker.join(30)
    assert worker.exitcode == (0 if blocked else -signal.SIGTERM)


# ---- order, parts, resume -------------------------------------------------------------------------


def test_order_is_a_function_of_seed_and_epoch_whatever_the_workers(folder: Path) -> None:
    inline, _ = loaders(folder)
    parallel, _ = loaders(folder, "data.workers=2")
    assert len(inline) == 4 and inline.batch_samples(2) == 6 and inline.batch_samples(3) == 2
    first = epoch(inline, 1)
    assert same(first, epoch(parallel, 1))
    assert same(epoch(inline, 2), epoch(parallel, 2))
    assert not same(first, epoch(inline, 2))
    reseeded, _ = loaders(folder, "run.seed=7")
    assert not same(first, epoch(reseeded, 1))
    # the epoch order is the resident loader's rule: the (seed, epoch) permutation, in batches
    order = torch.randperm(20, generator=torch.Generator().manual_seed(1))  # mix_seed(0, 1) == 1
    labels = torch.cat([labels for _, labels in first])
    assert torch.equal(labels, torch.from_numpy(inline.files.split.labels)[order])


def test_resume_at_a_batch_equals_skipping(folder: Path) -> None:
    train, _ = loaders(folder)
    assert same(epoch(train, 2, start=1), epoch(train, 2)[1:])


def test_parts_are_the_slices_of_the_global_batch(folder: Path) -> None:
    train, _ = loaders(folder)
    whole = epoch(train, 1)
    parts = [epoch(train, 1, part=Part(replica, 2)) for replica in range(2)]
    for index, (images, labels) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][index][0], parts[1][index][0]]), images)
        assert torch.equal(torch.cat([parts[0][index][1], parts[1][index][1]]), labels)
    # a part decodes its own files only (the transform runs in this process with data.workers = 0)
    decoded = []
    transform = train.files.transform
    train.files.transform = lambda image, seed: decoded.append(seed) or transform(image, seed)
    assert sum(len(labels) for _, labels in epoch(train, 1, part=Part(1, 2))) == len(decoded) == 10
    _, val = loaders(folder)  # 3 images in one batch: the fourth of 4 parts is empty, shaped as the rest
    (images, labels), = epoch(val, 0, part=Part(3, 4))
    assert images.shape == (0, 3, 16, 16) and labels.shape == (0,)


def test_batches_are_normalised_crops_of_the_image_size(folder: Path) -> None:
    train, val = loaders(folder)
    images, labels = next(iter(train.batches(1)))
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.int64
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (images * std + mean) * 255
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert same(epoch(val, 0), epoch(val, 0)) and sum(len(labels) for _, labels in epoch(val, 0)) == CLASSES


def test_make_loaders_streams_image_folders_and_clamps_the_batch(folder: Path) -> None:
    config = folder_config(folder, "data.batch_size=64")
    train, val = make_loaders(config.data, config.model, config.run.seed, CPU)
    assert isinstance(train, FolderLoader) and train.batch_size == 20 and val.batch_size == CLASSES
    assert train.spec.classes == CLASSES and len(train) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gpu_batches_come_through_pinned_memory_and_equal_cpu_batches(folder: Path) -> None:
    on_cpu = epoch(loaders(folder)[0], 1)
    config = folder_config(folder, "data.workers=2", "run.device=cuda")
    gpu = make_folder_loaders(config.data, config.model, config.run.seed, torch.device("cuda"))[0]
    on_gpu = epoch(gpu, 1)
    assert len(on_gpu) == len(on_cpu)
    for (images, labels), (gpu_images, gpu_labels) in zip(on_cpu, on_gpu):
        assert gpu_images.is_cuda and gpu_labels.is_cuda
        assert torch.equal(labels, gpu_labels.cpu()) and torch.allclose(images, gpu_images.cpu(), atol=1e-6)


# ---- transforms ---------------------------------------------------------------------------------------


def test_eval_transform_is_the_centre_crop_of_the_resized_image(tmp_path: Path) -> None:
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = 255  # left half white, right half black
    path = tmp_path / "half.png"
    Image.fromarray(pixels).save(path)
    transform = EvalTransform(size=20, resize=40)
    with Image.open(path) as image:
        out = transform(image, seed=1)
    with Image.open(path) as image:
        again = transform(image, seed=2)
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8 and torch.equal(out, again)
    # resize 40x60 -> 40x60 (shorter side 40), crop the central 20x20: columns 20..40 of 60, half white
    assert out[:, :, :9].min() == 255 and out[:, :, 11:].max() == 0


def test_train_transform_depends_on_the_seed_alone(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
    transform = TrainTransform(size=24)

    def crop(seed: int) -> torch.Tensor:
        with Image.open(path) as image:
            return transform(image, seed)

    assert crop(5).shape == (3, 24, 24) and torch.equal(crop(5), crop(5))
    assert not torch.equal(crop(5), crop(6))


def test_random_crop_stays_inside_with_the_allowed_area_and_shape() -> None:
    import random

    draws = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_crop(64, 48, draws, (0.08, 1.0), (3 / 4, 4 / 3))
        assert left >= 0 and left + w <= 64 and top >= 0 and top + h <= 48
        # the drawn area and shape, up to the rounding of w and h to whole pixels
        assert 0.08 * 64 * 48 - (w + h) <= w * h <= 64 * 48 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # an image far wider than 4:3 falls back to the central crop of ratio 4:3 when no draw fits
    assert random_crop(400, 10, random.Random(0), (0.99, 1.0), (3 / 4, 4 / 3)) == (193, 0, 13, 10)


# ---- a damaged file ---------------------------------------------------------------------------------


def test_a_corrupt_image_stops_the_loader_with_its_path(folder: Path) -> None:
    victim = sorted((folder / "train" / "class_002").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated file
    train, _ = loaders(folder, "data.workers=2")
    with pytest.raises(BadInput) as caught:
        epoch(train, 1)
    message = str(caught.value)
    assert message.startswith(str(victim)) and "\n" not in message and "replace it" in message


@pytest.mark.slow
def test_a_corrupt_image_ends_the_cli_with_one_line_and_exit_2(folder: Path, tmp_path: Path) -> None:
    victim = sorted((folder / "train" / "class_000").iterdir())[1]
    victim.write_bytes(b"this is not an image")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--set", "data.name=image_folder", "--set", f"data.root='{folder}'",
         "--set", "data.image_size=16", "--set", "data.eval_resize=16", "--set", "model.arch=resnet8",
         "--set", "model.family=cifar",
         "--set", "data.batch_size=20", "--set", "data.workers=1", "--set", "run.device=cpu",
         "--set", f"run.out_dir='{tmp_path / 'run'}'", "--set", "train.schedule=constant", "--set", "train.epochs=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(victim) in lines[0] and "Traceback" not in done.stderr


def test_throughput_cli_makes_a_folder_and_reports_a_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "made"
    assert throughput_main(["--root", str(root), "--make", "12", "--classes", "3", "--workers", "0", "--batch", "4",
                            "--image-size", "32", "--batches", "2"]) == 0
    assert len(scan(root).train.files) == 12
    out = capsys.readouterr().out
    assert "images/s: 8 training images" in out
    assert throughput_main(["--root", str(root), "--make", "2", "--classes", "3"]) == 2
