"""Checkpoint integrity: safetensors header checks and per-tensor checksums of the packed OTQ tensors.

A saved quantized model carries, in every safetensors header, ``otq_format_version`` and ``otq_checksums``
(JSON ``{state_dict_key: crc32}`` of the packed codes, codebooks and scales). On load the headers are read
first (no tensor data), so a truncated or foreign file is reported by name before anything is loaded, and each
packed tensor is verified against its checksum as it arrives: flipped bits in the codes cannot slip through
as a silently different model.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable, Mapping

import torch


__all__ = [
    "CHECKSUMS_KEY",
    "FORMAT_VERSION_KEY",
    "CheckpointError",
    "SafetensorsHeader",
    "checksums_metadata",
    "collect_checksums",
    "read_safetensors_header",
    "tensor_checksum",
]

CHECKSUMS_KEY = "otq_checksums"
FORMAT_VERSION_KEY = "otq_format_version"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


class CheckpointError(ValueError):
    """A checkpoint file or tensor is not what its config and header promise (the message says which and why)."""


class SafetensorsHeader:
    """The parsed JSON header of one safetensors file.

    Attributes:
        path: the file.
        tensors: ``key -> {"dtype", "shape", "data_offsets"}``.
        metadata: the ``__metadata__`` string map (empty if absent).
    """

    def __init__(self, path: str, tensors: dict[str, dict], metadata: dict[str, str]) -> None:
        self.path = path
        self.tensors = tensors
        self.metadata = metadata


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without reading its tensors.

    Raises:
        CheckpointError: the file is shorter than its header says (truncated download or copy), or its header
            is not valid safetensors JSON.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    fix = "Re-download or re-save the checkpoint (the file on disk is damaged)."
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file (needs >= 8). {fix}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size} bytes in all; the file is "
                f"truncated or not a safetensors file. {fix}"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err}). {fix}") from None
    metadata = header.pop("__metadata__", None) or {}
    data_end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path}: the header describes {expected} bytes of tensors, but the file has only {size} bytes "
            f"({expected - size} missing); it is truncated. {fix}"
        )
    return SafetensorsHeader(path, header, dict(metadata))


def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the tensor's raw bytes (any dtype, any device)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return zlib.crc32(data)


def checksums_metadata(tensors: Mapping[str, torch.Tensor]) -> str:
    """The ``otq_checksums`` metadata value for ``tensors`` (JSON text)."""
    return json.dumps({key: tensor_checksum(t) for key, t in tensors.items()}, sort_keys=True)


def collect_checksums(headers: Iterable[SafetensorsHeader]) -> dict[str, int]:
    """Merge the ``otq_checksums`` maps of several shard headers (each shard carries the full map)."""
    merged: dict[str, int] = {}
    for header in headers:
        text = header.metadata.get(CHECKSUMS_KEY)
        if text is None:
            continue
        try:
            merged.update({str(k): int(v) for k, v in json.loads(text).items()})
        except (ValueError, AttributeError) as err:
            raise CheckpointError(
                f"{header.path}: the {CHECKSUMS_KEY!r} header entry is not a JSON map of checksums ({err}); "
                "re-save the checkpoint."
            ) from None
    return merged
