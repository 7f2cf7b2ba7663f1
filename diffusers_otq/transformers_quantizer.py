"""The "otq" backend inside transformers' ``from_pretrained``: text encoders (T5, CLIP) quantized like denoisers.

``PipelineQuantizationConfig(quant_backend="otq", components_to_quantize=["transformer", "text_encoder_2"])``
hands the text encoders' ``from_pretrained`` an :class:`~diffusers_otq.OTQConfig`; this quantizer is what
transformers then looks up under "otq" (registered with ``register_quantizer`` by :mod:`.registration`).

* **Quantize on load** (a float checkpoint): transformers loads the float weights as usual, then every layer
  the config selects is quantized data-free, one at a time, exactly as :func:`~diffusers_otq.quantize_model`
  would (same codes). The float model is in memory once while loading; quantizing releases it layer by layer.
* **Pre-quantized** (a checkpoint saved by this backend): the selected layers are replaced by empty OTQ layers
  before loading, so the packed codes, codebooks and scales load into them; nothing is re-fitted.

``save_pretrained`` writes the same packed tensors and safetensors metadata as the diffusers backend: the format
version, the CRC-32 of every tensor (dtype, shape and bytes) under the name it is written (tied weights once, the
renames transformers applied while loading reverted: a CLIP encoder loaded from Hub-style ``text_model.*`` keys is
saved under them) and the checksums of the config.json fields (:mod:`diffusers_otq.config_checksums`;
transformers' ``dtype`` and ``architectures`` are hashed with the values ``save_pretrained`` writes next). A
pre-quantized checkpoint gets the diffusers backend's checks, from the same
:class:`~diffusers_otq.integrity.CheckpointVerifier`, before transformers reads any weight, with the stored keys
renamed as transformers' loader renames them (so a ``CLIPTextModelWithProjection`` checkpoint loads as
``CLIPTextModel``):

* every file's header is validated (truncated, appended to, malformed, unknown format version, checksums removed)
  and config.json is compared field by field with the config saved with the weights;
* every tensor of every file is read once, one at a time, and checked against its CRC-32 (so a flipped bit, a
  relabelled dtype, a swap, a renamed, added or removed tensor is refused by name), and each stored tensor of an
  OTQ layer against the dtype and shape its settings give, finite values and scales >= 0; a tied weight
  transformers stores once (T5's ``encoder.embed_tokens.weight``) counts as present when the checksum of the one
  it is tied to matches; then transformers loads the files as usual (a second read, from the page cache);
* after loading, every selected layer is an OTQ layer whose codes index its codebooks.

Where transformers fails before these hooks run (a shard index that is not JSON, a config.json it cannot build
the model from, a quantization_config that is not a mapping), registration's ``PreTrainedModel.from_pretrained``
wrapper explains the failure from the files (:mod:`diffusers_otq.load_errors`): a
:class:`~diffusers_otq.checkpoint.CheckpointError` chained to transformers' error.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from .config import OTQConfig
from .convert import plan_layers, quantize_layer, replace_with_empty_layers, set_submodule
from .integrity import CheckpointVerifier, checkpoint_metadata
from .layers import QUANTIZED_BUFFERS
from .quantizer import adapt_quantized_model


try:
    from transformers.quantizers.base import HfQuantizer
except ImportError:  # pragma: no cover - transformers is a dependency
    HfQuantizer = object  # type: ignore[misc,assignment]


__all__ = ["OTQTransformersQuantizer", "saved_config"]

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
        self.verifier = CheckpointVerifier()

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
        self,
        model: nn.Module,
        keep_in_fp32_modules: list[str] | None = None,
        checkpoint_files: list[str] | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Plan the OTQ layers; for a pre-quantized checkpoint, swap the planned layers for empty OTQ layers and
        verify every file and tensor against them (module docstring)."""
        config = self.quantization_config
        keep = list(keep_in_fp32_modules or getattr(model, "_keep_in_fp32_modules", None) or [])
        skip = (*keep, *(m for m in config.modules_to_not_convert or () if m))
        planned = plan_layers(model, partial(config.layer_spec, skip=skip), warn=not self.pre_quantized)
        self.plan = {layer.name: layer for layer in planned}
        if self.pre_quantized:
            replace_with_empty_layers(model, planned, dtype=_float_dtype(model))
            self.verifier = CheckpointVerifier(rename=_loader_renaming(model, self))
            tied = getattr(model, "all_tied_weights_keys", None)  # {tied key: the key stored for both}
            headers = self.verifier.read_headers(checkpoint_files or [])
            self.verifier.check_all_present(tied)
            stored = [self.verifier.model_key(key) for header in headers for key in header.tensors]
            self.verifier.check_plan(model, self.plan, stored, config)
            self.verifier.verify_files(model, self.plan)
            self.verifier.check_all_verified(tied)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            for layer in self.plan.values():
                module = model.get_submodule(layer.name)
                set_submodule(model, layer.name, quantize_layer(replace(layer, module=module)))  # the loaded float
            logger.info("Quantized %d layers of %s with OTQ on load.", len(self.plan), type(model).__name__)
        self.verifier.check_loaded(model, self.plan, stored=self.pre_quantized)
        adapt_quantized_model(model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state dict and the header entries: format version, checksums of every tensor as ``save_pretrained``
        writes it (:func:`_as_written`) and of the config fields it writes next (:func:`saved_config`)."""
        state = model.state_dict()
        return state, checkpoint_metadata(_as_written(model, state), saved_config(model))

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def saved_config(model: nn.Module) -> dict[str, Any]:
    """The config.json transformers' ``save_pretrained`` writes for ``model``: its own serialisation (the fields
    that differ from the defaults), after the ``dtype`` and ``architectures`` it sets right after asking the
    quantizer for the header entries."""
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    return json.loads(config.to_json_string(use_diff=True))


def _as_written(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes for ``state``, under the names it writes them: after the keys the model
    does not save, tied weights stored once, and the renamings it applied while loading reverted (a CLIP text
    encoder loaded from ``text_model.*`` keys is saved under them), as transformers does right after asking the
    quantizer (``remove_tied_weights_from_state_dict``, ``revert_weight_conversion``)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    ignored = getattr(model, "_keys_to_ignore_on_save", None) or ()
    state = {key: value for key, value in state.items() if key not in ignored}
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def _loader_renaming(model: nn.Module, quantizer: HfQuantizer) -> Callable[[str], str]:
    """transformers' renaming of a checkpoint key to the model's name for it, as its loader does it: the model's
    conversion mapping (e.g. ``CLIPTextModel`` drops a ``text_model.`` prefix) and its ``base_model_prefix`` added or
    stripped (``rename_source_key`` in ``convert_and_load_state_dict_in_model``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model, None, quantizer)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    expected = model.state_dict()  # on meta: names only
    prefix = model.base_model_prefix

    def rename(key: str) -> str:
        renamed, _ = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:  # as transformers: keep a name the model has
            renamed, _ = rename_source_key(key, [], [], prefix, expected)
        return renamed

    return rename


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)


def _is_quantized_key(key: str, plan: dict[str, Any]) -> bool:
    """Whether ``key`` (``<layer>.<tensor>``) is a stored tensor of a planned OTQ layer."""
    module, _, tensor = key.rpartition(".")
    return module in plan and tensor in QUANTIZED_BUFFERS
