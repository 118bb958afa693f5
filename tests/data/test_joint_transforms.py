"""Joint image + label transforms: seeded, geometry shared by image and label, colour on the image only."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from pipeline.data.joint_transforms import (
    SegmentEvalTransform,
    SegmentTrainTransform,
    photometric,
    rescaled_crop,
    varied,
)
from pipeline.data.specs import IGNORE_INDEX
from tests.data.segmentation_files import sample_pair

HEIGHT, WIDTH = 24, 40


def pair(seed: int = 0, classes: int = 5) -> tuple[Image.Image, np.ndarray]:
    image, label = sample_pair(np.random.default_rng(seed), classes, (HEIGHT, WIDTH))
    return image, np.array(label)


def test_a_sample_is_a_function_of_its_seed() -> None:
    image, label = pair()
    transform = SegmentTrainTransform((16, 24))
    first = transform(image, label, 11)
    again = transform(image, label, 11)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    others = [transform(image, label, seed) for seed in range(12, 20)]
    assert any(not np.array_equal(first[0], other[0]) for other in others)
    for pixels, classes in [first, *others]:
        assert pixels.dtype == np.uint8 and classes.dtype == np.uint8
        assert pixels.shape == (*classes.shape, 3)
        assert classes.shape[0] <= 16 and classes.shape[1] <= 24
        assert set(np.unique(classes)) <= set(np.unique(label))  # nearest: no blended class ids


def draws_of(seed: int, crop: tuple[int, int]) -> tuple[int, int, int, int, int, int, bool]:
    """The rescale, crop and flip that seed draws: the file rescaled to width x height, the crop's
    top, left, height and width, and the flip."""
    draws = random.Random(seed)
    ratio = draws.uniform(0.5, 2.0)
    width, height = round(WIDTH * ratio), round(HEIGHT * ratio)
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    top, left = draws.randint(0, height - crop_h), draws.randint(0, width - crop_w)
    return width, height, top, left, crop_h, crop_w, draws.random() < 0.5


def test_the_crop_is_the_crop_of_the_whole_rescaled_image() -> None:
    """The image: Pillow's bilinear rescale of the whole file, then the crop (to rounding). The
    label: at each pixel, the file's pixel under its centre (a label map that names its column
    and row shows where each pixel came from)."""
    image, _ = pair(3)
    where = np.add.outer(np.arange(HEIGHT) * 64, np.arange(WIDTH))  # row * 64 + column, fits no uint8: two maps
    for seed in range(16):
        width, height, top, left, crop_h, crop_w, flip = draws_of(seed, (16, 24))
        whole = np.array(image.resize((width, height), Image.Resampling.BILINEAR)).astype(int)
        expected = whole[top:top + crop_h, left:left + crop_w]
        columns = rescaled_crop(image, (where % 64).astype(np.uint8), (16, 24), random.Random(seed))[1].astype(int)
        pixels, rows = rescaled_crop(image, (where // 64).astype(np.uint8), (16, 24), random.Random(seed))
        if flip:
            expected, columns, rows = expected[:, ::-1], columns[:, ::-1], rows[:, ::-1]
        assert np.abs(pixels.astype(int) - expected).max() <= 2
        centre_x = (np.arange(left, left + crop_w) + 0.5) * WIDTH / width
        centre_y = (np.arange(top, top + crop_h) + 0.5) * HEIGHT / height
        assert np.all((columns <= centre_x[None, :] + 1e-9) & (centre_x[None, :] < columns + 1 + 1e-9))
        assert np.all((rows <= centre_y[:, None] + 1e-9) & (centre_y[:, None] < rows + 1 + 1e-9))


def test_a_crop_that_one_class_dominates_is_drawn_again() -> None:
    """A 12 x 12 square of class 1 on class 0: most first draws of a 16 x 16 crop see class 0
    alone or nearly; the redraws (MMSegmentation's cat_max_ratio = 0.75) find the square."""
    image = Image.new("RGB", (WIDTH, HEIGHT))
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    label[6:18, 14:26] = 1
    label[0, :] = IGNORE_INDEX  # ignored pixels count for no class
    first, kept = 0, 0
    for seed in range(40):
        width, height, top, left, crop_h, crop_w, _ = draws_of(seed, (16, 16))
        rows = (2 * np.arange(top, top + crop_h) + 1) * HEIGHT // (2 * height)
        columns = (2 * np.arange(left, left + crop_w) + 1) * WIDTH // (2 * width)
        first += varied(label[rows[:, None], columns[None, :]])
        kept += varied(rescaled_crop(image, label, (16, 16), random.Random(seed))[1])
    assert kept >= 35 and first <= 25
    assert not varied(np.array([[0, 0, 0, 1]])) and varied(np.array([[0, 0, 1, 1]]))
    assert not varied(np.array([[0, 0, 0, 0]])) and varied(np.array([[0, 255, 255, 1]]))


def test_flip_and_crop_move_image_and_label_together() -> None:
    """Grey columns that brighten left to right, labelled by column: every crop keeps the image's
    and the label's columns in the same order, flipped or not (photometric changes of a grey image
    are one increasing map of its values)."""
    columns = np.arange(WIDTH)
    label = np.tile(columns // 4, (HEIGHT, 1)).astype(np.uint8)
    grey = np.tile((60 + 2 * columns).astype(np.uint8), (HEIGHT, 1))
    image = Image.fromarray(np.stack([grey] * 3, axis=-1))
    flipped = 0
    for seed in range(24):
        pixels, classes = SegmentTrainTransform((16, 16))(image, label, seed)
        ids = classes[0].astype(int)
        values = pixels[0, :, 0].astype(int)
        assert ids[0] != ids[-1] and values[0] != values[-1]
        assert np.sign(ids[-1] - ids[0]) == np.sign(values[-1] - values[0])
        flipped += ids[0] > ids[-1]
        assert flipped == sum(draws_of(s, (16, 16))[-1] for s in range(seed + 1))
    assert 0 < flipped < 24  # both ways happen


def test_photometric_distortion_is_seeded_and_changes_colours_alone() -> None:
    pixels = np.array(pair(5)[0])
    out = [photometric(pixels.copy(), random.Random(seed)) for seed in range(16)]
    assert np.array_equal(out[0], photometric(pixels.copy(), random.Random(0)))
    assert all(result.dtype == np.uint8 and result.shape == pixels.shape for result in out)
    assert len({result.tobytes() for result in out}) > 8
    # on a grey ramp every step is one increasing map of the grey level: it stays a grey ramp
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    for seed in range(16):
        values = photometric(ramp.copy(), random.Random(seed)).reshape(-1, 3).astype(int)
        assert np.all(values == values[:, :1]) and np.all(np.diff(values[:, 0]) >= 0)


def test_evaluation_keeps_the_whole_image() -> None:
    image, label = pair(7)
    pixels, classes = SegmentEvalTransform()(image, label, 123)
    assert np.array_equal(pixels, np.array(image)) and np.array_equal(classes, label)
