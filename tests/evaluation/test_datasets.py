"""Tests for :mod:`diffusers_otq.evaluation.datasets`: shapes, ranges, label counts, and clear errors for missing/corrupt files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_otq.evaluation.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_DIR_ENV,
    dataset_info,
    load_dataset,
    load_digits,
    load_fashion_mnist,
)


HAS_FASHION_MNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
requires_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST, reason="needs `sudo apt-get install -y dataset-fashion-mnist`"
)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">" + "I" * (1 + array.ndim), magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion_mnist(root: Path, n: int = 20, prefix: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.arange(n, dtype=np.uint8) % 10
    _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return images, labels


@requires_fashion_mnist
def test_fashion_mnist_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_DIR_ENV, raising=False)
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * len(FASHION_MNIST_CLASSES)


@requires_fashion_mnist
def test_fashion_mnist_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_DIR_ENV, raising=False)
    images, labels = load_dataset("fashion-mnist", "train")
    assert images.shape == (60000, 1, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10


def test_fake_files_roundtrip_through_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw_images, raw_labels = _write_fake_fashion_mnist(tmp_path)
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    images, labels = load_fashion_mnist("test")
    assert images.shape == (20, 1, 28, 28)
    torch.testing.assert_close(images[:, 0], torch.from_numpy(raw_images.astype(np.float32)) / 127.5 - 1)
    assert labels.tolist() == raw_labels.tolist()
    assert images[0, 0, 0, 0] == -1.0 and images[0, 0, 0, 1] == 1.0


def test_missing_files_name_path_and_apt_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train")
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(info.value)
    assert "sudo apt-get install -y dataset-fashion-mnist" in str(info.value)


@pytest.mark.parametrize(
    "corruption, match",
    [("magic", "magic number is 2049, expected 2051"), ("truncated", "header says shape"), ("not_gzip", "gzip")],
)
def test_corrupt_image_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corruption: str, match: str) -> None:
    _write_fake_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    if corruption == "magic":
        _write_idx(path, np.zeros((20, 28, 28), dtype=np.uint8), 2049)
    elif corruption == "truncated":
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[:-100]))
    else:
        path.write_bytes(b"this is not a gzip file at all")
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=match):
        load_fashion_mnist("test")


def test_image_label_count_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_fashion_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8), 2049)
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="20 images but .* 19 labels"):
        load_fashion_mnist("test")


def test_digits_split_is_deterministic_and_disjoint() -> None:
    pytest.importorskip("sklearn")
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    assert x_train.shape == (1438, 1, 8, 8) and x_test.shape == (359, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert x_train.min() >= -1 and x_train.max() <= 1 and x_train.min() == -1.0 and x_train.max() == 1.0
    assert set(y_train.tolist()) == set(range(10)) and set(y_test.tolist()) == set(range(10))
    torch.testing.assert_close(load_digits("test")[0], x_test, rtol=0, atol=0)
    train_rows = {tuple(r) for r in x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in x_test.flatten(1).tolist())
    assert overlap < 5  # sklearn digits has a few exact duplicates, but the index split is disjoint


def test_unknown_names_list_valid_values() -> None:
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="train"):
        load_fashion_mnist("validation")
    with pytest.raises(ValueError, match="digits"):
        dataset_info("mnist")
    assert DATASETS == ("fashion-mnist", "digits")
