"""Tests for :mod:`diffusers_otq.evaluation.classifier`: forward shapes and the safetensors + JSON save/load roundtrip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_otq.evaluation.classifier import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    FashionClassifier,
    load_classifier,
    save_classifier,
)


@pytest.mark.parametrize("image_size, num_stages", [(28, 3), (8, 2)], ids=["fashion-mnist", "digits"])
def test_forward_shape(image_size: int, num_stages: int) -> None:
    model = FashionClassifier(image_size=image_size, num_stages=num_stages, width=8, hidden=16)
    assert model(torch.randn(3, 1, image_size, image_size)).shape == (3, 10)


def test_too_many_stages_for_image_size() -> None:
    with pytest.raises(ValueError, match="too small"):
        FashionClassifier(image_size=4, num_stages=3)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = FashionClassifier(width=8, hidden=16)
    model.train()
    model(torch.randn(16, 1, 28, 28))  # move the BatchNorm running statistics away from their init
    model.eval()
    save_classifier(model, tmp_path, test_accuracy=0.5, dataset="fashion-mnist")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["architecture"]["width"] == 8 and config["test_accuracy"] == 0.5

    loaded = load_classifier(tmp_path)
    assert not loaded.training
    assert loaded.saved_config["dataset"] == "fashion-mnist"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_classifier(tmp_path)
