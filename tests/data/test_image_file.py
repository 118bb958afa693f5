"""pipeline.data.image_file: one image file prepared exactly as the run's evaluation prepared its test
images (an image folder's decoding, a resident dataset's arrays), and a file that does not decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.loading import load_config
from pipeline.data.image_file import Preprocess, evaluation_preprocess
from pipeline.data.image_folder import scan
from pipeline.data.loader import BatchLoader, make_loaders
from pipeline.data.readers import Split
from pipeline.data.specs import dataset_spec
from pipeline.data.throughput import write_folder
from pipeline.errors import BadInput

CPU = torch.device("cpu")


def test_a_folder_image_is_the_test_loaders_image(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_folder(root, 12, 3, size=(50, 38), png_every=3)
    config = load_config(None, ["data.name=image_folder", f"data.root='{root}'", "data.image_size=32",
                                "data.eval_resize=40", "data.batch_size=4", "data.workers=0", "model.family=cifar"])
    _, test = make_loaders(config.data, config.model, config.run.seed, CPU)
    prepare = evaluation_preprocess(config.data, test.spec)
    loaded = torch.cat([images for images, _ in test.batches(0)])
    files = [path.decode() for path in scan(root).val.files]
    assert len(files) == len(loaded) == 3
    assert torch.equal(torch.stack([prepare(path) for path in files]), loaded)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_a_resident_datasets_image_is_its_loaders_image(name: str, tmp_path: Path) -> None:
    config = load_config(None, [f"data.name={name}"])
    spec = dataset_spec(config.data, config.model)
    prepare = evaluation_preprocess(config.data, spec)
    draws = np.random.default_rng(0)
    if name == "fashion_mnist":  # 28 x 28 grey files, padded to 32 by the reader
        pixels = draws.integers(0, 256, (28, 28), dtype=np.uint8)
        array = np.pad(pixels, 2)[None]
    else:
        pixels = draws.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        array = pixels.transpose(2, 0, 1)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    loader = BatchLoader(Split(torch.from_numpy(array.copy())[None], torch.zeros(1, dtype=torch.int64)), spec, 1, CPU,
                         0, train=False, augment=False)
    (expected, _), = loader.batches(0)
    assert torch.equal(prepare(tmp_path / "image.png")[None], expected)
    assert prepare == Preprocess.from_dict(prepare.to_dict())


def test_a_file_that_does_not_decode_is_bad_input(tmp_path: Path) -> None:
    config = load_config(None, ["data.name=cifar10"])
    prepare = evaluation_preprocess(config.data, dataset_spec(config.data, config.model))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(BadInput, match="broken.jpg' is not an image this can read"):
        prepare(tmp_path / "broken.jpg")
    with pytest.raises(BadInput, match="missing.png' is not an image this can read"):
        prepare(tmp_path / "missing.png")
