"""explain_load_failure: a failed from_pretrained on a local folder gets the cause its files show."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import UNet2DModel

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
