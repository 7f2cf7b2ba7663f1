"""Damaged or inconsistent OTQ checkpoints on disk fail loudly, naming the file/layer, the finding and the fix."""

from __future__ import annotations

import json
from collections.abc import Callable
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
    typed_checksum,
)
from diffusers_otq.config_checksums import CONFIG_CHECKSUMS_KEY, config_field_checksums
from diffusers_otq.testing.tiny_models import tiny_unet


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
        checksums[key] = typed_checksum(tensors[key])
        metadata[CHECKSUMS_KEY] = json.dumps(checksums)

    _rewrite(path, apply)


def test_saved_headers_carry_version_and_checksums(saved: Path) -> None:
    header = read_safetensors_header(saved / WEIGHTS)
    assert header.metadata[FORMAT_VERSION_KEY] == str(FORMAT_VERSION)
    checksums = json.loads(header.metadata[CHECKSUMS_KEY])
    tensors = load_file(saved / WEIGHTS)
    assert set(checksums) == set(tensors)  # every tensor: packed codes, codebooks, and the float biases and norms
    assert all(typed_checksum(tensors[k]) == v for k, v in checksums.items())
    config = json.loads((saved / "config.json").read_text())  # and every field of config.json but two
    assert json.loads(header.metadata[CONFIG_CHECKSUMS_KEY]) == config_field_checksums(config)
    assert set(config) - set(json.loads(header.metadata[CONFIG_CHECKSUMS_KEY])) == {"quantization_config"}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(norm_num_groups=4), r"changed: norm_num_groups=4"),  # every shape still fits
        (lambda c: c.update(act_fn="gelu"), r"changed: act_fn=\"gelu\""),
        (lambda c: c.update(_class_name="UNet2DConditionModel"), r"changed: _class_name="),
        (lambda c: c.pop("resnet_time_scale_shift"), r"removed: resnet_time_scale_shift"),
        (lambda c: c.update(norm_num_groups=3), r"changed: norm_num_groups=3"),  # GroupNorm(3, 16) cannot be built
    ],
)  # fmt: skip
def test_config_field_edits_are_refused_naming_the_field(
    saved: Path, tmp_path: Path, edit: Callable[[dict], object], match: str
) -> None:
    folder = _copy(saved, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config.json: does not match the config the weights were saved with "
                                              rf"\({match}"):  # fmt: skip
        UNet2DModel.from_pretrained(folder)


def test_config_checksums_are_required_from_format_4_and_absent_before(saved: Path, tmp_path: Path) -> None:
    from diffusers_otq.testing.tiny_models import unet_inputs

    folder = _copy(saved, tmp_path / "v4")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: metadata.pop(CONFIG_CHECKSUMS_KEY))
    with pytest.raises(CheckpointError, match=r"format version \d+ but the header has no 'otq_config_checksums'"):
        UNet2DModel.from_pretrained(folder)

    def format_3(tensors: dict, metadata: dict) -> None:
        metadata.update({FORMAT_VERSION_KEY: "3"})

    _rewrite(folder / WEIGHTS, format_3)  # a format-3 checkpoint: loads as before, config.json is not compared
    config = json.loads((folder / "config.json").read_text())
    config["norm_num_groups"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        edited = UNet2DModel.from_pretrained(folder)(**unet_inputs()).sample
        assert not torch.equal(edited, UNet2DModel.from_pretrained(saved)(**unet_inputs()).sample)


def test_format_4_checkpoints_load_as_scalar_codebooks(saved: Path, tmp_path: Path) -> None:
    """A checkpoint written before vector codebooks (format 4: no ``vector_dim`` anywhere) loads unchanged."""
    from diffusers_otq.testing.tiny_models import unet_inputs

    folder = _copy(saved, tmp_path / "v4")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: metadata.update({FORMAT_VERSION_KEY: "4"}))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 4
    assert config["quantization_config"].pop("vector_dim") == 1  # format 4 configs have no such field
    (folder / "config.json").write_text(json.dumps(config))
    old = UNet2DModel.from_pretrained(folder)
    assert old.config.quantization_config.format_version == 4
    with torch.no_grad():
        assert torch.equal(old(**unet_inputs()).sample, UNet2DModel.from_pretrained(saved)(**unet_inputs()).sample)


_RELOAD_AND_RUN = """
import sys, torch
import diffusers_otq
from diffusers import DiTTransformer2DModel
model = DiTTransformer2DModel.from_pretrained(sys.argv[1])
g = torch.Generator().manual_seed(0)
inputs = dict(hidden_states=torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
              class_labels=torch.tensor([1, 2]))
with torch.no_grad():
    torch.save(model(**inputs).sample, sys.argv[2])
"""


