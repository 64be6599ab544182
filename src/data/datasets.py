"""Small image datasets as uint8 tensors.

Every loader returns an :class:`ImageDataset`: the whole train pool and the global test set as
contiguous ``uint8 [N, C, H, W]`` tensors plus int64 labels, so the orchestrator can put them on
the device once and gather/normalise batches there.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from src.errors import ConfigError, InputError


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 [N, C, H, W], contiguous
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def partition_labels(self) -> torch.Tensor:
        """What partitioners split by: the class labels."""
        return self.labels


@dataclass
class ImageDataset:
    name: str
    train: ImageSplit  # the pool that gets partitioned over clients
    test: ImageSplit  # the global test set
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units (pixels / 255)
    std: tuple[float, ...]


class DatasetNotFoundError(InputError):
    """The dataset files are not on disk and could not be downloaded."""


def _split(images, labels) -> ImageSplit:
    images = torch.as_tensor(images, dtype=torch.uint8)
    if images.ndim == 3:  # [N, H, W] -> [N, 1, H, W]
        images = images.unsqueeze(1)
    return ImageSplit(images.contiguous(), torch.as_tensor(labels, dtype=torch.int64).contiguous())


# --------------------------------------------------------------------------- digits (offline)


def load_digits(image_size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), as 1 x image_size^2 uint8.

    Pixels 0..16 are scaled to 0..255, resized with bilinear interpolation, then split into a
    seeded, stratified train/test split. mean/std are computed from the train split.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if int(image_size) < 1:
        raise ConfigError(f"data.image_size must be >= 1, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.loader.test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sk_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    if int(image_size) != x.shape[-1]:
        size = (int(image_size), int(image_size))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    images = x.round().clamp_(0, 255).to(torch.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    train = _split(images[torch.as_tensor(train_idx)], labels[train_idx])
    test = _split(images[torch.as_tensor(test_idx)], labels[test_idx])
    pixels = train.images.float().div_(255.0)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).tolist())
    return ImageDataset("digits", train, test, 10, mean, std)


# --------------------------------------------------------------------------- torchvision datasets

# Reader: (root, train) -> (uint8 images [N, (C,) H, W], int labels [N]); raises FileNotFoundError
# or RuntimeError (torchvision's "Dataset not found") when the files are absent.
Reader = Callable[[str, bool], tuple]


def _load_torchvision(
    name: str,
    root: str,
    download: bool,
    folder: str,
    read: Reader,
    fetch: Callable[[str], object],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> ImageDataset:
    """Shared by the torchvision loaders: read from disk, else download once, else one clear error."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    where = os.path.join(root, folder) + os.sep

    def read_both() -> tuple[ImageSplit, ImageSplit]:
        return _split(*read(root, True)), _split(*read(root, False))

    try:
        train, test = read_both()
    except (FileNotFoundError, RuntimeError) as missing:
        reason = "download=false"
        if download:
            try:
                fetch(root)
                train, test = read_both()
            except Exception as err:  # offline: URLError, RuntimeError, OSError, ...
                first_line = (str(err).strip().splitlines() or [""])[0]
                reason = f"download failed: {type(err).__name__}: {first_line}"
            else:
                return ImageDataset(name, train, test, 10, mean, std)
        raise DatasetNotFoundError(
            f"{name} not found in {where} ({reason}); put the files there in torchvision layout, "
            f"set paths.data_dir=<folder containing {folder}/>, or run once online with data.loader.download=true"
        ) from missing
    return ImageDataset(name, train, test, 10, mean, std)


class DataFileError(ConfigError):
    """A dataset file is there but is not what its format says (truncated, wrong header)."""


