"""The "otq" diffusers quantizer: quantize on load, post-hoc equivalence, packed save/reload, dtypes, compile."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import ModelMixin, SD3Transformer2DModel, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_otq import OTQConfig, OTQConv2d, OTQLinear, quantize_model
from diffusers_otq.checkpoint import read_safetensors_header
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import (
    flux_inputs,
    sd3_inputs,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_unet,
    unet_inputs,
)


MODELS: dict[str, tuple[Callable[[], ModelMixin], Callable[[], dict[str, torch.Tensor]]]] = {
    "unet": (tiny_unet, unet_inputs),
    "sd3": (tiny_sd3_transformer, sd3_inputs),
    "flux": (tiny_flux_transformer, flux_inputs),
}


def _run(model: nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**inputs).sample


def _otq_layers(model: nn.Module) -> dict[str, OTQLayerMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OTQLayerMixin)}


def _float_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


@pytest.fixture(scope="module")
def saved_float(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved once in fp32."""
    root = tmp_path_factory.mktemp("float")
    paths = {}
    for name, (build, _) in MODELS.items():
        build().save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.mark.parametrize("name", list(MODELS))
def test_quantize_on_load_replaces_every_layer_and_matches_post_hoc(name: str, saved_float: dict[str, Path]) -> None:
    build, inputs = MODELS[name]
    cls = type(build())
    reference = _run(build(), inputs())
    loaded = cls.from_pretrained(saved_float[name], quantization_config=OTQConfig(bits=4))
    assert loaded.is_quantized and loaded.hf_quantizer.quantization_config.bits == 4
    assert not _float_layers(loaded), f"left in float: {_float_layers(loaded)}"
    assert isinstance(loaded.config["quantization_config"], OTQConfig)

    post_hoc = build()
    reports = quantize_model(post_hoc, OTQConfig(bits=4), progress=False)
    assert [r.name for r in reports] == list(_otq_layers(loaded))
    for (key, a), (key_b, b) in zip(loaded.state_dict().items(), post_hoc.state_dict().items(), strict=True):
        assert key == key_b and torch.equal(a, b), key
    out = _run(loaded, inputs())
    assert torch.equal(out, _run(post_hoc, inputs()))
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.98, f"{name}: 4-bit output cosine {cosine:.4f} vs float"


