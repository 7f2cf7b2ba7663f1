"""OTQ through diffusers pipelines: SD3 and Flux built offline from tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, PipelineQuantizationConfig, StableDiffusion3Pipeline
from torch import nn

from diffusers_otq import OTQConfig
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import PIPELINE_CALL, tiny_flux_pipeline, tiny_sd3_pipeline


PIPELINES = {"sd3": (StableDiffusion3Pipeline, tiny_sd3_pipeline), "flux": (FluxPipeline, tiny_flux_pipeline)}
QUANT_FORMS = {
    "mapping": lambda: PipelineQuantizationConfig(quant_mapping={"transformer": OTQConfig(bits=3)}),
    "backend": lambda: PipelineQuantizationConfig(
        quant_backend="otq", quant_kwargs={"bits": 3}, components_to_quantize=["transformer"]
    ),
}


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    paths = {}
    for name, (_, build) in PIPELINES.items():
        build(root / f"{name}-tokenizers").save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _generate(pipe: object, name: str) -> torch.Tensor:
    return pipe(**PIPELINE_CALL[name], generator=torch.Generator().manual_seed(0)).images


def _quantized(module: nn.Module) -> bool:
    return any(isinstance(m, OTQLayerMixin) for m in module.modules())


@pytest.mark.parametrize("form", list(QUANT_FORMS))
@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_quantizes_only_the_transformer_and_reloads(
    name: str, form: str, saved_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    cls, _ = PIPELINES[name]
    pipe = cls.from_pretrained(saved_pipelines[name], quantization_config=QUANT_FORMS[form]())
    assert _quantized(pipe.transformer) and not any(
        type(m) in (nn.Linear, nn.Conv2d) for m in pipe.transformer.modules()
    )
    assert not _quantized(pipe.text_encoder) and not _quantized(pipe.vae)
    images = _generate(pipe, name)
    assert torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path)
    assert _quantized(reloaded.transformer)
    assert torch.equal(_generate(reloaded, name), images)


def test_model_cpu_offload_moves_packed_buffers(saved_pipelines: dict[str, Path]) -> None:
    pipe = StableDiffusion3Pipeline.from_pretrained(
        saved_pipelines["sd3"], quantization_config=QUANT_FORMS["mapping"]()
    )
    expected = _generate(pipe, "sd3")
    pipe.enable_model_cpu_offload(device="cpu")  # installs accelerate's offload hooks; the GPU case moves buffers too
    assert hasattr(pipe.transformer, "_hf_hook")
    assert torch.equal(_generate(pipe, "sd3"), expected)
