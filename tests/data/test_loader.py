"""pipeline.data.loader: seeded order and augmentation, resuming mid-epoch, batch sizes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config.loading import load_config
from pipeline.data.loader import BatchLoader, make_loaders
from pipeline.data.readers import Split
from pipeline.data.specs import SPECS, DatasetSpec, dataset_spec
from pipeline.errors import BadInput

CPU = torch.device("cpu")



def to_pixels(images, spec):
    """Undo the loader's normalisation: back to 0..255 pixel values."""
    shape = (1, spec.channels, 1, 1)
    return (images * torch.tensor(spec.std).view(shape) + torch.tensor(spec.mean).view(shape)) * 255.0

def toy_spec(pad: int = 2, pad_mode: str = "constant", flip: bool = True) -> DatasetSpec:
    return DatasetSpec("toy", 3, 10, 8, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), pad, pad_mode, flip, "", "")


def toy_split(count: int) -> Split:
    """Random 8x8 images; label i marks sample i so batches can be traced to their samples."""
    generator = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (count, 3, 8, 8), generator=generator).to(torch.uint8)
    return Split(images, torch.arange(count))


def loader(count=32, batch=8, seed=5, train=True, augment=True, spec=None) -> BatchLoader:
    return BatchLoader(toy_split(count), spec or toy_spec(), batch, CPU, seed, train, augment,
                       smallest_batch=2 if train else 1)


