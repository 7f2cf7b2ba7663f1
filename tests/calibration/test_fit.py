"""Calibrated fits of one layer: output error on its own inputs, bias correction, layouts, no-stats fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_otq import CalibrationConfig, LayerSpec, quantize_tensor
from diffusers_otq.calibration.fit import quantize_calibrated
from diffusers_otq.calibration.statistics import LayerStatistics, StatisticsCollector
from diffusers_otq.convert import PlannedLayer
from diffusers_otq.fitting import fit_data_free
from diffusers_otq.functional import error_feedback
from diffusers_otq.functional.error_feedback import output_error as output_error_rows
from diffusers_otq.functional.error_feedback import ridge_gram
from diffusers_otq.functional.moments import gram_block_sizes
from diffusers_otq.layers import OTQLinear


def correlated_layer(n: int = 96, out: int = 48, samples: int = 4096, mean: float = 0.0, seed: int = 0):
    """A Linear layer and inputs with correlated, unequal-energy columns (and a mean offset)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 2 * torch.randn(n, n, generator=g) / n**0.5
    x = (torch.randn(samples, n, generator=g) @ mix) * torch.linspace(0.2, 3.0, n) + mean
    layer = nn.Linear(n, out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, n, generator=g) / n**0.5)
    return layer, x


def statistics_of(layer: nn.Module, x: torch.Tensor, max_block: int = 4096) -> LayerStatistics:
    collector = StatisticsCollector({"layer": layer}, {"layer": gram_block_sizes(x.shape[-1], max_block)}, 10**9)
    with collector.attached():
        collector.start_batch()
        for chunk in x.split(1024):
            layer(chunk)
    return collector.batch()["layer"]


