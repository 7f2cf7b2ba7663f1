"""Offloading a quantized pipeline or model gives exactly what the same quantized pipeline gives without it.

Every mode diffusers and accelerate offer runs on tiny SD3 and Flux pipelines whose transformer and text encoders
are OTQ-quantized, with the real hooks, on the CPU: accelerate's hooks take any execution device, so an execution
device "cpu" runs the same code a GPU would (parameters parked on ``meta`` or on disk and materialised per
forward), only without a copy to another device. Where diffusers itself refuses the CPU, a test shows the refusal
(the same without quantization) and the mode is installed the way diffusers installs it. Streams need CUDA. The outputs are compared with ``torch.equal``: offloading moves
tensors, it must not change one bit of a result. After the offloaded runs, every stored tensor of every OTQ
layer (codes, codebooks, scales) is read back through the hooks and must be bit-identical, in its dtype, and
dequantize to the same weight.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from accelerate.utils import align_module_device, has_offloaded_params
from accelerate.utils.modeling import compute_module_sizes, get_state_dict_offloaded_model, infer_auto_device_map
from diffusers import DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.hooks import HookRegistry, apply_group_offloading
from torch import nn

from diffusers_otq import OTQConfig, quantize_model
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.offloading import device_in_map
from diffusers_otq.testing.tiny_models import (
    PIPELINE_CALL,
    flux_inputs,
    sd3_inputs,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)


PIPELINES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
TRANSFORMERS = {"sd3": (tiny_sd3_transformer, sd3_inputs), "flux": (tiny_flux_transformer, flux_inputs)}
QUANTIZED_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
T5_ENCODER = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}


class Quantized:
    """A quantized pipeline, its output without offloading, and every stored tensor and dequantized weight."""

    def __init__(self, pipe: DiffusionPipeline, name: str) -> None:
        self.pipe, self.name = pipe, name
        self.images = generate(pipe, name)
        self.stored = {comp: stored_tensors(module) for comp, module in quantized_components(pipe)}
        self.weights = {comp: dequantized(module) for comp, module in quantized_components(pipe)}

    def fresh(self) -> DiffusionPipeline:
        """A copy to put hooks on (hooks change the modules they are attached to)."""
        return copy.deepcopy(self.pipe)


def generate(pipe: DiffusionPipeline, name: str) -> torch.Tensor:
    return pipe(**PIPELINE_CALL[name], generator=torch.Generator().manual_seed(0)).images


def quantized_components(pipe: DiffusionPipeline) -> Iterator[tuple[str, nn.Module]]:
    for comp in QUANTIZED_COMPONENTS:
        module = getattr(pipe, comp, None)
        if module is not None:
            yield comp, module


def otq_layers(model: nn.Module) -> dict[str, OTQLayerMixin]:
    return {name: m for name, m in model.named_modules() if isinstance(m, OTQLayerMixin)}


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name, layer in otq_layers(model).items()
        for key, tensor in layer.stored_tensors().items()
    }


def dequantized(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.dequantize_weight() for name, layer in otq_layers(model).items()}


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(expected) <= set(actual)
    for key, tensor in expected.items():
        got = actual[key]
        assert got.dtype == tensor.dtype and torch.equal(got.cpu(), tensor), key


def assert_storage_intact(model: nn.Module, stored: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Every stored tensor as before (read back through any accelerate offload hook), and it dequantizes to the
    same weight; the layer's own tensors keep their dtypes while offloaded."""
    for name, layer in otq_layers(model).items():
        assert layer.packed.dtype == torch.uint8, name
        with align_module_device(layer, "cpu"):  # materialises offloaded tensors, a no-op without a hook
            assert layer.packed.device.type == "cpu"
            assert torch.equal(layer.dequantize_weight(), weights[name]), name
    assert_bit_identical(get_state_dict_offloaded_model(model), stored)


