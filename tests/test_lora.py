"""LoRA and peft on OTQ-quantized models: adapters on the quantized layers behave like the same adapters on the
dequantized model, train without touching the packed codes, save/load, and fusing is refused with a clear error."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from diffusers_otq import OTQConfig, dequantize_model, quantize_model
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import (
    flux_inputs,
    sd3_inputs,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_unet,
    unet_inputs,
)
from diffusers_otq.weight_view import QuantizedWeightWriteError


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict], list[str]]] = {
    "unet": (tiny_unet, unet_inputs, ["to_q", "to_k", "to_v", "conv1"]),  # Linear and Conv2d targets
    "sd3": (tiny_sd3_transformer, sd3_inputs, ["to_q", "to_k", "to_v", "to_out.0"]),
    "flux": (tiny_flux_transformer, flux_inputs, ["to_q", "to_k", "to_v", "proj_out"]),
}
# Adapters on the quantized layers against the same adapters on the dequantized model: the base weights agree to
# float32 rounding of the dequantization, so outputs agree to this tolerance.
RTOL, ATOL = 1e-4, 1e-5
LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes


def _quantized(name: str) -> torch.nn.Module:
    model = MODELS[name][0]()
    quantize_model(model, OTQConfig(bits=4), progress=False, compute_metrics=False)
    return model


def _out(model: torch.nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**MODELS[name][1]()).sample


def _lora(name: str, init: bool | str = False) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=MODELS[name][2], init_lora_weights=init)


def _add_adapter(model: torch.nn.Module, config: LoraConfig) -> None:
    """diffusers' ``add_adapter`` where the model has it (SD3, Flux), peft's own injection otherwise (UNet2DModel)."""
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)


@pytest.mark.parametrize("name", list(MODELS))
def test_an_adapter_on_quantized_layers_matches_it_on_the_dequantized_model(name: str) -> None:
    quantized = _quantized(name)
    base = _out(quantized, name)
    dequantized = copy.deepcopy(quantized)
    dequantize_model(dequantized)
    torch.manual_seed(0)
    _add_adapter(quantized, _lora(name))  # random A and B: the adapter changes the output
    _add_adapter(dequantized, _lora(name))
    lora = get_peft_model_state_dict(quantized)
    assert lora and all("lora_" in key for key in lora)
    wrapped = [m for n, m in quantized.named_modules() if n.endswith("base_layer")]
    assert wrapped and all(isinstance(m, OTQLayerMixin) for m in wrapped)  # peft wrapped the OTQ layers
    missing = dequantized.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k},
                                          strict=False).unexpected_keys  # fmt: skip
    assert missing == []
    with_lora = _out(quantized, name)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    torch.testing.assert_close(with_lora, _out(dequantized, name), rtol=RTOL, atol=ATOL)


def _stored_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every stored tensor of the OTQ layers (the codes are a parameter, the rest buffers)."""
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, OTQLayerMixin)
        for key, tensor in module.stored_tensors().items()
    }


def _unchanged(model: torch.nn.Module, stored: dict[str, torch.Tensor]) -> bool:
    now = _stored_tensors(model)
    return now.keys() == stored.keys() and all(torch.equal(now[k], stored[k]) for k in stored)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_an_adapter_moves_only_the_lora_weights(name: str) -> None:
    model = _quantized(name)
    _add_adapter(model, _lora(name, init=True))  # B = 0: starts as the quantized model
    stored = _stored_tensors(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    inputs = MODELS[name][1]()
    target = torch.randn_like(_out(model, name), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(model(**inputs).sample, target)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert _unchanged(model, stored)  # codes and codebooks never change


def test_a_saved_adapter_loads_onto_a_fresh_quantized_model(tmp_path: Path) -> None:
    model = _quantized("flux")
    torch.manual_seed(0)
    model.add_adapter(_lora("flux"), adapter_name="style")
    expected = _out(model, "flux")
    model.save_lora_adapter(tmp_path / "lora", adapter_name="style")  # diffusers calls model.to(dtype=None)
    fresh = _quantized("flux")
    fresh.load_lora_adapter(tmp_path / "lora", prefix=None, adapter_name="style", weight_name=LORA_FILE)
    torch.testing.assert_close(_out(fresh, "flux"), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "pipeline"),
    [("flux", tiny_flux_pipeline), ("sd3", tiny_sd3_pipeline)],
)
def test_pipeline_load_lora_weights_set_adapters_and_unload(name: str, pipeline, tmp_path: Path) -> None:
    float_model = MODELS[name][0]()
    torch.manual_seed(0)
    float_model.add_adapter(_lora(name))
    type(pipeline(tmp_path)).save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(
        float_model))  # fmt: skip
    pipe = pipeline(tmp_path)
    pipe.transformer = MODELS[name][0]()
    quantize_model(pipe.transformer, OTQConfig(bits=4), progress=False, compute_metrics=False)
    reference = copy.deepcopy(pipe.transformer)
    dequantize_model(reference)
    base = _out(pipe.transformer, name)
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="a")
    reference.load_lora_adapter(tmp_path / "lora", prefix="transformer", adapter_name="a", weight_name=LORA_FILE)
    assert not torch.allclose(_out(pipe.transformer, name), base, atol=1e-3)
    torch.testing.assert_close(_out(pipe.transformer, name), _out(reference, name), rtol=RTOL, atol=ATOL)
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    reference.set_adapters(["a"], weights=[0.5])
    torch.testing.assert_close(_out(pipe.transformer, name), _out(reference, name), rtol=RTOL, atol=ATOL)
    with pytest.raises(QuantizedWeightWriteError, match="keep the LoRA unfused"):
        pipe.fuse_lora()
    pipe.unfuse_lora()  # nothing was fused: a no-op
    pipe.unload_lora_weights()
    torch.testing.assert_close(_out(pipe.transformer, name), base, rtol=0, atol=0)
    assert all(isinstance(m, OTQLayerMixin) for n, m in pipe.transformer.named_modules() if n.endswith("to_q"))


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_fusing_into_a_quantized_weight_is_refused_and_changes_nothing(name: str) -> None:
    model = _quantized(name)
    torch.manual_seed(0)
    model.add_adapter(_lora(name))
    before = _out(model, name)
    stored = _stored_tensors(model)
    for safe in (False, True):
        with pytest.raises(QuantizedWeightWriteError, match=r"keep the LoRA unfused.*model.dequantize\(\), fuse"):
            model.fuse_lora(safe_fusing=safe)
    assert _unchanged(model, stored)
    torch.testing.assert_close(_out(model, name), before, rtol=0, atol=0)


def test_the_weight_view_reads_like_a_tensor_and_refuses_writes() -> None:
    layer = _quantized("sd3").transformer_blocks[0].attn.to_q
    assert isinstance(layer, torch.nn.Linear)
    weight = layer.weight
    torch.testing.assert_close(weight * 1.0, layer.dequantize_weight())
    assert type(weight * 2) is torch.Tensor and type(weight.float()) is torch.Tensor
    weight.requires_grad_(False)  # already frozen: accepted
    for write in (lambda w: w.add_(1), lambda w: w.data.copy_(w), lambda w: setattr(w, "data", w.clone()),
                  lambda w: w.__setitem__(0, 0.0), lambda w: w.requires_grad_(True)):  # fmt: skip
        with pytest.raises(QuantizedWeightWriteError, match=r"OTQLinear\(32, 32\)"):
            write(weight)
