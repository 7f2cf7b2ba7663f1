"""CalibrationStatistics: the safetensors file (bit-identical reload, probes included) and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_otq import CalibrationError, CalibrationStatistics, OTQConfig, calibrate
from tests.calibration.helpers import quick, unet_pipeline


@pytest.fixture(scope="module")
def statistics() -> CalibrationStatistics:
    return calibrate(unet_pipeline(), OTQConfig(bits=3), quick(sensitivity="velocity"))


def test_save_and_load_are_bit_identical(statistics: CalibrationStatistics, tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    statistics.save(path)
    again = CalibrationStatistics.load(path)
    assert list(again) == list(statistics) and again.info == statistics.info
    for name, stats in statistics.items():
        for mine, theirs in zip(stats.tensors(), again[name].tensors(), strict=True):
            assert torch.equal(mine, theirs), name
    assert len(again.probes) == len(statistics.probes) == 2
    for (args, kwargs), (args2, kwargs2) in zip(statistics.probes.calls, again.probes.calls, strict=True):
        assert all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(args, args2, strict=True)
        )
        assert kwargs.keys() == kwargs2.keys()


def test_moments_and_gram_agree(statistics: CalibrationStatistics) -> None:
    stats = statistics["conv_in"]  # 1 input channel, 3x3: n = 9
    assert stats.width == 9 and stats.groups == 1 and stats.seen
    gram = stats.gram_blocks()[0]
    assert gram.shape == (9, 9) and torch.allclose(gram, gram.T)
    # The Gram uses a subset of rows, the moments all of them: close, not equal.
    assert torch.allclose(gram.diagonal(), stats.second_moments()[0], rtol=0.2)
    covariance = stats.gram_blocks(centered=True)[0]
    assert torch.linalg.eigvalsh(covariance).min() > -1e-9
    assert torch.all(stats.second_moments(centered=True) <= stats.second_moments() + 1e-12)


def _edit(path: Path, out: Path, metadata: dict | None = None, drop: str | None = None) -> Path:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(path)
    if drop:
        tensors.pop(drop)
    meta.update(metadata or {})
    save_file(tensors, str(out), metadata=meta)
    return out


def test_bad_files(statistics: CalibrationStatistics, tmp_path: Path) -> None:
    path = tmp_path / "stats.safetensors"
    statistics.save(path)
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationStatistics.load(tmp_path / "missing.safetensors")
    with pytest.raises(CalibrationError, match="not a diffusers-otq calibration statistics file"):
        CalibrationStatistics.load(_edit(path, tmp_path / "a.safetensors", {"format": "something-else"}))
    with pytest.raises(CalibrationError, match="reads up to"):
        CalibrationStatistics.load(_edit(path, tmp_path / "b.safetensors", {"version": "99"}))
    with pytest.raises(CalibrationError, match="'conv_in::sum_sq' is missing"):
        CalibrationStatistics.load(_edit(path, tmp_path / "c.safetensors", drop="conv_in::sum_sq"))
    with pytest.raises(CalibrationError, match="not a valid statistics layout"):
        CalibrationStatistics.load(_edit(path, tmp_path / "d.safetensors", {"layers": "[not json"}))
    layout = json.loads(_read_meta(path)["layers"])
    assert [name for name, _ in layout] == list(statistics)


def _read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()
