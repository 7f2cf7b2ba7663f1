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


def test_the_bundled_model_has_two_judges_trained_apart() -> None:
    from diffusers_otq.evaluation.classifier import JUDGES, reference_classifier

    judges = {judge: reference_classifier("otq/fashion-mnist-dit", judge) for judge in JUDGES}
    assert all(isinstance(model, FashionClassifier) and not model.training for model in judges.values())
    bundled, plain = (dict(m.state_dict()) for m in (judges["bundled"], judges["plain"]))
    assert bundled.keys() == plain.keys() and not torch.equal(bundled["head.5.weight"], plain["head.5.weight"])
    with pytest.raises(ValueError, match="judge='lenient' is unknown"):
        reference_classifier("otq/fashion-mnist-dit", "lenient")


def test_class_metrics_score_agreement_with_the_float_samples_from_the_same_noise(tmp_path: Path) -> None:
    from diffusers_otq.evaluation.config import load_config
    from diffusers_otq.evaluation.datasets import load_dataset
    from diffusers_otq.evaluation.runner import Evaluator

    config = load_config(
        {"models": ["otq/fashion-mnist-dit"], "blocks": [{"name": "b", "methods": ["ot"], "bits": [3]}]}
    )
    evaluator = Evaluator(config, tmp_path, tmp_path)
    images = (load_dataset("fashion-mnist", "test")[0][:40] + 1) / 2  # [0, 1] like generated samples
    same = evaluator._class_metrics("otq/fashion-mnist-dit", images, images)
    assert set(same) == {"class_accuracy", "class_agreement", "class_accuracy_plain", "class_agreement_plain"}
    assert same["class_agreement"] == same["class_agreement_plain"] == 1.0
    upside_down = evaluator._class_metrics("otq/fashion-mnist-dit", images.flip(-2), images)
    assert upside_down["class_agreement"] < 0.9 and upside_down["class_agreement_plain"] < 0.9
    assert set(evaluator._class_metrics("otq/fashion-mnist-dit", images, None)) == {
        "class_accuracy",
        "class_accuracy_plain",
    }  # the float model's own row: accuracy only
