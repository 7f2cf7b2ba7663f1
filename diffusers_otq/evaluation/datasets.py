"""Offline image datasets for training and scoring the reference flow-matching models.

Nothing here downloads anything. Two sources are supported:

* ``"fashion-mnist"``: the Debian package ``dataset-fashion-mnist`` (``sudo apt-get install -y dataset-fashion-mnist``),
  which installs the original IDX files under ``/usr/share/datasets/fashion-mnist/``. Set the environment variable
  ``OTQ_FASHION_MNIST_DIR`` to read the same four ``*-ubyte.gz`` files from another directory. 60000 train and
  10000 test images, 28x28, 10 classes (:data:`FASHION_MNIST_CLASSES`).
* ``"digits"``: scikit-learn's bundled ``load_digits`` (1797 images, 8x8, values 0..16, 10 classes), split 80/20
  into train/test with a fixed seed.

Every loader returns ``(images, labels)``: ``images`` is float32 of shape ``(N, 1, H, W)`` scaled to ``[-1, 1]``,
``labels`` is int64 of shape ``(N,)``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch


__all__ = [
    "DATASETS",
    "SPLITS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "load_fashion_mnist",
    "load_digits",
    "load_dataset",
    "dataset_info",
]

DATASETS: tuple[str, ...] = ("fashion-mnist", "digits")
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR_ENV = "OTQ_FASHION_MNIST_DIR"
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; expected one of {SPLITS}.")
    return split


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes, checking its magic number and its size against its header."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found. Install the dataset with "
            f"`sudo apt-get install -y dataset-fashion-mnist`, or set {FASHION_MNIST_DIR_ENV} to a directory "
            f"holding the four *-ubyte.gz IDX files."
        )
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} is not a readable gzip file ({e}); reinstall dataset-fashion-mnist.") from e
    header_bytes = 4 * (1 + ndim)
    if len(data) < header_bytes:
        raise ValueError(f"{path} is corrupt: {len(data)} bytes is shorter than the {header_bytes}-byte IDX header.")
    header = np.frombuffer(data, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(f"{path} is corrupt: IDX magic number is {int(header[0])}, expected {magic}.")
    shape = tuple(int(d) for d in header[1:])
    expected = header_bytes + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"{path} is corrupt: header says shape {shape} ({expected} bytes with header) but the file holds "
            f"{len(data)} bytes."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def _to_unit_range(images: np.ndarray, max_value: float) -> torch.Tensor:
    """uint8/int ``(N, H, W)`` in ``[0, max_value]`` -> float32 ``(N, 1, H, W)`` in ``[-1, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return (x / (max_value / 2.0) - 1.0).unsqueeze(1)


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST from the Debian ``dataset-fashion-mnist`` IDX files.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images, the ``t10k`` files).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` in ``[-1, 1]`` and int64 ``(N,)`` in ``0..9``
        (names in :data:`FASHION_MNIST_CLASSES`).

    Raises:
        FileNotFoundError: a file is missing (the message names it and the ``apt-get`` command).
        ValueError: a file is corrupt (bad gzip, magic number or size), or images and labels disagree.
    """
    prefix = _FASHION_MNIST_PREFIX[_check_split(split)]
    root = Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DIR)
    image_path = root / f"{prefix}-images-idx3-ubyte.gz"
    label_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC, ndim=3)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels."
        )
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path} holds images of shape {images.shape[1:]}, expected (28, 28).")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{label_path} holds label {int(labels.max())}, expected 0..{len(FASHION_MNIST_CLASSES) - 1}."
        )
    return _to_unit_range(images, 255.0), torch.from_numpy(labels.astype(np.int64))


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's 8x8 handwritten digits, split 80/20 with a fixed seed.

    The split is a permutation from ``numpy.random.default_rng(DIGITS_SPLIT_SEED)``; the first 20% (rounded down,
    359 images) is ``"test"`` and the rest (1438 images) is ``"train"``. It is the same on every machine.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 8, 8)`` in ``[-1, 1]`` and int64 ``(N,)`` in ``0..9``.
    """
    _check_split(split)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError("The digits dataset needs scikit-learn: `pip install scikit-learn`.") from e
    bunch = _sk_load_digits()
    images = np.asarray(bunch.images)
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(len(labels) * DIGITS_TEST_FRACTION)
    idx = order[:n_test] if split == "test" else order[n_test:]
    idx = np.sort(idx)
    return _to_unit_range(images[idx], 16.0), torch.from_numpy(labels[idx])


def load_dataset(name: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load dataset ``name`` (one of :data:`DATASETS`); see :func:`load_fashion_mnist` and :func:`load_digits`."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split)
    if name == "digits":
        return load_digits(split)
    raise ValueError(f"Unknown dataset {name!r}; valid names are {DATASETS}.")


def dataset_info(name: str) -> dict[str, int | tuple[str, ...]]:
    """Shape facts of dataset ``name`` without loading it: ``image_size``, ``channels``, ``num_classes``, ``classes``.

    >>> dataset_info("digits")["image_size"]
    8
    """
    if name == "fashion-mnist":
        return {"image_size": 28, "channels": 1, "num_classes": 10, "classes": FASHION_MNIST_CLASSES}
    if name == "digits":
        return {"image_size": 8, "channels": 1, "num_classes": 10, "classes": tuple(str(i) for i in range(10))}
    raise ValueError(f"Unknown dataset {name!r}; valid names are {DATASETS}.")
