"""The work folder of a block-by-block run: fingerprint check, plan, finished blocks and progress, read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_otq import CalibrationError, LayerSpec
from diffusers_otq.calibration.allocation import LayerChoice
from diffusers_otq.calibration.work_folder import Progress, WorkFolder


FINGERPRINT = {"model": "SD3Transformer2DModel", "blocks": ["a", "b"], "calls": 4, "processes": 1}


def choice(name: str, bits: int) -> LayerChoice:
    spec = LayerSpec(bits=bits, codebook_dtype=torch.float16)
    return LayerChoice(name, spec, 4096, 1600, 0.01 * bits, 0.5, False)


def test_a_fresh_folder_starts_and_another_run_is_refused(tmp_path: Path) -> None:
    work = WorkFolder(tmp_path / "work")
    assert work.open(FINGERPRINT) is None
    assert json.loads((tmp_path / "work" / "run.json").read_text())["calls"] == 4
    work.finish_block(0, "a", {}, Progress(1, [], [], None))
    assert work.open(FINGERPRINT).done == 1
    with pytest.raises(CalibrationError, match=r"holds another run \(its calls, processes differ\)"):
        work.open({**FINGERPRINT, "calls": 8, "processes": 2})


def test_plan_blocks_and_progress_read_back_exactly(tmp_path: Path) -> None:
    work = WorkFolder(tmp_path)
    assert work.plan() is None
    plan = [choice("a.to_q", 2), choice("b.to_k", 3)]
    work.save_plan(plan)
    assert work.plan() == plan
    work.open(FINGERPRINT)
    layers = {"a.to_q": {"weight": torch.arange(6, dtype=torch.uint8), "codebook": torch.randn(3, 4)},
              "a.to_k": {"weight": torch.ones(2, dtype=torch.uint8)}}  # fmt: skip
    work.finish_block(0, "a", layers, Progress(1, plan[:1], [{"name": "a.to_q", "error": 0.5}], {"steps": 3}))
    tensors, names = work.block(0)
    assert names == ["a.to_q", "a.to_k"]
    assert torch.equal(tensors["a.to_q.codebook"], layers["a.to_q"]["codebook"])
    assert torch.equal(tensors["a.to_k.weight"], layers["a.to_k"]["weight"])
    progress = work.open(FINGERPRINT)
    assert progress == Progress(1, plan[:1], [{"name": "a.to_q", "error": 0.5}], {"steps": 3})
    assert not list(tmp_path.glob("*.tmp"))  # written under temporary names, then renamed


def test_only_rank_zero_writes_the_shared_files(tmp_path: Path) -> None:
    WorkFolder(tmp_path, rank=1, world=2).save_plan([choice("a.to_q", 2)])
    assert not (tmp_path / "plan.json").exists()
    assert WorkFolder(tmp_path, rank=1, world=2).streams(3).name == "streams-r1-0003.safetensors"
    assert WorkFolder(tmp_path).streams(3).name == "streams-0003.safetensors"