# What a CIFAR-10 batch pickle may name: numpy's array constructors (protocols 2-5) and the
# codec python-2 pickles use for raw bytes. Nothing else: a data file must not run code.
_CIFAR_GLOBALS = {
    *((f"numpy{core}.multiarray", "_reconstruct") for core in ("._core", ".core")),
    *((f"numpy{core}.numeric", "_frombuffer") for core in ("._core", ".core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR batch never does"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, list[int]]:
    """One batch file: {"data": uint8 [N, 3072], "labels": [N]}, keys as str or bytes (python-2
    era pickles and some mirrors keep them as bytes)."""
    with open(path, "rb") as f:  # FileNotFoundError when absent
        try:
            entry = _CifarUnpickler(f, encoding="latin1").load()  # the originals: python-2 pickles
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise DataFileError(
                f"data=cifar10: {path} is not a readable CIFAR-10 batch ({error or 'truncated'}); "
                "replace it with the original file"
            ) from None
    if isinstance(entry, dict):
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = np.asarray(entry.get("labels", []) if isinstance(entry, dict) else [])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != (len(data),)
        or labels.dtype.kind not in "iu"
        or (len(labels) and not 0 <= labels.min() <= labels.max() < 10)
    ):
        got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise DataFileError(
            f"data=cifar10: {path} is not a CIFAR-10 batch (expected 'data': uint8 [N, 3072] "
            f"and 'labels': N ints in 0..9; got {got}); replace it with the original file"
        )
    return data, labels.tolist()


def _read_cifar10(root: str, train: bool) -> tuple[np.ndarray, list[int]]:
    # We read the pickles ourselves instead of using torchvision.datasets.CIFAR10, because that
    # class checks the md5 of every batch file and rejects any file it did not download itself
    # (re-packed copies, the test fixtures), and unpickles with no restriction. The format is
    # CIFAR's documented python pickle: {"data": uint8 [N, 3072] (R, G, B planes), "labels": [N]}.
    folder = os.path.join(root, "cifar-10-batches-py")
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    data, labels = [], []
    for file in files:
        batch, batch_labels = _read_cifar_batch(os.path.join(folder, file))
        data.append(batch.reshape(-1, 3, 32, 32))
        labels.extend(batch_labels)
    return np.concatenate(data), labels


def _check_idx(path: str, ndim: int) -> int:
    """An MNIST-format idx file of unsigned bytes with `ndim` dimensions: its header's magic
    number, and a size that matches the dimensions it declares. Returns the first dimension."""
    with open(path, "rb") as f:
        header = f.read(4 * (ndim + 1))
        size = os.fstat(f.fileno()).st_size
    problem = None
    if len(header) < 4 * (ndim + 1):
        problem = f"{size} bytes, shorter than its header"
    else:
        magic, *dims = struct.unpack(f">{ndim + 1}I", header)
        expected = 4 * (ndim + 1) + int(np.prod(dims))
        if magic != 0x800 + ndim:
            problem = f"magic number {magic:#010x}, expected {0x800 + ndim:#010x}"
        elif size != expected:
            problem = f"{size} bytes, but its header {dims} needs {expected} (truncated?)"
    if problem:
        raise DataFileError(
            f"{path} is not an idx file of {ndim}-d uint8 data ({problem}); "
            "replace it with the original (uncompressed) file"
        )
    return dims[0]


def _torchvision_reader(cls) -> Reader:
    # MNIST-style classes only check that the raw files exist (no md5) and decode the idx files;
    # their decoder asserts, so the files' headers and sizes are checked here first.
    def read(root: str, train: bool):
        folder, prefix = os.path.join(root, cls.__name__, "raw"), "train" if train else "t10k"
        images = os.path.join(folder, f"{prefix}-images-idx3-ubyte")
        labels = os.path.join(folder, f"{prefix}-labels-idx1-ubyte")
        if os.path.isfile(images) and os.path.isfile(labels):  # else torchvision says missing
            if _check_idx(images, 3) != _check_idx(labels, 1):
                raise DataFileError(f"{images} and {labels} hold different numbers of samples")
        ds = cls(root=root, train=train, download=False)
        return ds.data, ds.targets

    return read


def load_cifar10(root: str, download: bool = True) -> ImageDataset:
    """CIFAR-10, 3x32x32, files in ``<root>/cifar-10-batches-py/``."""
    from torchvision.datasets import CIFAR10

    return _load_torchvision(
        "CIFAR-10",
        root,
        download,
        "cifar-10-batches-py",
        _read_cifar10,
        lambda r: CIFAR10(root=r, train=True, download=True),  # fetches train and test
        # Official per-channel constants (computed once over the 50k train images).
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )


def load_mnist(root: str, download: bool = True) -> ImageDataset:
    """MNIST, 1x28x28, files in ``<root>/MNIST/raw/``."""
    from torchvision.datasets import MNIST

    return _load_torchvision(
        "MNIST",
        root,
        download,
        os.path.join("MNIST", "raw"),
        _torchvision_reader(MNIST),
        lambda r: MNIST(root=r, train=True, download=True),  # fetches train and test
        mean=(0.1307,),  # official constants over the 60k train images
        std=(0.3081,),
    )


def load_fashion_mnist(root: str, download: bool = True) -> ImageDataset:
    """Fashion-MNIST, 1x28x28, files in ``<root>/FashionMNIST/raw/``."""
    from torchvision.datasets import FashionMNIST

    return _load_torchvision(
        "Fashion-MNIST",
        root,
        download,
        os.path.join("FashionMNIST", "raw"),
        _torchvision_reader(FashionMNIST),
        lambda r: FashionMNIST(root=r, train=True, download=True),
        mean=(0.2860,),  # official constants over the 60k train images
        std=(0.3530,),
    )


# --------------------------------------------------------------------------- synthetic (offline)


def load_synthetic(
    num_train: int = 60000,
    num_test: int = 10000,
    image_size: int = 28,
    channels: int = 1,
    num_classes: int = 10,
    noise: float = 60.0,
    seed: int = 0,
) -> ImageDataset:
    """Generated images of any shape (default Fashion-MNIST's: 60k/10k, 1x28x28, 10 classes):
    one random uint8 prototype per class plus Gaussian pixel noise, so the labels are learnable.
    For benchmarks and scaling runs without files or network."""
    if min(num_train, num_test, image_size, channels, num_classes) < 1:
        raise ConfigError("data.loader sizes (num_train, num_test, image_size, ...) must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    shape = (channels, image_size, image_size)
    prototypes = torch.rand((num_classes, *shape), generator=gen) * 255.0

    def split(n: int) -> ImageSplit:
        labels = torch.randint(num_classes, (n,), generator=gen)
        images = prototypes[labels] + noise * torch.randn((n, *shape), generator=gen)
        return _split(images.round().clamp_(0, 255).to(torch.uint8), labels)

    train, test = split(num_train), split(num_test)
    mean = tuple(train.images.float().mean(dim=(0, 2, 3)).div(255.0).tolist())
    std = tuple(train.images.float().std(dim=(0, 2, 3)).div(255.0).tolist())
    return ImageDataset("synthetic", train, test, num_classes, mean, std)
