"""FlowMatchPipeline: velocity convention, determinism, guidance, schedulers, quantized load/save, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    ConfigMixin,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ModelMixin,
    PipelineQuantizationConfig,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from PIL import Image

from diffusers_otq import FlowMatchPipeline, OTQConfig
from diffusers_otq import reference as reference_module
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import tiny_dit, tiny_unet


SCHEDULERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


class ExactVelocity(ModelMixin, ConfigMixin):
    """The true velocity towards one fixed image x0: v = (x_sigma - x0) / sigma, with sigma = timestep / 1000."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        self.register_buffer("x0", torch.linspace(-0.9, 0.9, sample_size * sample_size).reshape(1, 1, 4, 4))
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a dtype and device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        sigma = (timestep.float() / 1000).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=((sample.float() - self.x0) / sigma).to(sample.dtype))


def conditional_unet() -> UNet2DModel:
    return tiny_unet(num_class_embeds=11, attention=False)  # 10 classes + the null label


def small_dit() -> DiTTransformer2DModel:
    return tiny_dit(num_layers=1)


def make_pipeline(model: ModelMixin | None = None, scheduler: str = "euler") -> FlowMatchPipeline:
    pipe = FlowMatchPipeline(model if model is not None else conditional_unet(), SCHEDULERS[scheduler]())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: FlowMatchPipeline, seed: int = 0, **kwargs: object) -> torch.Tensor:
    kwargs = {"batch_size": 3, "num_inference_steps": 4, "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_velocity_convention_matches_the_scheduler(scheduler: str) -> None:
    """With the exact velocity field the solver lands on x0 from any noise: sign and timestep scale are right."""
    model = ExactVelocity()
    pipe = make_pipeline(model, scheduler)
    images = run(pipe, num_inference_steps=7, batch_size=2)
    expected = (model.x0 / 2 + 0.5).expand_as(images)
    assert torch.allclose(images, expected, atol=1e-4), (images - expected).abs().max()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("build", [conditional_unet, small_dit], ids=["unet", "dit"])
def test_deterministic_for_a_generator(build: object, scheduler: str) -> None:
    pipe = make_pipeline(build(), scheduler)
    first = run(pipe, class_labels=[1, 2, 3], guidance_scale=2.0)
    assert first.shape == (3, 1, 8, 8) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, run(pipe, class_labels=[1, 2, 3], guidance_scale=2.0))
    assert not torch.equal(first, run(pipe, seed=1, class_labels=[1, 2, 3], guidance_scale=2.0))


def test_classifier_free_guidance() -> None:
    pipe = make_pipeline()
    conditional = run(pipe, class_labels=4)
    assert not torch.equal(conditional, run(pipe, class_labels=5))  # the label matters
    assert not torch.equal(conditional, run(pipe, class_labels=4, guidance_scale=3.0))
    # guidance 0 is the null-label (unconditional) sample; no labels means the same
    assert torch.allclose(run(pipe, class_labels=4, guidance_scale=0.0), run(pipe), atol=1e-6)


def test_output_types() -> None:
    pipe = make_pipeline()
    pil = pipe(batch_size=2, class_labels=0, num_inference_steps=2).images
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    array = pipe(batch_size=2, class_labels=0, num_inference_steps=2, output_type="np").images
    assert array.shape == (2, 8, 8, 1)
    (images,) = pipe(batch_size=1, class_labels=0, num_inference_steps=2, output_type="pt", return_dict=False)
    assert images.shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"class_labels": [0, 10, 11]}, r"class_labels \[10, 11\] are out of range.*10 classes \(0..9\)"),
        ({"class_labels": [-1, 0, 1]}, r"\[-1\] are out of range"),
        ({"class_labels": [0, 1]}, r"2 class_labels for batch_size=3"),
        ({"class_labels": [0.5, 1, 2]}, r"must be integers"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0 must be an int >= 1"),
        ({"output_type": "latent"}, r"output_type='latent' is not supported"),
        ({"guidance_scale": float("nan")}, r"guidance_scale=nan"),
        ({"batch_size": 0}, r"batch_size=0"),
    ],
)
def test_bad_call_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(make_pipeline(), **kwargs)


def test_labels_for_an_unconditional_model_are_refused() -> None:
    pipe = make_pipeline(ExactVelocity())
    with pytest.raises(ValueError, match="not class-conditional"):
        run(pipe, class_labels=1)


@pytest.mark.parametrize(
    "config",
    [OTQConfig(bits=3), PipelineQuantizationConfig(quant_mapping={"transformer": OTQConfig(bits=3)})],
    ids=["bare", "pipeline"],
)
def test_quantized_load_save_reload(config: object, tmp_path: Path) -> None:
    make_pipeline().save_pretrained(tmp_path / "float")
    pipe = FlowMatchPipeline.from_pretrained(tmp_path / "float", quantization_config=config)
    assert any(isinstance(m, OTQLayerMixin) for m in pipe.transformer.modules())
    pipe.set_progress_bar_config(disable=True)
    images = run(pipe, class_labels=[1, 2, 3], guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "q")
    index = json.loads((tmp_path / "q" / "model_index.json").read_text())
    assert index["_class_name"] == "FlowMatchPipeline" and index["transformer"] == ["diffusers", "UNet2DModel"]
    reloaded = FlowMatchPipeline.from_pretrained(tmp_path / "q")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(reloaded, class_labels=[1, 2, 3], guidance_scale=2.0), images)


def test_bundled_names_resolve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_pipeline().save_pretrained(tmp_path / "tiny-unet")
    (tmp_path / "notes").mkdir()
    monkeypatch.setattr(reference_module, "_root", lambda: tmp_path)
    assert reference_module.reference_models() == ["otq/tiny-unet"]
    pipe = FlowMatchPipeline.from_pretrained("otq/tiny-unet")
    assert isinstance(pipe.transformer, UNet2DModel)
    with pytest.raises(
        ValueError, match=r"'otq/nope' is not a bundled reference pipeline; available: \['otq/tiny-unet'\]"
    ):
        FlowMatchPipeline.from_pretrained("otq/nope")


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    conditional_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"not a diffusers pipeline folder.*UNet2DModel.from_pretrained"):
        FlowMatchPipeline.from_pretrained(tmp_path / "unet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        FlowMatchPipeline.from_pretrained(tmp_path / "empty")
