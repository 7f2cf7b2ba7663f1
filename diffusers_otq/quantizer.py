"""``OTQQuantizer``: the diffusers quantizer behind ``quant_method="otq"``.

Two loading paths, chosen by diffusers from the checkpoint's ``config.json``:

* **quantize on load** (a float checkpoint plus ``quantization_config=OTQConfig(...)``): the float skeleton is
  kept; as each selected ``*.weight`` arrives, :meth:`create_quantized_param` quantizes it and swaps its layer
  for an OTQ layer, so peak memory stays near the float checkpoint plus one layer.
* **pre-quantized** (``config.json`` carries ``quantization_config``): before loading, every selected layer is
  replaced by an empty OTQ layer with the exact storage layout (:func:`~diffusers_otq.convert.plan_layers` is
  deterministic), and :meth:`create_quantized_param` validates and places each stored tensor as it is on disk.
  The loader casts floating tensors to ``torch_dtype`` before this hook; the original is read from the
  shard's state dict instead, so codebooks and scales are never re-rounded.

A pre-quantized checkpoint also loads with a ``device_map`` that offloads (``"cpu"`` beside an accelerator, or
``"disk"``, explicit or from ``device_map="auto"``/``max_memory``). With ``"disk"`` in the map diffusers routes
the tensors of disk layers to accelerate's offload files, and by default (``offload_state_dict``) those of CPU
layers through a temporary one, instead of through :meth:`create_quantized_param`, and casts their floats to
``torch_dtype`` on the way. So :meth:`maybe_update_state_dict` validates them as they arrive, places the side
tensors (codebooks, scales) of disk layers itself (accelerate's hooks keep buffers on the execution device and
cannot load them) and keeps the exact side tensors, which replace the cast copies after loading.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from .config import OTQConfig
from .convert import (
    PlannedLayer,
    dequantize_model,
    plan_layers,
    quantize_layer,
    replace_with_empty_layers,
    set_submodule,
)
from .integrity import ALLOW_UNCHECKED_ENV, CheckpointVerifier, checkpoint_metadata, current_key
from .layers import QUANTIZED_BUFFERS, OTQLayerMixin
from .memory import release_freed_memory
from .noise_bands import install_noise_band_router
from .offloading import device_in_map


__all__ = ["ALLOW_UNCHECKED_ENV", "OTQQuantizer", "adapt_quantized_model", "saved_config"]

logger = logging.getLogger(__name__)


class OTQQuantizer(DiffusersQuantizer):
    """Quantizes ``nn.Linear``/``nn.Conv2d`` weights to packed OT codebooks inside ``ModelMixin.from_pretrained``."""

    requires_calibration = False
    required_packages = ["diffusers_otq"]
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: OTQConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, OTQConfig):
            raise TypeError(
                f"OTQQuantizer needs an OTQConfig, got {type(quantization_config).__name__}; "
                "pass quantization_config=OTQConfig(bits=...)."
            )
        super().__init__(quantization_config, **kwargs)
        self.quantization_config: OTQConfig
        self.plan: dict[str, PlannedLayer] = {}
        self.verifier = CheckpointVerifier()
        self._torch_dtype: torch.dtype | None = None
        self._loaded_keys: list[str] = []
        self._saving: nn.Module | None = None
        self._model: nn.Module | None = None  # the skeleton being loaded
        self._disk_map: dict[str, Any] | None = None  # the device_map, when it offloads to disk
        self._exact: dict[str, torch.Tensor] = {}  # side tensors as stored, for layers loaded through offload files

    # ------------------------------------------------------------------------------------------- environment

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            self.quantization_config.check_resolved()  # a bits budget cannot be allocated one weight at a time
            if self.quantization_config.noise_band_edges is not None:
                raise ValueError(
                    f"OTQConfig(noise_band_edges={self.quantization_config.noise_band_edges}) describes codebooks per "
                    "noise band, which only refinement on the pipeline's own trajectories makes differ; quantizing on "
                    "load would store identical copies. Use diffusers_otq.quantize_pipeline(pipe, OTQConfig(...), "
                    "CalibrationConfig(noise_bands=2, refine_steps=600, sequential=False)) and save that, or drop "
                    "noise_band_edges."
                )
        device_map = kwargs.get("device_map")
        self._disk_map = None
        if not (isinstance(device_map, dict) and "disk" in device_map.values()):
            return
        if not self.pre_quantized:
            disk = sorted(name or "the whole model" for name, device in device_map.items() if device == "disk")
            raise ValueError(
                f"device_map sends {', '.join(disk[:3])}{' ...' if len(disk) > 3 else ''} to 'disk' while quantizing "
                "on load: diffusers writes those weights to the offload folder in float before the quantizer sees "
                "them, so they would never be quantized. Quantize and save first (save_pretrained), then load the "
                "saved checkpoint with this device_map; or keep the map to GPU/CPU entries."
            )
        self._disk_map = dict(device_map)

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        """The load dtype; without one, diffusers' float32 default (so ``_pre_quantization_dtype`` is recorded)."""
        self._torch_dtype = torch_dtype or torch.float32
        return self._torch_dtype

    def adjust_target_dtype(self, target_dtype: torch.dtype) -> Any:
        """Size estimate for ``device_map="auto"``: while quantizing on load, 4- or 2-bit codes count as
        accelerate's int4/int2; a pre-quantized skeleton already has the stored layout (integer codes are counted
        at their size), so only its floats follow the load dtype."""
        from accelerate.utils import CustomDtype

        if self.pre_quantized:
            return target_dtype
        bits = self.quantization_config.bits
        return CustomDtype.INT2 if bits <= 2 else CustomDtype.INT4 if bits <= 4 else torch.int8

    # ------------------------------------------------------------------------------------------------ loading

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """Validate every safetensors header and the config.json next to them, and collect the tensor checksums
        (:meth:`~diffusers_otq.integrity.CheckpointVerifier.read_headers`); keys get their current names."""
        if not self.pre_quantized:
            return loaded_keys
        self.verifier.read_headers(checkpoint_files or [])
        self.verifier.check_all_present()
        self._loaded_keys = [current_key(key) for key in loaded_keys]
        return self._loaded_keys

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Entries of format versions 1-2 under their current names (``<layer>.packed`` -> ``<layer>.weight``), and
        every tensor verified against its checksum as stored (before any dtype cast)."""
        if not self.pre_quantized:
            return state_dict
        state_dict = {current_key(key): value for key, value in state_dict.items()}
        for key, value in state_dict.items():
            self.verifier.verify_tensor(key, value)
        if self._disk_map is not None:
            self._take_offloaded(state_dict)
        return state_dict

    def _take_offloaded(self, state_dict: dict[str, Any]) -> None:
        """With ``"disk"`` in the device_map (module doc): validate every OTQ tensor, place the side tensors of disk
        layers and keep all side tensors as stored."""
        if self._model is None:
            raise RuntimeError("OTQQuantizer: a state dict arrived before the model skeleton was prepared.")
        for key, value in state_dict.items():
            module_name, _, tensor_name = key.rpartition(".")
            layer = self.plan.get(module_name)
            if layer is None or tensor_name not in QUANTIZED_BUFFERS:
                continue
            module = self._model.get_submodule(module_name)
            self.verifier.check_stored(key, layer, module.stored_tensors().get(tensor_name), value)
            if tensor_name == "weight":  # the codes: integers, never cast, offloaded as they are
                continue
            if device_in_map(key, self._disk_map) == "disk":
                module.set_stored(tensor_name, value.to("cpu"))
            self._exact[key] = value

    def _restore_exact(self, model: nn.Module) -> None:
        """Put the side tensors kept by :meth:`_take_offloaded` back in place of the copies loaded through offload
        files (cast to ``torch_dtype`` and back), on the device those copies are on."""
        for key, value in self._exact.items():
            module_name, _, tensor_name = key.rpartition(".")
            module = model.get_submodule(module_name)
            current = module.stored_tensors()[tensor_name]
            if current.device.type != "meta":
                module.set_stored(tensor_name, value.to(current.device))
        self._exact = {}

    def _process_model_before_weight_loading(
        self, model: nn.Module, device_map: Any = None, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        self._model = model
        skip = (*(keep_in_fp32_modules or ()), *(m for m in self.modules_to_not_convert or () if m))
        self.plan = {
            layer.name: layer
            for layer in plan_layers(
                model, partial(self.quantization_config.layer_spec, skip=skip), warn=not self.pre_quantized
            )
        }
        if not self.plan:
            logger.warning(
                "OTQConfig selects no nn.Linear/nn.Conv2d layer of %s; nothing is quantized.", type(model).__name__
            )
        if self.pre_quantized:
            if self._loaded_keys:
                self.verifier.check_plan(model, self.plan, self._loaded_keys, self.quantization_config)
            replace_with_empty_layers(model, list(self.plan.values()), dtype=self._torch_dtype)
        else:
            layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
            self.quantization_config.warn_unmatched_overrides(layers)
        return model

    def check_if_quantized_param(
        self, model: nn.Module, param_value: torch.Tensor, param_name: str, state_dict: dict[str, Any], **kwargs: Any
    ) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        if module_name not in self.plan:
            return False
        return tensor_name in QUANTIZED_BUFFERS if self.pre_quantized else tensor_name == "weight"

    def check_quantized_param_shape(
        self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor
    ) -> bool:
        layer = self.plan[param_name.rpartition(".")[0]]
        raise self.verifier.shape_error(param_name, layer, current_param.shape, loaded_param)

    def create_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        target_device: torch.device | str,
        state_dict: dict[str, Any],
        unexpected_keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        module_name, _, tensor_name = param_name.rpartition(".")
        layer = self.plan[module_name]
        if not self.pre_quantized:  # quantize on load: param_value is already in the load dtype
            weight = param_value.to(target_device)
            set_submodule(model, module_name, quantize_layer(layer, weight))
            release_freed_memory()
            return
        stored = state_dict[param_name]  # as on disk: param_value may have been cast to torch_dtype
        module = model.get_submodule(module_name)
        self.verifier.check_stored(param_name, layer, module.stored_tensors().get(tensor_name), stored)
        module.set_stored(tensor_name, stored.to(target_device))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            self._restore_exact(model)
            self.verifier.check_all_verified()
        self._model = None
        self.verifier.check_loaded(model, self.plan, stored=self.pre_quantized)
        from .hub import attach_model_card

        attach_model_card(model)
        adapt_quantized_model(model)
        if self.quantization_config.noise_band_edges is not None:  # each call decodes its timestep's codebooks
            install_noise_band_router(model, self.quantization_config.noise_band_edges)
        return model

    # --------------------------------------------------------------------------------------- saving / helpers

    @contextmanager
    def saving(self, model: nn.Module) -> Iterator[None]:
        """While ``model`` is being saved: its config goes into the checksums of the headers written meanwhile
        (registration's ``ModelMixin.save_pretrained`` wrapper enters this around every save)."""
        self._saving = model
        try:
            yield
        finally:
            self._saving = None

    def get_state_dict_and_metadata(
        self, state_dict: dict[str, torch.Tensor], safe_serialization: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Add the format version, the checksums of every tensor and those of the config fields to the headers.

        Raises:
            ValueError: a pickle save was asked for, or the save did not go through ``ModelMixin.save_pretrained``
                (so the config it writes is unknown).
        """
        if not safe_serialization:
            raise ValueError(
                "OTQ checkpoints are saved as safetensors only (no pickles); call "
                "save_pretrained(..., safe_serialization=True) (the default)."
            )
        if self._saving is None:
            raise ValueError(
                "OTQQuantizer.get_state_dict_and_metadata is called by ModelMixin.save_pretrained, which "
                "`import diffusers_otq` wraps so that the config being saved is known; save with "
                "model.save_pretrained(...)."
            )
        return state_dict, checkpoint_metadata(state_dict, saved_config(self._saving))

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """True: adapters (LoRA via peft) train on OTQ layers; the packed codes themselves are never trained."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module) -> nn.Module:
        """Restore float layers and drop ``quantization_config`` from the config, so saving gives a plain model."""
        dequantize_model(model)
        config = getattr(model, "_internal_dict", None)
        if config is not None and "quantization_config" in config:
            model._internal_dict = FrozenDict({k: v for k, v in config.items() if k != "quantization_config"})
        from .hub import detach_model_card

        detach_model_card(model)
        return model


def saved_config(model: nn.Module) -> dict[str, Any]:
    """The config diffusers writes to config.json when saving ``model`` (its own serialisation)."""
    return json.loads(model.to_json_string())


def _num_parameters(self: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """``ModelMixin.num_parameters`` with every OTQ layer's packed codes (a uint8 parameter) counted as the float
    weight they replace (as diffusers counts bitsandbytes' packed weights); the codes are never trainable, so
    ``only_trainable`` counts what diffusers counts."""
    count = type(self).num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if only_trainable:
        return count
    layers = [m for m in self.modules() if isinstance(m, OTQLayerMixin)]
    return count + sum(m.weight_shape.numel() - m.packed.numel() for m in layers)


def _to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """``ModelMixin.to`` with ``dtype=None`` (no cast) dropped: diffusers refuses any ``dtype`` keyword on a
    quantized model, even None, which is what its own ``save_lora_adapter`` passes."""
    if "dtype" in kwargs and kwargs["dtype"] is None:
        kwargs.pop("dtype")
    return type(self).to(self, *args, **kwargs)


def adapt_quantized_model(model: nn.Module) -> None:
    """Bookkeeping of a quantized diffusers/transformers model, as other backends have it: ``num_parameters()``
    counts the unquantized parameters, and ``to(dtype=None)`` (no cast, e.g. from ``save_lora_adapter``) works."""
    if callable(getattr(type(model), "num_parameters", None)):
        model.num_parameters = types.MethodType(_num_parameters, model)
    if type(model).to is not nn.Module.to:  # diffusers' ModelMixin.to, which refuses dtype=None
        model.to = types.MethodType(_to, model)
