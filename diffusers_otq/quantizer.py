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

import logging
import os
import types
from functools import partial
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from .checkpoint import (
    CHECKSUMS_KEY,
    FORMAT_VERSION_KEY,
    CheckpointError,
    checksums_metadata,
    collect_checksums,
    read_safetensors_header,
    tensor_checksum,
    typed_checksum,
)
from .config import FORMAT_VERSION, OTQConfig
from .convert import (
    PlannedLayer,
    dequantize_model,
    plan_layers,
    quantize_layer,
    replace_with_empty_layers,
    set_submodule,
)
from .functional.packing import unpack_codes
from .layers import LEGACY_BUFFER_NAMES, QUANTIZED_BUFFERS, OTQLayerMixin
from .memory import release_freed_memory
from .offloading import device_in_map, missing_tensors, offloaded_modules, stored_value
from .options import CODEBOOK_DTYPES


__all__ = ["OTQQuantizer"]

logger = logging.getLogger(__name__)

_FIX_MISMATCH = (
    "The weights and quantization_config in config.json disagree (edited config, or files mixed from different "
    "quantizations). Re-quantize from the original model, or restore the matching config.json."
)


ALLOW_UNCHECKED_ENV = "DIFFUSERS_OTQ_ALLOW_UNCHECKED"
"""Set to 1 to load checkpoint files whose headers carry no OTQ checksums (explicit opt-out, with a warning)."""


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
        self._torch_dtype: torch.dtype | None = None
        self._checksums: dict[str, int] = {}
        self._typed = False  # the checkpoint's checksums cover every tensor with its dtype and shape (format >= 3)
        self._verified: set[str] = set()
        self._loaded_keys: list[str] = []
        self._files: list[str] = []
        self._file_of: dict[str, str] = {}  # stored key -> the file that holds it
        self._unchecked: set[str] = set()  # keys of unsigned files loaded under DIFFUSERS_OTQ_ALLOW_UNCHECKED=1
        self._model: nn.Module | None = None  # the skeleton being loaded
        self._disk_map: dict[str, Any] | None = None  # the device_map, when it offloads to disk
        self._exact: dict[str, torch.Tensor] = {}  # side tensors as stored, for layers loaded through offload files

    # ------------------------------------------------------------------------------------------- environment

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            self.quantization_config.check_resolved()  # a bits budget cannot be allocated one weight at a time
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
        """Validate every safetensors header (truncation, format version) and collect the tensor checksums."""
        if not self.pre_quantized:
            return loaded_keys
        headers = []
        for path in checkpoint_files or []:
            if not str(path).endswith(".safetensors"):
                raise CheckpointError(
                    f"{path}: OTQ checkpoints are stored as safetensors only (found {str(path).rsplit('.', 1)[-1]!r}); "
                    "re-save with save_pretrained(..., safe_serialization=True)."
                )
            header = read_safetensors_header(path)
            version = header.metadata.get(FORMAT_VERSION_KEY)
            if version is not None and not (version.isascii() and version.isdecimal()):
                raise CheckpointError(
                    f"{path}: the header's OTQ format version {version!r} is not a number; the file is damaged. "
                    "Re-download or re-save the checkpoint."
                )
            if version is not None and int(version) > FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: written with OTQ format version {version!r}, but this diffusers-otq reads versions up "
                    f"to {FORMAT_VERSION}; upgrade it: pip install -U diffusers-otq."
                )
            headers.append(header)
        unsigned = [h.path for h in headers if FORMAT_VERSION_KEY not in h.metadata or CHECKSUMS_KEY not in h.metadata]
        if unsigned and os.environ.get(ALLOW_UNCHECKED_ENV, "") in ("", "0"):
            raise CheckpointError(
                f"{unsigned[0]}: the header has no {FORMAT_VERSION_KEY!r}/{CHECKSUMS_KEY!r} entries, which every "
                "file diffusers-otq saves carries: the metadata was removed or the file was not written by "
                "diffusers-otq, so its integrity cannot be checked. Re-download or re-save the checkpoint (or, "
                f"for a file you trust, set {ALLOW_UNCHECKED_ENV}=1 to load it unverified)."
            )
        if unsigned:
            logger.warning("%s=1: loading %s without integrity checks (no OTQ checksums in the header).",
                           ALLOW_UNCHECKED_ENV, ", ".join(unsigned))  # fmt: skip
        self._unchecked = {_current_key(k) for h in headers if h.path in unsigned for k in h.tensors}
        headers = [h for h in headers if h.path not in unsigned]
        versions = {int(h.metadata[FORMAT_VERSION_KEY]) for h in headers}
        self._typed = bool(headers) and min(versions) >= 3  # every tensor, dtype and shape included
        self._files = [h.path for h in headers]
        self._file_of = {_current_key(key): h.path for h in headers for key in h.tensors}
        self._checksums = {_current_key(key): crc for key, crc in collect_checksums(headers).items()}
        self._verified = set()
        self._loaded_keys = [_current_key(key) for key in loaded_keys]
        return self._loaded_keys

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Entries of format versions 1-2 under their current names (``<layer>.packed`` -> ``<layer>.weight``)."""
        if not self.pre_quantized:
            return state_dict
        state_dict = {_current_key(key): value for key, value in state_dict.items()}
        if self._typed:  # format >= 3: every tensor as stored (before any dtype cast), dtype and shape included
            for key, value in state_dict.items():
                if key in self._unchecked:  # the user's explicit opt-out for an unsigned file
                    continue
                expected = self._checksums.get(key)
                if expected is None:
                    raise CheckpointError(
                        f"{self._files_text(key)}: tensor {key!r} is not in the checksums saved with the checkpoint (a "
                        "renamed or added entry); the file is corrupted. Re-download or re-save it."
                    )
                if typed_checksum(value) != expected:
                    raise CheckpointError(
                        f"{self._files_text(key)}: tensor {key!r} ({str(value.dtype).removeprefix('torch.')}, "
                        f"{list(value.shape)}) does not match the checksum saved with it (its bytes, dtype or shape "
                        "changed); the file is corrupted. Re-download or re-save it."
                    )
                self._verified.add(key)
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
            self._check_stored(key, layer, module.stored_tensors()[tensor_name], value)
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

    def _files_text(self, key: str | None = None) -> str:
        """The file holding ``key`` when known, else every file of the checkpoint."""
        if key is not None and key in self._file_of:
            return self._file_of[key]
        return ", ".join(self._files) or "the checkpoint"

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
            self._check_plan_matches_checkpoint()
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
        module_name, _, tensor_name = param_name.rpartition(".")
        layer = self.plan[module_name]
        raise CheckpointError(
            f"{self._where(param_name)}: stored {tensor_name!r} has shape {tuple(loaded_param.shape)}, but a "
            f"{tuple(layer.module.weight.shape)} weight quantized with {self._describe(layer)} needs "
            f"{tuple(current_param.shape)}{self._implied_bits(layer, tensor_name, loaded_param)}. {_FIX_MISMATCH}"
        )

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
        self._check_stored(param_name, layer, module.stored_tensors()[tensor_name], stored)
        module.set_stored(tensor_name, stored.to(target_device))

    def _check_stored(self, key: str, layer: PlannedLayer, empty: torch.Tensor, stored: torch.Tensor) -> None:
        tensor_name = key.rpartition(".")[2]
        if tensor_name == "codebook":
            allowed = [empty.dtype] if layer.spec.codebook_dtype is not None else list(CODEBOOK_DTYPES)
        elif tensor_name in ("lowrank_up", "lowrank_down"):  # 16-bit by default, float32 allowed
            allowed = list(CODEBOOK_DTYPES)
        else:
            allowed = [empty.dtype]
        if stored.dtype not in allowed:
            raise CheckpointError(
                f"{self._where(key)}: stored {tensor_name!r} has dtype {stored.dtype}, expected "
                f"{' or '.join(map(str, allowed))} for {self._describe(layer)}. {_FIX_MISMATCH}"
            )
        if stored.shape != empty.shape:  # normally caught by check_quantized_param_shape first
            self.check_quantized_param_shape(key, empty, stored)
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            raise CheckpointError(
                f"{self._where(key)}: stored {tensor_name!r} holds NaN or Inf values, which would make every output "
                f"of the layer NaN/Inf; the file is corrupted. Re-download or re-save it."
            )
        if tensor_name in ("scale_max", "scale_step") and bool((stored < 0).any()):
            raise CheckpointError(
                f"{self._where(key)}: stored {tensor_name!r} has negative values ({float(stored.min()):g}); group "
                "scales are >= 0 by construction, so the file is corrupted. Re-download or re-save it."
            )
        expected = None if self._typed else self._checksums.get(key)  # format >= 3: verified on arrival
        if expected is not None and tensor_checksum(stored) != expected:
            raise CheckpointError(
                f"{self._where(key)}: the bytes of {tensor_name!r} do not match the checksum saved with them "
                f"(crc32 {tensor_checksum(stored)} != {expected}); the file is corrupted. Re-download or re-save it."
            )

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            self._restore_exact(model)
            self._check_complete(model)
        self._model = None
        held = {name for name, _ in offloaded_modules(model)}
        for name, layer in self.plan.items():
            module = model.get_submodule(name)
            if not isinstance(module, OTQLayerMixin):
                raise CheckpointError(
                    f"Layer {name!r} was selected for OTQ quantization but its weight never arrived from the "
                    "checkpoint, so it was not quantized; check that the checkpoint is complete."
                )
            for buffer_name, buffer in module.stored_tensors().items():
                if buffer.device.type == "meta" and name not in held:  # not offloaded by a hook: never loaded
                    raise CheckpointError(
                        f"Layer {name!r}: {buffer_name!r} is still on the meta device after loading: the checkpoint "
                        f"{self._files or ''} has no '{name}.{buffer_name}' entry (a missing shard, or a checkpoint "
                        f"quantized with different settings than {self._describe(layer)}). {_FIX_MISMATCH}"
                    )
            if self.pre_quantized:
                self._check_codes(name, module)
        from .hub import attach_model_card

        attach_model_card(model)
        adapt_quantized_model(model)
        return model

    def _check_plan_matches_checkpoint(self) -> None:
        """The layers config.json selects are exactly those the checkpoint stores quantized (with a codebook)."""
        if not self._loaded_keys:
            return
        stored = {key.rpartition(".")[0] for key in self._loaded_keys if key.endswith(".codebook")}
        extra, missing = sorted(stored - set(self.plan)), sorted(set(self.plan) - stored)
        if extra or missing:
            config = self.quantization_config
            raise CheckpointError(
                f"{self._files_text()}: config.json's quantization_config does not match the stored tensors: "
                + (f"the checkpoint stores {', '.join(extra[:5])} quantized, but the config leaves them in float "
                   f"(modules_to_not_convert={config.modules_to_not_convert!r})" if extra else "")
                + ("; " if extra and missing else "")
                + (f"the config quantizes {', '.join(missing[:5])}, but the checkpoint stores them in float"
                   if missing else "")
                + ". config.json was edited or belongs to another checkpoint; restore it or re-save the model."
            )  # fmt: skip

    def _check_complete(self, model: nn.Module) -> None:
        """Every tensor the checksums list arrived, and no parameter or buffer is left on the meta device."""
        if self._typed:
            missing = sorted(set(self._checksums) - self._verified)
            if missing:
                raise CheckpointError(
                    f"{self._files_text()}: {len(missing)} tensor(s) listed in the checkpoint's checksums are not in "
                    f"its files: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (removed or renamed); "
                    "the checkpoint is incomplete or corrupted. Re-download or re-save it."
                )
        left = missing_tensors(model)  # offloaded tensors are on meta too, held by accelerate's hooks
        if left:
            raise CheckpointError(
                f"{self._files_text()}: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''} never arrived from the "
                "checkpoint and would be left uninitialised; the checkpoint is incomplete. Re-download or re-save it."
            )

    def _check_codes(self, name: str, module: OTQLayerMixin) -> None:
        """Codes must index existing codewords (only possible to violate when a codebook has < 2**bits entries)."""
        levels = module.codebook.shape[1]
        if levels >= 1 << module.bits:
            return
        numel = module.weight_shape.numel()
        codes = stored_value(module, "weight")  # an offloaded layer's codes: from its hook's weights map
        largest = int(unpack_codes(codes, module.bits, numel).max()) if numel else 0
        if largest >= levels:
            raise CheckpointError(
                f"Layer {name!r}: a stored code is {largest}, but its codebooks have only {levels} entries; "
                "the packed codes are corrupted. Re-download or re-save the checkpoint."
            )

    # --------------------------------------------------------------------------------------- saving / helpers

    def get_state_dict_and_metadata(
        self, state_dict: dict[str, torch.Tensor], safe_serialization: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Add the format version and the checksums of every packed tensor to the safetensors headers."""
        if not safe_serialization:
            raise ValueError(
                "OTQ checkpoints are saved as safetensors only (no pickles); call "
                "save_pretrained(..., safe_serialization=True) (the default)."
            )
        return state_dict, checkpoint_metadata(state_dict)

    def _where(self, key: str) -> str:
        files = f" in {self._files_text(key)}" if self._files else ""
        return f"Layer {key.rpartition('.')[0]!r}{files}"

    @staticmethod
    def _describe(layer: PlannedLayer) -> str:
        spec = layer.spec
        text = f"bits={spec.bits}, granularity={spec.granularity!r}"
        text += f", group_size={spec.group_size}" if spec.group_size else ""
        text += f", rank={spec.rank}" if spec.rank else ""
        return text + (f", rotation_block={spec.rotation_block}" if spec.rotation_block else "")

    @staticmethod
    def _implied_bits(layer: PlannedLayer, tensor_name: str, loaded: torch.Tensor) -> str:
        bits = layer.spec.bits
        if tensor_name == "weight":
            numel = layer.module.weight.numel()
            return f" (the stored codes hold {loaded.numel() * 8 / numel:.2f} bits per weight, config says {bits})"
        if tensor_name == "codebook" and loaded.dim() == 2:
            return f" (the stored codebooks have {loaded.shape[1]} entries; bits={bits} means up to {1 << bits})"
        return ""

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


def _current_key(key: str) -> str:
    """``key`` with a format-version-1/2 tensor name (``packed``) replaced by its current one (``weight``)."""
    module, _, tensor = key.rpartition(".")
    new = LEGACY_BUFFER_NAMES.get(tensor)
    return f"{module}.{new}" if new is not None and module else key


def checkpoint_metadata(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors header entries of a saved OTQ model: format version and the checksum of every tensor."""
    return {FORMAT_VERSION_KEY: str(FORMAT_VERSION), CHECKSUMS_KEY: checksums_metadata(state_dict)}


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
