"""pipeline.data.readers on small files written here in each data set's real on-disk format."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.loading import load_config
from pipeline.data.loader import load_raw
from pipeline.data.readers import READERS, make_synthetic, read_idx
from pipeline.data.specs import SPECS, dataset_spec
from pipeline.errors import BadInput

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, magic_type: int = 0x08) -> None:
    """IDX: two zero bytes, the type byte (0x08 = unsigned byte), ndim, big-endian uint32 dims."""
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def raw_for(name: str, root: Path):
    config = load_config(None, [f"data.name={name}", f"data.root='{root}'"])
    return load_raw(config.data, config.model, config.run.seed)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- IDX / Fashion-MNIST -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_plain_and_gzip(tmp_path, suffix):
    array = rng().integers(0, 256, (3, 4, 5), dtype=np.uint8)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    write_idx(path, array)
    got = read_idx(path)
    assert got.shape == (3, 4, 5) and np.array_equal(got, array)


def test_read_idx_bad_magic_and_truncation(tmp_path):
    path = tmp_path / "floats-idx1-ubyte"
    write_idx(path, np.zeros(4, dtype=np.uint8), magic_type=0x0D)  # 0x0D: float data
    with pytest.raises(BadInput, match="magic"):
        read_idx(path)
    path = tmp_path / "junk-idx1-ubyte"
    path.write_bytes(b"\x08\x03\x00\x00" + bytes(20))
    with pytest.raises(BadInput, match="magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBB3I", 0, 0, 8, 3, 2, 28, 28) + bytes(28 * 28))  # one image of two
    with pytest.raises(BadInput, match="truncated"):
        read_idx(path)


def test_fashion_mnist_reader_mixes_gzip_and_plain(tmp_path):
    train_images = rng(1).integers(1, 256, (5, 28, 28), dtype=np.uint8)
    train_labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    test_images = rng(2).integers(1, 256, (2, 28, 28), dtype=np.uint8)
    test_labels = np.array([9, 0], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_labels)
    spec, raw = raw_for("fashion_mnist", tmp_path)
    assert spec.channels == 1 and spec.image_size == 32
    for split, images, labels in ((raw.train, train_images, train_labels), (raw.test, test_images, test_labels)):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert tuple(split.images.shape) == (len(labels), 1, 32, 32)  # 28x28 zero-padded to 32x32
        assert torch.equal(split.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
        border = split.images.clone()
        border[:, :, 2:30, 2:30] = 0
        assert int(border.sum()) == 0
        assert split.labels.tolist() == labels.tolist()


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_installed_fashion_mnist():
    config = load_config(None)  # the default data set and root
    _, raw = load_raw(config.data, config.model, config.run.seed)
    assert tuple(raw.train.images.shape) == (60000, 1, 32, 32)
    assert tuple(raw.test.images.shape) == (10000, 1, 32, 32)
    assert torch.bincount(raw.train.labels).tolist() == [6000] * 10
    assert torch.bincount(raw.test.labels).tolist() == [1000] * 10
    assert int(raw.test.images[:, :, :2].max()) == 0  # the padding rows


def fashion_folder(root: Path, train: int = 5, test: int = 2, side: int = 28) -> Path:
    """Fashion-MNIST IDX files of ``train`` / ``test`` random images, labels 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        pixels = rng(count).integers(0, 256, (count, side, side), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", pixels)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8) % 10)
    return root


def one_line_naming(info: pytest.ExceptionInfo[BadInput], path: Path, *needles: str) -> str:
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("prefix", ["train", "t10k"])
def test_fashion_labels_outside_the_classes(tmp_path, prefix):
    fashion_folder(tmp_path)
    labels = tmp_path / f"{prefix}-labels-idx1-ubyte"
    write_idx(labels, np.array([0, 10], dtype=np.uint8) if prefix == "t10k" else np.array([1, 2, 3, 4, 10], np.uint8))
    with pytest.raises(BadInput) as info:
        raw_for("fashion_mnist", tmp_path)
    one_line_naming(info, labels, "label 10", "0..9")


def test_fashion_labels_that_are_not_1d(tmp_path):
    fashion_folder(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros((5, 2), dtype=np.uint8))
    with pytest.raises(BadInput) as info:
        raw_for("fashion_mnist", tmp_path)
    one_line_naming(info, labels, "2-D data where 1-D was expected")


def test_fashion_images_and_labels_of_different_counts(tmp_path):
    fashion_folder(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.zeros(3, dtype=np.uint8))  # 2 test images
    with pytest.raises(BadInput) as info:
        raw_for("fashion_mnist", tmp_path)
    one_line_naming(info, labels, "3 entries", "t10k-images-idx3-ubyte holds 2 images")


def test_fashion_images_of_the_wrong_size(tmp_path):
    fashion_folder(tmp_path, side=27)  # would pad to 31x31, not the 32x32 the network expects
    with pytest.raises(BadInput) as info:
        raw_for("fashion_mnist", tmp_path)
    one_line_naming(info, tmp_path / "train-images-idx3-ubyte", "(27, 27)", "(28, 28)")


def gzip_of_zeros(path: Path, header: bytes, mebibytes: int) -> None:
    """``header`` then ``mebibytes`` MiB of zeros, as a gzip file of a few KiB per 16 MiB.

    Gzip members may be concatenated: one 16 MiB member written many times inflates to GiBs.
    """
    member = gzip.compress(bytes(16 << 20), compresslevel=9)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(header))
        handle.writelines([member] * (mebibytes // 16))


class InflationMeter:
    """gzip.open whose files count the bytes they inflate, and stop a test that inflates GiBs."""

    limit = 64 << 20

    def __init__(self) -> None:
        self.inflated = 0
        self.real_open = gzip.open

    def __call__(self, *args, **kwargs):
        meter, handle = self, self.real_open(*args, **kwargs)
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            chunks = []
            while size < 0 or sum(map(len, chunks)) < size:
                want = 1 << 20 if size < 0 else min(1 << 20, size - sum(map(len, chunks)))
                chunk = real_read(want)
                meter.inflated += len(chunk)
                assert meter.inflated <= meter.limit, "the reader inflated more than 64 MiB of a tiny file"
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

        handle.read = read
        return handle


@pytest.mark.parametrize("dims, needle", [((3_000_000, 28, 28), "more than the"),  # header declares 2.2 GiB
                                          ((2, 28, 28), "more data than its header")],  # 2 images, then GiBs
                         ids=["declared", "trailing"])
def test_a_gzip_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch, dims, needle):
    fashion_folder(tmp_path).joinpath("train-images-idx3-ubyte").unlink()
    path = tmp_path / "train-images-idx3-ubyte.gz"
    gzip_of_zeros(path, struct.pack(">BBBB3I", 0, 0, 8, 3, *dims), mebibytes=2048)
    assert path.stat().st_size < 4 << 20
    meter = InflationMeter()
    monkeypatch.setattr(gzip, "open", meter)
    with pytest.raises(BadInput) as info:
        raw_for("fashion_mnist", tmp_path)
    one_line_naming(info, path, needle)
    assert meter.inflated <= 2 * 28 * 28 + 1 + 16


# ---- CIFAR python batches ------------------------------------------------------------------------


def dump(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=2)


def test_cifar10_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    rows, labels = [], []
    for index in range(1, 6):
        data = rng(index).integers(0, 256, (2, 3072), dtype=np.uint8)
        batch_labels = [index % 10, (index + 3) % 10]
        dump(folder / f"data_batch_{index}", {b"batch_label": b"x", b"data": data, b"labels": batch_labels})
        rows.append(data)
        labels += batch_labels
    test_data = rng(9).integers(0, 256, (3, 3072), dtype=np.uint8)
    dump(folder / "test_batch", {b"data": test_data, b"labels": [7, 8, 9]})
    spec, raw = raw_for("cifar10", tmp_path)
    assert spec.channels == 3 and spec.classes == 10
    assert tuple(raw.train.images.shape) == (10, 3, 32, 32)
    assert raw.train.labels.tolist() == labels
    first = rows[0][0]
    # a row is 1024 red, 1024 green, 1024 blue values, each image row by row
    assert raw.train.images[0, 0, 0, :].tolist() == first[:32].tolist()
    assert raw.train.images[0, 1, 0, 0].item() == first[1024]
    assert raw.train.images[0, 2, 31, 31].item() == first[3071]
    assert torch.equal(raw.train.images[-1].reshape(-1), torch.from_numpy(rows[-1][-1]))
    assert raw.test.labels.tolist() == [7, 8, 9]
    assert torch.equal(raw.test.images.reshape(3, -1), torch.from_numpy(test_data))


def test_cifar100_reader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    train = rng(3).integers(0, 256, (4, 3072), dtype=np.uint8)
    test = rng(4).integers(0, 256, (2, 3072), dtype=np.uint8)
    dump(folder / "train", {b"data": train, b"fine_labels": [99, 0, 57, 3], b"coarse_labels": [1, 2, 3, 4]})
    dump(folder / "test", {b"data": test, b"fine_labels": [12, 88], b"coarse_labels": [5, 6]})
    spec, raw = raw_for("cifar100", tmp_path)
    assert spec.classes == 100
    assert raw.train.labels.tolist() == [99, 0, 57, 3]
    assert raw.test.labels.tolist() == [12, 88]
    assert torch.equal(raw.train.images.reshape(4, -1), torch.from_numpy(train))


def test_cifar_batch_that_is_not_a_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"this is not a pickle")
    with pytest.raises(BadInput, match="not a CIFAR python batch"):
        raw_for("cifar10", tmp_path)


