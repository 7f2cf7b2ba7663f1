"""explain_load_failure: a failed from_pretrained on a local folder gets the cause its files show."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from diffusers import UNet2DModel

from diffusers_otq import OTQConfig
from diffusers_otq.checkpoint import CheckpointError
from diffusers_otq.load_errors import explain_load_failure
from diffusers_otq.testing.tiny_models import tiny_unet


WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_a_truncated_float_checkpoint_is_explained_too(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"it is truncated") as caught:
        UNet2DModel.from_pretrained(tmp_path)
    assert isinstance(caught.value.__cause__, OSError)


def test_failures_it_cannot_explain_pass_through_unchanged(tmp_path: Path) -> None:
    error = OSError("no such repository")
    assert explain_load_failure("someone/some-repo", None, error) is None  # not a local folder
    assert explain_load_failure(tmp_path, "missing-subfolder", error) is None
    tiny_unet().save_pretrained(tmp_path)
    assert explain_load_failure(tmp_path, None, ValueError("unrelated")) is None  # intact float checkpoint
    with pytest.raises(EnvironmentError, match="containing a config.json file") as caught:
        UNet2DModel.from_pretrained(tmp_path / "nothing-here-either", local_files_only=True)
    assert not isinstance(caught.value, CheckpointError)  # diffusers' own error, unwrapped


def test_an_unreadable_file_diffusers_reports_without_cause_gets_the_root_cause(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path)
    cause = RuntimeError("HeaderTooLarge")
    wrapped = OSError("Unable to load weights from checkpoint file for 'x' at 'x'.")
    wrapped.__context__ = ValueError("Unable to locate the file")
    wrapped.__context__.__context__ = cause
    explained = explain_load_failure(tmp_path, None, wrapped)
    assert isinstance(explained, CheckpointError) and "RuntimeError: HeaderTooLarge" in str(explained)


def test_the_file_diffusers_names_is_examined_wherever_it_lives(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path / "snapshot")  # e.g. a Hub cache snapshot, loaded by repo id
    path = tmp_path / "snapshot" / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    error = OSError(f"Unable to load weights from checkpoint file for '{path}' at '{path}'. ")
    explained = explain_load_failure("someone/some-repo", None, error)
    assert isinstance(explained, CheckpointError) and "100 missing" in str(explained)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-bit quantized tiny UNet saved in shards."""
    root = tmp_path_factory.mktemp("sharded")
    tiny_unet().save_pretrained(root / "float")
    model = UNet2DModel.from_pretrained(root / "float", quantization_config=OTQConfig(bits=3))
    model.save_pretrained(root / "q", max_shard_size="40KB")
    return root / "q"


INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.mark.parametrize(
    ("edit", "match", "cause"),
    [
        (lambda index: index[:-40], r"the shard index is not valid JSON", json.JSONDecodeError),
        (lambda index: json.dumps({**json.loads(index), "weight_map": "x"}), r"weight_map is \"x\", not a",
         AttributeError),
        (lambda index: json.dumps({k: v for k, v in json.loads(index).items() if k != "metadata"}),
         r"metadata is null, not an object", KeyError),
        (lambda index: json.dumps([json.loads(index)]), r"the shard index is a JSON list", TypeError),
        (lambda index: index.replace("-00002-of-", "-00009-of-"), r"names diffusion_pytorch_model-00009-of-0000\d"
         r".safetensors, which is not in", OSError),
    ],
)  # fmt: skip
def test_a_damaged_shard_index_is_explained_and_chained_to_diffusers_error(
    sharded: Path, tmp_path: Path, edit: Callable[[str], str], match: str, cause: type
) -> None:
    folder = Path(shutil.copytree(sharded, tmp_path / "q"))
    (folder / INDEX).write_text(edit((folder / INDEX).read_text()))
    with pytest.raises(CheckpointError, match=rf"{INDEX}: .*{match}") as caught:
        UNet2DModel.from_pretrained(folder)
    assert isinstance(caught.value.__cause__, cause)


def test_a_config_diffusers_cannot_build_is_explained_by_the_field_that_changed(sharded: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(sharded, tmp_path / "q"))
    config = json.loads((folder / "config.json").read_text())
    config["norm_num_groups"] = 3  # GroupNorm(3, 16): diffusers fails while building the model
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"config.json: does not match .* \(changed: norm_num_groups=3\)"
    ) as caught:
        UNet2DModel.from_pretrained(folder)
    assert isinstance(caught.value.__cause__, ValueError) and not isinstance(caught.value.__cause__, CheckpointError)
