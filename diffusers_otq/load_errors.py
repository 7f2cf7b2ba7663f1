"""The cause of a failed ``from_pretrained`` on a local OTQ checkpoint folder, as a :class:`CheckpointError`.

diffusers and transformers do some reading before any quantizer hook runs, and fail there with the bare error of
whatever they were doing: diffusers reads a single-file checkpoint (its default below 10 GB) first and for an
unreadable file raises only ``OSError: Unable to load weights from checkpoint file``; both parse a sharded
checkpoint's index (``JSONDecodeError``, ``KeyError: 'metadata'``, ``AttributeError`` when it is damaged) and build
the model from config.json (an edited field can fail anywhere in the model's constructor); a
``quantization_config`` that is not a dict fails with an ``AttributeError``. Registration wraps both libraries'
``from_pretrained`` so that such a failure is examined here: when the folder's files or config explain it, the user
gets a :class:`CheckpointError` naming the file and the cause (truncated at byte N of M, header not JSON, shard
index not JSON, config.json fields that differ from the config saved with the weights, a config that does not
describe the OTQ weights next to it, ...), chained to the library's error; otherwise that error is re-raised
unchanged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .checkpoint import FORMAT_VERSION_KEY, CheckpointError, read_safetensors_header, read_shard_index
from .config import OTQMethod
from .config_checksums import check_config, saved_config_checksums


__all__ = ["explain_load_failure"]

_UNREADABLE = "Unable to load weights from checkpoint file"


def _root_cause(error: BaseException) -> BaseException:
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


def _unreadable_file(error: BaseException) -> str | None:
    """The safetensors file named by diffusers' "Unable to load weights from checkpoint file for '<path>'"."""
    match = re.search(_UNREADABLE + r" for '([^']+\.safetensors)'", str(error))
    return match.group(1) if match and os.path.isfile(match.group(1)) else None


def explain_load_failure(
    pretrained: str | os.PathLike | None, subfolder: str | None, error: BaseException
) -> CheckpointError | None:
    """A :class:`CheckpointError` that explains ``error`` from the files of a local checkpoint folder, or None.

    Args:
        pretrained: what was passed to ``from_pretrained`` (only local folders are examined).
        subfolder: its ``subfolder`` argument.
        error: the exception diffusers raised.

    Returns:
        The first cause found: the damaged safetensors file diffusers names in its error (any source, Hub
        snapshots included) or any damaged file of a local folder (by :func:`read_safetensors_header`), a damaged
        shard index (by :func:`read_shard_index`), config.json fields that differ from the config checksums saved
        in the weights' headers, a config.json whose ``quantization_config`` does not describe the OTQ weights
        stored next to it, or an unreadable file diffusers reported without a cause (the root exception is quoted);
        None when nothing explains it.
    """
    unreadable = _unreadable_file(error)
    if unreadable is not None:  # any source, a Hub snapshot included: diffusers names the file it could not read
        try:
            read_safetensors_header(unreadable)
        except CheckpointError as damaged:
            return damaged
    if pretrained is None or not os.path.isdir(pretrained):
        return None
    folder = Path(pretrained) / (subfolder or "")
    if not folder.is_dir():
        return None
    headers = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            headers.append(read_safetensors_header(path))
        except CheckpointError as damaged:
            return damaged
    for path in sorted(folder.glob("*.safetensors.index.json")):
        try:
            read_shard_index(path)
        except CheckpointError as damaged:
            return damaged
    versions = sorted({h.metadata[FORMAT_VERSION_KEY] for h in headers if FORMAT_VERSION_KEY in h.metadata})
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = None  # the library's own error names a missing or malformed config.json
    if isinstance(config, dict):
        try:
            saved = saved_config_checksums(headers)
            if saved is not None:
                check_config(config, saved, str(folder / "config.json"))
        except CheckpointError as edited:
            return edited
    if versions and isinstance(config, dict):
        stored = config.get("quantization_config", "absent")
        if not isinstance(stored, dict) or stored.get("quant_method") != OTQMethod.OTQ.value:
            return CheckpointError(
                f"{folder / 'config.json'}: quantization_config is {stored!r:.120}, but the weights next to it are "
                f"OTQ-quantized (otq_format_version {', '.join(versions)}), so they cannot be loaded as described: "
                "config.json was edited or belongs to another checkpoint. Restore the config saved with the weights "
                "(its quantization_config has quant_method 'otq'), or re-save the model."
            )
    if isinstance(error, OSError) and _UNREADABLE in str(error):
        cause = _root_cause(error)
        return CheckpointError(
            f"{folder}: a weights file could not be read ({type(cause).__name__}: {str(cause)[:200]}); the file is "
            "damaged. Re-download or re-save the checkpoint."
        )
    return None
