"""The "otq" backend inside transformers' ``from_pretrained``: text encoders (T5, CLIP) quantized like denoisers.

``PipelineQuantizationConfig(quant_backend="otq", components_to_quantize=["transformer", "text_encoder_2"])``
hands the text encoders' ``from_pretrained`` an :class:`~diffusers_otq.OTQConfig`; this quantizer is what
transformers then looks up under "otq" (registered with ``register_quantizer`` by :mod:`.registration`).

* **Quantize on load** (a float checkpoint): transformers loads the float weights as usual, then every layer
  the config selects is quantized data-free, one at a time, exactly as :func:`~diffusers_otq.quantize_model`
  would (same codes). The float model is in memory once while loading; quantizing releases it layer by layer.
* **Pre-quantized** (a checkpoint saved by this backend): the selected layers are replaced by empty OTQ layers
  before loading, so the packed codes, codebooks and scales load into them; nothing is re-fitted.

``save_pretrained`` writes the same packed tensors and safetensors metadata (format version, per-tensor CRC-32)
as the diffusers backend. On load, a selected layer whose tensors did not all arrive is an error naming it (the
CRC-32 and codebook-range checks of the diffusers backend are not run on this path yet).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError
from .config import OTQConfig
from .convert import plan_layers, quantize_layer, replace_with_empty_layers, set_submodule
from .layers import QUANTIZED_BUFFERS, OTQLayerMixin
from .quantizer import adapt_quantized_model, checkpoint_metadata


try:
    from transformers.quantizers.base import HfQuantizer
except ImportError:  # pragma: no cover - transformers is a dependency
    HfQuantizer = object  # type: ignore[misc,assignment]


__all__ = ["OTQTransformersQuantizer"]

logger = logging.getLogger(__name__)


class OTQTransformersQuantizer(HfQuantizer):
    """transformers' quantizer for :class:`OTQConfig` (see module doc)."""

    requires_calibration = False
    quantization_config: OTQConfig

    def __init__(self, quantization_config: OTQConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, OTQConfig):
            raise TypeError(
                f"the otq quantizer needs an OTQConfig, got {type(quantization_config).__name__}; pass "
                "quantization_config=OTQConfig(bits=...)."
            )
        if quantization_config.bits_per_weight is not None:
            raise ValueError(
                f"OTQConfig(bits_per_weight={quantization_config.bits_per_weight}) needs calibration statistics; it "
                "cannot be used while loading a text encoder. Give bits=... instead."
            )
        super().__init__(quantization_config, **kwargs)
        self.plan: dict[str, Any] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                f"device_map={device_map} offloads to disk, which the otq quantizer does not support in transformers' "
                "loader (the diffusers one does); keep the text encoder's map to cpu/GPU entries and offload it after "
                "loading: pipe.enable_sequential_cpu_offload(), accelerate.disk_offload(model, folder), or "
                "enable_group_offload(..., offload_to_disk_path=folder)."
            )

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # quantized after loading (or loaded pre-quantized into OTQ layers)

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        """Stored OTQ tensors load in their stored dtype (a fp16 codebook cast to bf16 would change its values);
        everything else is cast as transformers casts it."""
        targets = getattr(converter, "target_patterns", None) or []
        if any(_is_quantized_key(key, self.plan) for key in targets):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(
        self, model: nn.Module, keep_in_fp32_modules: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        config = self.quantization_config
        keep = list(keep_in_fp32_modules or getattr(model, "_keep_in_fp32_modules", None) or [])
        skip = (*keep, *(m for m in config.modules_to_not_convert or () if m))
        planned = plan_layers(model, partial(config.layer_spec, skip=skip), warn=not self.pre_quantized)
        self.plan = {layer.name: layer for layer in planned}
        if self.pre_quantized:
            replace_with_empty_layers(model, planned, dtype=_float_dtype(model))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            for layer in self.plan.values():
                module = model.get_submodule(layer.name)
                set_submodule(model, layer.name, quantize_layer(replace(layer, module=module)))  # the loaded float
            logger.info("Quantized %d layers of %s with OTQ on load.", len(self.plan), type(model).__name__)
            adapt_quantized_model(model)
            return model
        for name in self.plan:
            module = model.get_submodule(name)
            stored = module.stored_tensors() if isinstance(module, OTQLayerMixin) else {}
            meta = [n for n, tensor in stored.items() if tensor.device.type == "meta"]
            if not isinstance(module, OTQLayerMixin) or meta:
                raise CheckpointError(
                    f"Layer {name!r}: {', '.join(meta) or 'its weight'} never arrived from the checkpoint (a missing "
                    "shard, or a checkpoint quantized with other settings than its config.json says)."
                )
        adapt_quantized_model(model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state dict and the format version and checksums of every tensor, for the safetensors header."""
        state = model.state_dict()
        return state, checkpoint_metadata(state)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)


def _is_quantized_key(key: str, plan: dict[str, Any]) -> bool:
    """Whether ``key`` (``<layer>.<tensor>``) is a stored tensor of a planned OTQ layer."""
    module, _, tensor = key.rpartition(".")
    return module in plan and tensor in QUANTIZED_BUFFERS
