"""Text encoders through transformers' loading path: the "otq" quantizer quantizes T5 and CLIP on load exactly as
quantize_model does, saves packed and reloads bit-identically; pipelines quantize transformer and text encoders
together with one PipelineQuantizationConfig."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.quantizers import PipelineQuantizationConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from diffusers_otq import OTQConfig, quantize_model
from diffusers_otq.checkpoint import CHECKSUMS_KEY, CheckpointError, read_safetensors_header, typed_checksum
from diffusers_otq.config_checksums import CONFIG_CHECKSUMS_KEY, config_field_checksums
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import (
    PIPELINE_CALL,
    _clip_config,
    _t5,
    t5_inputs,
    tiny_clip_text_model,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_t5_encoder,
)


ENCODERS = {"t5": (_t5, T5EncoderModel, 32), "clip": (lambda: CLIPTextModel(_clip_config()), CLIPTextModel, 1000)}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


def _encode(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


@pytest.mark.parametrize("name", list(ENCODERS))
def test_quantize_on_load_equals_post_hoc_and_reloads_bit_identically(name: str, tmp_path: Path) -> None:
    build, cls, vocab = ENCODERS[name]
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "float")
    loaded = cls.from_pretrained(tmp_path / "float", quantization_config=OTQConfig(bits=4))
    post_hoc = cls.from_pretrained(tmp_path / "float")
    quantize_model(post_hoc, OTQConfig(bits=4), progress=False)
    layers = [n for n, m in loaded.named_modules() if isinstance(m, OTQLayerMixin)]
    assert layers and layers == [n for n, m in post_hoc.named_modules() if isinstance(m, OTQLayerMixin)]
    ids = _ids(vocab)
    expected = _encode(loaded, ids)
    assert torch.equal(expected, _encode(post_hoc, ids))
    loaded.save_pretrained(tmp_path / "quantized")
    config = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "otq" and config["bits"] == 4
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import {cls.__name__}
        import diffusers_otq
        from diffusers_otq.layers import OTQLayerMixin
        torch.set_num_threads({torch.get_num_threads()})  # as this process: same kernels, same bits
        model = {cls.__name__}.from_pretrained({str(tmp_path / "quantized")!r})
        assert any(isinstance(m, OTQLayerMixin) for m in model.modules())
        with torch.no_grad():
            out = model(load_file({str(tmp_path / "ids.safetensors")!r})["ids"]).last_hidden_state
        save_file({{"out": out.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)
    assert loaded.num_parameters() == cls.from_pretrained(tmp_path / "float").num_parameters()
    bf16 = cls.from_pretrained(tmp_path / "quantized", dtype=torch.bfloat16)  # codebooks keep their stored values
    stored = {k: v for k, v in loaded.state_dict().items() if k.rpartition(".")[0] in layers}  # packed tensors
    again = bf16.state_dict()
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in stored.items() if "bias" not in k)
    assert any(k.endswith(".codebook") and v.dtype == torch.float16 for k, v in stored.items())


@pytest.mark.parametrize(("kind", "build", "cls"), [("sd3", tiny_sd3_pipeline, StableDiffusion3Pipeline),
                                                     ("flux", tiny_flux_pipeline, FluxPipeline)])  # fmt: skip
def test_one_pipeline_config_quantizes_transformer_and_text_encoders(kind, build, cls, tmp_path: Path) -> None:
    build(tmp_path).save_pretrained(tmp_path / "float")
    components = ["transformer", "text_encoder", "text_encoder_2"]
    config = PipelineQuantizationConfig(quant_backend="otq", quant_kwargs={"bits": 4},
                                        components_to_quantize=components)  # fmt: skip
    pipe = cls.from_pretrained(tmp_path / "float", quantization_config=config)
    pipe.set_progress_bar_config(disable=True)
    for component in components:
        assert any(isinstance(m, OTQLayerMixin) for m in getattr(pipe, component).modules()), component
    call = {**PIPELINE_CALL[kind], "generator": torch.Generator().manual_seed(0)}
    images = pipe(**call).images
    pipe.save_pretrained(tmp_path / "quantized")
    again = cls.from_pretrained(tmp_path / "quantized")
    again.set_progress_bar_config(disable=True)
    for component in components:
        assert any(isinstance(m, OTQLayerMixin) for m in getattr(again, component).modules()), component
    assert torch.equal(again(**{**call, "generator": torch.Generator().manual_seed(0)}).images, images)


# --- integrity: the diffusers backend's checks, through transformers' loading -------------------------------------


@pytest.fixture(scope="module")
def saved_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """T5 (one file and sharded) and CLIP text encoders quantized at 3 bits and saved."""
    root = tmp_path_factory.mktemp("encoders")
    for name, build, cls, kwargs in [("t5", tiny_t5_encoder, T5EncoderModel, {}),
                                     ("t5-sharded", tiny_t5_encoder, T5EncoderModel, {"max_shard_size": "20KB"}),
                                     ("clip", tiny_clip_text_model, CLIPTextModel, {})]:  # fmt: skip
        build().save_pretrained(root / f"{name}-float")
        quantized = cls.from_pretrained(root / f"{name}-float", quantization_config=OTQConfig(bits=3))
        quantized.save_pretrained(root / name, **kwargs)
    return {name: root / name for name in ("t5", "t5-sharded", "clip")}


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _rewrite(path: Path, edit: Callable[[dict, dict], object]) -> None:
    """Rewrite a safetensors file; ``edit(tensors, metadata)`` changes both in place."""
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = dict(load_file(path))
    edit(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def _edit_config(folder: Path, edit: Callable[[dict], object]) -> None:
    """Rewrite config.json; ``edit(config)`` changes it in place."""
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


CLASSES = {"t5": T5EncoderModel, "t5-sharded": T5EncoderModel, "clip": CLIPTextModel}


def test_saved_config_checksums_are_those_of_the_config_json_transformers_writes(
    saved_encoders: dict[str, Path],
) -> None:
    for name, folder in saved_encoders.items():
        config = json.loads((folder / "config.json").read_text())
        for path in folder.glob("*.safetensors"):
            saved = json.loads(read_safetensors_header(path).metadata[CONFIG_CHECKSUMS_KEY])
            assert saved == config_field_checksums(config), name
            assert {"dtype", "architectures", "transformers_version"} <= set(saved)  # written after the metadata


@pytest.mark.parametrize("name", ["t5", "clip"])
def test_damaged_text_encoder_files_are_refused_by_name(
    saved_encoders: dict[str, Path], tmp_path: Path, name: str
) -> None:
    cls, weights = CLASSES[name], "model.safetensors"
    folder = _copy(saved_encoders[name], tmp_path / "truncated")
    (folder / weights).write_bytes((folder / weights).read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{weights}: .*100 missing.*truncated"):
        cls.from_pretrained(folder)

    header = read_safetensors_header(saved_encoders[name] / weights)
    norm = next(k for k, v in header.tensors.items() if v["dtype"] == "F32" and "norm" in k)  # loaded as is
    folder = _copy(saved_encoders[name], tmp_path / "flipped")
    data = bytearray((folder / weights).read_bytes())
    data[8 + struct.unpack("<Q", data[:8])[0] + header.tensors[norm]["data_offsets"][0]] ^= 1
    (folder / weights).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(norm)}' .* does not match the checksum"):
        cls.from_pretrained(folder)

    codebook = next(k for k in header.tensors if k.endswith(".codebook"))
    folder = _copy(saved_encoders[name], tmp_path / "removed")
    _rewrite(folder / weights, lambda tensors, metadata: tensors.pop(codebook))
    with pytest.raises(CheckpointError, match=rf"not in its files: {re.escape(codebook)}"):
        cls.from_pretrained(folder)

    def poison(tensors: dict, metadata: dict) -> None:  # re-signed: only the value check can object
        tensors[codebook] = tensors[codebook].clone()
        tensors[codebook][0, 0] = float("nan")
        checksums = json.loads(metadata[CHECKSUMS_KEY])
        checksums[codebook] = typed_checksum(tensors[codebook])
        metadata[CHECKSUMS_KEY] = json.dumps(checksums)

    folder = _copy(saved_encoders[name], tmp_path / "nan")
    _rewrite(folder / weights, poison)
    with pytest.raises(CheckpointError, match=rf"'{re.escape(codebook.rpartition('.')[0])}'.*'codebook' holds NaN"):
        cls.from_pretrained(folder)


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("t5", lambda c: c.update(layer_norm_epsilon=1e-3), r"changed: layer_norm_epsilon=0.001"),
        ("t5", lambda c: c.update(dtype="bfloat16"), r"changed: dtype=\"bfloat16\""),  # dtype="auto" would cast
        ("t5", lambda c: c.update(num_layers=1), r"changed: num_layers=1"),  # block 1 would be dropped
        ("clip", lambda c: c.update(hidden_act="gelu"), r"changed: hidden_act=\"gelu\""),
        ("clip", lambda c: c.pop("layer_norm_eps"), r"removed: layer_norm_eps"),
        ("clip", lambda c: c.update(rope_theta=10.0), r"added: rope_theta=10.0"),
        ("clip", lambda c: c["quantization_config"].update(rank=1), r"stores 'lowrank_up', 'lowrank_down'.*no "),
    ],
)  # fmt: skip
def test_config_edits_of_text_encoders_are_refused_naming_the_field(
    saved_encoders: dict[str, Path],
    tmp_path: Path,
    name: str,
    edit: Callable[[dict], object],
    match: str,
) -> None:
    folder = _copy(saved_encoders[name], tmp_path / name)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=match):
        CLASSES[name].from_pretrained(folder)


@pytest.mark.parametrize(
    ("edit", "match", "cause"),
    [
        (lambda text: text[: len(text) // 2], r" is not valid JSON", json.JSONDecodeError),
        (lambda text: json.dumps({**json.loads(text), "weight_map": []}), r"'s weight_map is \[\], not a", AttributeError),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "metadata"}),
         r"'s metadata is null, not an object", KeyError),
    ],
)  # fmt: skip
def test_a_damaged_shard_index_is_explained_and_chained_to_transformers_error(
    saved_encoders: dict[str, Path],
    tmp_path: Path,
    edit: Callable[[str], str],
    match: str,
    cause: type,
) -> None:
    folder = _copy(saved_encoders["t5-sharded"], tmp_path / "sharded")
    index = folder / "model.safetensors.index.json"
    index.write_text(edit(index.read_text()))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: the shard index{match}") as caught:
        T5EncoderModel.from_pretrained(folder)
    assert isinstance(caught.value.__cause__, cause)  # transformers' own error stays chained


def test_format_3_text_encoder_checkpoints_still_load(saved_encoders: dict[str, Path], tmp_path: Path) -> None:
    """Format 3 as saved before: no config checksums, and the checksums list T5's tied embed_tokens, which
    transformers stores once (its checksum is that of shared.weight)."""
    folder = _copy(saved_encoders["t5"], tmp_path / "v3")

    def format_3(tensors: dict, metadata: dict) -> None:
        metadata["otq_format_version"] = "3"
        del metadata[CONFIG_CHECKSUMS_KEY]
        checksums = json.loads(metadata[CHECKSUMS_KEY])
        metadata[CHECKSUMS_KEY] = json.dumps({**checksums, "encoder.embed_tokens.weight": checksums["shared.weight"]})

    _rewrite(folder / "model.safetensors", format_3)
    checksums = json.loads(read_safetensors_header(folder / "model.safetensors").metadata[CHECKSUMS_KEY])
    assert "encoder.embed_tokens.weight" in checksums
    assert "encoder.embed_tokens.weight" not in load_file(folder / "model.safetensors")
    ids = t5_inputs()["input_ids"]
    expected = _encode(T5EncoderModel.from_pretrained(saved_encoders["t5"]), ids)
    assert torch.equal(_encode(T5EncoderModel.from_pretrained(folder), ids), expected)
    _edit_config(folder, lambda c: c.update(layer_norm_epsilon=1e-3))  # nothing to compare config.json with
    assert not torch.equal(_encode(T5EncoderModel.from_pretrained(folder), ids), expected)


def test_checksums_follow_the_names_transformers_writes_and_reads(
    saved_encoders: dict[str, Path], tmp_path: Path
) -> None:
    """A CLIP text encoder from the Hub stores ``text_model.*`` keys, which transformers renames on load and back on
    save; a CLIPTextModelWithProjection checkpoint loads as CLIPTextModel (its projection left out); T5Model would
    need a decoder that an encoder checkpoint does not have."""
    tiny_clip_text_model().save_pretrained(tmp_path / "float")
    float_weights = tmp_path / "float" / "model.safetensors"
    save_file(
        {f"text_model.{k}": v for k, v in load_file(float_weights).items()}, float_weights, metadata={"format": "pt"}
    )
    quantized = CLIPTextModel.from_pretrained(tmp_path / "float", quantization_config=OTQConfig(bits=3))
    quantized.save_pretrained(tmp_path / "hub-style")
    header = read_safetensors_header(tmp_path / "hub-style" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in header.tensors)
    assert set(json.loads(header.metadata[CHECKSUMS_KEY])) == set(header.tensors)
    ids = _ids(1000)
    assert torch.equal(_encode(CLIPTextModel.from_pretrained(tmp_path / "hub-style"), ids), _encode(quantized, ids))

    CLIPTextModelWithProjection(_clip_config()).save_pretrained(tmp_path / "projection-float")
    projection = CLIPTextModelWithProjection.from_pretrained(tmp_path / "projection-float",
                                                             quantization_config=OTQConfig(bits=3))  # fmt: skip
    projection.save_pretrained(tmp_path / "projection")
    text_model = CLIPTextModel.from_pretrained(tmp_path / "projection")
    assert torch.equal(_encode(text_model, ids), _encode(projection, ids))
    with pytest.raises(CheckpointError, match=r"the config quantizes decoder.block.0.* does not store them"):
        AutoModel.from_pretrained(saved_encoders["t5"])  # T5Model: the decoder would be left random
