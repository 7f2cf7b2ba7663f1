"""A damaged safetensors header or shard index is a CheckpointError naming the file and the entry, never a raw KeyError,
IndexError, TypeError or ValueError from the parser (issue: integrity of every byte, finding 6)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from diffusers_otq.checkpoint import CheckpointError, collect_checksums, read_safetensors_header, read_shard_index
from diffusers_otq.config import OTQConfig
from diffusers_otq.quantizer import OTQQuantizer


def _write(path: Path, header: dict, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


GOOD = {"w": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "U8", "shape": [16]}, r"'w' has data_offsets None"),
        ({"dtype": "U8", "shape": [16], "data_offsets": [16]}, r"'w' has data_offsets \[16\]"),
        ({"dtype": "U8", "shape": [16], "data_offsets": [16, 0]}, r"0 <= begin <= end"),
        ({"dtype": "U8", "shape": [16], "data_offsets": ["0", "16"]}, r"'w' has data_offsets"),
        ({"dtype": "U8", "shape": "16", "data_offsets": [0, 16]}, r"'w' has shape '16'"),
        ({"dtype": "U8", "shape": [-1], "data_offsets": [0, 16]}, r"not a list of non-negative ints"),
        ({"dtype": 8, "shape": [16], "data_offsets": [0, 16]}, r"'w' has dtype 8"),
        ([1, 2], r"'w' is list, not an object"),
    ],
)
def test_malformed_entries_are_named(tmp_path: Path, entry: object, match: str) -> None:
    path = _write(tmp_path / "bad.safetensors", {"w": entry})
    with pytest.raises(CheckpointError, match=match):
        read_safetensors_header(path)


def test_metadata_must_map_strings_to_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.safetensors", {**GOOD, "__metadata__": {"otq_format_version": 3}})
    with pytest.raises(CheckpointError, match=r"__metadata__ must map strings to strings"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("checksums", "match"),
    [
        ('{"w": null}', "every checksum must be an int"),
        ("[1, 2]", "not a JSON map"),
        ('{"w": "12"}', "every checksum must be an int"),
    ],  # fmt: skip
)
def test_bad_checksum_maps_are_named(tmp_path: Path, checksums: str, match: str) -> None:
    path = _write(tmp_path / "bad.safetensors", {**GOOD, "__metadata__": {"otq_checksums": checksums}})
    with pytest.raises(CheckpointError, match=match):
        collect_checksums([read_safetensors_header(path)])


@pytest.mark.parametrize(("version", "match"), [("²", r"'²' is not a number"), ("x3", r"'x3' is not a number"),
                                                ("99", r"reads versions up to")])  # fmt: skip
def test_format_versions_that_are_not_numbers_or_too_new(tmp_path: Path, version: str, match: str) -> None:
    path = _write(tmp_path / "bad.safetensors", {**GOOD, "__metadata__": {"otq_format_version": version}})
    quantizer = OTQQuantizer(OTQConfig(bits=3), pre_quantized=True)
    with pytest.raises(CheckpointError, match=match):
        quantizer.maybe_update_loaded_keys(["w"], [str(path)])


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ('{"metadata": {}, "weight_map": {"w": "a.safe', r"the shard index is not valid JSON"),
        ("[]", r"the shard index is a JSON list, not an object"),
        ({"metadata": {}}, r"weight_map is null, not a non-empty map"),
        ({"metadata": {}, "weight_map": {}}, r"weight_map is \{\}, not a non-empty map"),
        ({"metadata": {}, "weight_map": {"w": 1}}, r"weight_map is \{\"w\": 1\}"),
        ({"weight_map": {"w": "a.safetensors"}}, r"metadata is null, not an object"),
        ({"metadata": {}, "weight_map": {"w": "b.safetensors"}}, r"names b.safetensors, which is not in"),
    ],
)  # fmt: skip
def test_damaged_shard_indexes_are_named(tmp_path: Path, index: object, match: str) -> None:
    _write(tmp_path / "a.safetensors", GOOD)
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(index if isinstance(index, str) else json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        read_shard_index(path)
    path.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "a.safetensors"}}))
    assert read_shard_index(path) == {"w": "a.safetensors"}
