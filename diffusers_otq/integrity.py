"""The integrity checks of a pre-quantized OTQ checkpoint, one implementation for the diffusers and transformers loaders.

diffusers (:class:`~diffusers_otq.quantizer.OTQQuantizer`) and transformers
(:class:`~diffusers_otq.transformers_quantizer.OTQTransformersQuantizer`) show their quantizer the checkpoint files,
the model skeleton and the stored tensors at different moments; each quantizer owns a :class:`CheckpointVerifier`
and calls the same checks from its own hooks:

1. :meth:`~CheckpointVerifier.read_headers`: every file's safetensors header, before any tensor is read (truncation,
   layout, format version, the OTQ checksums present unless ``DIFFUSERS_OTQ_ALLOW_UNCHECKED=1``), the checksum maps
   merged across shards, and the config.json next to the files compared with the config checksums saved in the
   headers (format >= 4, :mod:`diffusers_otq.config_checksums`).
2. :meth:`~CheckpointVerifier.check_plan`: the layers config.json quantizes are those the checkpoint stores
   quantized.
3. :meth:`~CheckpointVerifier.verify_tensor`: the CRC-32 of each stored tensor's dtype, shape and bytes (format >=
   3), before any dtype cast; :meth:`~CheckpointVerifier.check_stored`: each tensor of an OTQ layer has the dtype
   and shape its settings give, finite values, and group scales >= 0.
4. :meth:`~CheckpointVerifier.check_all_present` (from the headers) and
   :meth:`~CheckpointVerifier.check_all_verified` (after reading): every tensor the checksums list is there;
   :meth:`~CheckpointVerifier.check_loaded`: after loading, every planned layer is an OTQ layer with no tensor
   left on the meta device and codes that index its codebooks.

Every failure is a :class:`~diffusers_otq.checkpoint.CheckpointError` naming the file, the tensor or field, what
was found and the fix. Saving writes what these checks read back: :func:`checkpoint_metadata`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CHECKSUMS_KEY,
    FORMAT_VERSION_KEY,
    CheckpointError,
    SafetensorsHeader,
    checksums_metadata,
    collect_checksums,
    read_safetensors_header,
    tensor_checksum,
    typed_checksum,
)
from .config import FORMAT_VERSION, OTQConfig
from .config_checksums import CONFIG_CHECKSUMS_KEY, check_config, config_checksums_metadata, saved_config_checksums
from .convert import PlannedLayer
from .functional.packing import unpack_codes
from .layers import LEGACY_BUFFER_NAMES, QUANTIZED_BUFFERS, OTQLayerMixin
from .offloading import missing_tensors, stored_value
from .options import CODEBOOK_DTYPES


__all__ = ["ALLOW_UNCHECKED_ENV", "CheckpointVerifier", "checkpoint_metadata", "current_key"]

logger = logging.getLogger(__name__)

ALLOW_UNCHECKED_ENV = "DIFFUSERS_OTQ_ALLOW_UNCHECKED"
"""Set to 1 to load checkpoint files whose headers carry no OTQ checksums (explicit opt-out, with a warning)."""

FIX_MISMATCH = (
    "The weights and quantization_config in config.json disagree (edited config, or files mixed from different "
    "quantizations). Re-quantize from the original model, or restore the matching config.json."
)
_REDOWNLOAD = "Re-download or re-save the checkpoint."


def checkpoint_metadata(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors header entries of a saved OTQ model: format version, the checksum of every tensor, and the
    checksums of the config.json fields written next to it.

    Args:
        state_dict: every tensor the checkpoint stores.
        config: the config as the library writes it to config.json in the same save.
    """
    return {
        FORMAT_VERSION_KEY: str(FORMAT_VERSION),
        CHECKSUMS_KEY: checksums_metadata(state_dict),
        CONFIG_CHECKSUMS_KEY: config_checksums_metadata(config),
    }


def current_key(key: str) -> str:
    """``key`` with a format-version-1/2 tensor name (``packed``) replaced by its current one (``weight``)."""
    module, _, tensor = key.rpartition(".")
    new = LEGACY_BUFFER_NAMES.get(tensor)
    return f"{module}.{new}" if new is not None and module else key