def test_vector_and_int8_codebooks_save_and_reload_in_a_fresh_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    from diffusers import DiTTransformer2DModel

    from diffusers_otq.layers import OTQLayerMixin
    from diffusers_otq.testing.tiny_models import tiny_dit

    tiny_dit().save_pretrained(tmp_path / "float")
    config = OTQConfig(bits=2, vector_dim=2, granularity="group", group_size=16,
                       module_overrides={"proj_out*": {"bits": 1, "vector_dim": 4, "granularity": "tensor",
                                                      "group_size": None, "codebook_dtype": "int8"}})  # fmt: skip
    model = DiTTransformer2DModel.from_pretrained(tmp_path / "float", quantization_config=config)
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    assert {m.vector_dim for m in layers} == {2, 4} and all(m.codebook.dim() == 3 for m in layers)
    int8 = [m for m in layers if m.codebook.dtype == torch.int8]
    assert int8 and all(m.vector_dim == 4 and m.codebook_scale.shape == (1,) for m in int8)
    model.save_pretrained(tmp_path / "q")
    assert any(key.endswith(".codebook_scale") for key in read_safetensors_header(tmp_path / "q" / WEIGHTS).tensors)
    header = read_safetensors_header(tmp_path / "q" / WEIGHTS)
    assert header.metadata[FORMAT_VERSION_KEY] == str(FORMAT_VERSION) == "7"
    saved_config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved_config["vector_dim"] == 2
    out = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", _RELOAD_AND_RUN, str(tmp_path / "q"), str(out)], check=True,
                   capture_output=True)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  class_labels=torch.tensor([1, 2]))  # fmt: skip
    with torch.no_grad():
        expected = model(**inputs).sample
    assert torch.equal(torch.load(out, weights_only=True), expected)


def test_truncated_single_file_names_the_file(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}: .*it is truncated") as caught:
        UNet2DModel.from_pretrained(folder)
    assert isinstance(caught.value.__cause__, OSError)  # diffusers' own error stays chained


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
    with pytest.raises(CheckpointError, match=r"'down_blocks.0.resnets.0.conv1.weight'.*checksum.*corrupted"):
        UNet2DModel.from_pretrained(folder)


def test_config_bits_disagreeing_with_codes(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'conv_in'.*codebook.*have 9 entries; bits=3 means up to 8"):
        UNet2DModel.from_pretrained(folder)
    config["quantization_config"]["bits"] = 5  # codebooks fit; the packed codes are too short
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
    newer = FORMAT_VERSION + 1
    config["quantization_config"]["format_version"] = newer
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"format_version={newer}.*up to {FORMAT_VERSION}.*pip install -U diffusers-otq"
    ):
        UNet2DModel.from_pretrained(folder)

    folder = _copy(saved, tmp_path / "header")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: metadata.update({FORMAT_VERSION_KEY: str(newer)}))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}.*format version '{newer}'.*upgrade"):
        UNet2DModel.from_pretrained(folder)


@pytest.mark.parametrize("key", ["mid_block.resnets.0.conv2.weight", "conv_in.bias", "conv_norm_out.weight"])
def test_a_missing_tensor_packed_or_float_is_named(saved: Path, tmp_path: Path, key: str) -> None:
    folder = _copy(saved, tmp_path / "q")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: tensors.pop(key))
    with pytest.raises(CheckpointError, match=rf"listed in the checkpoint's checksums are not in its files: {key}"):
        UNet2DModel.from_pretrained(folder)


@pytest.mark.parametrize("key", ["conv_in.bias", "conv_norm_out.weight", "conv_in.codebook"])
def test_float_tensors_are_checksummed_bytes_dtype_and_shape(saved: Path, tmp_path: Path, key: str) -> None:
    for name, edit in {"flip": lambda t: t.clone().view(torch.uint8).bitwise_xor_(1).view(t.dtype),
                       "relabel": lambda t: t.view(torch.bfloat16) if t.dtype == torch.float16 else t.view(torch.int32),
                       "reshape": lambda t: t.reshape(1, -1)}.items():  # fmt: skip
        folder = _copy(saved, tmp_path / name)

        def apply(tensors: dict, metadata: dict, edit=edit) -> None:
            tensors[key] = edit(tensors[key]).contiguous()

        _rewrite(folder / WEIGHTS, apply)
        with pytest.raises(CheckpointError, match=rf"tensor '{key}' .* does not match the checksum"):
            UNet2DModel.from_pretrained(folder)


