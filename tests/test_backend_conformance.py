"""What diffusers' quantization test mixins expect of a backend, and the test that checks each for OTQ.

``BEHAVIOURS`` is the table: one expected behaviour per row, the test (``module::function``) that checks it. The
first test below fails when a row points at a test that no longer exists, so the table cannot go stale; the
other tests here check the bookkeeping rows themselves.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_otq import OTQConfig, quantize_model
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import tiny_unet


BEHAVIOURS: dict[str, str] = {
    # loading, saving, dtypes, devices
    "quantize on load = post-hoc quantization": "test_quantizer::test_quantize_on_load_replaces_every_layer_and_matches_post_hoc",
    "save / reload bit-identical in a fresh process, sharded": "test_quantizer::test_fresh_process_reload_is_bit_identical_including_shards",
    "torch_dtype on load (fp32/fp16/bf16)": "test_quantizer::test_dtypes_reload_bit_identical",
    "reload in another dtype keeps codebooks exact": "test_quantizer::test_reload_in_another_dtype_keeps_codebooks_and_scales_exact",
    "modules_to_not_convert / overrides survive reload": "test_quantizer::test_modules_to_not_convert_and_overrides_survive_reload",
    "_keep_in_fp32_modules stay float32": "test_quantizer::test_keep_in_fp32_modules_stay_float32",
    "dequantize() gives a plain model": "test_quantizer::test_dequantize_gives_a_plain_model_that_saves_and_reloads",
    "post-hoc quantized model saves and reloads": "test_quantizer::test_post_hoc_quantized_model_saves_and_reloads",
    "model.to(device) moves packed buffers": "test_quantizer::test_to_device_moves_packed_buffers",
    "torch.compile(fullgraph=True), no graph break": "test_quantizer::test_compile_fullgraph_has_no_graph_breaks",
    "model CPU offload": "test_pipelines::test_model_cpu_offload_moves_packed_buffers",
    # offloading: outputs equal to no offloading, stored tensors bit-identical afterwards
    "sequential CPU offload (accelerate cpu_offload per component)": "test_offloading::test_sequential_cpu_offload_equals_no_offload",
    "enable_model_cpu_offload on SD3 / Flux with quantized text encoders": "test_offloading::test_model_cpu_offload_equals_no_offload",
    "group offloading, block/leaf level, memory/disk": "test_offloading::test_group_offloading_equals_no_offload",
    "accelerate cpu_offload / disk_offload, with and without buffers": "test_offloading::test_accelerate_offload_hooks_equal_no_offload",
    "device_map with disk entries (explicit, auto + max_memory) loads a saved checkpoint": "test_offloading::test_from_pretrained_with_disk_offload_equals_no_offload",
    "PipelineQuantizationConfig(quant_backend='otq')": "test_registration::test_pipeline_quant_backend_form_resolves_to_otq_config",
    "pipeline quantizes the denoiser and reloads": "test_pipelines::test_pipeline_quantizes_only_the_transformer_and_reloads",
    "older checkpoint formats load": "test_structure::test_older_checkpoints_still_load",
    "damaged checkpoints fail with a reason": "test_checkpoint::test_flipped_code_bits_fail_the_checksum",
    # LoRA / peft
    "peft adapters on quantized layers = on the dequantized model": "test_lora::test_an_adapter_on_quantized_layers_matches_it_on_the_dequantized_model",
    "adapter training moves only LoRA weights": "test_lora::test_training_an_adapter_moves_only_the_lora_weights",
    "save_lora_adapter / load_lora_adapter": "test_lora::test_a_saved_adapter_loads_onto_a_fresh_quantized_model",
    "load_lora_weights / set_adapters / unload (SD3, Flux)": "test_lora::test_pipeline_load_lora_weights_set_adapters_and_unload",
    "fuse_lora refused with a clear error": "test_lora::test_fusing_into_a_quantized_weight_is_refused_and_changes_nothing",
    # text encoders through transformers
    "T5 / CLIP quantize on load, save, reload": "test_text_encoders::test_quantize_on_load_equals_post_hoc_and_reloads_bit_identically",
    "one pipeline config for transformer + text encoders": "test_text_encoders::test_one_pipeline_config_quantizes_transformer_and_text_encoders",
    # bookkeeping
    "num_parameters() counts the unquantized parameters": "test_backend_conformance::test_num_parameters_counts_the_float_parameters",
    "is_trainable, _pre_quantization_dtype, memory footprint": "test_backend_conformance::test_quantizer_flags_and_memory_footprint",
    "config prints as 'ClassName {json}'": "test_backend_conformance::test_config_prints_like_diffusers_configs",
    "quantize on load refuses a disk entry in device_map clearly": "test_backend_conformance::test_disk_offload_is_refused_clearly",
}  # fmt: skip


def test_every_behaviour_points_at_an_existing_test() -> None:
    missing = []
    for behaviour, target in BEHAVIOURS.items():
        module, _, function = target.partition("::")
        if not callable(getattr(importlib.import_module(f"tests.{module}"), function, None)):
            missing.append(f"{behaviour}: {target}")
    assert not missing, missing


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("conformance") / "float"
    tiny_unet().save_pretrained(folder)
    return folder


def test_num_parameters_counts_the_float_parameters(saved: Path) -> None:
    float_model = UNet2DModel.from_pretrained(saved)
    loaded = UNet2DModel.from_pretrained(saved, quantization_config=OTQConfig(bits=3))
    post_hoc = UNet2DModel.from_pretrained(saved)
    quantize_model(post_hoc, OTQConfig(bits=3), progress=False)
    total = float_model.num_parameters()
    assert loaded.num_parameters() == post_hoc.num_parameters() == total
    stored = sum(p.numel() for p in loaded.parameters())
    assert stored < total  # the quantized weights are buffers, counted as the parameters they replace
    assert loaded.num_parameters(exclude_embeddings=True) == float_model.num_parameters(exclude_embeddings=True)
    assert loaded.num_parameters(only_trainable=True) == sum(p.numel() for p in loaded.parameters() if p.requires_grad)


def test_quantizer_flags_and_memory_footprint(saved: Path) -> None:
    float_model = UNet2DModel.from_pretrained(saved)
    loaded = UNet2DModel.from_pretrained(saved, quantization_config=OTQConfig(bits=3))
    assert loaded.hf_quantizer.is_trainable and loaded.is_quantized
    assert loaded.config["_pre_quantization_dtype"] == torch.float32  # no torch_dtype given: the float32 default
    bf16 = UNet2DModel.from_pretrained(saved, quantization_config=OTQConfig(bits=3), torch_dtype=torch.bfloat16)
    assert bf16.config["_pre_quantization_dtype"] == torch.bfloat16
    packed = sum(b.numel() * b.element_size() for m in loaded.modules() if isinstance(m, OTQLayerMixin)
                 for b in m.buffers())  # fmt: skip
    footprint = loaded.get_memory_footprint()
    assert packed > 0 and footprint >= packed and footprint < float_model.get_memory_footprint() / 3


def test_config_prints_like_diffusers_configs(saved: Path) -> None:
    loaded = UNet2DModel.from_pretrained(saved, quantization_config=OTQConfig(bits=3))
    text = repr(loaded.config["quantization_config"])
    name, _, body = text.partition(" ")
    assert name == "OTQConfig" and json.loads(body)["bits"] == 3 and json.loads(body)["quant_method"] == "otq"


def test_disk_offload_is_refused_clearly(saved: Path) -> None:
    # quantizing on load only: diffusers offloads the float weights before the quantizer sees them
    with pytest.raises(ValueError, match=r"sends the whole model to 'disk' while quantizing on load"):
        UNet2DModel.from_pretrained(saved, quantization_config=OTQConfig(bits=3), device_map={"": "disk"})
