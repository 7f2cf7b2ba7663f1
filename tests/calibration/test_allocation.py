"""Mixed precision under a bits budget: the budget is met, the plan is explicit, and bad budgets are refused."""

from __future__ import annotations

import pytest
import torch

from diffusers_otq import CalibrationConfig, OTQConfig, calibrate, plan_bits, quantize_model
from diffusers_otq.calibration import measure_candidates
from diffusers_otq.calibration.allocation import candidate_specs
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.options import LayerSpec
from tests.calibration.helpers import dit_pipeline, quick


def reached(model: torch.nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    return sum(m.nbytes for m in layers) * 8 / sum(m.weight_shape.numel() for m in layers)


@pytest.fixture(scope="module")
def calibrated():
    pipe = dit_pipeline()
    return pipe, calibrate(pipe, OTQConfig(bits=3), quick(sensitivity="velocity"))


@pytest.mark.parametrize("budget", [2.0, 3.0, 4.5])
def test_calibrated_budget_is_met_within_a_hundredth(calibrated, budget: float) -> None:
    pipe, stats = calibrated
    plan = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=budget), stats, quick(), progress=False)
    assert plan.sensitivity == "output"
    assert budget - 0.01 <= plan.bits_per_weight <= budget
    model = type(pipe.transformer).from_config(pipe.transformer.config)
    model.load_state_dict(pipe.transformer.state_dict())
    quantize_model(model, OTQConfig(bits_per_weight=budget), statistics=stats, calibration=quick(), progress=False)
    assert abs(reached(model) - plan.bits_per_weight) < 1e-9
    config = model.config.quantization_config
    assert config.bits_per_weight is None
    assert config.provenance["bits_per_weight"]["budget"] == budget
    assert "calibration" in config.provenance
    # Every allocated layer is pinned by its full name, deeper names first.
    names = list(config.module_overrides)
    assert sorted(names) == sorted(c.name for c in plan.choices)
    assert [n.count(".") for n in names] == sorted((n.count(".") for n in names), reverse=True)


def test_velocity_sensitivity_scales_each_layer(calibrated) -> None:
    pipe, stats = calibrated
    velocity = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=3.0), stats, quick(sensitivity="velocity"),
                         progress=False)  # fmt: skip
    output = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=3.0), stats, quick(), progress=False)
    assert velocity.sensitivity == "velocity" and 2.99 <= velocity.bits_per_weight <= 3.0
    ratios = {c.distortion / c.relative_error for c in velocity.choices if c.relative_error > 0}
    assert len(ratios) > 1  # a factor per layer, unlike the output sensitivity
    assert all(c.distortion == c.relative_error for c in output.choices)


def test_data_free_budget_and_user_overrides(calibrated) -> None:
    pipe, _ = calibrated
    config = OTQConfig(bits_per_weight=3.0, module_overrides={"proj_out_2": {"bits": 8}})
    plan = plan_bits(pipe.transformer, config, progress=False)
    assert plan.sensitivity == "weights"
    pinned = [c for c in plan.choices if c.fixed]
    assert [c.name for c in pinned] == ["proj_out_2"] and pinned[0].spec.bits == 8
    assert 2.99 <= plan.bits_per_weight <= 3.0
    resolved = plan.resolved_config(config)
    assert list(resolved.module_overrides)[0] == "proj_out_2"  # the user's entries stay first
    assert resolved.layer_spec("proj_out_2").bits == 8


def test_more_bits_never_predict_more_distortion(calibrated) -> None:
    pipe, stats = calibrated
    low = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=2.2), stats, quick(), progress=False)
    high = plan_bits(pipe.transformer, OTQConfig(bits_per_weight=3.5), stats, quick(), progress=False)
    assert sum(c.distortion for c in high.choices) <= sum(c.distortion for c in low.choices)


def test_budget_below_the_cheapest_plan_is_refused(calibrated) -> None:
    pipe, stats = calibrated
    with pytest.raises(ValueError, match=r"bits_per_weight=0.5 is below what this model can reach.*at least"):
        plan_bits(pipe.transformer, OTQConfig(bits_per_weight=0.5), stats, quick(), progress=False)
    with pytest.raises(ValueError, match="needs OTQConfig\\(bits_per_weight"):
        plan_bits(pipe.transformer, OTQConfig(bits=3), stats, quick(), progress=False)


