"""Driving the full-precision model along its own trajectories: which inputs are recorded, and every refusal."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from diffusers_otq import CalibrationError, OTQConfig, calibrate, quantize_model
from diffusers_otq.calibration.sampling import selected_layers
from diffusers_otq.testing.tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_unet
from tests.calibration.helpers import dit_pipeline, quick, unet_pipeline


def test_velocity_sensitivity_records_probes_from_an_extra_batch() -> None:
    stats = calibrate(dit_pipeline(), OTQConfig(bits=3), quick(sensitivity="velocity"))
    assert len(stats.probes) == 2
    args, kwargs = stats.probes.calls[0]
    assert isinstance(args[0], torch.Tensor) and args[0].shape[0] == 2 * 2  # 2 probe samples, guided


def test_class_label_pipeline_records_every_selected_layer_once() -> None:
    pipe = unet_pipeline()
    config = OTQConfig(bits=3, modules_to_not_convert=["conv_out"])
    stats = calibrate(pipe, config, quick())
    assert list(stats) == list(selected_layers(pipe.transformer, config))
    assert "conv_out" not in stats and "conv_in" in stats
    # conv_in sees every latent position of every denoiser call: 6 samples x 2 (guidance) x 64 positions x 3 steps.
    assert float(stats["conv_in"].count) == 6 * 2 * 64 * 3
    assert stats.info["num_batches"] == 2 and stats.info["processes"] == 1 and stats.info["source"] == "class_labels"
    assert stats.probes is None  # probes are recorded for the velocity sensitivity only
    again = calibrate(pipe, config, quick())
    for name in stats:
        assert all(torch.equal(a, b) for a, b in zip(stats[name].tensors(), again[name].tensors(), strict=True)), name


def test_timestep_weighting_scales_the_statistics() -> None:
    pipe = dit_pipeline()
    config = OTQConfig(bits=3)
    plain = calibrate(pipe, config, quick())
    seen: list[float] = []

    def late_only(sigma: float) -> float:
        seen.append(sigma)
        return 0.0 if sigma > 0.5 else 2.0

    weighted = calibrate(pipe, config, quick(timestep_weighting=late_only))
    assert seen and all(0.0 <= s <= 1.0 for s in seen)
    name = next(iter(plain))
    assert 0 < float(weighted[name].count) < 2 * float(plain[name].count)
    with pytest.raises(CalibrationError, match="expected a finite number >= 0"):
        calibrate(pipe, config, quick(timestep_weighting=lambda sigma: -1.0))


def test_several_passes_give_identical_statistics() -> None:
    pipe = dit_pipeline()
    config = OTQConfig(bits=3)
    one = calibrate(pipe, config, quick())
    many = calibrate(pipe, config, quick(max_statistics_bytes=200_000))
    assert many.info["passes"] > 1 == one.info["passes"]
    for name in one:
        assert all(torch.equal(a, b) for a, b in zip(one[name].tensors(), many[name].tensors(), strict=True)), name


def test_prompts_and_class_labels_go_to_the_right_pipelines(tmp_path) -> None:
    with pytest.raises(CalibrationError, match="class-conditional and takes no prompts"):
        calibrate(unet_pipeline(), OTQConfig(bits=3), quick(prompts=["a cat"]))
    sd3 = tiny_sd3_pipeline(tmp_path)
    with pytest.raises(CalibrationError, match="pass prompts=\\[...\\] instead of class_labels"):
        calibrate(sd3, OTQConfig(bits=3), quick(class_labels=[0]))
    with pytest.raises(CalibrationError, match="calibration needs prompts"):
        calibrate(sd3, OTQConfig(bits=3), quick())
    with pytest.raises(CalibrationError, match="out of range"):
        calibrate(unet_pipeline(), OTQConfig(bits=3), quick(class_labels=[10]))
    with pytest.raises(CalibrationError, match="forward_fn"):
        calibrate(tiny_unet(), OTQConfig(bits=3), quick())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_text_to_image_pipelines_calibrate_from_prompts(kind: str, tmp_path) -> None:
    pipe = (tiny_sd3_pipeline if kind == "sd3" else tiny_flux_pipeline)(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    extra = {"height": 16, "width": 16} if kind == "sd3" else {"height": 8, "width": 8, "max_sequence_length": 48}
    calibration = quick(
        prompts=["a photo of a cat", "a shoe"],
        num_samples=2,
        batch_size=2,
        pipeline_kwargs=extra,
        sensitivity="velocity",
    )
    stats = calibrate(pipe, OTQConfig(bits=3), calibration)
    assert stats.info["source"] == "prompts" and len(stats) == len(selected_layers(pipe.transformer, OTQConfig()))
    assert all(s.seen for s in stats.values())
    assert len(stats.probes) == 2
    reports = quantize_model(pipe.transformer, OTQConfig(bits=3), statistics=stats, progress=False)
    assert len(reports) == len(stats)
    image = pipe(prompt="a photo of a dog", num_inference_steps=2, output_type="pt", **extra).images
    assert torch.isfinite(image).all()


def test_forward_fn_drives_any_model() -> None:
    model = tiny_unet()
    calls = []

    def run(batch: int) -> None:
        calls.append(batch)
        generator = torch.Generator().manual_seed(batch)
        model(torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([100, 900]))

    calibration = quick(forward_fn=run, num_batches=3, num_samples=None, sensitivity="velocity")
    stats = calibrate(model, OTQConfig(bits=3), calibration)
    assert calls == [0, 1, 2] and stats.info["source"] == "forward_fn"
    assert len(stats.probes) == 1  # recorded from batch 0, which makes one call


def test_nan_activations_name_the_layer() -> None:
    model = tiny_unet()

    def run(batch: int) -> None:
        sample = torch.randn(1, 1, 8, 8)
        sample[0, 0, 3, 3] = math.nan
        model(sample, torch.tensor([500]))

    with pytest.raises(CalibrationError, match="layer 'conv_in' received NaN/Inf inputs"):
        calibrate(model, OTQConfig(bits=3), quick(forward_fn=run, num_batches=1, num_samples=None))


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.never_called = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_layer_the_hooks_never_saw_is_named(caplog: pytest.LogCaptureFixture) -> None:
    model = WithUnusedLayer()
    calibration = quick(forward_fn=lambda b: model(torch.randn(4, 8)), num_batches=2, num_samples=None)
    with pytest.raises(CalibrationError, match="received no input during calibration: never_called"):
        calibrate(model, OTQConfig(bits=3), calibration)
    lenient = quick(forward_fn=lambda b: model(torch.randn(4, 8)), num_batches=2, num_samples=None,
                    unseen_layers="data-free")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        stats = calibrate(model, OTQConfig(bits=3), lenient)
    assert list(stats) == ["used"] and "never_called" in caplog.text
    reports = quantize_model(model, OTQConfig(bits=3), statistics=stats, progress=False)
    assert [r.name for r in reports] == ["used", "never_called"]


def test_nothing_selected() -> None:
    with pytest.raises(CalibrationError, match="selects no nn.Linear/nn.Conv2d"):
        calibrate(unet_pipeline(), OTQConfig(bits=3, modules_to_not_convert=["*"]), quick())
