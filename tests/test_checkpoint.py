"""Damaged or inconsistent OTQ checkpoints on disk fail loudly, naming the file/layer, the finding and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_otq import FORMAT_VERSION, OTQConfig
from diffusers_otq.checkpoint import (
    CHECKSUMS_KEY,
    FORMAT_VERSION_KEY,
    CheckpointError,
    read_safetensors_header,
    tensor_checksum,
)

from .tiny_models import tiny_unet


WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit quantized tiny UNet saved as one file."""
    root = tmp_path_factory.mktemp("otq")
    tiny_unet().save_pretrained(root / "float")
    UNet2DModel.from_pretrained(root / "float", quantization_config=OTQConfig(bits=4)).save_pretrained(root / "q")
    return root / "q"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _rewrite(path: Path, edit) -> None:  # noqa: ANN001 - edit(tensors, metadata) mutates both
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = dict(load_file(path))
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def _replace_tensor(path: Path, key: str, edit) -> None:  # noqa: ANN001 - edit(tensor) -> tensor
    """Replace one stored tensor and re-sign it, so only the layout checks (not the checksum) can object."""

    def apply(tensors: dict, metadata: dict) -> None:
        tensors[key] = edit(tensors[key]).contiguous()
        checksums = json.loads(metadata[CHECKSUMS_KEY])
        checksums[key] = tensor_checksum(tensors[key])
        metadata[CHECKSUMS_KEY] = json.dumps(checksums)

    _rewrite(path, apply)


def test_saved_headers_carry_version_and_checksums(saved: Path) -> None:
    header = read_safetensors_header(saved / WEIGHTS)
    assert header.metadata[FORMAT_VERSION_KEY] == str(FORMAT_VERSION)
    checksums = json.loads(header.metadata[CHECKSUMS_KEY])
    tensors = load_file(saved / WEIGHTS)
    assert "conv_in.weight" in checksums and "conv_in.codebook" in checksums and "conv_in.bias" not in checksums
    assert all(tensor_checksum(tensors[k]) == v for k, v in checksums.items())


def test_truncated_single_file_names_the_file(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 1000])
    with pytest.raises((OSError, CheckpointError), match=WEIGHTS):
        UNet2DModel.from_pretrained(folder)


def test_truncated_shard_is_reported_before_loading(saved: Path, tmp_path: Path) -> None:
    model = UNet2DModel.from_pretrained(saved)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*100 missing.*truncated.*Re-download or re-save"):
        UNet2DModel.from_pretrained(tmp_path / "sharded")


def test_garbage_header_is_reported(saved: Path, tmp_path: Path) -> None:
    model = UNet2DModel.from_pretrained(saved)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*not valid JSON"):
        UNet2DModel.from_pretrained(tmp_path / "sharded")


def test_flipped_code_bits_fail_the_checksum(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")

    def flip(tensors: dict, metadata: dict) -> None:
        tensors["down_blocks.0.resnets.0.conv1.weight"][5] ^= 0xFF

    _rewrite(folder / WEIGHTS, flip)
    with pytest.raises(CheckpointError, match=r"'down_blocks.0.resnets.0.conv1'.*'weight'.*checksum.*corrupted"):
        UNet2DModel.from_pretrained(folder)


def test_config_bits_disagreeing_with_codes(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'conv_in'.*codebook.*have 9 entries; bits=3 means up to 8"):
        UNet2DModel.from_pretrained(folder)
    config["quantization_config"]["bits"] = 5  # codebooks fit; the packed codes are too short
    config["quantization_config"]["modules_to_not_convert"] = ["conv_in"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'conv_out'.*have 16 entries; bits=5 means up to 32.*config.json"):
        UNet2DModel.from_pretrained(folder)


def test_packed_codes_of_the_wrong_length(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")

    _replace_tensor(folder / WEIGHTS, "conv_out.weight", lambda packed: packed[:-8])
    with pytest.raises(CheckpointError, match=r"'conv_out'.*'weight' has shape \(64,\).*needs \(72,\).*3.56 bits"):
        UNet2DModel.from_pretrained(folder)


def test_codebook_shape_mismatch(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")

    _replace_tensor(folder / WEIGHTS, "conv_in.codebook", lambda codebook: codebook[:, :8])
    with pytest.raises(CheckpointError, match=r"'conv_in'.*'codebook' has shape \(16, 8\).*needs \(16, 9\)"):
        UNet2DModel.from_pretrained(folder)


def test_codes_beyond_a_short_codebook(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")  # conv_in: 9 values per row, so a 4-bit codebook has 9 < 16 entries

    def bad_code(packed: torch.Tensor) -> torch.Tensor:
        packed = packed.clone()
        packed[0] = 0xFF  # two codes of 15
        return packed

    _replace_tensor(folder / WEIGHTS, "conv_in.weight", bad_code)
    with pytest.raises(CheckpointError, match=r"'conv_in'.*code is 15.*only 9 entries"):
        UNet2DModel.from_pretrained(folder)


def test_unknown_format_version_in_config_and_header(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "config")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"format_version=7.*up to {FORMAT_VERSION}.*pip install -U diffusers-otq"):
        UNet2DModel.from_pretrained(folder)

    folder = _copy(saved, tmp_path / "header")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: metadata.update({FORMAT_VERSION_KEY: "7"}))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}.*format version '7'.*upgrade"):
        UNet2DModel.from_pretrained(folder)


def test_missing_packed_tensor_is_not_left_on_meta(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: tensors.pop("mid_block.resnets.0.conv2.weight"))
    with pytest.raises(CheckpointError, match=r"'mid_block.resnets.0.conv2'.*'weight' is still on the meta device"):
        UNet2DModel.from_pretrained(folder)


def test_wrong_codebook_dtype(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")

    def to_int(tensors: dict, metadata: dict) -> None:
        tensors["conv_in.codebook"] = tensors["conv_in.codebook"].to(torch.int16)
        metadata.pop(CHECKSUMS_KEY)

    _rewrite(folder / WEIGHTS, to_int)
    with pytest.raises(CheckpointError, match=r"'conv_in'.*dtype torch.int16, expected torch.float16"):
        UNet2DModel.from_pretrained(folder)


def test_pickle_save_is_refused(saved: Path, tmp_path: Path) -> None:
    model = UNet2DModel.from_pretrained(saved)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
