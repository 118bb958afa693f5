"""Readers for the datasets' own file formats; each returns uint8 images [N, C, H, W] and labels.

Only the standard on-disk layouts are read (the ones torchvision's downloads produce), so a
folder prepared by any tool works. torchvision and scipy are optional: torchvision only to
download, scipy only for SVHN's MATLAB files.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput


class Split(NamedTuple):
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


class RawDataset(NamedTuple):
    train: Split
    test: Split


def _missing(spec: DatasetSpec, root: Path, wanted: str) -> BadInput:
    return BadInput(f"{spec.name}: no {wanted} under {str(root)!r}; {spec.how_to_get}")


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                 torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def _labels(spec: DatasetSpec, labels: np.ndarray, path: Path, first_label: int = 0) -> np.ndarray:
    """``labels`` as int64, once they are one whole number in [first, first + classes) per sample.

    Checked here, where the file is known, so the message can name it; ``first_label`` is the
    label the file stores for its first class (1 for SVHN and STL-10).
    """
    fix = f"replace it with the original {spec.name} file"
    if labels.ndim != 1:
        raise BadInput(f"{path}: the labels have shape {labels.shape}, not one label per sample (1-D); {fix}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise BadInput(f"{path}: the labels are {labels.dtype} values, not whole numbers; {fix}")
    labels = labels.astype(np.int64)
    last = first_label + spec.classes - 1
    outside = (labels < first_label) | (labels > last)
    if outside.any():
        index = int(np.argmax(outside))
        raise BadInput(f"{path}: label {labels[index]} of sample {index} is outside {first_label}..{last}, "
                       f"the {spec.classes} classes of {spec.name}; {fix}")
    return labels


def _paired(images: np.ndarray, images_path: Path, labels: np.ndarray, labels_path: Path) -> Split:
    if len(images) != len(labels):
        where = "it" if images_path == labels_path else str(labels_path)
        raise BadInput(f"{images_path} holds {len(images)} images but {where} {len(labels)} labels; "
                       f"each image needs exactly one label, replace the damaged file")
    return _split(images, labels)


# ---- IDX (MNIST family) ---------------------------------------------------------------------

_IDX_UBYTE = 0x08
# The header is trusted only this far: a few KiB of gzip can declare, and inflate to, GiBs.
# The MNIST family needs 55 MB at most; a GiB leaves room for larger IDX sets.
MAX_IDX_BYTES = 1 << 30
FASHION_MNIST_SIDE = 28  # the files' images; the spec's image_size is after the fixed padding


def read_idx(path: Path, item_shape: tuple[int, ...] | None = None,
             items: tuple[int, str] | None = None) -> np.ndarray:
    """An IDX file (optionally gzip'd) of unsigned bytes, as an ndarray of its dimensions.

    The header is checked before the body is read: each item must have ``item_shape``, the
    count must equal ``items`` (a count and the file it comes from), and the body must fit
    MAX_IDX_BYTES. Then exactly the declared bytes are read, and nothing may follow them.
    """
    gzipped = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as handle:
            return _read_idx_body(path, handle, item_shape, items)
    except (OSError, EOFError, zlib.error) as err:
        kind = "gzip'd IDX file" if gzipped else "IDX file"
        raise BadInput(f"{path} cannot be read as a {kind} ({err}); replace it with the original file") from None


def _read_idx_body(path: Path, handle: io.BufferedIOBase, item_shape: tuple[int, ...] | None,
                   items: tuple[int, str] | None) -> np.ndarray:
    magic = handle.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != _IDX_UBYTE or magic[3] == 0:
        raise BadInput(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = magic[3]
    if item_shape is not None and ndim != 1 + len(item_shape):
        raise BadInput(f"{path} holds {ndim}-D data where {1 + len(item_shape)}-D was expected "
                       f"(items of shape {item_shape}); replace it with the original file")
    packed = handle.read(4 * ndim)
    if len(packed) < 4 * ndim:
        raise BadInput(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", packed)
    if item_shape is not None and dims[1:] != item_shape:
        raise BadInput(f"{path} holds items of shape {dims[1:]} where {item_shape} was expected; "
                       f"replace it with the original file")
    if items is not None and dims[0] != items[0]:
        raise BadInput(f"{path} holds {dims[0]} entries but {items[1]}; they must pair up one to one")
    size = math.prod(dims)
    if size > MAX_IDX_BYTES:
        raise BadInput(f"{path} declares {dims} = {size} bytes, more than the {MAX_IDX_BYTES} an IDX data set "
                       f"may hold here; its header is damaged, replace it with the original file")
    body = handle.read(size)
    if len(body) != size:
        raise BadInput(f"{path} is truncated: header says {dims}, file holds {len(body)} values")
    if handle.read(1):
        raise BadInput(f"{path} holds more data than its header declares {dims}; replace it with the original file")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_fashion_mnist(root: Path, spec: DatasetSpec) -> RawDataset:
    splits = []
    for prefix in ("train", "t10k"):
        images_path = _find(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        if images_path is None or labels_path is None:
            raise _missing(spec, root, f"{prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz]")
        images = read_idx(images_path, (FASHION_MNIST_SIDE, FASHION_MNIST_SIDE))[:, None]  # [N, 1, 28, 28]
        pad = (spec.image_size - FASHION_MNIST_SIDE) // 2  # 28 -> 32 (docs/reference.md)
        images = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        # The images' count bounds the labels file before any of its body is read.
        labels = read_idx(labels_path, (), items=(len(images), f"{images_path} holds {len(images)} images"))
        splits.append(_split(images, _labels(spec, labels, labels_path)))
    return RawDataset(*splits)


# ---- CIFAR python pickles ----------------------------------------------------------------------


def _latin1(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Python 3's protocol-2 pickles write bytes as _codecs.encode(text, 'latin1'): only that encoding."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1" or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


# What a CIFAR batch may name: numpy's array, dtype and scalar reconstructors under both of
# numpy's module names (1.x wrote numpy.core, 2.x writes numpy._core), and the bytes helper.
# Anything else in the file is code to run, and a data file must never run code.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's own _reconstruct, whichever module holds it
_SCALAR = np.float64(0).__reduce__()[0]
_CIFAR_GLOBALS: dict[tuple[str, str], object] = {
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the arrays, lists and bytes a CIFAR batch holds; nothing it names is imported."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _unpickle(path: Path) -> dict[bytes, object]:
    with open(path, "rb") as handle:
        try:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        except _ForbiddenGlobal as err:
            raise BadInput(f"{path} is not a CIFAR python batch: it asks to call {err}, which a data file never "
                           f"needs, and was not loaded; replace it with the original CIFAR file") from None
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not a CIFAR batch
            raise BadInput(f"{path} is not a CIFAR python batch ({err})") from None
    if not isinstance(batch, dict):
        raise BadInput(f"{path} is not a CIFAR python batch (it holds a value of type {type(batch).__name__}, "
                       "not a dict)")
    return batch


def _cifar_split(spec: DatasetSpec, paths: list[Path], label_key: bytes) -> Split:
    row = spec.channels * spec.image_size * spec.image_size
    splits = []
    for path in paths:
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise BadInput(f"{path} is not a CIFAR python batch (no {b'data'!r} / {label_key!r})")
        data = np.asarray(batch[b"data"])
        if data.ndim != 2 or data.shape[1] != row:
            raise BadInput(f"{path}: the images have shape {data.shape}, not [N, {row}]; "
                           f"replace it with the original {spec.name} file")
        images = data.astype(np.uint8).reshape(-1, spec.channels, spec.image_size, spec.image_size)
        splits.append(_paired(images, path, _labels(spec, np.asarray(batch[label_key]), path), path))
    return Split(torch.cat([split.images for split in splits]), torch.cat([split.labels for split in splits]))


def read_cifar10(root: Path, spec: DatasetSpec) -> RawDataset:
    folder = root / "cifar-10-batches-py"
    train = [folder / f"data_batch_{i}" for i in range(1, 6)]
    test = [folder / "test_batch"]
    if not all(p.is_file() for p in train + test):
        raise _missing(spec, root, "cifar-10-batches-py/data_batch_1..5 and test_batch")
    return RawDataset(_cifar_split(spec, train, b"labels"), _cifar_split(spec, test, b"labels"))


def read_cifar100(root: Path, spec: DatasetSpec) -> RawDataset:
    folder = root / "cifar-100-python"
    if not (folder / "train").is_file() or not (folder / "test").is_file():
        raise _missing(spec, root, "cifar-100-python/train and test")
    return RawDataset(_cifar_split(spec, [folder / "train"], b"fine_labels"),
                      _cifar_split(spec, [folder / "test"], b"fine_labels"))


# ---- SVHN (MATLAB) and STL-10 (raw binary) ----------------------------------------------------------


def read_svhn(root: Path, spec: DatasetSpec) -> RawDataset:
    paths = [root / "train_32x32.mat", root / "test_32x32.mat"]
    if not all(p.is_file() for p in paths):
        raise _missing(spec, root, "train_32x32.mat and test_32x32.mat")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise BadInput("svhn: reading its .mat files needs scipy; pip install scipy") from None
    splits = []
    for path in paths:
        mat = loadmat(str(path))
        stored = mat["y"]
        if stored.ndim == 2 and stored.shape[1] == 1:  # MATLAB's column vector
            stored = stored[:, 0]
        labels = _labels(spec, stored, path, first_label=1) % 10  # SVHN stores digit 0 as label 10
        splits.append(_paired(np.transpose(mat["X"], (3, 2, 0, 1)), path, labels, path))
    return RawDataset(*splits)


def read_stl10(root: Path, spec: DatasetSpec) -> RawDataset:
    folder = root / "stl10_binary"
    splits = []
    for prefix in ("train", "test"):
        images_path, labels_path = folder / f"{prefix}_X.bin", folder / f"{prefix}_y.bin"
        if not images_path.is_file() or not labels_path.is_file():
            raise _missing(spec, root, f"stl10_binary/{prefix}_X.bin and {prefix}_y.bin")
        # Stored column-major per channel: swap H and W to get the upright image.
        side = spec.image_size
        pixels = np.fromfile(images_path, dtype=np.uint8)
        if pixels.size % (spec.channels * side * side):
            raise BadInput(f"{images_path} does not hold whole {spec.channels}x{side}x{side} images; "
                           f"replace it with the original {spec.name} file")
        images = pixels.reshape(-1, spec.channels, side, side).transpose(0, 1, 3, 2)
        labels = _labels(spec, np.fromfile(labels_path, dtype=np.uint8), labels_path, first_label=1) - 1
        splits.append(_paired(images, images_path, labels, labels_path))
    return RawDataset(*splits)


# ---- synthetic ----------------------------------------------------------------------------------

SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1024, 256


def make_synthetic(spec: DatasetSpec, seed: int) -> RawDataset:
    """Noise around one fixed random template per class: learnable and the same for a seed."""
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.channels, spec.image_size, spec.image_size)
    templates = torch.randint(0, 256, (spec.classes, *shape), generator=generator, dtype=torch.int16)
    splits = []
    for size in (SYNTHETIC_TRAIN, SYNTHETIC_TEST):
        labels = torch.randint(0, spec.classes, (size,), generator=generator)
        noise = torch.randint(-64, 65, (size, *shape), generator=generator, dtype=torch.int16)
        splits.append(Split((templates[labels] + noise).clamp(0, 255).to(torch.uint8), labels))
    return RawDataset(*splits)


READERS = {
    "fashion_mnist": read_fashion_mnist,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "svhn": read_svhn,
    "stl10": read_stl10,
}
