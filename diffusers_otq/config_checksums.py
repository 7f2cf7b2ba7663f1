"""config.json is part of the checkpoint: the config a model was saved with, as per-field checksums in its headers.

An edit of an architecture field that leaves every tensor shape valid (a UNet's ``norm_num_groups`` 8 -> 4, a T5's
``layer_norm_epsilon`` or ``dense_act_fn``) loads without any tensor check objecting and changes every output. From
format version 4, every safetensors header of a saved OTQ model carries ``otq_config_checksums``: a JSON map from
each field of the config.json written next to it to the CRC-32 of that field's canonical JSON
(:func:`config_field_checksums`). On load the config.json next to the weights is compared field by field
(:func:`check_config`), so a mismatch names the changed, added and removed fields. Format versions 1-3 have no
such entry and load as before.

Every field is covered except :data:`EXCLUDED_CONFIG_FIELDS`:

* ``_name_or_path``: the folder the model was loaded from, written by diffusers into the config it saves and then
  removed by diffusers-otq's save (byte-identical checkpoints, :mod:`diffusers_otq.saving`); transformers never
  writes it. Machine-specific and never read to build the model.
* ``quantization_config``: checked on its own, against what is stored: it is rebuilt and validated by
  :class:`~diffusers_otq.OTQConfig`, the layers it quantizes must be exactly those stored quantized, and every
  stored tensor must have the dtype and shape its settings give (bits, granularity, group size, rank, ...).

Nothing else is excluded: library versions (``_diffusers_version``, ``transformers_version``; diffusers reads the
former to patch old configs), class names (``_class_name``, ``architectures``; auto classes pick the model class
from them) and transformers' ``dtype`` (the precision ``dtype="auto"``, transformers' default, loads the float
tensors in) all change what loads, and each is written with the value hashed here (the quantizers hash the config
exactly as the library serialises it at save time).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from .checkpoint import FORMAT_VERSION_KEY, CheckpointError, SafetensorsHeader, checksum_map


__all__ = [
    "CONFIG_CHECKSUMS_KEY",
    "EXCLUDED_CONFIG_FIELDS",
    "check_config",
    "config_checksums_metadata",
    "config_field_checksums",
    "saved_config_checksums",
]

CONFIG_CHECKSUMS_KEY = "otq_config_checksums"
EXCLUDED_CONFIG_FIELDS: frozenset[str] = frozenset({"_name_or_path", "quantization_config"})
FIRST_VERSION = 4
"""The first format version whose headers must carry :data:`CONFIG_CHECKSUMS_KEY`."""


def config_field_checksums(config: Mapping[str, Any]) -> dict[str, int]:
    """CRC-32 of the canonical JSON (sorted keys, compact) of each field of ``config`` outside the exclusions.

    Args:
        config: a config as JSON would load it (what config.json holds, or the dict the library writes there).

    Example:
        >>> config_field_checksums({"norm_num_groups": 8, "_name_or_path": "/tmp/x"})
        {'norm_num_groups': 4194326291}
    """
    return {
        str(field): zlib.crc32(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())
        for field, value in sorted(config.items())
        if field not in EXCLUDED_CONFIG_FIELDS
    }


def config_checksums_metadata(config: Mapping[str, Any]) -> str:
    """The ``otq_config_checksums`` header entry for ``config`` (JSON text of :func:`config_field_checksums`)."""
    return json.dumps(config_field_checksums(config), sort_keys=True)


def check_config(config: Mapping[str, Any], saved: Mapping[str, int], where: str) -> None:
    """Compare a loaded config.json with the checksums saved with the weights.

    Args:
        config: the parsed config.json next to the weights.
        saved: the ``otq_config_checksums`` map of their headers.
        where: the config file, for the message.

    Raises:
        CheckpointError: naming every field whose value changed (with its value now), was added or was removed.
    """
    current = config_field_checksums(config)
    changed = sorted(field for field in saved.keys() & current.keys() if saved[field] != current[field])
    added = sorted(current.keys() - saved.keys())
    removed = sorted(saved.keys() - current.keys())
    if not (changed or added or removed):
        return

    def shown(fields: list[str]) -> str:
        return ", ".join(f"{field}={json.dumps(config[field])[:60]}" for field in fields[:8])

    findings = [f"changed: {shown(changed)}" if changed else "", f"added: {shown(added)}" if added else "",
                f"removed: {', '.join(removed[:8])}" if removed else ""]  # fmt: skip
    raise CheckpointError(
        f"{where}: does not match the config the weights were saved with ({'; '.join(f for f in findings if f)}); "
        "config.json was edited or belongs to another checkpoint, and the model it describes would compute other "
        "outputs. Restore the config.json saved with the weights, or re-save the model."
    )


def saved_config_checksums(headers: Sequence[SafetensorsHeader]) -> dict[str, int] | None:
    """The config checksums saved in ``headers`` (every shard carries the same map); None when none carries one.

    Raises:
        CheckpointError: a header of format version >= 4 has no ``otq_config_checksums`` entry (its metadata was
            edited), an entry is not a JSON map of checksums, or two shards disagree.
    """
    found: dict[str, int] | None = None
    for header in headers:
        own = checksum_map(header, CONFIG_CHECKSUMS_KEY)
        version = header.metadata.get(FORMAT_VERSION_KEY, "")
        if own is None and version.isdecimal() and int(version) >= FIRST_VERSION:
            raise CheckpointError(
                f"{header.path}: format version {version} but the header has no {CONFIG_CHECKSUMS_KEY!r} entry, which "
                "every file of that version carries: the metadata was edited, so config.json cannot be checked. "
                "Re-download or re-save the checkpoint."
            )
        if own is not None and found is not None and own != found:
            raise CheckpointError(
                f"{header.path}: its {CONFIG_CHECKSUMS_KEY!r} differ from another shard's; the shards' metadata was "
                "edited or they come from different saves. Re-download or re-save the checkpoint."
            )
        found = own if own is not None else found
    return found
