"""The checkpoints the fuzz campaigns damage: tiny real models, quantized at 3 bits and saved, and the probe that
loads a (damaged) copy and runs it: diffusers denoisers (UNet, SD3 transformer) and transformers text encoders (T5,
CLIP), each loaded with its own class's ``from_pretrained``.

Used by ``tests/testing/test_fuzzing.py`` (a few hundred mutations per CI run) and ``scripts/fuzz_checkpoints.py``
(long campaigns, ``results/reliability.md``).

Example:
    >>> from diffusers_otq.testing.fuzz_cases import CASES
    >>> sorted(CASES)[:3]
    ['clip-single-file', 'sd3-single-file', 't5-sharded']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, UNet2DModel
from transformers import CLIPTextModel, T5EncoderModel

from ..config import OTQConfig
from .fuzzing import Probe
from .tiny_models import (
    clip_inputs,
    sd3_inputs,
    t5_inputs,
    tiny_clip_text_model,
    tiny_sd3_transformer,
    tiny_t5_encoder,
    tiny_unet,
    unet_inputs,
)


__all__ = ["CASES", "FuzzCase", "make_probe", "saved_checkpoint"]


@dataclass(frozen=True)
class FuzzCase:
    """One checkpoint layout to damage.

    Attributes:
        build: makes the float model (seeded, from a config).
        model_class: the class whose ``from_pretrained`` loads the checkpoint.
        inputs: makes the forward keyword arguments the probe runs.
        save_kwargs: ``save_pretrained`` keyword arguments (e.g. ``max_shard_size`` for a sharded layout).
        mutations: how many mutations a CI run applies.
    """

    build: Callable[[], torch.nn.Module]
    model_class: type
    inputs: Callable[[], dict[str, torch.Tensor]]
    save_kwargs: dict
    mutations: int


CASES: dict[str, FuzzCase] = {
    "unet-single-file": FuzzCase(tiny_unet, UNet2DModel, unet_inputs, {}, 320),
    "unet-sharded": FuzzCase(tiny_unet, UNet2DModel, unet_inputs, {"max_shard_size": "20KB"}, 100),
    "sd3-single-file": FuzzCase(tiny_sd3_transformer, SD3Transformer2DModel, sd3_inputs, {}, 100),
    "t5-single-file": FuzzCase(tiny_t5_encoder, T5EncoderModel, t5_inputs, {}, 100),
    "t5-sharded": FuzzCase(tiny_t5_encoder, T5EncoderModel, t5_inputs, {"max_shard_size": "20KB"}, 100),
    "clip-single-file": FuzzCase(tiny_clip_text_model, CLIPTextModel, clip_inputs, {}, 100),
}


def saved_checkpoint(folder: Path, case: FuzzCase) -> Path:
    """``case.build()`` saved in float, quantized on load at 3 bits and saved again under ``folder / "quantized"``."""
    case.build().save_pretrained(folder / "float")
    case.model_class.from_pretrained(folder / "float", quantization_config=OTQConfig(bits=3)).save_pretrained(
        folder / "quantized", **case.save_kwargs
    )
    return folder / "quantized"


def make_probe(case: FuzzCase, source: Path) -> Probe:
    """Load with ``case.model_class.from_pretrained`` and run ``case.inputs()``; the expected output is that of
    ``source``."""
    inputs = case.inputs()

    def run(model: torch.nn.Module) -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]

    def load(folder: Path) -> torch.nn.Module:
        return case.model_class.from_pretrained(folder)

    with torch.no_grad():
        return Probe(load, run, run(load(source)))