def normalised(spec: DatasetSpec, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def epoch(batch_loader: BatchLoader, number: int, start: int = 0):
    return list(batch_loader.batches(number, start))


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


# ---- order ---------------------------------------------------------------------------------------


def test_same_seed_same_batches():
    assert same(epoch(loader(), 1), epoch(loader(), 1))
    assert same(epoch(loader(), 3), epoch(loader(), 3))


def test_epochs_and_seeds_differ():
    first = epoch(loader(), 1)
    assert not torch.equal(torch.cat([l for _, l in first]), torch.cat([l for _, l in epoch(loader(), 2)]))
    assert not torch.equal(torch.cat([l for _, l in first]), torch.cat([l for _, l in epoch(loader(seed=6), 1)]))


def test_every_sample_once_per_epoch():
    for number in (1, 2):
        labels = torch.cat([l for _, l in epoch(loader(count=32, batch=8), number)])
        assert sorted(labels.tolist()) == list(range(32))


@pytest.mark.parametrize("start", [1, 2, 3])
def test_resume_at_a_batch_equals_skipping(start):
    full = epoch(loader(), 2)
    resumed = epoch(loader(), 2, start)  # a fresh loader, as after a restart
    assert len(resumed) == len(full) - start
    assert same(resumed, full[start:])


def test_global_random_state_does_not_matter():
    torch.manual_seed(1)
    a = epoch(loader(), 1)
    torch.manual_seed(2)
    torch.rand(100)
    b = epoch(loader(), 1)
    assert same(a, b)


def test_test_split_is_in_order_unaugmented_and_complete():
    spec = toy_spec()
    test = loader(count=17, batch=8, train=False, augment=True, spec=spec)
    assert not test.augment
    batches = epoch(test, 0)
    assert [len(l) for _, l in batches] == [8, 8, 1]  # the size-1 batch is kept for evaluation
    assert torch.cat([l for _, l in batches]).tolist() == list(range(17))
    images = torch.cat([x for x, _ in batches])
    assert torch.equal(images, normalised(spec, toy_split(17).images))


@pytest.mark.parametrize("count, sizes", [(17, [8, 8]), (18, [8, 8, 2]), (16, [8, 8]), (9, [8])])
def test_a_size_one_final_training_batch_is_dropped(count, sizes):
    train = loader(count=count, batch=8)
    assert len(train) == len(sizes)
    assert [len(l) for _, l in epoch(train, 1)] == sizes
    assert [len(l) for _, l in epoch(train, 1, start=len(sizes) - 1)] == sizes[-1:]


# ---- augmentation ------------------------------------------------------------------------------------


def test_augment_off_gives_the_normalised_raw_images():
    spec = toy_spec()
    train = loader(augment=False, spec=spec)
    raw = toy_split(32).images
    for images, labels in epoch(train, 1):
        assert images.dtype == torch.float32
        assert torch.equal(images, normalised(spec, raw[labels]))


def crop_kind(sample: torch.Tensor, raw: torch.Tensor, pad: int, mode: str) -> set[str]:
    """How ``sample`` (normalised away) arises from ``raw``: {'plain'} / {'mirrored'} crops of the padded image."""
    padded = F.pad(raw[None].float(), (pad, pad, pad, pad), mode=mode)[0]
    size = raw.shape[-1]
    kinds = set()
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[:, top : top + size, left : left + size]
            if torch.equal(sample, crop):
                kinds.add("plain")
            if torch.equal(sample, crop.flip(-1)):
                kinds.add("mirrored")
    return kinds


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_every_augmented_sample_is_a_possibly_mirrored_crop(pad_mode):
    spec = toy_spec(pad=2, pad_mode=pad_mode, flip=True)
    train = loader(count=32, batch=16, spec=spec)
    raw = toy_split(32).images
    seen = set()
    for images, labels in epoch(train, 1):
        assert images.shape == (16, 3, 8, 8)  # crop and flip keep the shape
        pixels = to_pixels(images, spec)
        for sample, label in zip(pixels.round(), labels):
            kinds = crop_kind(sample, raw[label], spec.crop_pad, pad_mode)
            assert kinds, f"sample {int(label)} is no crop of its padded image"
            seen |= kinds
    assert seen == {"plain", "mirrored"}  # 32 fair coin flips: both occur


def test_flipped_sample_is_the_mirror_of_the_same_crop():
    """With no padding the only change is the flip: a sample is the raw image or its mirror."""
    spec = toy_spec(pad=0, flip=True)
    train = loader(count=32, batch=32, spec=spec)
    raw = normalised(spec, toy_split(32).images)
    ((images, labels),) = epoch(train, 1)
    flipped = [torch.equal(s, raw[l].flip(-1)) for s, l in zip(images, labels)]
    plain = [torch.equal(s, raw[l]) for s, l in zip(images, labels)]
    assert all(f != p for f, p in zip(flipped, plain))
    assert 0 < sum(flipped) < 32


def test_no_flip_for_svhn_like_specs():
    spec = toy_spec(pad=2, flip=False)
    train = loader(count=32, batch=32, spec=spec)
    raw = toy_split(32).images
    ((images, labels),) = epoch(train, 1)
    pixels = to_pixels(images, spec).round()
    shifted = 0
    for sample, label in zip(pixels, labels):
        kinds = crop_kind(sample, raw[label], 2, "constant")
        assert "plain" in kinds
        shifted += not torch.equal(sample, raw[label].float())
    assert shifted > 0  # the crop does move


def test_augmentation_is_seeded_per_batch():
    a, b = loader(), loader()
    first = epoch(a, 1)
    assert same(first, epoch(b, 1))
    again = epoch(a, 1)  # the same epoch twice gives the same crops, not the next random ones
    assert same(first, again)


# ---- the real specs and make_loaders ----------------------------------------------------------------


def test_published_normalisation_and_augmentation():
    cifar = SPECS["cifar10"]
    assert cifar.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert cifar.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    assert (cifar.crop_pad, cifar.pad_mode, cifar.flip) == (4, "reflect", True)
    svhn = SPECS["svhn"]
    assert (svhn.crop_pad, svhn.flip, svhn.mean, svhn.std) == (2, False, (0.5,) * 3, (0.5,) * 3)
    stl = SPECS["stl10"]
    assert (stl.image_size, stl.crop_pad, stl.flip) == (96, 4, True)
    fashion = SPECS["fashion_mnist"]
    assert (fashion.channels, fashion.image_size, fashion.mean, fashion.std) == (1, 32, (0.2860,), (0.3530,))


def test_make_loaders_synthetic(make_config):
    config = make_config("data.batch_size=16")
    train, test = make_loaders(config.data, config.model, config.run.seed, CPU)
    assert train.samples == 1024 and test.samples == 256
    assert len(train) == 64 and len(test) == 16
    assert train.augment and not test.augment
    images, labels = next(train.batches(1))
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    train_again, _ = make_loaders(config.data, config.model, config.run.seed, CPU)
    assert same(epoch(train, 1)[:3], list(train_again.batches(1))[:3])


def test_dataset_spec_rejects_a_model_that_does_not_fit():
    def cifar100_spec(model: str) -> DatasetSpec:
        config = load_config(None, ["data.name=cifar100", model])
        return dataset_spec(config.data, config.model)

    with pytest.raises(BadInput, match="model.in_channels"):
        cifar100_spec("model.in_channels=1")
    with pytest.raises(BadInput, match="model.classes"):
        cifar100_spec("model.classes=10")
    assert cifar100_spec("model.classes=100").classes == 100


# ---- a data set smaller than a batch ------------------------------------------------------------------


def tiny_cifar10(root: Path, train: int, test: int) -> Path:
    """A cifar-10-batches-py folder: ``train`` samples spread over the five batches, ``test`` in the test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    sizes = [len(part) for part in torch.arange(train).tensor_split(5)] + [test]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, size in zip(names, sizes):
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": np.zeros((size, 3072), np.uint8), b"labels": [1] * size}, handle, protocol=2)
    return root


def cifar_config(root: Path, batch: int):
    return load_config(None, ["data.name=cifar10", f"data.root='{root}'", f"data.batch_size={batch}"])


def test_fewer_samples_than_one_batch_per_process_is_bad_input(tmp_path):
    config = cifar_config(tiny_cifar10(tmp_path, train=5, test=2), batch=8)
    # 5 samples: one batch of 2 + 3, enough for 2 processes
    make_loaders(config.data, config.model, config.run.seed, CPU, processes=2)
    with pytest.raises(BadInput) as info:
        # 3 processes need 6 samples for one batch
        make_loaders(config.data, config.model, config.run.seed, CPU, processes=3)
    message = str(info.value)
    assert "\n" not in message and "5 sample(s)" in message and "one batch of 6" in message


def test_a_batch_larger_than_the_data_set_is_clamped_and_said(tmp_path, capsys):
    config = cifar_config(tiny_cifar10(tmp_path, train=5, test=3), batch=128)
    train, test = make_loaders(config.data, config.model, config.run.seed, CPU)
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and "data.batch_size = 128" in notice[0] and "batches of 5" in notice[0]
    assert (train.batch_size, test.batch_size) == (5, 3)
    assert [len(labels) for _, labels in train.batches(1)] == [5]
    assert [len(labels) for _, labels in test.batches(0)] == [3]
    fitting = cifar_config(tmp_path, batch=4)
    make_loaders(fitting.data, fitting.model, fitting.run.seed, CPU)
    assert capsys.readouterr().out == ""  # a batch that fits is not mentioned


def test_the_index_copy_leaves_cpu_batches_untouched(monkeypatch):
    """On CPU the indices are used where they are drawn: no pinning, no copy."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("pin_memory on a CPU run")
    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    batches = epoch(loader(), 0)
    assert len(batches) == 4 and batches[0][0].shape == (8, 3, 8, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gpu_batches_equal_cpu_batches_without_a_host_sync():
    """Same draws on every device; the per-batch index copies never block the host."""
    on_cpu = epoch(loader(), 1)
    split = toy_split(32)
    gpu = BatchLoader(split, toy_spec(), 8, torch.device("cuda"), 5, True, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = list(gpu.batches(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(on_gpu) == len(on_cpu)
    for (images, labels), (gpu_images, gpu_labels) in zip(on_cpu, on_gpu):
        assert torch.equal(labels, gpu_labels.cpu()) and torch.allclose(images, gpu_images.cpu(), atol=1e-6)