def test_one_candidate_table_serves_every_budget_with_the_same_plans_and_codes(calibrated) -> None:
    pipe, stats = calibrated
    table = measure_candidates(pipe.transformer, OTQConfig(bits=3), stats, quick(), progress=False)
    for budget in (2.2, 3.5):
        assert table.allocate(budget) == plan_bits(
            pipe.transformer, OTQConfig(bits_per_weight=budget), stats, quick(), progress=False
        )
    models = []
    for candidates in (None, table):
        model = type(pipe.transformer).from_config(pipe.transformer.config)
        model.load_state_dict(pipe.transformer.state_dict())
        quantize_model(model, OTQConfig(bits_per_weight=2.5), statistics=stats, calibration=quick(),
                       candidates=candidates, progress=False)  # fmt: skip
        models.append(model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_a_candidate_table_of_another_model_or_other_statistics_is_refused(calibrated) -> None:
    pipe, stats = calibrated
    data_free = measure_candidates(pipe.transformer, OTQConfig(bits=3), progress=False)
    model = type(pipe.transformer).from_config(pipe.transformer.config)
    with pytest.raises(ValueError, match="measured without statistics, but statistics are given"):
        quantize_model(model, OTQConfig(bits_per_weight=3.0), statistics=stats, candidates=data_free, progress=False)
    other = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match="measured on another model: its layer .* is missing in Sequential"):
        quantize_model(other, OTQConfig(bits_per_weight=3.0), candidates=data_free, progress=False)


def test_candidates() -> None:
    specs = candidate_specs(LayerSpec(bits=3), 128, 64)
    labels = {(s.bits, s.granularity) for s in specs}
    assert {(b, "channel") for b in range(1, 9)} <= labels
    assert {(b, "group") for b in range(2, 9)} <= labels and (1, "group") not in labels
    assert {(2, "tensor"), (3, "tensor")} <= labels
    assert all(s.granularity != "group" for s in candidate_specs(LayerSpec(bits=3), 72, 64))


def test_bits_per_weight_is_refused_by_quantize_on_load(tmp_path) -> None:
    from diffusers import DiTTransformer2DModel

    dit_pipeline().transformer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs every weight before the first one is quantized"):
        DiTTransformer2DModel.from_pretrained(tmp_path, quantization_config=OTQConfig(bits_per_weight=2.5))
    with pytest.raises(ValueError, match="bits_per_weight=-1"):
        OTQConfig(bits_per_weight=-1)
    # The low-level converter refuses an unresolved budget too.
    from diffusers_otq.api import quantize_model as convert

    with pytest.raises(ValueError, match="needs every weight"):
        convert(dit_pipeline().transformer, OTQConfig(bits_per_weight=2.5), progress=False)
    assert CalibrationConfig().refit_rounds >= 1


def test_wide_layers_may_spend_bits_on_a_low_rank_branch_and_every_byte_counts(monkeypatch) -> None:
    """Rank candidates exist only where the 16-bit factors are cheap; a layer whose weight is mostly rank 8 then
    takes a branch, and the budget counts the factors."""
    from diffusers_otq.calibration import allocation

    assert {s.rank for s in candidate_specs(LayerSpec(), 1024, 64, rows=1024)} == {0, 16}  # rank 32: 1 b/w
    assert all(s.rank == 0 for s in candidate_specs(LayerSpec(), 512, 64, rows=512))  # rank 16 would cost 1 b/w
    # a small model with the same trade-off: rank-8 factors of a 256 x 256 layer cost 1 bit/weight
    monkeypatch.setattr(allocation, "RANK_CANDIDATES", (8,))
    monkeypatch.setattr(allocation, "MAX_RANK_BITS", 1.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(256, 8) @ torch.randn(8, 256) / 8 + 0.01 * torch.randn(256, 256))
    config = OTQConfig(bits_per_weight=3.0)
    plan = plan_bits(model, config, progress=False)
    first = next(c for c in plan.choices if c.name == "0")
    assert first.spec.rank == 8 and "+ rank 8" in plan.table(), plan.table()
    quantize_model(model, config, progress=False)
    assert model[0].rank == 8 and abs(reached(model) - plan.bits_per_weight) < 1e-9 and reached(model) <= 3.0