def test_cifar_batch_without_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    dump(folder / "train", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})  # CIFAR-10 keys
    dump(folder / "test", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
    with pytest.raises(BadInput, match="fine_labels"):
        raw_for("cifar100", tmp_path)


class RunsCode:
    """Unpickling this runs a shell command: what a crafted data file can do to a plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def cifar10_folder(tmp_path: Path) -> Path:
    """A complete, valid cifar-10-batches-py folder of one image per batch."""
    folder = tmp_path / "cifar-10-batches-py"
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        dump(folder / name, {b"data": rng(index).integers(0, 256, (1, 3072), dtype=np.uint8), b"labels": [index]})
    return folder


def test_a_cifar_batch_never_runs_code(tmp_path):
    folder = cifar10_folder(tmp_path)
    marker = tmp_path / "code-ran"
    dump(folder / "data_batch_1", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": RunsCode(marker)})
    with pytest.raises(BadInput) as info:
        raw_for("cifar10", tmp_path)
    assert not marker.exists(), "unpickling the data file ran its command"
    message = str(info.value)
    assert str(folder / "data_batch_1") in message and "system" in message and "\n" not in message


@pytest.mark.parametrize("payload, needle", [(7, "type int"), ({b"data": b"", b"labels": []}, "utf_16")],
                         ids=["not-a-dict", "bytes-via-another-codec"])
def test_a_cifar_batch_of_the_wrong_kind_is_refused(tmp_path, payload, needle):
    folder = cifar10_folder(tmp_path)
    # Python 3 writes protocol-2 bytes as _codecs.encode(text, 'latin1'); only latin1 makes a bytes literal.
    (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=2).replace(b"latin1", b"utf_16"))
    with pytest.raises(BadInput) as info:
        raw_for("cifar10", tmp_path)
    message = str(info.value)
    assert f"{folder / 'test_batch'} is not a CIFAR python batch" in message and needle in message


def py2_str(text: bytes) -> bytes:
    """A Python 2 str in a pickle: SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(text)]) + text if len(text) < 256 else b"T" + struct.pack("<i", len(text)) + text


