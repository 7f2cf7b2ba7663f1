"""Registration of the "otq" backend with diffusers and transformers."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import PipelineQuantizationConfig, StableDiffusion3Pipeline
from diffusers.quantizers import auto as diffusers_auto
from transformers.quantizers import auto as transformers_auto

from diffusers_otq import OTQConfig, OTQQuantizer, register
from diffusers_otq.testing.tiny_models import tiny_unet


def test_registered_with_diffusers_and_transformers_idempotently() -> None:
    register()
    register()
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["otq"] is OTQConfig
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["otq"] is OTQQuantizer
    assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["otq"] is OTQConfig


def test_never_replaces_another_packages_entry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Other:
        pass

    monkeypatch.setitem(diffusers_auto.AUTO_QUANTIZER_MAPPING, "otq", Other)
    with caplog.at_level(logging.WARNING, logger="diffusers_otq.registration"):
        register()
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["otq"] is Other and "leaves it in place" in caplog.text


def test_pipeline_quant_backend_form_resolves_to_otq_config() -> None:
    config = PipelineQuantizationConfig(
        quant_backend="otq", quant_kwargs={"bits": 3, "method": "ot-vp"}, components_to_quantize=["transformer"]
    )
    resolved = config._resolve_quant_config(is_diffusers=True, module_name="transformer")
    assert resolved == OTQConfig(bits=3)


def test_bare_config_to_a_pipeline_explains_how_to_wrap_it(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"PipelineQuantizationConfig\(quant_mapping=\{'transformer': OTQConfig\(bits=3"
    ):
        StableDiffusion3Pipeline.from_pretrained(tmp_path, quantization_config=OTQConfig(bits=3))


def test_loading_without_import_fails_with_diffusers_message(tmp_path: Path) -> None:
    """Documents the one thing registration cannot fix: ``import diffusers_otq`` must come first."""
    from diffusers_otq import quantize_model

    model = tiny_unet()
    quantize_model(model, OTQConfig(bits=3), progress=False)
    model.save_pretrained(tmp_path)
    script = f"from diffusers import UNet2DModel; UNet2DModel.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "Unknown quantization type, got otq" in result.stderr
