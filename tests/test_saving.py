"""Saving an OTQ model gives byte-identical files for identical inputs (diffusers_otq.saving)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from diffusers_otq.testing.tiny_models import tiny_unet


_QUANTIZE_AND_SAVE = """
import sys, torch
import diffusers_otq
from diffusers import UNet2DModel
from diffusers_otq import OTQConfig
torch.set_num_threads(int(sys.argv[3]))
model = UNet2DModel.from_pretrained(sys.argv[1], quantization_config=OTQConfig(bits=3, granularity="group", group_size=8))
model.save_pretrained(sys.argv[2], max_shard_size="40KB")
"""


def test_the_same_model_quantized_twice_gives_byte_identical_files(tmp_path: Path) -> None:
    outputs = []
    for run, threads in ((0, 1), (1, 2)):  # other processes (hash-map seeds), source paths and thread counts
        source = tmp_path / f"float-{run}"
        tiny_unet().save_pretrained(source)
        outputs.append(tmp_path / f"q-{run}")
        subprocess.run([sys.executable, "-c", _QUANTIZE_AND_SAVE, str(source), str(outputs[-1]), str(threads)],
                       check=True, capture_output=True)  # fmt: skip
    files = sorted(p.name for p in outputs[0].iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded: several headers to order
    assert files == sorted(p.name for p in outputs[1].iterdir())
    for name in files:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
    assert "_name_or_path" not in json.loads((outputs[0] / "config.json").read_text())
