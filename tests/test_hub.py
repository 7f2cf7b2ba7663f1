"""Model card and Hub upload, offline: the hub client's create_repo/upload_folder are patched."""

from __future__ import annotations

import types
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from diffusers import UNet2DModel
from diffusers.models import modeling_utils
from diffusers.utils import hub_utils
from huggingface_hub import ModelCard

import diffusers_otq
from diffusers_otq import OTQConfig, quantize_model
from diffusers_otq.hub import write_model_card
from diffusers_otq.testing.tiny_models import tiny_unet


class FakeHub:
    """Records create_repo/upload_folder calls and snapshots the uploaded folder (it is a temp dir)."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> types.SimpleNamespace:
        self.repos.append(repo_id)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: object) -> str:
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()
    for module in (huggingface_hub, hub_utils, modeling_utils):
        if hasattr(module, "create_repo"):
            monkeypatch.setattr(module, "create_repo", fake.create_repo)
        if hasattr(module, "upload_folder"):
            monkeypatch.setattr(module, "upload_folder", fake.upload_folder)
    generic = lambda *args, **kwargs: ModelCard("---\nlibrary_name: diffusers\n---\ngeneric diffusers card")  # noqa: E731
    monkeypatch.setattr(modeling_utils, "load_or_create_model_card", generic)
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", generic)
    return fake


@pytest.fixture
def quantized() -> UNet2DModel:
    model = tiny_unet()
    quantize_model(model, OTQConfig(bits=3), progress=False)
    return model


def _card(upload: dict) -> tuple[dict, str]:
    text = upload["files"]["README.md"].decode()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _check_card(upload: dict, repo_id: str) -> None:
    metadata, body = _card(upload)
    assert metadata["library_name"] == "diffusers"
    assert {"quantized", "otq", "flow-matching", "3-bit"} <= set(metadata["tags"])
    assert "import diffusers_otq" in body and f'UNet2DModel.from_pretrained("{repo_id}")' in body
    assert '"bits": 3' in body and '"quant_method": "otq"' in body
    assert "bits per weight" in body and "size on disk" in body and "16 bits (bf16)" in body
    assert "generic diffusers card" not in body


EXPECTED_FILES = {"README.md", "config.json", "diffusion_pytorch_model.safetensors"}


def test_push_to_hub_function_uploads_packed_checkpoint_and_card(hub: FakeHub, quantized: UNet2DModel) -> None:
    diffusers_otq.push_to_hub(quantized, "me/unet-otq3", base_model="me/unet")
    assert hub.repos == ["me/unet-otq3"]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/unet-otq3" and set(upload["files"]) == EXPECTED_FILES
    _check_card(upload, "me/unet-otq3")
    assert _card(upload)[0]["base_model"] == "me/unet"
    assert b'"quant_method": "otq"' in upload["files"]["config.json"]


def test_model_push_to_hub_keeps_our_card(hub: FakeHub, quantized: UNet2DModel) -> None:
    quantized.push_to_hub("me/unet-otq3")
    (upload,) = hub.uploads
    assert set(upload["files"]) == EXPECTED_FILES
    _check_card(upload, "me/unet-otq3")


def test_save_pretrained_push_to_hub_keeps_our_card(hub: FakeHub, quantized: UNet2DModel, tmp_path: Path) -> None:
    quantized.save_pretrained(str(tmp_path / "unet-otq3"), push_to_hub=True, repo_id="me/unet-otq3")
    (upload,) = hub.uploads
    assert set(upload["files"]) == EXPECTED_FILES
    _check_card(upload, "me/unet-otq3")


def test_quantize_on_load_model_also_gets_the_card(hub: FakeHub, tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path / "float")
    model = UNet2DModel.from_pretrained(tmp_path / "float", quantization_config=OTQConfig(bits=3))
    model.push_to_hub("me/x")
    _check_card(hub.uploads[0], "me/x")


def test_card_numbers_match_the_folder(quantized: UNet2DModel, tmp_path: Path) -> None:
    quantized.save_pretrained(tmp_path)
    body = write_model_card(quantized, tmp_path, "me/x").read_text()
    size = (tmp_path / "diffusion_pytorch_model.safetensors").stat().st_size
    assert f"{size / 1000:.2f} kB" in body
    layers = [m for m in quantized.modules() if isinstance(m, diffusers_otq.OTQConv2d | diffusers_otq.OTQLinear)]
    bpw = sum(m.nbytes for m in layers) * 8 / sum(m.weight_shape.numel() for m in layers)
    assert f"| {bpw:.3f} |" in body


def test_flow_match_pipeline_push_to_hub_writes_pipeline_card(hub: FakeHub, tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_otq import FlowMatchPipeline

    FlowMatchPipeline(tiny_unet(num_class_embeds=11), FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path)
    pipe = FlowMatchPipeline.from_pretrained(tmp_path, quantization_config=OTQConfig(bits=3))
    pipe.push_to_hub("me/fm-otq3")
    (upload,) = hub.uploads
    assert {"README.md", "model_index.json", "transformer/config.json"} <= set(upload["files"])
    metadata, body = _card(upload)
    assert {"otq", "3-bit"} <= set(metadata["tags"])
    assert (
        "from diffusers_otq import FlowMatchPipeline" in body
        and 'FlowMatchPipeline.from_pretrained("me/fm-otq3")' in body
    )
    assert '"transformer"' in body  # the per-component quantization config


def test_a_hostile_repo_id_stays_a_string_literal_in_the_card(tmp_path: Path) -> None:
    import ast

    from diffusers_otq.hub import _usage

    repo_id = 'x"); import os; os.system("echo owned'
    code = _usage(tiny_unet(), repo_id)
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
    assert len(calls) == 1 and calls[0].args[0].value == repo_id  # one call, the id as its only (string) argument
    assert not any(isinstance(node, ast.Import) and node.names[0].name == "os" for node in ast.walk(ast.parse(code)))