_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import diffusers_otq  # the only import a user needs, besides the model class
    import diffusers
    jobs = json.loads(sys.argv[1])
    outputs = {}
    for job in jobs:
        cls = getattr(diffusers, job["class"])
        model = cls.from_pretrained(job["path"])
        inputs = {k: v.clone() for k, v in load_file(job["inputs"]).items()}
        with torch.no_grad():
            outputs[job["key"]] = model(**inputs).sample.contiguous()
        assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in model.modules())
    save_file(outputs, sys.argv[2])
    """
)


def test_fresh_process_reload_is_bit_identical_including_shards(saved_float: dict[str, Path], tmp_path: Path) -> None:
    jobs, expected = [], {}
    for name, (build, make_inputs) in MODELS.items():
        cls = type(build())
        model = cls.from_pretrained(saved_float[name], quantization_config=OTQConfig(bits=3))
        inputs = make_inputs()
        save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / f"{name}-inputs.safetensors")
        expected[name] = expected[f"{name}-sharded"] = _run(model, inputs)
        model.save_pretrained(tmp_path / name)
        model.save_pretrained(tmp_path / f"{name}-sharded", max_shard_size="30KB")
        assert len(list((tmp_path / f"{name}-sharded").glob("*.safetensors"))) > 1
        for key in (name, f"{name}-sharded"):
            jobs.append(
                {
                    "class": cls.__name__,
                    "path": str(tmp_path / key),
                    "inputs": str(tmp_path / f"{name}-inputs.safetensors"),
                    "key": key,
                }
            )
    out_file = tmp_path / "outputs.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, json.dumps(jobs), str(out_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(out_file)
    for key, value in expected.items():
        assert torch.equal(outputs[key], value), f"{key}: max diff {(outputs[key] - value).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_reload_bit_identical(dtype: torch.dtype, saved_float: dict[str, Path], tmp_path: Path) -> None:
    model = SD3Transformer2DModel.from_pretrained(
        saved_float["sd3"], quantization_config=OTQConfig(bits=3), torch_dtype=dtype
    )
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.weight_dtype == dtype and model.pos_embed.proj.bias.dtype == dtype
    assert layer.codebook.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    out = _run(model, sd3_inputs(), dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path, torch_dtype=dtype)
    assert torch.equal(_run(reloaded, sd3_inputs(), dtype), out)


def test_reload_in_another_dtype_keeps_codebooks_and_scales_exact(
    saved_float: dict[str, Path], tmp_path: Path
) -> None:
    config = OTQConfig(bits=3, granularity="group", group_size=8, codebook_dtype="float32")
    model = SD3Transformer2DModel.from_pretrained(saved_float["sd3"], quantization_config=config)
    model.save_pretrained(tmp_path)
    half = SD3Transformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    for name, layer in _otq_layers(model).items():
        other = half.get_submodule(name)
        assert other.codebook.dtype == torch.float32 and torch.equal(other.codebook, layer.codebook), name
        if layer.granularity == "group":
            assert other.scale_max.dtype == torch.float32 and torch.equal(other.scale_max, layer.scale_max), name
        assert torch.equal(other.dequantize_weight(torch.float32), layer.dequantize_weight(torch.float32)), name


def test_on_disk_size_is_bits_over_16_of_bf16_plus_counted_metadata(tmp_path: Path) -> None:
    model = tiny_sd3_transformer(num_layers=4)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = SD3Transformer2DModel.from_pretrained(
        tmp_path / "bf16", quantization_config=OTQConfig(bits=3), torch_dtype=torch.bfloat16
    )
    loaded.save_pretrained(tmp_path / "q")
    layers = _otq_layers(loaded)
    quantized_keys = {f"{n}.{b}" for n, m in layers.items() for b in m.stored_tensors()}
    file = tmp_path / "q" / "diffusion_pytorch_model.safetensors"
    header = read_safetensors_header(file)
    data_bytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.tensors.items()}
    quantized_bytes = sum(data_bytes[k] for k in quantized_keys)
    assert quantized_bytes == sum(m.nbytes for m in layers.values())
    numel = sum(m.weight_shape.numel() for m in layers.values())
    codes_bytes = sum(math.ceil(m.weight_shape.numel() * 3 / 8) for m in layers.values())
    metadata_bytes = sum(m.codebook.numel() * m.codebook.element_size() for m in layers.values())
    assert quantized_bytes == codes_bytes + metadata_bytes
    assert codes_bytes <= 3 / 16 * (2 * numel) + len(layers)  # bits/16 of the bf16 size, +1 byte rounding per layer
    float_header = read_safetensors_header(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors")
    for key, info in float_header.tensors.items():  # everything else is stored exactly as in the bf16 checkpoint
        if key.rpartition(".")[0] not in layers:
            assert data_bytes[key] == info["data_offsets"][1] - info["data_offsets"][0], key


def test_modules_to_not_convert_and_overrides_survive_reload(saved_float: dict[str, Path], tmp_path: Path) -> None:
    config = OTQConfig(
        bits=3, modules_to_not_convert=["proj_out", "context_embedder"], module_overrides={"ff": {"bits": 5}}
    )
    model = SD3Transformer2DModel.from_pretrained(saved_float["sd3"], quantization_config=config)
    assert type(model.proj_out) is nn.Linear and type(model.context_embedder) is nn.Linear
    assert model.transformer_blocks[0].ff.net[2].bits == 5 and model.transformer_blocks[0].attn.to_q.bits == 3
    model.save_pretrained(tmp_path)
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path)
    assert reloaded.config["quantization_config"] == config
    assert {n: m.bits for n, m in _otq_layers(reloaded).items()} == {n: m.bits for n, m in _otq_layers(model).items()}
    assert torch.equal(_run(reloaded, sd3_inputs()), _run(model, sd3_inputs()))


class _KeepsNormOut(SD3Transformer2DModel):
    _keep_in_fp32_modules = ["proj_out"]


def test_keep_in_fp32_modules_stay_float32(saved_float: dict[str, Path], tmp_path: Path) -> None:
    model = _KeepsNormOut.from_pretrained(
        saved_float["sd3"], quantization_config=OTQConfig(bits=3), torch_dtype=torch.float16
    )
    assert type(model.proj_out) is nn.Linear and model.proj_out.weight.dtype == torch.float32
    assert isinstance(model.transformer_blocks[0].attn.to_q, OTQLinear)
    post_hoc = _KeepsNormOut.from_pretrained(saved_float["sd3"], torch_dtype=torch.float16)
    quantize_model(post_hoc, OTQConfig(bits=3), progress=False)
    assert type(post_hoc.proj_out) is nn.Linear


def test_dequantize_gives_a_plain_model_that_saves_and_reloads(saved_float: dict[str, Path], tmp_path: Path) -> None:
    model = UNet2DModel.from_pretrained(saved_float["unet"], quantization_config=OTQConfig(bits=3))
    quantized_out = _run(model, unet_inputs())
    model.dequantize()
    assert not _otq_layers(model) and "quantization_config" not in model.config
    assert not getattr(model, "is_quantized", False)
    assert torch.allclose(_run(model, unet_inputs()), quantized_out, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = UNet2DModel.from_pretrained(tmp_path)
    assert not _otq_layers(reloaded) and torch.allclose(_run(reloaded, unet_inputs()), quantized_out, atol=1e-5)


def test_post_hoc_quantized_model_saves_and_reloads(tmp_path: Path) -> None:
    model = tiny_unet()
    quantize_model(model, OTQConfig(bits=2, granularity="group", group_size=16), progress=False)
    out = _run(model, unet_inputs())
    model.save_pretrained(tmp_path)
    reloaded = UNet2DModel.from_pretrained(tmp_path)
    assert isinstance(reloaded.conv_out, OTQConv2d) and reloaded.conv_out.granularity == "group"
    assert torch.equal(_run(reloaded, unet_inputs()), out)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(reloaded, OTQConfig(bits=3), progress=False)


def test_to_device_moves_packed_buffers(device: str, saved_float: dict[str, Path]) -> None:
    model = UNet2DModel.from_pretrained(saved_float["unet"], quantization_config=OTQConfig(bits=3))
    expected = _run(model, unet_inputs())
    model.to(device)
    for layer in _otq_layers(model).values():
        assert layer.packed.device.type == device and layer.codebook.device.type == device
    inputs = {k: v.to(device) for k, v in unet_inputs().items()}
    assert torch.allclose(_run(model, inputs).cpu(), expected, atol=1e-4)


def test_compile_fullgraph_has_no_graph_breaks() -> None:
    model = tiny_sd3_transformer(num_layers=1)
    quantize_model(model, OTQConfig(bits=3, granularity="group", group_size=8), progress=False)
    expected = _run(model, sd3_inputs())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # graph capture; inductor: slow test
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = _run(compiled, sd3_inputs())
        _run(compiled, sd3_inputs())
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.slow
def test_compile_fullgraph_inductor(saved_float: dict[str, Path]) -> None:
    model = SD3Transformer2DModel.from_pretrained(saved_float["sd3"], quantization_config=OTQConfig(bits=3))
    expected = _run(model, sd3_inputs())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(_run(compiled, sd3_inputs()), expected, atol=1e-4)


def test_the_header_entries_come_from_a_save_that_names_its_model(tmp_path: Path) -> None:
    """The config checksums need the config being written: ModelMixin.save_pretrained (wrapped on import) names the
    model; a direct call cannot know it and says how to save, and so does a pickle save."""
    from diffusers_otq import OTQQuantizer

    quantizer = OTQQuantizer(OTQConfig(bits=3), pre_quantized=True)
    with pytest.raises(ValueError, match=r"called by ModelMixin.save_pretrained.*model.save_pretrained"):
        quantizer.get_state_dict_and_metadata({}, safe_serialization=True)
    model = tiny_unet()
    quantize_model(model, OTQConfig(bits=3), progress=False)
    with model.hf_quantizer.saving(model):
        _, metadata = model.hf_quantizer.get_state_dict_and_metadata(model.state_dict(), safe_serialization=True)
    assert "norm_num_groups" in json.loads(metadata["otq_config_checksums"])
    with pytest.raises(ValueError, match=r"called by ModelMixin.save_pretrained"):  # only while that save runs
        model.hf_quantizer.get_state_dict_and_metadata(model.state_dict(), safe_serialization=True)
