"""Readers for the datasets' own file formats; each returns uint8 images [N, C, H, W] and labels.

Only the standard on-disk layouts are read (the ones torchvision's downloads produce), so a
folder prepared by any tool works. torchvision and scipy are optional: torchvision only to
download, scipy only for SVHN's MATLAB files.
"""

from __future__ import annotations

import gzip
import pickle
import struct
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


# ---- IDX (MNIST family) ---------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip'd) of unsigned bytes, as an ndarray of its dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise BadInput(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise BadInput(f"{path} is truncated: header says {dims}, file holds {body.size} values")
    return body.reshape(dims)


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
        images = read_idx(images_path)[:, None]  # [N, 1, 28, 28]
        pad = (spec.image_size - images.shape[-1]) // 2  # 28 -> 32 as in REFERENCE.md
        images = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        splits.append(_split(images, read_idx(labels_path)))
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
        raise BadInput(f"{path} is not a CIFAR python batch (it holds a value of type {type(batch).__name__}, not a dict)")
    return batch


def _cifar_split(paths: list[Path], label_key: bytes) -> Split:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise BadInput(f"{path} is not a CIFAR python batch (no {b'data'!r} / {label_key!r})")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key]))
    return _split(np.concatenate(images), np.concatenate(labels))


def read_cifar10(root: Path, spec: DatasetSpec) -> RawDataset:
    folder = root / "cifar-10-batches-py"
    train = [folder / f"data_batch_{i}" for i in range(1, 6)]
    test = [folder / "test_batch"]
    if not all(p.is_file() for p in train + test):
        raise _missing(spec, root, "cifar-10-batches-py/data_batch_1..5 and test_batch")
    return RawDataset(_cifar_split(train, b"labels"), _cifar_split(test, b"labels"))


def read_cifar100(root: Path, spec: DatasetSpec) -> RawDataset:
    folder = root / "cifar-100-python"
    if not (folder / "train").is_file() or not (folder / "test").is_file():
        raise _missing(spec, root, "cifar-100-python/train and test")
    return RawDataset(_cifar_split([folder / "train"], b"fine_labels"),
                      _cifar_split([folder / "test"], b"fine_labels"))


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
        labels = mat["y"].astype(np.int64).reshape(-1) % 10  # SVHN stores digit 0 as label 10
        splits.append(_split(np.transpose(mat["X"], (3, 2, 0, 1)), labels))
    return RawDataset(*splits)


def read_stl10(root: Path, spec: DatasetSpec) -> RawDataset:
    folder = root / "stl10_binary"
    splits = []
    for prefix in ("train", "test"):
        images_path, labels_path = folder / f"{prefix}_X.bin", folder / f"{prefix}_y.bin"
        if not images_path.is_file() or not labels_path.is_file():
            raise _missing(spec, root, f"stl10_binary/{prefix}_X.bin and {prefix}_y.bin")
        # Stored column-major per channel: swap H and W to get the upright image.
        images = np.fromfile(images_path, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1
        if len(images) != len(labels):
            raise BadInput(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
        splits.append(_split(images, labels))
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
