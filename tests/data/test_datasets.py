"""Dataset loaders: digits (bundled), CIFAR-10 and MNIST from files written to tmp. No downloads."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from src.data import (
    DataFileError,
    DatasetNotFoundError,
    ImageDataset,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_mnist,
)
from tests.conftest import WritesAFile


def _check_split(split, n, shape):
    assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
    assert split.labels.dtype == torch.int64
    assert tuple(split.images.shape) == (n, *shape)
    assert split.labels.shape == (n,)


# --------------------------------------------------------------------------- digits


def test_load_digits_shapes_dtypes_and_labels():
    ds = load_digits()
    assert isinstance(ds, ImageDataset) and ds.name == "digits" and ds.num_classes == 10
    _check_split(ds.train, 1437, (1, 16, 16))  # 1797 images, 80/20 split
    _check_split(ds.test, 360, (1, 16, 16))
    for split in (ds.train, ds.test):
        assert split.labels.min() == 0 and split.labels.max() == 9
    assert len(ds.mean) == len(ds.std) == 1
    assert 0 < ds.mean[0] < 1 and 0 < ds.std[0] < 1


@pytest.mark.parametrize("size", [8, 28])
def test_load_digits_image_size(size):
    ds = load_digits(image_size=size)
    assert tuple(ds.train.images.shape[1:]) == (1, size, size)
    assert ds.train.images.max() == 255 and ds.train.images.min() == 0  # 0..16 scaled to 0..255


def test_load_digits_mean_std_from_train_split():
    ds = load_digits()
    pixels = ds.train.images.float() / 255
    assert ds.mean[0] == pytest.approx(pixels.mean().item(), rel=1e-5)
    assert ds.std[0] == pytest.approx(pixels.std().item(), rel=1e-4)


def test_load_digits_split_is_seeded_and_stratified():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.test.images, c.test.images)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class


# --------------------------------------------------------------------------- CIFAR-10 (fake pickles)


def _write_cifar(root, per_batch=4):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        batches[name] = entry
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return batches


def test_cifar10_reads_cifar_format_pickles(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    # downloads allowed, but the files are there: any attempt to fetch fails the test (no network)
    monkeypatch.setattr(CIFAR10, "download", lambda self: pytest.fail("tried to download"))
    batches = _write_cifar(str(tmp_path))
    ds = load_cifar10(str(tmp_path), download=True)
    assert ds.num_classes == 10 and len(ds.mean) == len(ds.std) == 3
    _check_split(ds.train, 20, (3, 32, 32))
    _check_split(ds.test, 4, (3, 32, 32))
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    expected = np.concatenate([b["data"] for b in train]).reshape(-1, 3, 32, 32)
    assert np.array_equal(ds.train.images.numpy(), expected)  # CHW planes in file order
    assert ds.train.labels.tolist() == sum((b["labels"] for b in train), [])
    assert ds.test.labels.tolist() == batches["test_batch"]["labels"]


def test_torchvision_cifar10_rejects_fake_pickles_hence_own_reader(tmp_path):
    # Pins the reason load_cifar10 reads the pickles itself: torchvision md5-checks every file.
    from torchvision.datasets import CIFAR10

    _write_cifar(str(tmp_path))
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR10(str(tmp_path), download=False)


def test_cifar10_accepts_bytes_keys_as_python_2_era_pickles_have_them(tmp_path):
    batches = _write_cifar(str(tmp_path))
    folder = tmp_path / "cifar-10-batches-py"
    for name, entry in batches.items():  # re-written with b"data", b"labels"
        with open(folder / name, "wb") as f:
            pickle.dump({k.encode(): v for k, v in entry.items()}, f, protocol=2)
    ds = load_cifar10(str(tmp_path), download=False)
    assert ds.test.labels.tolist() == batches["test_batch"]["labels"]
    assert np.array_equal(ds.test.images.numpy().reshape(4, -1), batches["test_batch"]["data"])


@pytest.mark.parametrize("damage", ["truncated", "wrong keys", "runs code", "not a pickle"])
def test_a_damaged_cifar_batch_is_refused_naming_the_file(tmp_path, damage):
    _write_cifar(str(tmp_path))
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    planted = tmp_path / "planted"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:100])
    elif damage == "wrong keys":
        batch.write_bytes(pickle.dumps({"pixels": np.zeros((1, 3072), np.uint8)}))
    elif damage == "runs code":
        batch.write_bytes(pickle.dumps({"data": WritesAFile(planted), "labels": [0]}))
    else:
        batch.write_bytes(b"<html>mirror error page</html>")
    with pytest.raises(DataFileError) as refused:
        load_cifar10(str(tmp_path), download=False)
    message = str(refused.value)
    assert str(batch) in message and "\n" not in message
    assert not planted.exists()


def test_cifar10_missing_raises_with_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10(str(tmp_path), download=False)
    msg = str(err.value)
    assert "CIFAR-10" in msg and os.path.join(str(tmp_path), "cifar-10-batches-py") in msg
    assert "paths.data_dir" in msg and "\n" not in msg


# --------------------------------------------------------------------------- MNIST (tiny idx files)


def _write_idx(folder, prefix, n, rng):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return images, labels


@pytest.mark.parametrize(
    "loader, folder", [(load_mnist, "MNIST"), (load_fashion_mnist, "FashionMNIST")]
)
def test_mnist_family_reads_idx_files(tmp_path, loader, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, train_y = _write_idx(str(raw), "train", 6, rng)
    test_x, test_y = _write_idx(str(raw), "t10k", 3, rng)
    ds = loader(str(tmp_path), download=False)
    _check_split(ds.train, 6, (1, 28, 28))
    _check_split(ds.test, 3, (1, 28, 28))
    assert np.array_equal(ds.train.images[:, 0].numpy(), train_x)
    assert ds.train.labels.tolist() == train_y.tolist()
    assert np.array_equal(ds.test.images[:, 0].numpy(), test_x)
    assert ds.test.labels.tolist() == test_y.tolist()


def _idx_folder(root, folder):
    """<root>/<folder>/raw with 6 train and 3 test samples in idx files."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(str(raw), "train", 6, rng)
    _write_idx(str(raw), "t10k", 3, rng)
    return raw


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncated", "needs 4720 (truncated?)"),
        ("wrong magic", "magic number 0x00000802, expected 0x00000803"),
        ("header only", "shorter than its header"),
    ],
)
def test_a_damaged_idx_file_is_refused_naming_the_file(tmp_path, damage, expected):
    images = _idx_folder(tmp_path, "FashionMNIST") / "train-images-idx3-ubyte"
    data = images.read_bytes()
    if damage == "truncated":
        images.write_bytes(data[:-100])
    elif damage == "wrong magic":
        images.write_bytes(struct.pack(">I", 0x802) + data[4:])
    else:
        images.write_bytes(data[:6])
    with pytest.raises(DataFileError) as refused:
        load_fashion_mnist(str(tmp_path), download=False)
    message = str(refused.value)
    assert str(images) in message and expected in message and "\n" not in message


def test_idx_files_with_different_sample_counts_are_refused(tmp_path):
    labels = _idx_folder(tmp_path, "MNIST") / "train-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 0x801, 5) + bytes(5))
    with pytest.raises(DataFileError, match="hold different numbers of samples"):
        load_mnist(str(tmp_path), download=False)


def test_mnist_missing_raises_with_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_mnist(str(tmp_path), download=False)
    msg = str(err.value)
    assert "MNIST" in msg and os.path.join(str(tmp_path), "MNIST", "raw") in msg
    assert "paths.data_dir" in msg and "\n" not in msg
