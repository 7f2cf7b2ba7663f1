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


def test_layers_reading_one_tensor_share_its_moments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Query, key and value projections read the same tensor: its statistics are computed once and each layer
    gets exactly what accumulating its own input gives."""
    from torch import nn

    from diffusers_otq.calibration import statistics as module
    from diffusers_otq.functional.moments import accumulate_moments

    torch.manual_seed(0)
    layers = {"q": nn.Linear(12, 6), "k": nn.Linear(12, 6), "v": nn.Linear(12, 6), "out": nn.Linear(6, 4)}
    blocks = {name: [layer.in_features] for name, layer in layers.items()}
    collector = module.StatisticsCollector(layers, blocks, max_gram_rows=7)
    computed = []
    original = module.input_moments
    monkeypatch.setattr(module, "input_moments", lambda x, *a: computed.append(x) or original(x, *a))
    inputs = [torch.randn(3, 5, 12) + 2.0 for _ in range(2)]
    collector.start_batch()
    with collector.attached():
        for x in inputs:
            attention = layers["q"](x) + layers["k"](x) * layers["v"](x)
            layers["out"](attention)
    assert len(computed) == 2 * len(inputs)  # one per distinct tensor, not one per layer
    for name, layer in layers.items():
        expected = module.LayerStatistics.zeros(1, layer.in_features, blocks[name])
        for call, x in enumerate(inputs):
            x = x if name != "out" else layers["q"](x) + layers["k"](x) * layers["v"](x)
            e = expected
            accumulate_moments(x, layer.in_features, None, 1.0, e.sum_x, e.sum_sq, e.count, e.gram, e.gram_sum,
                               e.gram_count, max_rows=7, call_index=call)  # fmt: skip
        for got, want in zip(collector.batch()[name].tensors(), expected.tensors(), strict=True):
            assert torch.equal(got, want), name


def test_a_call_weighted_zero_is_not_read() -> None:
    """A timestep weighted 0 adds nothing and is not even inspected (its NaN does not stop the calibration), but
    it still advances the call counter that rotates the Gram's row offset."""
    from torch import nn

    from diffusers_otq.calibration import statistics as module

    layer = nn.Linear(4, 2)
    collector = module.StatisticsCollector({"layer": layer}, {"layer": [4]}, max_gram_rows=1)
    collector.start_batch()
    with collector.attached():
        collector.weight = 0.0
        layer(torch.full((3, 4), float("nan")))
        collector.weight = 1.0
        x = torch.arange(12.0).reshape(3, 4)
        layer(x)
    stats = collector.batch()["layer"]
    assert float(stats.count) == 3 and float(stats.gram_count) == 1
    assert torch.equal(stats.gram_sum[0], x[1].double())  # call 1's offset: row 1, not row 0