def test_removed_checksum_metadata_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: metadata.pop(CHECKSUMS_KEY))
    with pytest.raises(CheckpointError, match=r"no 'otq_format_version'/'otq_checksums' entries"):
        UNet2DModel.from_pretrained(folder)


def test_unsigned_files_load_only_with_the_explicit_opt_out(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from diffusers_otq.testing.tiny_models import unet_inputs

    folder = _copy(saved, tmp_path / "q")
    _rewrite(folder / WEIGHTS, lambda tensors, metadata: metadata.clear())
    with pytest.raises(CheckpointError, match="set DIFFUSERS_OTQ_ALLOW_UNCHECKED=1"):
        UNet2DModel.from_pretrained(folder)
    monkeypatch.setenv("DIFFUSERS_OTQ_ALLOW_UNCHECKED", "1")
    with caplog.at_level("WARNING", logger="diffusers_otq.integrity"):
        model = UNet2DModel.from_pretrained(folder)
    assert "without integrity checks" in caplog.text and WEIGHTS in caplog.text
    with torch.no_grad():
        expected = UNet2DModel.from_pretrained(saved)(**unet_inputs()).sample
        assert torch.equal(model(**unet_inputs()).sample, expected)


def test_wrong_codebook_dtype(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "q")

    _replace_tensor(folder / WEIGHTS, "conv_in.codebook", lambda t: t.to(torch.int16))  # re-signed
    with pytest.raises(CheckpointError, match=r"'conv_in'.*dtype torch.int16, expected torch.float16"):
        UNet2DModel.from_pretrained(folder)


def test_pickle_save_is_refused(saved: Path, tmp_path: Path) -> None:
    model = UNet2DModel.from_pretrained(saved)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_codebooks_are_refused_even_when_re_signed(saved: Path, tmp_path: Path, value: float) -> None:
    folder = _copy(saved, tmp_path / "q")

    def poison(codebook: torch.Tensor) -> torch.Tensor:
        codebook = codebook.clone()
        codebook[0, 0] = value
        return codebook

    _replace_tensor(folder / WEIGHTS, "conv_in.codebook", poison)
    with pytest.raises(CheckpointError, match=r"'conv_in'.*'codebook' holds NaN or Inf"):
        UNet2DModel.from_pretrained(folder)


def test_negative_group_scales_are_refused(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path / "float")
    config = OTQConfig(bits=3, granularity="group", group_size=8)
    UNet2DModel.from_pretrained(tmp_path / "float", quantization_config=config).save_pretrained(tmp_path / "q")
    _replace_tensor(tmp_path / "q" / WEIGHTS, "conv_out.scale_max", lambda t: -t)
    with pytest.raises(CheckpointError, match=r"'conv_out'.*'scale_max' has negative values"):
        UNet2DModel.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda c: c["quantization_config"].update(modules_to_not_convert=["conv_in"]), CheckpointError,
         r"stores conv_in quantized, but the config leaves them in float"),
        (lambda c: c["quantization_config"].update(modules_to_not_convert=["*"]), CheckpointError,
         r"does not match the stored tensors"),
        (lambda c: c.update(quantization_config=None), CheckpointError, r"quantization_config is None, but the "
         r"weights next to it are OTQ-quantized"),
        (lambda c: c.pop("quantization_config"), CheckpointError, r"quantization_config is 'absent'"),
        (lambda c: c.update(quantization_config=[]), CheckpointError, r"quantization_config is \[\]"),
        (lambda c: c["quantization_config"].update(bits=99), CheckpointError, r"not a valid OTQConfig: bits=99"),
    ],
)  # fmt: skip
def test_config_edits_fail_loudly_instead_of_giving_nan(saved: Path, tmp_path: Path, edit, error, match) -> None:  # noqa: ANN001
    folder = _copy(saved, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        UNet2DModel.from_pretrained(folder)


def test_sorting_header_metadata_keeps_every_tensor_and_offset(saved: Path, tmp_path: Path) -> None:
    from diffusers_otq.checkpoint import sort_header_metadata

    path = _copy(saved, tmp_path / "c") / WEIGHTS
    _rewrite(path, lambda tensors, metadata: metadata.update({"zz_note": "1", "aa_note": "2"}))
    before = load_file(path)
    assert sort_header_metadata(path)
    header = read_safetensors_header(path)
    assert list(header.metadata) == sorted(header.metadata)
    after = load_file(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
