"""The bundled reference pipelines: present, loadable by short name, sampling, with their classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusers_otq import FlowMatchPipeline, OTQConfig, reference_models
from diffusers_otq.evaluation.classifier import reference_classifier
from diffusers_otq.reference import reference_info, resolve_reference


BUNDLED = reference_models()


def test_the_fashion_mnist_unet_is_bundled() -> None:
    assert "otq/fashion-mnist-unet" in BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_pipeline_is_small_documented_and_samples(name: str) -> None:
    folder = Path(resolve_reference(name))
    weights = list(folder.rglob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) < 5e6, "bundled weights must stay a few MB"
    info = reference_info(name)
    assert info["name"] == name and len(info["classes"]) == info["null_label"]
    pipe = FlowMatchPipeline.from_pretrained(name, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.num_classes == len(info["classes"])
    images = pipe(batch_size=2, class_labels=[0, 1], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, info["image_size"], info["image_size"]) and torch.isfinite(images).all()
    classifier = reference_classifier(name)
    assert classifier is not None and classifier(images * 2 - 1).shape == (2, len(info["classes"]))


def test_bundled_pipeline_quantizes_on_load() -> None:
    pipe = FlowMatchPipeline.from_pretrained("otq/fashion-mnist-unet", quantization_config=OTQConfig(bits=3))
    assert type(pipe.transformer.conv_in).__name__ == "OTQConv2d"


def test_bundled_dit_quantizes_its_linear_layers_on_load() -> None:
    pipe = FlowMatchPipeline.from_pretrained("otq/fashion-mnist-dit", quantization_config=OTQConfig(bits=3))
    kinds = {type(m).__name__ for m in pipe.transformer.modules()}
    assert "OTQLinear" in kinds and "Linear" not in kinds
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, class_labels=[3, 7], num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_card_reports_the_measured_quality(name: str) -> None:
    metrics = reference_info(name)["metrics"]
    card = (
        Path(__file__).resolve().parent.parent / "diffusers_otq" / "model_cards" / f"{name.split('/')[-1]}.md"
    ).read_text()
    assert metrics["class_accuracy"] >= 0.8 and f"**{metrics['class_accuracy']:.1%}**" in card
    assert f"**{metrics['fid_test']:.2f}**" in card and metrics["fid_samples"] >= 2000
    assert (Path(resolve_reference(name)) / "README.md").read_text() == card


@pytest.mark.parametrize("name", ["otq/..", "otq/../..", "otq/../../etc", "otq/digits-unet/../.."])
def test_short_names_cannot_reach_outside_the_bundled_folder(name: str) -> None:
    with pytest.raises(ValueError, match="not a bundled reference pipeline"):
        resolve_reference(name)