def python2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the CIFAR site's files were: Python 2, protocol 2, numpy.core names."""
    rows, columns = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_str(b"b") + b"\x87R("
             + b"K\x01M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", columns) + b"\x86"
             + b"cnumpy\ndtype\n" + py2_str(b"u1") + b"K\x00K\x01\x87R(K\x03" + py2_str(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + py2_str(data.tobytes()) + b"tb")
    items = (py2_str(b"batch_label") + py2_str(b"testing batch 1 of 1") + py2_str(b"data") + array
             + py2_str(b"labels") + b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e")
    return b"\x80\x02}(" + items + b"u."


def test_a_python2_cifar_batch_reads(tmp_path):
    folder = cifar10_folder(tmp_path)
    data = rng(10).integers(0, 256, (2, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(python2_cifar_batch(data, [3, 7]))
    _, raw = raw_for("cifar10", tmp_path)
    assert raw.test.labels.tolist() == [3, 7]
    assert torch.equal(raw.test.images.reshape(2, -1), torch.from_numpy(data))


@pytest.mark.parametrize("batch, labels, needle", [
    ("test_batch", [10], "label 10"), ("data_batch_3", [-1], "label -1"),
    ("data_batch_2", [[1, 2]], "not one label per sample"), ("data_batch_4", [1, 2], "1 images but it 2 labels"),
    ("data_batch_5", ["cat"], "not whole numbers"),
])
def test_cifar_labels_are_checked_per_file(tmp_path, batch, labels, needle):
    folder = cifar10_folder(tmp_path)
    dump(folder / batch, {b"data": np.zeros((1, 3072), np.uint8), b"labels": labels})
    with pytest.raises(BadInput) as info:
        raw_for("cifar10", tmp_path)
    one_line_naming(info, folder / batch, needle)


def test_cifar100_fine_label_100_is_outside(tmp_path):
    folder = tmp_path / "cifar-100-python"
    dump(folder / "train", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [99, 100]})
    dump(folder / "test", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
    with pytest.raises(BadInput) as info:
        raw_for("cifar100", tmp_path)
    one_line_naming(info, folder / "train", "label 100 of sample 1", "0..99")


def test_cifar_images_of_the_wrong_size(tmp_path):
    folder = cifar10_folder(tmp_path)
    dump(folder / "test_batch", {b"data": np.zeros((2, 3072 // 2), np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(BadInput) as info:
        raw_for("cifar10", tmp_path)
    one_line_naming(info, folder / "test_batch", "(2, 1536)")


def test_numpy_scalars_and_other_dtypes_in_a_cifar_batch_still_read(tmp_path):
    """Re-saved batches may hold numpy integer labels and a big-endian array: plain data, admitted."""
    folder = cifar10_folder(tmp_path)
    data = rng(11).integers(0, 256, (2, 3072)).astype(">u2")
    dump(folder / "test_batch", {b"data": data, b"labels": [np.int64(3), np.uint8(4)], b"batch_label": b"re-saved"})
    _, raw = raw_for("cifar10", tmp_path)
    assert raw.test.labels.tolist() == [3, 4]
    assert torch.equal(raw.test.images.reshape(2, -1), torch.from_numpy(data.astype(np.uint8)))


# ---- STL-10 binary, SVHN MATLAB --------------------------------------------------------------------


def test_stl10_reader_turns_column_major_images_upright(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    upright = {"train": rng(5).integers(0, 256, (2, 3, 96, 96), dtype=np.uint8),
               "test": rng(6).integers(0, 256, (1, 3, 96, 96), dtype=np.uint8)}
    labels = {"train": np.array([1, 10], dtype=np.uint8), "test": np.array([4], dtype=np.uint8)}  # 1-based
    for prefix in ("train", "test"):
        # on disk each channel is stored column by column
        np.ascontiguousarray(upright[prefix].transpose(0, 1, 3, 2)).tofile(folder / f"{prefix}_X.bin")
        labels[prefix].tofile(folder / f"{prefix}_y.bin")
    spec, raw = raw_for("stl10", tmp_path)
    assert spec.image_size == 96
    assert torch.equal(raw.train.images, torch.from_numpy(upright["train"]))
    assert torch.equal(raw.test.images, torch.from_numpy(upright["test"]))
    assert raw.train.labels.tolist() == [0, 9] and raw.test.labels.tolist() == [3]


def test_stl10_count_mismatch(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for prefix in ("train", "test"):
        np.zeros((2, 3, 96, 96), np.uint8).tofile(folder / f"{prefix}_X.bin")
        np.ones(3, np.uint8).tofile(folder / f"{prefix}_y.bin")
    with pytest.raises(BadInput, match="labels"):
        raw_for("stl10", tmp_path)


@pytest.mark.parametrize("stored", [0, 11])
def test_stl10_labels_outside_1_to_10(tmp_path, stored):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for prefix in ("train", "test"):
        np.zeros((2, 3, 96, 96), np.uint8).tofile(folder / f"{prefix}_X.bin")
        np.array([1, stored if prefix == "test" else 2], np.uint8).tofile(folder / f"{prefix}_y.bin")
    with pytest.raises(BadInput) as info:
        raw_for("stl10", tmp_path)
    one_line_naming(info, folder / "test_y.bin", f"label {stored}", "1..10")


@pytest.mark.parametrize("stored", [0, 11])
def test_svhn_labels_outside_1_to_10(tmp_path, stored):
    scipy_io = pytest.importorskip("scipy.io")
    for split in ("train", "test"):
        labels = np.array([[1], [stored if split == "train" else 2]], dtype=np.uint8)
        scipy_io.savemat(str(tmp_path / f"{split}_32x32.mat"), {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": labels})
    with pytest.raises(BadInput) as info:
        raw_for("svhn", tmp_path)
    one_line_naming(info, tmp_path / "train_32x32.mat", f"label {stored}", "1..10")


def test_svhn_reader(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    images = {"train": rng(7).integers(0, 256, (32, 32, 3, 3), dtype=np.uint8),
              "test": rng(8).integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)}
    labels = {"train": np.array([[10], [1], [9]], dtype=np.uint8), "test": np.array([[2], [10]], dtype=np.uint8)}
    for split in ("train", "test"):
        scipy_io.savemat(str(tmp_path / f"{split}_32x32.mat"), {"X": images[split], "y": labels[split]})
    _, raw = raw_for("svhn", tmp_path)
    assert tuple(raw.train.images.shape) == (3, 3, 32, 32)
    assert raw.train.labels.tolist() == [0, 1, 9]  # SVHN's label 10 is the digit 0
    assert raw.test.labels.tolist() == [2, 0]
    assert torch.equal(raw.train.images[1], torch.from_numpy(images["train"][:, :, :, 1].transpose(2, 0, 1).copy()))


# ---- missing files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(READERS))
def test_missing_files_name_the_folder_and_the_fix(tmp_path, name):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(BadInput) as info:
        raw_for(name, root)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and str(root) in message
    assert SPECS[name].how_to_get in message
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message
    else:
        assert "data.download" in message


# ---- synthetic ----------------------------------------------------------------------------------------


def test_synthetic_is_seeded_and_shaped_by_the_model():
    config = load_config(None, ["data.name=synthetic", "model.in_channels=1", "model.classes=4"])
    spec = dataset_spec(config.data, config.model)
    assert (spec.channels, spec.classes) == (1, 4)
    a, b, c = make_synthetic(spec, 0), make_synthetic(spec, 0), make_synthetic(spec, 1)
    assert tuple(a.train.images.shape) == (1024, 1, 32, 32) and tuple(a.test.images.shape) == (256, 1, 32, 32)
    assert a.train.images.dtype == torch.uint8
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert set(a.train.labels.tolist()) == {0, 1, 2, 3}
