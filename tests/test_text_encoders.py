"""Text encoders through transformers' loading path: the "otq" quantizer quantizes T5 and CLIP on load exactly as
quantize_model does, saves packed and reloads bit-identically; pipelines quantize transformer and text encoders
together with one PipelineQuantizationConfig."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.quantizers import PipelineQuantizationConfig
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, T5EncoderModel

from diffusers_otq import OTQConfig, quantize_model
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import PIPELINE_CALL, _clip_config, _t5, tiny_flux_pipeline, tiny_sd3_pipeline


ENCODERS = {"t5": (_t5, T5EncoderModel, 32), "clip": (lambda: CLIPTextModel(_clip_config()), CLIPTextModel, 1000)}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


def _encode(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


@pytest.mark.parametrize("name", list(ENCODERS))
def test_quantize_on_load_equals_post_hoc_and_reloads_bit_identically(name: str, tmp_path: Path) -> None:
    build, cls, vocab = ENCODERS[name]
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "float")
    loaded = cls.from_pretrained(tmp_path / "float", quantization_config=OTQConfig(bits=4))
    post_hoc = cls.from_pretrained(tmp_path / "float")
    quantize_model(post_hoc, OTQConfig(bits=4), progress=False)
    layers = [n for n, m in loaded.named_modules() if isinstance(m, OTQLayerMixin)]
    assert layers and layers == [n for n, m in post_hoc.named_modules() if isinstance(m, OTQLayerMixin)]
    ids = _ids(vocab)
    expected = _encode(loaded, ids)
    assert torch.equal(expected, _encode(post_hoc, ids))
    loaded.save_pretrained(tmp_path / "quantized")
    config = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "otq" and config["bits"] == 4
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import {cls.__name__}
        import diffusers_otq
        from diffusers_otq.layers import OTQLayerMixin
        torch.set_num_threads({torch.get_num_threads()})  # as this process: same kernels, same bits
        model = {cls.__name__}.from_pretrained({str(tmp_path / "quantized")!r})
        assert any(isinstance(m, OTQLayerMixin) for m in model.modules())
        with torch.no_grad():
            out = model(load_file({str(tmp_path / "ids.safetensors")!r})["ids"]).last_hidden_state
        save_file({{"out": out.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)
    assert loaded.num_parameters() == cls.from_pretrained(tmp_path / "float").num_parameters()
    bf16 = cls.from_pretrained(tmp_path / "quantized", dtype=torch.bfloat16)  # codebooks keep their stored values
    stored = {k: v for k, v in loaded.state_dict().items() if k.rpartition(".")[0] in layers}  # packed tensors
    again = bf16.state_dict()
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in stored.items() if "bias" not in k)
    assert any(k.endswith(".codebook") and v.dtype == torch.float16 for k, v in stored.items())


@pytest.mark.parametrize(("kind", "build", "cls"), [("sd3", tiny_sd3_pipeline, StableDiffusion3Pipeline),
                                                     ("flux", tiny_flux_pipeline, FluxPipeline)])  # fmt: skip
def test_one_pipeline_config_quantizes_transformer_and_text_encoders(kind, build, cls, tmp_path: Path) -> None:
    build(tmp_path).save_pretrained(tmp_path / "float")
    components = ["transformer", "text_encoder", "text_encoder_2"]
    config = PipelineQuantizationConfig(quant_backend="otq", quant_kwargs={"bits": 4},
                                        components_to_quantize=components)  # fmt: skip
    pipe = cls.from_pretrained(tmp_path / "float", quantization_config=config)
    pipe.set_progress_bar_config(disable=True)
    for component in components:
        assert any(isinstance(m, OTQLayerMixin) for m in getattr(pipe, component).modules()), component
    call = {**PIPELINE_CALL[kind], "generator": torch.Generator().manual_seed(0)}
    images = pipe(**call).images
    pipe.save_pretrained(tmp_path / "quantized")
    again = cls.from_pretrained(tmp_path / "quantized")
    again.set_progress_bar_config(disable=True)
    for component in components:
        assert any(isinstance(m, OTQLayerMixin) for m in getattr(again, component).modules()), component
    assert torch.equal(again(**{**call, "generator": torch.Generator().manual_seed(0)}).images, images)