def quantize_components(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Quantize the transformer and text encoders; every component in eval mode (built from configs, the text
    encoders start in train mode, with dropout)."""
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()
    for comp, module in quantized_components(pipe):
        quantize_model(module, OTQConfig(bits=3 if comp == "transformer" else 4), progress=False)
    return pipe


@pytest.fixture(scope="module", params=list(PIPELINES))
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    name = request.param
    pipe = quantize_components(PIPELINES[name](tmp_path_factory.mktemp(f"{name}-tokenizers")))
    assert all(otq_layers(module) for _, module in quantized_components(pipe))
    return Quantized(pipe, name)


# ------------------------------------------------------------------------------------------- pipeline hooks


def enable_sequential_cpu_offload(pipe: DiffusionPipeline, device: str = "cpu") -> None:
    """Install what ``pipe.enable_sequential_cpu_offload(device=device)`` installs (diffusers 0.42,
    ``pipeline_utils.py``): accelerate's ``cpu_offload`` on every component, buffers offloaded only for a
    component with parameters of its own.

    Needed on the CPU because diffusers turns ``device="cpu"`` into ``torch.device("cpu:0")``, and accelerate's
    ``set_module_tensor_to_device`` then stores ``Parameter(...).to("cpu:0")``, a plain tensor, in place of a
    parameter while the first forward onloads it, and fails on it at the next
    (:func:`test_diffusers_sequential_offload_refuses_cpu`).
    """
    pipe.remove_all_hooks()
    for name, model in pipe.components.items():
        if isinstance(model, nn.Module) and name not in pipe._exclude_from_cpu_offload:
            cpu_offload(model, torch.device(device), offload_buffers=len(model._parameters) > 0)


def test_diffusers_sequential_offload_refuses_cpu(quantized: Quantized, tmp_path: Path) -> None:
    # an upstream limitation, the same without quantization: the reason the test below installs the hooks itself
    for pipe in (quantized.fresh(), PIPELINES[quantized.name](tmp_path)):
        with pytest.raises(RuntimeError, match="requires accelerator, but not found"):
            pipe.enable_sequential_cpu_offload()
        pipe.enable_sequential_cpu_offload(device="cpu")
        with pytest.raises(TypeError, match="invalid combination of arguments"):
            generate(pipe, quantized.name)


def test_sequential_cpu_offload_equals_no_offload(quantized: Quantized) -> None:
    pipe = quantized.fresh()
    enable_sequential_cpu_offload(pipe)
    for comp, module in quantized_components(pipe):
        layers = otq_layers(module).values()
        assert all(has_offloaded_params(m) and m.packed.device.type == "meta" for m in layers), comp
    assert torch.equal(generate(pipe, quantized.name), quantized.images)  # every forward onloads from the hooks
    for comp, module in quantized_components(pipe):
        assert_storage_intact(module, quantized.stored[comp], quantized.weights[comp])


def test_model_cpu_offload_equals_no_offload(quantized: Quantized) -> None:
    pipe = quantized.fresh()
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")
    assert torch.equal(generate(pipe, quantized.name), quantized.images)
    for comp, module in quantized_components(pipe):
        assert_storage_intact(module, quantized.stored[comp], quantized.weights[comp])


GROUP_OFFLOADS: dict[str, dict[str, Any]] = {
    "block_level": {"offload_type": "block_level", "num_blocks_per_group": 1},
    "leaf_level": {"offload_type": "leaf_level"},
    "block_level-disk": {"offload_type": "block_level", "num_blocks_per_group": 1, "to_disk": True},
    "leaf_level-disk": {"offload_type": "leaf_level", "to_disk": True},
}


def onload_groups(model: nn.Module) -> list[Any]:
    """Load every offload group of ``model`` (disk groups hold empty placeholders between forwards)."""
    groups = []
    for module in model.modules():
        hook = HookRegistry.check_if_exists_or_initialize(module).get_hook("group_offloading")
        if hook is not None and all(hook.group is not g for g in groups):
            groups.append(hook.group)
    for group in groups:
        group.onload_()
    return groups


@pytest.mark.parametrize("mode", list(GROUP_OFFLOADS))
def test_group_offloading_equals_no_offload(quantized: Quantized, mode: str, tmp_path: Path) -> None:
    options = dict(GROUP_OFFLOADS[mode])
    to_disk = options.pop("to_disk", False)
    pipe = quantized.fresh()
    exclude: list[str] = []
    if not to_disk:
        pipe.enable_group_offload(onload_device="cpu", offload_device="cpu", **options)
    else:
        # What pipe.enable_group_offload(offload_to_disk_path=...) does, with one folder per component: in a shared
        # folder a group's file is named after its module path, so SD3's two CLIP encoders (same class, same
        # paths) read each other's weights. T5 is left out: disk groups change its output without quantization
        # too (upstream limitations both; memory groups above run every component).
        exclude = [T5_ENCODER[quantized.name]]
        for comp, module in pipe.components.items():
            if isinstance(module, nn.Module) and comp not in exclude:
                folder = str(tmp_path / comp)
                apply_group_offloading(module, torch.device("cpu"), offload_to_disk_path=folder, **options)
    assert torch.equal(generate(pipe, quantized.name), quantized.images)
    if to_disk:  # the first run offloads to the files, the second reads them back
        assert torch.equal(generate(pipe, quantized.name), quantized.images)
    for comp, module in quantized_components(pipe):
        if comp in exclude:
            continue
        if to_disk:  # between forwards the disk groups hold uninitialised placeholders
            assert all(m.packed.dtype == torch.uint8 for m in otq_layers(module).values())
        groups = onload_groups(module)
        assert groups
        assert_bit_identical(stored_tensors(module), quantized.stored[comp])
        assert_storage_intact(module, quantized.stored[comp], quantized.weights[comp])
        for group in groups:
            group.offload_()


def test_group_offloading_refuses_streams_onto_the_cpu(quantized: Quantized) -> None:
    # diffusers' check (hooks/group_offloading.py), quantized or not: streams need an accelerator's backend
    pipe = quantized.fresh()
    with pytest.raises(ValueError, match="requires an onload device whose backend implements streams"):
        pipe.transformer.enable_group_offload(onload_device="cpu", offload_type="leaf_level", use_stream=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="use_stream needs a CUDA onload device")
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_with_streams_equals_no_offload(quantized: Quantized, offload_type: str) -> None:
    expected = generate(quantized.fresh().to("cuda"), quantized.name)
    pipe = quantized.fresh()
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.enable_group_offload(torch.device("cuda"), offload_type=offload_type, use_stream=True, **options)
    assert torch.equal(generate(pipe, quantized.name), expected)
    assert torch.equal(generate(pipe, quantized.name), expected)
    for comp, module in quantized_components(pipe):  # between forwards: the pinned CPU copies
        assert_bit_identical(stored_tensors(module), quantized.stored[comp])


# ------------------------------------------------------------------------------ accelerate, on a model alone


def _cpu_offload(model: nn.Module, folder: Path) -> None:
    cpu_offload(model, execution_device="cpu")


def _cpu_offload_buffers(model: nn.Module, folder: Path) -> None:
    cpu_offload(model, execution_device="cpu", offload_buffers=True)


def _disk_offload(model: nn.Module, folder: Path) -> None:
    disk_offload(model, folder, execution_device="cpu")


def _disk_offload_buffers(model: nn.Module, folder: Path) -> None:
    disk_offload(model, folder, execution_device="cpu", offload_buffers=True)


ACCELERATE_HOOKS: dict[str, Callable[[nn.Module, Path], None]] = {
    "cpu_offload": _cpu_offload,
    "cpu_offload-buffers": _cpu_offload_buffers,
    "disk_offload": _disk_offload,
    "disk_offload-buffers": _disk_offload_buffers,
}


@pytest.mark.parametrize("hook", list(ACCELERATE_HOOKS))
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_accelerate_offload_hooks_equal_no_offload(name: str, hook: str, tmp_path: Path) -> None:
    build, inputs = TRANSFORMERS[name]
    model = build()
    quantize_model(model, OTQConfig(bits=3), progress=False)
    with torch.no_grad():
        expected = model(**inputs()).sample
    stored, weights = stored_tensors(model), dequantized(model)
    ACCELERATE_HOOKS[hook](model, tmp_path)
    layers = otq_layers(model).values()
    assert all(m.packed.device.type == "meta" for m in layers)  # the codes are a parameter: always offloaded
    offloaded_buffers = hook.endswith("buffers")
    assert all((m.codebook.device.type == "meta") == offloaded_buffers for m in layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, expected)
        assert torch.equal(model(**inputs()).sample, expected)
    assert all(m.packed.device.type == "meta" for m in layers)  # offloaded again after the forward
    assert_storage_intact(model, stored, weights)


# ------------------------------------------------------------------------ from_pretrained with a device_map


MODEL_CLASSES = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}


@pytest.fixture(scope="module")
def saved_transformers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Quantized tiny transformers, saved (the codebooks stored in float16, the bfloat16 load below casts them)."""
    root = tmp_path_factory.mktemp("saved")
    for name, (build, _) in TRANSFORMERS.items():
        model = build()
        quantize_model(model, OTQConfig(bits=3), progress=False)
        model.save_pretrained(root / name)
    return {name: root / name for name in TRANSFORMERS}


def _forward(model: nn.Module, name: str) -> torch.Tensor:
    dtype = model.dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in TRANSFORMERS[name][1]().items()}
    with torch.no_grad():
        return model(**inputs).sample


