"""Checkpoint integrity: safetensors header checks and per-tensor checksums of the packed OTQ tensors.

A saved quantized model carries, in every safetensors header, ``otq_format_version`` and ``otq_checksums``
(JSON ``{state_dict_key: crc32}``). From format version 3 the map covers every tensor of the checkpoint (packed
codes, codebooks, scales, and the float biases, norms and embeddings too) and each checksum covers the tensor's
dtype and shape as well as its bytes (:func:`typed_checksum`), so a header relabel (F16 -> BF16), a swap or a
renamed key is caught like a flipped bit. Versions 1-2 listed only the packed tensors, by raw bytes
(:func:`tensor_checksum`). From format version 4 the headers also carry checksums of the config.json fields
(:mod:`diffusers_otq.config_checksums`). On load the headers are read first (no tensor data), so a truncated or
foreign file is reported by name before anything is loaded, and each tensor is verified as it arrives.
A sharded checkpoint's index is checked by :func:`read_shard_index`.
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
    "checksum_map",
    "checksums_metadata",
    "collect_checksums",
    "sort_header_metadata",
    "read_safetensors_header",
    "read_shard_index",
    "tensor_checksum",
    "typed_checksum",
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
    _check_entries(path, header, metadata, fix)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path}: the header describes {expected} bytes of tensors, but the file has only {size} bytes "
            f"({expected - size} missing); it is truncated. {fix}"
        )
    if size > expected:
        raise CheckpointError(
            f"{path}: {size - expected} byte(s) follow the last tensor the header describes (the file has {size} "
            f"bytes, the header accounts for {expected}); the file was appended to or its header edited. {fix}"
        )
    _check_layout(path, header, fix)
    return SafetensorsHeader(path, header, dict(metadata))


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


def _check_layout(path: str, tensors: dict, fix: str) -> None:
    """What safetensors itself demands, said by name: a known dtype, ``data_offsets`` spanning exactly
    ``numel * itemsize`` bytes, and the tensors tiling the data region without gaps or overlaps."""
    spans = []
    for key, info in tensors.items():
        itemsize = _DTYPE_BYTES.get(info["dtype"])
        if itemsize is None:
            raise CheckpointError(
                f"{path}: header entry {key!r} has dtype {info['dtype']!r}, which is not a safetensors dtype "
                f"({', '.join(_DTYPE_BYTES)}). {fix}"
            )
        begin, end = info["data_offsets"]
        numel = 1
        for dim in info["shape"]:
            numel *= dim
        if end - begin != numel * itemsize:
            raise CheckpointError(
                f"{path}: header entry {key!r} ({info['dtype']}, shape {info['shape']}) needs {numel * itemsize} "
                f"bytes but its data_offsets [{begin}, {end}] span {end - begin}; its dtype, shape or offsets were "
                f"changed. {fix}"
            )
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves {begin - position} bytes unused"
            raise CheckpointError(f"{path}: header entry {key!r} at data_offsets [{begin}, {end}] {what}. {fix}")
        position = end


def _check_entries(path: str, tensors: dict, metadata: object, fix: str) -> None:
    """Every header entry must be ``{"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end]}`` with
    ``0 <= begin <= end``, and ``__metadata__`` a map of strings; otherwise a :class:`CheckpointError` naming it."""
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{path}: the header's __metadata__ must map strings to strings, got {metadata!r:.200}. {fix}"
        )
    for key, info in tensors.items():
        problem = None
        if not isinstance(info, dict):
            problem = f"is {type(info).__name__}, not an object"
        elif not isinstance(info.get("dtype"), str):
            problem = f"has dtype {info.get('dtype')!r}, not a string"
        elif not isinstance(info.get("shape"), list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]
        ):
            problem = f"has shape {info.get('shape')!r}, not a list of non-negative ints"
        else:
            offsets = info.get("data_offsets")
            valid = (isinstance(offsets, list) and len(offsets) == 2
                     and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                     and 0 <= offsets[0] <= offsets[1])  # fmt: skip
            if not valid:
                problem = f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end"
        if problem:
            raise CheckpointError(f"{path}: header entry {key!r} {problem}. {fix}")


def tensor_checksum(tensor: torch.Tensor, start: int = 0) -> int:
    """CRC-32 of the tensor's raw bytes (any dtype, any device), continuing from ``start``."""
    return zlib.crc32(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy(), start)


def typed_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of ``"<dtype>:<shape>:"`` followed by the tensor's raw bytes (format version 3)."""
    prefix = f"{str(tensor.dtype).removeprefix('torch.')}:{list(tensor.shape)}:".encode()
    return tensor_checksum(tensor, zlib.crc32(prefix))


def checksums_metadata(tensors: Mapping[str, torch.Tensor]) -> str:
    """The ``otq_checksums`` metadata value for ``tensors`` (JSON text of :func:`typed_checksum` per key)."""
    return json.dumps({key: typed_checksum(t) for key, t in tensors.items()}, sort_keys=True)


def checksum_map(header: SafetensorsHeader, key: str = CHECKSUMS_KEY) -> dict[str, int] | None:
    """The JSON map ``{name: crc32}`` stored under ``key`` in the header's metadata; None when there is none.

    Raises:
        CheckpointError: the entry is not a JSON map of int checksums.
    """
    text = header.metadata.get(key)
    if text is None:
        return None
    try:
        entries = json.loads(text).items()
        if not all(isinstance(v, int) and not isinstance(v, bool) for _, v in entries):
            raise ValueError("every checksum must be an int")
    except (ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"{header.path}: the {key!r} header entry is not a JSON map of checksums ({err}); re-save the checkpoint."
        ) from None
    return {str(k): v for k, v in entries}


def collect_checksums(headers: Iterable[SafetensorsHeader]) -> dict[str, int]:
    """Merge the ``otq_checksums`` maps of several shard headers (each shard carries the full map).

    Raises:
        CheckpointError: a map is not JSON ``{key: int}``; two shards disagree on a checksum; or (format >= 3) a
            shard stores a tensor its own map does not list.
    """
    merged: dict[str, int] = {}
    for header in headers:
        own = checksum_map(header)
        if own is None:
            continue
        clash = next((k for k, v in own.items() if merged.get(k, v) != v), None)
        if clash is not None:
            raise CheckpointError(
                f"{header.path}: its checksum of {clash!r} ({own[clash]}) differs from another shard's "
                f"({merged[clash]}); the shards' metadata was edited or they come from different saves. "
                "Re-download or re-save the checkpoint."
            )
        version = header.metadata.get(FORMAT_VERSION_KEY, "")
        unlisted = sorted(set(header.tensors) - set(own)) if version.isdecimal() and int(version) >= 3 else []
        if unlisted:
            raise CheckpointError(
                f"{header.path}: stores {', '.join(unlisted[:5])} but its {CHECKSUMS_KEY!r} do not list them; the "
                "header was edited. Re-download or re-save the checkpoint."
            )
        merged.update(own)
    return merged


def read_shard_index(path: str | os.PathLike) -> dict[str, str]:
    """Read and validate the index of a sharded checkpoint (``*.safetensors.index.json``).

    diffusers and transformers parse it before any quantizer hook runs and fail with a bare ``JSONDecodeError``,
    ``KeyError`` or ``AttributeError`` when it is damaged; this names the cause.

    Returns:
        Its ``weight_map`` (tensor name -> shard file name).

    Raises:
        CheckpointError: the index is not JSON (truncated), not an object, has no ``metadata`` object, has no
            ``weight_map`` mapping tensor names to file names (or an empty one), or names a shard that is not next
            to it.
    """
    path = os.fspath(path)
    fix = "Re-download or re-save the checkpoint (the index lists which shard holds each tensor)."
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: the shard index is not valid JSON ({err}); it is truncated or edited. {fix}"
        ) from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{path}: the shard index is a JSON {type(index).__name__}, not an object. {fix}")
    weight_map = index.get("weight_map")
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise CheckpointError(
            f"{path}: the shard index's weight_map is {json.dumps(weight_map)[:100]}, not a non-empty map of tensor "
            f"names to shard file names. {fix}"
        )
    if not isinstance(index.get("metadata"), dict):
        raise CheckpointError(
            f"{path}: the shard index's metadata is {json.dumps(index.get('metadata'))[:100]}, not an object (diffusers "
            f"and transformers read it; it was removed or edited). {fix}"
        )
    folder = os.path.dirname(path)
    absent = sorted(name for name in set(weight_map.values()) if not os.path.isfile(os.path.join(folder, name)))
    if absent:
        raise CheckpointError(
            f"{path}: the shard index names {', '.join(absent[:3])}, which is not in {folder}; the index was edited "
            f"or a shard is missing. {fix}"
        )
    return weight_map


def sort_header_metadata(path: str | os.PathLike) -> bool:
    """Rewrite the ``__metadata__`` of a safetensors header with its keys sorted, in place.

    safetensors writes the metadata map from a Rust ``HashMap``, so its key order (and the file's bytes) varies
    between runs; sorted, identical inputs give byte-identical files. Only the header's JSON is touched, and only
    when it is in safetensors' own compact form (checked by re-serialising it), so the length and every tensor
    offset stay the same.

    Returns:
        True if the header is now in sorted form, False if it was left alone (not compact JSON, no metadata).
    """
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        text = raw.rstrip(b" ")
        header = json.loads(text)
        metadata = header.get("__metadata__")
        compact = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if not isinstance(metadata, dict) or compact != text:
            return False
        header["__metadata__"] = dict(sorted(metadata.items()))
        ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if ordered != text:
            handle.seek(8)
            handle.write(ordered)
    return True