@torch.no_grad()
def output_error(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> float:
    reference = x.double() @ layer.weight.double().T + layer.bias.double()
    return float((x.double() @ weight.double().T + bias.double() - reference).square().mean())


def fit(layer: nn.Linear, stats: LayerStatistics | None, spec: LayerSpec, **calibration):
    planned = PlannedLayer("layer", layer, OTQLinear, spec)
    result = quantize_calibrated(layer.weight, planned, stats, CalibrationConfig(progress=False, **calibration))
    bias = layer.bias if result.bias is None else result.bias
    return result.quantized, bias


@pytest.mark.parametrize(
    "spec",
    [LayerSpec(bits=2), LayerSpec(bits=3), LayerSpec(bits=3, granularity="group", group_size=32),
     LayerSpec(bits=3, granularity="tensor"), LayerSpec(bits=3, method="uniform"),
     LayerSpec(bits=2, granularity="group", group_size=32, vector_dim=2), LayerSpec(bits=2, vector_dim=2),
     LayerSpec(bits=1, granularity="tensor", vector_dim=4)],
    ids=["2-bit", "3-bit", "3-bit group", "3-bit tensor", "3-bit uniform", "2-bit 2-D group", "2-bit 2-D channel",
         "1-bit 4-D tensor"],
)  # fmt: skip
def test_calibration_lowers_the_output_error_on_correlated_inputs(spec: LayerSpec) -> None:
    layer, x = correlated_layer(mean=0.5)
    stats = statistics_of(layer, x)
    data_free, _ = fit(layer, None, spec)
    baseline = output_error(layer, data_free.dequantize(), layer.bias, x)
    errors = {}
    for name, options in {
        "weighted": {"error_feedback": False, "bias_correction": False},
        "error feedback": {"bias_correction": False},
        "full": {},
    }.items():
        quantized, bias = fit(layer, stats, spec, **options)
        assert quantized.bits == spec.bits and quantized.granularity == spec.granularity
        assert (
            quantized.codebook.shape == data_free.codebook.shape and quantized.packed.shape == data_free.packed.shape
        )
        errors[name] = output_error(layer, quantized.dequantize(), bias, x)
    assert errors["error feedback"] < 0.8 * baseline, (baseline, errors)
    assert errors["full"] < errors["error feedback"], errors


def test_weighted_codebooks_help_on_uncorrelated_inputs_of_unequal_energy() -> None:
    layer = nn.Linear(128, 32)
    x = torch.randn(8192, 128) * torch.logspace(-1, 1, 128)
    stats = statistics_of(layer, x)
    data_free, _ = fit(layer, None, LayerSpec(bits=2))
    weighted, _ = fit(layer, stats, LayerSpec(bits=2), error_feedback=False, bias_correction=False)
    assert output_error(layer, weighted.dequantize(), layer.bias, x) < 0.9 * output_error(
        layer, data_free.dequantize(), layer.bias, x
    )


def test_bias_correction_removes_the_mean_output_error() -> None:
    layer, x = correlated_layer(mean=2.0)
    stats = statistics_of(layer, x)
    quantized, bias = fit(layer, stats, LayerSpec(bits=2), error_feedback=False)
    shift = (x.double() @ (quantized.dequantize().double() - layer.weight.double()).T + bias.double()
             - layer.bias.double()).mean(dim=0)  # fmt: skip
    assert float(shift.detach().abs().max()) < 1e-6
    assert bias.dtype == layer.bias.dtype and not torch.equal(bias, layer.bias)


def test_no_statistics_is_the_data_free_fit() -> None:
    layer, _ = correlated_layer()
    quantized, bias = fit(layer, None, LayerSpec(bits=3))
    plain = quantize_tensor(layer.weight, bits=3)
    assert torch.equal(quantized.packed, plain.packed) and torch.equal(quantized.codebook, plain.codebook)
    assert bias is layer.bias


def test_block_diagonal_gram_still_helps() -> None:
    layer, x = correlated_layer(n=128)
    stats = statistics_of(layer, x, max_block=32)
    assert [b.shape[-1] for b in stats.gram] == [32, 32, 32, 32]
    data_free, _ = fit(layer, None, LayerSpec(bits=2))
    quantized, bias = fit(layer, stats, LayerSpec(bits=2), bias_correction=False)
    assert output_error(layer, quantized.dequantize(), bias, x) < output_error(layer, data_free.dequantize(), bias, x)


def test_rank_deficient_inputs_cannot_blow_up_the_weights() -> None:
    """A timestep embedding seen at two timesteps: H has rank 2 and, centred, rank 1. Without the weight ridge
    the error feedback moved such a layer's weights ~500x their own size (output exact on the calibration
    inputs, garbage at any other timestep)."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(32, 64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 32, generator=g) / 32**0.5)
    seen = torch.randn(2, 32, generator=g).repeat(512, 1)  # two distinct inputs
    stats = statistics_of(layer, seen)
    data_free, _ = fit(layer, None, LayerSpec(bits=3))
    plain_error = float((data_free.dequantize() - layer.weight).square().sum())
    quantized, bias = fit(layer, stats, LayerSpec(bits=3))
    weight_error = float((quantized.dequantize() - layer.weight).square().sum())
    assert weight_error < 20 * plain_error, (weight_error, plain_error)
    unseen = torch.randn(256, 32, generator=g)  # other timesteps
    data_free_unseen = output_error(layer, data_free.dequantize(), layer.bias, unseen)
    assert output_error(layer, quantized.dequantize(), bias, unseen) < 20 * data_free_unseen
    assert output_error(layer, quantized.dequantize(), bias, seen) <= output_error(
        layer, data_free.dequantize(), layer.bias, seen
    )
    with pytest.raises(ValueError, match="weight_ridge=-1"):
        CalibrationConfig(weight_ridge=-1)


def test_grouped_conv_uses_each_groups_statistics() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    x = torch.randn(16, 8, 6, 6)
    x[:, :4] *= 5.0  # the two input groups differ in scale
    collector = StatisticsCollector({"conv": conv}, {"conv": [36]}, 10**9)
    with collector.attached():
        collector.start_batch()
        conv(x)
    stats = collector.batch()["conv"]
    assert stats.groups == 2 and stats.gram[0].shape == (2, 36, 36)
    from diffusers_otq.layers import OTQConv2d

    planned = PlannedLayer("conv", conv, OTQConv2d, LayerSpec(bits=2))
    result = quantize_calibrated(conv.weight, planned, stats, CalibrationConfig(progress=False))
    data_free = quantize_tensor(conv.weight, bits=2)

    def error(weight: torch.Tensor, bias: torch.Tensor) -> float:
        out = nn.functional.conv2d(x, weight, bias, padding=1, groups=2)
        return float((out - conv(x)).detach().square().mean())

    assert error(result.quantized.dequantize(), result.bias) < error(data_free.dequantize(), conv.bias)


def test_statistics_of_another_model_are_refused() -> None:
    layer, x = correlated_layer(n=96)
    other, y = correlated_layer(n=64)
    stats = statistics_of(other, y)
    with pytest.raises(ValueError, match="statistics describe inputs of width 64"):
        fit(layer, stats, LayerSpec(bits=3))


def _conv_statistics(conv: nn.Conv2d, x: torch.Tensor, blocks: list[int]) -> LayerStatistics:
    collector = StatisticsCollector({"conv": conv}, {"conv": blocks}, 10**9)
    with collector.attached():
        collector.start_batch()
        conv(x)
    return collector.batch()["conv"]


def test_rotated_statistics_are_the_statistics_of_rotated_inputs() -> None:
    from diffusers_otq.structure import InputRotation

    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(6, 16, 5, 5) * torch.linspace(0.2, 2.0, 16)[:, None, None] + 0.3
    rotation = InputRotation.create(16, 8, seed=1)
    rotated_conv = nn.Conv2d(16, 8, 3, padding=1)
    stats = _conv_statistics(conv, x, [144]).rotated(rotation.signs(torch.float64), 8, 9)
    direct = _conv_statistics(rotated_conv, rotation.rotate(x.double(), dim=1).float(), [144])
    assert torch.allclose(stats.gram[0], direct.gram[0], rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.sum_x, direct.sum_x, rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.second_moments(), direct.second_moments(), rtol=1e-4, atol=1e-4)
    split = _conv_statistics(conv, x, [72, 72])  # 72 = 8 channels x 9 taps: whole Hadamard blocks
    assert torch.allclose(split.rotated(rotation.signs(torch.float64), 8, 9).gram[1][0], stats.gram[0][0, 72:, 72:])
    from diffusers_otq.calibration import CalibrationError

    with pytest.raises(CalibrationError, match=r"Gram blocks \[48, 48, 48\] cut through"):
        _conv_statistics(conv, x, [48, 48, 48]).rotated(rotation.signs(torch.float64), 8, 9, "conv")


def _layer_of(layer: nn.Linear, result) -> OTQLinear:
    quantized = OTQLinear.from_quantized(result.quantized, layer, result.lowrank, result.rotation)
    if result.bias is not None:
        with torch.no_grad():
            quantized.bias.copy_(result.bias)
    return quantized


@pytest.mark.parametrize("structure", [{"rank": 6}, {"rotation_block": 32}, {"rank": 6, "rotation_block": 32}])
def test_structured_calibrated_fit_keeps_the_output_optimal_and_the_bias_exact(structure: dict) -> None:
    layer, x = correlated_layer(mean=1.0)
    with torch.no_grad():
        layer.weight += 0.5 * torch.randn(48, 3) @ torch.randn(3, 96) / 96**0.5  # a low-rank part
    stats = statistics_of(layer, x)
    spec = LayerSpec(bits=2, **structure)
    planned = PlannedLayer("layer", layer, OTQLinear, spec)
    calibrated = _layer_of(layer, quantize_calibrated(layer.weight, planned, stats, CalibrationConfig(progress=False)))
    data_free = _layer_of(layer, fit_data_free(layer.weight, spec, "layer"))
    plain, plain_bias = fit(layer, stats, LayerSpec(bits=2))
    errors = {
        "structured": output_error(layer, calibrated.dequantize_weight(), calibrated.bias, x),
        "structured, data-free": output_error(layer, data_free.dequantize_weight(), layer.bias, x),
        "calibrated, plain": output_error(layer, plain.dequantize(), plain_bias, x),
    }
    assert errors["structured"] < errors["structured, data-free"], errors
    if "rank" in structure:
        assert errors["structured"] < 0.8 * errors["calibrated, plain"], errors
    with torch.no_grad():
        shift = (calibrated(x) - layer(x)).double().mean(dim=0)
    assert float(shift.abs().max()) < 1e-4  # bias correction saw U V + Q, through the rotation


@pytest.mark.parametrize("spec", [LayerSpec(bits=3), LayerSpec(bits=2, granularity="group", group_size=32),
                                  LayerSpec(bits=2, vector_dim=2)], ids=["channel", "group", "2-D channel"])  # fmt: skip
def test_every_row_ends_at_most_at_its_stage_one_output_error(spec: LayerSpec) -> None:
    """Rows are kept one by one: no row's output error (the fit's objective) exceeds its stage-1 error."""
    layer, x = correlated_layer(n=96, out=64)
    stats = statistics_of(layer, x)
    ridged = [ridge_gram(block, CalibrationConfig().weight_ridge) for block in stats.gram_blocks(0)]

    def row_errors(quantized) -> torch.Tensor:  # noqa: ANN001
        return output_error_rows(layer.weight.detach().double() - quantized.dequantize(torch.float64), ridged)

    stage_one, _ = fit(layer, stats, spec, error_feedback=False, bias_correction=False)
    calibrated, _ = fit(layer, stats, spec, bias_correction=False)
    before, after = row_errors(stage_one), row_errors(calibrated)
    assert torch.all(after <= before * (1 + 1e-5)), (after / before).max()
    assert float(after.sum()) < 0.8 * float(before.sum())


@pytest.mark.parametrize("spec", [LayerSpec(bits=3), LayerSpec(bits=2, vector_dim=2)], ids=["scalar", "2-D"])
def test_the_calibrated_fit_is_the_same_bits_for_one_and_two_threads(
    monkeypatch: pytest.MonkeyPatch, spec: LayerSpec
) -> None:
    monkeypatch.setattr(error_feedback, "_TASK_ROWS", 24)  # four row chunks
    layer, x = correlated_layer(n=256, out=96, mean=0.5)  # a 256-wide Gram: LAPACK would use both threads
    stats = statistics_of(layer, x)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            quantized, bias = fit(layer, stats, spec)
            results.append((quantized.packed, quantized.codebook, bias))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("spec", [LayerSpec(bits=2), LayerSpec(bits=3), LayerSpec(bits=4, granularity="group",
                         group_size=32, codebook_scope="channel")], ids=["2-bit", "3-bit", "4-bit group"])  # fmt: skip
def test_a_fit_that_refits_its_codebooks_starts_from_a_coarse_codebook(
    spec: LayerSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Error feedback with codebook refits replaces stage 1's per-row codebooks: stage 1 fits coarse ones
    ("start" effort), and the result is as good as from the full stage-1 fit (within 2%); without refits, or with
    one codebook per tensor, the full fit."""
    from diffusers_otq.calibration import fit as fit_module

    layer, x = correlated_layer(n=256, out=64, mean=0.5)
    stats = statistics_of(layer, x)
    efforts: list[str] = []
    original = fit_module.quantize_tensor
    monkeypatch.setattr(
        fit_module, "quantize_tensor", lambda *a, **k: efforts.append(k["effort"]) or original(*a, **k)
    )
    coarse, bias = fit(layer, stats, spec)
    fit(layer, stats, spec, error_feedback=False)
    fit(layer, stats, LayerSpec(bits=3, granularity="tensor"))
    assert efforts == ["start", "full", "full"]
    monkeypatch.setattr(fit_module, "_starts_coarse", lambda *a: False)
    full, full_bias = fit(layer, stats, spec)
    assert efforts[-1] == "full"
    coarse_error = output_error(layer, coarse.dequantize(), bias, x)
    full_error = output_error(layer, full.dequantize(), full_bias, x)
    assert coarse_error < 1.02 * full_error, (coarse_error, full_error)