# Flux's x_embedder has 4 input channels, so codebooks of 4 < 2**3 entries: the load checks its codes on disk. Not
# SD3's pos_embed: on disk, its non-persistent buffer stays float32 under torch_dtype=bfloat16, quantized or not.
DISK = ("x_embedder", "transformer_blocks.0", "proj_out")


def _explicit_map(model: nn.Module) -> dict[str, str]:
    """``DISK`` on disk, every other top-level module and block on the CPU (accelerate needs disjoint entries)."""
    names = []
    for child, module in model.named_children():
        names += [f"{child}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [child]
    return {name: "disk" if name in DISK else "cpu" for name in names}


def _auto_map(model: nn.Module) -> dict[str, Any]:
    """``device_map="auto"`` with a CPU budget half a transformer block short of the whole model."""
    sizes = compute_module_sizes(model)
    return {"device_map": "auto", "max_memory": {"cpu": sizes[""] - sizes["transformer_blocks"] // 2}}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["stored", "bf16"])
@pytest.mark.parametrize("placement", ["explicit", "auto"])
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_from_pretrained_with_disk_offload_equals_no_offload(
    name: str, placement: str, dtype: torch.dtype | None, saved_transformers: dict[str, Path], tmp_path: Path
) -> None:
    cls, path = MODEL_CLASSES[name], saved_transformers[name]
    reference = cls.from_pretrained(path, torch_dtype=dtype)
    kwargs = {"device_map": _explicit_map(reference)} if placement == "explicit" else _auto_map(reference)
    model = cls.from_pretrained(path, torch_dtype=dtype, offload_folder=tmp_path, **kwargs)
    assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values()
    if placement == "auto":  # the skeleton was sized as stored: the same map as for the loaded model
        no_split = reference._no_split_modules
        expected_map = infer_auto_device_map(
            reference, max_memory=kwargs["max_memory"], no_split_module_classes=no_split
        )
        assert model.hf_device_map == dict(expected_map)
    offloaded = [m for m in otq_layers(model).values() if has_offloaded_params(m)]
    assert offloaded and all(m.packed.device.type == "meta" for m in offloaded)
    expected = _forward(reference, name)
    assert torch.equal(_forward(model, name), expected)
    assert torch.equal(_forward(model, name), expected)
    # bit-identical to the checkpoint: the float16 codebooks did not go through bfloat16 on the way to/from disk
    assert_storage_intact(model, stored_tensors(reference), dequantized(reference))


def test_quantize_on_load_refuses_disk_offload(saved_transformers: dict[str, Path], tmp_path: Path) -> None:
    float_model = tiny_sd3_transformer()
    float_model.save_pretrained(tmp_path / "float")
    refusal = r"sends proj_out, transformer_blocks.0 to 'disk' while quantizing on load"
    with pytest.raises(ValueError, match=refusal):
        SD3Transformer2DModel.from_pretrained(
            tmp_path / "float", quantization_config=OTQConfig(bits=3), device_map=_explicit_map(float_model),
            offload_folder=tmp_path / "offload",
        )  # fmt: skip


def test_device_in_map_resolves_like_diffusers() -> None:
    device_map = {"": "cpu", "blocks.0": "disk", "blocks.1.attn": 0}
    assert device_in_map("blocks.0.attn.to_q.codebook", device_map) == "disk"
    assert device_in_map("blocks.1.attn.to_q.weight", device_map) == 0
    assert device_in_map("blocks.10.ff.weight", device_map) == "cpu"  # a prefix of names, not of strings
    with pytest.raises(ValueError, match=r"device_map gives no device to 'proj_out.weight'"):
        device_in_map("proj_out.weight", {"blocks": "cpu"})
