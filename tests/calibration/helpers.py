"""Tiny class-conditional flow-matching pipelines and calibration settings shared by the calibration tests."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_otq import CalibrationConfig, FlowMatchPipeline
from diffusers_otq.testing.tiny_models import tiny_dit, tiny_unet


def unet_pipeline(seed: int = 0) -> FlowMatchPipeline:
    """An 8x8 class-conditional UNet2DModel (Conv2d + Linear) in a FlowMatchPipeline."""
    pipe = FlowMatchPipeline(tiny_unet(seed, num_class_embeds=11, attention=True), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pipeline(seed: int = 0) -> FlowMatchPipeline:
    """An 8x8 class-conditional DiT (Linear layers only) in a FlowMatchPipeline."""
    pipe = FlowMatchPipeline(tiny_dit(seed, num_layers=1), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quick(**overrides: Any) -> CalibrationConfig:
    """A few samples and steps: enough statistics for the tiny models, fast on CPU."""
    settings: dict[str, Any] = {
        "num_samples": 6,
        "batch_size": 4,
        "num_inference_steps": 3,
        "progress": False,
        "num_probe_samples": 2,
        "num_probe_inputs": 2,
    }
    settings.update(overrides)
    return CalibrationConfig(**settings)


def sample(pipe: FlowMatchPipeline, seed: int = 7) -> torch.Tensor:
    """Four images from fixed noise and labels (not the calibration noise)."""
    return pipe(
        batch_size=4,
        class_labels=[0, 1, 2, 3],
        guidance_scale=2.0,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