def describe_spec(layer: PlannedLayer) -> str:
    """The settings of ``layer`` that decide its storage layout, for messages."""
    spec = layer.spec
    text = f"bits={spec.bits}, granularity={spec.granularity!r}"
    text += f", group_size={spec.group_size}" if spec.group_size else ""
    text += f", vector_dim={spec.vector_dim}" if spec.vector_dim > 1 else ""
    text += f", rank={spec.rank}" if spec.rank else ""
    return text + (f", rotation_block={spec.rotation_block}" if spec.rotation_block else "")


def _implied_bits(layer: PlannedLayer, tensor_name: str, loaded: torch.Tensor) -> str:
    bits = layer.spec.bits
    if tensor_name == "weight":
        numel = layer.module.weight.numel()
        return f" (the stored codes hold {loaded.numel() * 8 / numel:.2f} bits per weight, config says {bits})"
    if tensor_name == "codebook" and loaded.dim() == 2:
        return f" (the stored codebooks have {loaded.shape[1]} entries; bits={bits} means up to {1 << bits})"
    return ""


class CheckpointVerifier:
    """What one pre-quantized load has verified so far, and the checks (see the module docstring).

    Attributes:
        checksums: stored key (under the model's names, :meth:`model_key`) -> CRC-32 saved in the headers.
        typed: the checksums cover every tensor with its dtype and shape (format >= 3).
        verified: keys whose checksum matched.
        files: the signed checkpoint files.
    """

    def __init__(self, rename: Callable[[str], str] | None = None) -> None:
        """``rename``: maps a stored key (current names) to the model's name for it, where the loader renames keys
        (transformers: the model's conversion mapping and ``base_model_prefix``); keys are compared under the
        model's names, and messages use them."""
        self._rename = rename
        self.checksums: dict[str, int] = {}
        self.typed = False
        self.verified: set[str] = set()
        self.files: list[str] = []
        self._all_files: list[str] = []
        self._file_of: dict[str, str] = {}  # key (model's name) -> the file that holds it
        self._unchecked: set[str] = set()  # keys of unsigned files loaded under DIFFUSERS_OTQ_ALLOW_UNCHECKED=1

    def model_key(self, stored_key: str) -> str:
        """The model's name for a stored key: format 1-2 names made current, then the loader's renaming."""
        key = current_key(stored_key)
        return key if self._rename is None else self._rename(key)

    # -------------------------------------------------------------------------------------------- headers

    def read_headers(self, checkpoint_files: Iterable[str | os.PathLike]) -> list[SafetensorsHeader]:
        """Validate every file's header (nothing else is read), collect the checksums and check config.json.

        Returns:
            The headers of every file.

        Raises:
            CheckpointError: a file is not safetensors, is damaged, has an unknown format version or (without the
                opt-out) no checksums; the shards disagree; config.json differs from the config saved with them.
        """
        headers = []
        for path in checkpoint_files:
            path = os.fspath(path)
            if not path.endswith(".safetensors"):
                raise CheckpointError(
                    f"{path}: OTQ checkpoints are stored as safetensors only (found {path.rsplit('.', 1)[-1]!r}); "
                    "re-save with save_pretrained(..., safe_serialization=True)."
                )
            header = read_safetensors_header(path)
            version = header.metadata.get(FORMAT_VERSION_KEY)
            if version is not None and not (version.isascii() and version.isdecimal()):
                raise CheckpointError(
                    f"{path}: the header's OTQ format version {version!r} is not a number; the file is damaged. "
                    f"{_REDOWNLOAD}"
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
        self._unchecked = {self.model_key(k) for h in headers if h.path in unsigned for k in h.tensors}
        signed = [h for h in headers if h.path not in unsigned]
        self.typed = bool(signed) and min(int(h.metadata[FORMAT_VERSION_KEY]) for h in signed) >= 3
        self.files = [h.path for h in signed]
        self._all_files = [h.path for h in headers]
        self._file_of = {self.model_key(key): h.path for h in signed for key in h.tensors}
        self.checksums = {self.model_key(key): crc for key, crc in collect_checksums(signed).items()}
        self.verified = set()
        self._check_config_file(signed)
        return headers

    def _check_config_file(self, headers: list[SafetensorsHeader]) -> None:
        """The config.json next to the files against the config checksums in their headers (format >= 4)."""
        saved = saved_config_checksums(headers)
        if saved is None:
            if headers:
                logger.debug("%s: no %s (format version < 4); config.json is not compared.", headers[0].path,
                             CONFIG_CHECKSUMS_KEY)  # fmt: skip
            return
        path = Path(headers[0].path).parent / "config.json"
        if not path.is_file():  # the caller passed the config some other way
            logger.info("%s: no config.json next to the weights to compare with the config saved with them.", path)
            return
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(
                f"{path}: not valid JSON ({err}); restore the config.json saved with the weights."
            ) from err
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: a JSON {type(config).__name__}, not an object; restore the saved config.")
        check_config(config, saved, str(path))

    # ------------------------------------------------------------------------------------------ tensors

    def verify_tensor(self, key: str, value: torch.Tensor) -> None:
        """Check a stored tensor (as on disk, before any dtype cast) against its saved checksum (format >= 3).

        Raises:
            CheckpointError: ``key`` is not in the checksums (a renamed or added entry), or its dtype, shape or
                bytes changed.
        """
        if not self.typed or key in self._unchecked:  # formats 1-2: packed tensors checked in check_stored
            return
        expected = self.checksums.get(key)
        if expected is None:
            raise CheckpointError(
                f"{self.files_text(key)}: tensor {key!r} is not in the checksums saved with the checkpoint (a "
                "renamed or added entry); the file is corrupted. Re-download or re-save it."
            )
        if typed_checksum(value) != expected:
            raise CheckpointError(
                f"{self.files_text(key)}: tensor {key!r} ({str(value.dtype).removeprefix('torch.')}, "
                f"{list(value.shape)}) does not match the checksum saved with it (its bytes, dtype or shape "
                "changed); the file is corrupted. Re-download or re-save it."
            )
        self.verified.add(key)

    def check_stored(self, key: str, layer: PlannedLayer, empty: torch.Tensor | None, stored: torch.Tensor) -> None:
        """A stored tensor of an OTQ layer: the dtype and shape of the empty layer's buffer ``empty``, finite
        values, group scales >= 0, and (formats 1-2) the raw-bytes checksum.

        Raises:
            CheckpointError: naming the layer, the file, what was found and what its settings need.
        """
        tensor_name = key.rpartition(".")[2]
        if empty is None:
            raise CheckpointError(
                f"{self.where(key)}: stores {tensor_name!r}, which a layer quantized with {describe_spec(layer)} "
                f"does not have. {FIX_MISMATCH}"
            )
        if tensor_name == "codebook":
            allowed = [empty.dtype] if layer.spec.codebook_dtype is not None else list(CODEBOOK_DTYPES)
        elif tensor_name in ("lowrank_up", "lowrank_down"):  # 16-bit by default, float32 allowed
            allowed = list(CODEBOOK_DTYPES)
        else:
            allowed = [empty.dtype]
        if stored.dtype not in allowed:
            raise CheckpointError(
                f"{self.where(key)}: stored {tensor_name!r} has dtype {stored.dtype}, expected "
                f"{' or '.join(map(str, allowed))} for {describe_spec(layer)}. {FIX_MISMATCH}"
            )
        if stored.shape != empty.shape:
            raise self.shape_error(key, layer, empty.shape, stored)
        if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
            raise CheckpointError(
                f"{self.where(key)}: stored {tensor_name!r} holds NaN or Inf values, which would make every output "
                f"of the layer NaN/Inf; the file is corrupted. Re-download or re-save it."
            )
        if tensor_name in ("scale_max", "scale_step", "codebook_scale") and bool((stored < 0).any()):
            raise CheckpointError(
                f"{self.where(key)}: stored {tensor_name!r} has negative values ({float(stored.min()):g}); group "
                "and codebook scales are >= 0 by construction, so the file is corrupted. Re-download or re-save it."
            )
        expected = None if self.typed else self.checksums.get(key)  # format >= 3: verify_tensor
        if expected is not None and tensor_checksum(stored) != expected:
            raise CheckpointError(
                f"{self.where(key)}: the bytes of {tensor_name!r} do not match the checksum saved with them "
                f"(crc32 {tensor_checksum(stored)} != {expected}); the file is corrupted. Re-download or re-save it."
            )

    def shape_error(
        self, key: str, layer: PlannedLayer, expected: tuple[int, ...] | torch.Size, loaded: torch.Tensor
    ) -> CheckpointError:
        """The error for a stored tensor of an OTQ layer whose shape is not the ``expected`` one."""
        tensor_name = key.rpartition(".")[2]
        return CheckpointError(
            f"{self.where(key)}: stored {tensor_name!r} has shape {tuple(loaded.shape)}, but a "
            f"{tuple(layer.module.weight.shape)} weight quantized with {describe_spec(layer)} needs "
            f"{tuple(expected)}{_implied_bits(layer, tensor_name, loaded)}. {FIX_MISMATCH}"
        )

    def verify_files(self, model: nn.Module, plan: Mapping[str, PlannedLayer]) -> None:
        """Read every tensor of every checkpoint file, one at a time, through :meth:`verify_tensor` and (those of
        OTQ layers, against ``model``'s empty layers) :meth:`check_stored`, and require every tensor of the empty
        OTQ layers to be stored: for loaders that never hand the stored tensors to the quantizer and fill what a
        checkpoint lacks with fresh values (transformers). The files are read again when the loader loads them.

        Raises:
            CheckpointError: from the checks above, or naming an OTQ layer's tensor that no file stores.
        """
        from safetensors import safe_open

        seen = set()
        for path in self._all_files:
            with safe_open(path, framework="pt") as handle:
                for stored_key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    key = self.model_key(stored_key)
                    tensor = handle.get_tensor(stored_key)
                    self.verify_tensor(key, tensor)
                    module_name, _, tensor_name = key.rpartition(".")
                    if module_name in plan and tensor_name in QUANTIZED_BUFFERS:
                        empty = model.get_submodule(module_name).stored_tensors().get(tensor_name)
                        self.check_stored(key, plan[module_name], empty, tensor)
                    seen.add(key)
        for name, layer in plan.items():
            stored = model.get_submodule(name).stored_tensors()
            absent = [b for b in stored if f"{name}.{b}" not in seen]
            if absent:
                raise CheckpointError(
                    f"Layer {name!r} in {self.files_text()}: quantized with {describe_spec(layer)} it stores "
                    f"{', '.join(map(repr, absent))}, but the checkpoint has no {name}.{absent[0]}. {FIX_MISMATCH}"
                )

    # --------------------------------------------------------------------------------------------- model

    def check_plan(
        self, model: nn.Module, plan: Mapping[str, PlannedLayer], stored_keys: Iterable[str], config: OTQConfig
    ) -> None:
        """The layers of ``model`` that config.json selects are exactly those the checkpoint stores quantized (with a
        codebook). Quantized layers ``model`` does not have are left to the loader (unexpected keys: e.g. a
        ``CLIPTextModelWithProjection`` checkpoint loaded as ``CLIPTextModel``).

        Raises:
            CheckpointError: a layer of the model is stored quantized but the config leaves it in float, or the
                config quantizes a layer the checkpoint stores in float or not at all.
        """
        stored_keys = set(stored_keys)
        modules = {name for name, _ in model.named_modules()}
        stored = {key.rpartition(".")[0] for key in stored_keys if key.endswith(".codebook")}
        extra, missing = sorted((stored & modules) - set(plan)), sorted(set(plan) - stored)
        in_float = [name for name in missing if f"{name}.weight" in stored_keys]
        absent = [name for name in missing if f"{name}.weight" not in stored_keys]
        findings = [
            f"the checkpoint stores {', '.join(extra[:5])} quantized, but the config leaves them in float "
            f"(modules_to_not_convert={config.modules_to_not_convert!r})" if extra else "",
            f"the config quantizes {', '.join(in_float[:5])}, but the checkpoint stores them in float" if in_float else "",
            f"the config quantizes {', '.join(absent[:5])}, but the checkpoint does not store them (a missing shard, "
            "or the weights of another model class)" if absent else "",
        ]  # fmt: skip
        if extra or missing:
            raise CheckpointError(
                f"{self.files_text()}: config.json's quantization_config does not match the stored tensors: "
                f"{'; '.join(f for f in findings if f)}. config.json was edited or belongs to another checkpoint; "
                "restore it or re-save the model."
            )

    def check_all_present(self, aliases: Mapping[str, str] | None = None) -> None:
        """Every tensor the checksums list is stored in one of the files, from the headers alone (format >= 3).

        Args:
            aliases: tied weights, ``{key: key it is tied to}``: a listed key the files do not store (transformers
                stores tied weights once) counts as present when its checksum equals that of the one it is tied to.

        Raises:
            CheckpointError: listed tensors are missing from the files (removed or renamed).
        """
        self._refuse_missing(set(self._file_of), aliases)

    def check_all_verified(self, aliases: Mapping[str, str] | None = None) -> None:
        """Every tensor the checksums list was read and matched its checksum (format >= 3); ``aliases`` as for
        :meth:`check_all_present`."""
        self._refuse_missing(self.verified, aliases)

    def _refuse_missing(self, found: set[str], aliases: Mapping[str, str] | None) -> None:
        if not self.typed:
            return
        aliases = aliases or {}
        missing = sorted(
            key for key in set(self.checksums) - found
            if not (aliases.get(key) in found and self.checksums.get(aliases[key]) == self.checksums[key])
        )  # fmt: skip
        if missing:
            raise CheckpointError(
                f"{self.files_text()}: {len(missing)} tensor(s) listed in the checkpoint's checksums are not in "
                f"its files: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (removed or renamed); "
                "the checkpoint is incomplete or corrupted. Re-download or re-save it."
            )

    def check_loaded(self, model: nn.Module, plan: Mapping[str, PlannedLayer], stored: bool = True) -> None:
        """After loading: every planned layer is an OTQ layer and, for a pre-quantized checkpoint (``stored``),
        nothing is left on the meta device and every layer's codes index its codebooks.

        Raises:
            CheckpointError: naming the tensor or layer that never arrived, or the out-of-range code.
        """
        left = missing_tensors(model)  # offloaded tensors are on meta too, held by accelerate's hooks
        if stored and left:
            raise CheckpointError(
                f"{self.files_text()}: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''} never arrived from the "
                "checkpoint and would be left uninitialised; the checkpoint is incomplete. Re-download or re-save it."
            )
        for name in plan:
            module = model.get_submodule(name)
            if not isinstance(module, OTQLayerMixin):
                raise CheckpointError(
                    f"Layer {name!r} was selected for OTQ quantization but its weight never arrived from the "
                    "checkpoint, so it was not quantized; check that the checkpoint is complete."
                )
            if stored:
                _check_codes(name, module)

    def files_text(self, key: str | None = None) -> str:
        """The file holding ``key`` when known, else every file of the checkpoint."""
        if key is not None and key in self._file_of:
            return self._file_of[key]
        return ", ".join(self.files) or "the checkpoint"

    def where(self, key: str) -> str:
        """``Layer '<layer of key>' in <file>``, for messages."""
        files = f" in {self.files_text(key)}" if self.files else ""
        return f"Layer {key.rpartition('.')[0]!r}{files}"


def _check_codes(name: str, module: OTQLayerMixin) -> None:
    """Codes must index existing codewords (only possible to violate when a codebook has < 2**bits entries)."""
    levels = module.codebook.shape[1]
    dim = getattr(module, "vector_dim", 1)
    if levels >= 1 << (module.bits * dim):
        return
    count = module.weight_shape.numel() // dim
    codes = stored_value(module, "weight")  # an offloaded layer's codes: from its hook's weights map
    largest = int(unpack_codes(codes, module.bits * dim, count).max()) if count else 0
    if largest >= levels:
        raise CheckpointError(
            f"Layer {name!r}: a stored code is {largest}, but its codebooks have only {levels} entries; "
            "the packed codes are corrupted. Re-download or re-save the checkpoint."
        )
