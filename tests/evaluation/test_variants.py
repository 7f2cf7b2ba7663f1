"""Quantized variants for the evaluation grid: deploy scope, paper scope, peer formats, calibrated and
mixed-precision variants on a real (tiny) UNet."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_otq import CalibrationConfig
from diffusers_otq.evaluation.rows import ABLATION_METHODS
from diffusers_otq.evaluation.variants import CALIBRATED, CALIBRATED_PEERS, Variant, family_of, quantize_variant
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import tiny_unet, unet_inputs


def _float_weights(model):
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}


def test_deploy_scope_is_what_otqconfig_does():
    model = tiny_unet()
    layers = _float_weights(model)
    metrics = quantize_variant(model, Variant("ot", "channel", 3))
    assert metrics["quantized_layers"] == len(layers) and metrics["skipped_layers"] == 0
    assert all(isinstance(model.get_submodule(n), OTQLayerMixin) for n in layers)
    stored = sum(model.get_submodule(n).nbytes for n in layers) * 8
    assert metrics["bits_per_weight"] == pytest.approx(stored / sum(layers.values()))
    assert 3 < metrics["bits_per_weight"] < 4.5
    assert [row["name"] for row in metrics["layers"]] == list(layers)
    assert 0 < metrics["rel_mse_mean"] < 0.1


def test_paper_scope_fake_quantizes_every_float_tensor():
    model = tiny_unet()
    original = copy.deepcopy(model.state_dict())
    metrics = quantize_variant(model, Variant("ot-equal-mass", "channel", 2, "paper"))
    float_names = [n for n, t in original.items() if t.is_floating_point()]
    assert [row["name"] for row in metrics["layers"]] == float_names  # biases and norms too
    changed = [n for n in float_names if not torch.equal(original[n], model.state_dict()[n])]
    assert "conv_in.bias" in changed and "time_embedding.linear_1.bias" in changed
    assert "down_blocks.0.resnets.0.norm1.weight" not in changed  # constant (all ones): reproduced exactly
    assert not any(isinstance(m, OTQLayerMixin) for m in model.modules())  # fake quantization, float modules
    # per-tensor 1-D codebooks: a 2-bit bias has at most 4 distinct values
    assert model.state_dict()["conv_in.bias"].unique().numel() <= 4


def test_lower_error_with_more_bits_and_ot_beats_equal_mass():
    model = tiny_unet()
    errors = {}
    for method in ("ot", "ot-equal-mass"):
        for bits in (2, 4):
            errors[method, bits] = quantize_variant(copy.deepcopy(model), Variant(method, "channel", bits))[
                "rel_mse_mean"
            ]
    assert errors["ot", 4] < errors["ot", 2] and errors["ot-equal-mass", 4] < errors["ot-equal-mass", 2]
    assert errors["ot", 2] < errors["ot-equal-mass", 2] and errors["ot", 4] < errors["ot-equal-mass", 4]


def test_peer_variant_replaces_weights_in_place_and_counts_skips():
    pytest.importorskip("hqq")
    model = tiny_unet()
    reference = copy.deepcopy(model)
    metrics = quantize_variant(model, Variant("hqq-3", "native", 3))
    skipped = [row for row in metrics["layers"] if row.get("skipped")]
    # conv_in and conv_out have 16 x 9 = 144 weights, not a multiple of HQQ's group of 64: kept in float and
    # counted at 16 bits
    assert [row["name"] for row in skipped] == ["conv_in", "conv_out"]
    assert torch.equal(model.conv_in.weight, reference.conv_in.weight)
    assert not torch.equal(model.time_embedding.linear_1.weight, reference.time_embedding.linear_1.weight)
    assert metrics["skipped_layers"] == 2 and metrics["quantized_layers"] == len(metrics["layers"]) - 2
    assert 3.4 < metrics["bits_per_weight"] < 4.5
    with torch.no_grad():
        out = model(**unet_inputs()).sample
    assert torch.isfinite(out).all()


def test_families():
    families = [family_of(m) for m in ("ot", "uniform", "gptq-uniform", "bnb-nf4", "fp")]
    assert families == ["otq", "paper", "calibrated-peer", "peer", "reference"]
    with pytest.raises(ValueError, match="kmeans"):
        family_of("kmeans")


def test_a_variant_that_fails_to_build_gives_error_rows_not_a_crash(tmp_path, monkeypatch):
    from diffusers_otq.evaluation import runner
    from diffusers_otq.evaluation.config import Unit, load_config

    def broken(model, variant, **kwargs):
        raise RuntimeError("library exploded")

    monkeypatch.setattr(runner, "quantize_variant", broken)
    config = load_config(
        {"models": ["otq/fashion-mnist-unet"], "blocks": [{"name": "b", "methods": ["ot"], "bits": [3]}]}
    )
    evaluator = runner.Evaluator(config, tmp_path, tmp_path)
    unit = Unit("otq/fashion-mnist-unet", Variant("ot", "channel", 3), (("weights", 0), ("probe", 0)))
    rows = evaluator.run_unit(unit, skip=set())
    assert [(r["metric_set"], r["status"]) for r in rows] == [("weights", "error"), ("probe", "error")]
    assert all("library exploded" in r["error"] for r in rows)


# ------------------------------------------------------------------------------------ calibrated and mixed


def test_calibrated_and_mixed_variants():
    cal = Variant("ot-vp+cal", "group", 3)
    assert (cal.calibrated, cal.mixed, cal.fitter, family_of(cal.method)) == (True, False, "ot-vp", "otq")
    budget = Variant("ot-vp", "mixed", 3)
    assert budget == Variant("ot-vp", "mixed", 3.0) and isinstance(budget.bits, float) and not budget.calibrated
    # the ablation order of the report is the calibrated methods' order; +cal is CalibrationConfig()'s defaults
    assert [m for m in CALIBRATED if m not in CALIBRATED_PEERS] == list(ABLATION_METHODS[1:])
    defaults = CalibrationConfig()
    assert CALIBRATED["ot-vp+cal"].calibration(CalibrationConfig(seed=9)) == CalibrationConfig(seed=9)
    assert (defaults.error_feedback, defaults.bias_correction) == (True, True)
    assert not CALIBRATED["ot-vp+aw"].error_feedback and not CALIBRATED["ot-vp+ef"].bias_correction


@pytest.mark.parametrize(
    "args, message",
    [
        (("ot-vp+cal", "channel", 3, "paper"), "scope='deploy'"),
        (("uniform", "mixed", 2.5), "granularity='mixed'"),
        (("ot-vp", "mixed", 2.5, "paper"), "deploy scope only"),
        (("ot-vp", "mixed", 40.0), r"budget in \(0, 32\]"),
        (("ot", "channel", 2.5), "int code width"),
    ],
)
def test_bad_calibrated_and_mixed_variants_name_the_value(args, message):
    with pytest.raises(ValueError, match=message):
        Variant(*args)


def test_a_calibrated_variant_needs_statistics():
    with pytest.raises(ValueError, match="statistics"):
        quantize_variant(tiny_unet(), Variant("ot-vp+aw", "channel", 3))


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    """An evaluator whose model "tiny" is a class-conditional tiny UNet pipeline (real calibration, 4 samples).

    Torch runs one thread, as the evaluation does (``threads: 1``): the allocator's many small ops slow down
    by an order of magnitude when two threads share a busy CPU.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_otq import FlowMatchPipeline
    from diffusers_otq.evaluation.config import load_config
    from diffusers_otq.evaluation.runner import Evaluator

    config = load_config(
        {
            "models": ["tiny"],
            "blocks": [{"name": "b", "methods": ["ot-vp+cal"], "bits": [3], "budgets": [3.0]}],
            "sampling": {"steps": 2, "batch_size": 4},
            "calibration": {"num_samples": 4, "batch_size": 4},
        }
    )
    out = tmp_path_factory.mktemp("calibrated")
    pipe = FlowMatchPipeline(tiny_unet(num_class_embeds=11), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator(config, out, out)
    evaluator._pipes["tiny"] = pipe
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    yield evaluator
    torch.set_num_threads(threads)


def _fresh(evaluator):
    from diffusers_otq.evaluation.runner import Evaluator

    fresh = Evaluator(evaluator.config, evaluator.output_dir, evaluator.stats_cache)
    fresh._pipes.update(evaluator._pipes)
    return fresh


def test_calibration_statistics_are_collected_once_and_cached_on_disk(tiny_evaluator, monkeypatch):
    import diffusers_otq.calibration as calibration
    from diffusers_otq.evaluation import runner

    statistics = tiny_evaluator.calibration_statistics("tiny")
    path = tiny_evaluator.output_dir / "cache" / "tiny" / "calibration.safetensors"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert tiny_evaluator.calibration_statistics("tiny") is statistics  # once per process
    assert statistics.info["seed"] == 1234 and statistics.info["num_inference_steps"] == 2
    assert len(statistics) == len(_float_weights(tiny_unet()))  # every Linear/Conv2d: one file for all variants

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached statistics should have been reused")

    monkeypatch.setattr(calibration, "calibrate", no_sampling)
    reloaded = _fresh(tiny_evaluator).calibration_statistics("tiny")
    assert reloaded.info == statistics.info
    pairs = [pair for n in statistics for pair in zip(statistics[n].tensors(), reloaded[n].tensors(), strict=True)]
    assert all(torch.equal(a, b) for a, b in pairs)  # bit-identical: rows do not depend on the cache
    # several processes: collecting alone would wait forever for the others
    monkeypatch.setattr(runner, "_world_size", lambda: 2)
    other = _fresh(tiny_evaluator)
    monkeypatch.setattr(other, "calibration_path", lambda model: path.with_name("missing.safetensors"))
    with pytest.raises(RuntimeError, match="collective=True"):
        other.calibration_statistics("tiny")


def test_calibrated_unit_records_calibration_and_quantization_seconds(tiny_evaluator):
    from diffusers_otq.evaluation.config import Unit

    unit = Unit("tiny", Variant("ot-vp+cal", "group", 3), (("weights", 0),))
    (row,) = tiny_evaluator.run_unit(unit, skip=set())
    metrics = row["metrics"]
    assert row["status"] == "ok" and row["family"] == "otq" and row["bits"] == 3
    assert metrics["calibrate_s"] == tiny_evaluator.calibration_statistics("tiny").info["seconds"]
    assert metrics["quantize_s"] > 0 and "plan" not in metrics
    assert 3 < metrics["bits_per_weight"] < 5 and 0 < metrics["rel_mse_mean"] < 1


def test_mixed_units_meet_their_budget(tiny_evaluator):
    from diffusers_otq.evaluation.config import Unit

    for variant, sensitivity in (
        (Variant("ot-vp+cal", "mixed", 3.0), "output"),
        (Variant("ot-vp", "mixed", 2.5), "weights"),
    ):
        (row,) = tiny_evaluator.run_unit(Unit("tiny", variant, (("weights", 0),)), skip=set())
        metrics, plan = row["metrics"], row["metrics"]["plan"]
        assert row["status"] == "ok" and row["bits"] == variant.bits and row["granularity"] == "mixed"
        assert variant.bits - 0.1 < metrics["bits_per_weight"] <= variant.bits + 0.01, metrics["bits_per_weight"]
        assert plan["budget"] == variant.bits and plan["reached"] == pytest.approx(
            metrics["bits_per_weight"], abs=1e-3
        )
        assert plan["sensitivity"] == sensitivity and ("calibrate_s" in metrics) == variant.calibrated
        assert sum(plan["layers"].values()) == metrics["quantized_layers"]
        assert sorted(set(layer["setting"] for layer in metrics["layers"])) == sorted(plan["layers"])


def test_refined_unit_records_the_refinement_and_never_raises_its_loss(tiny_evaluator, monkeypatch):
    from diffusers_otq.evaluation import variants
    from diffusers_otq.evaluation.config import Unit

    monkeypatch.setattr(variants, "REFINE_STEPS", 4)
    unit = Unit("tiny", Variant("ot-vp+ref", "mixed", 3.0), (("weights", 0),))
    (row,) = tiny_evaluator.run_unit(unit, skip=set())
    metrics = row["metrics"]
    assert row["status"] == "ok" and row["family"] == "otq", row.get("error")
    before, after = metrics["refine_loss"]
    assert after <= before and 0 < metrics["refine_s"] <= metrics["quantize_s"]
    assert tiny_evaluator.teacher("tiny", "ot-vp+ref") is tiny_evaluator.teacher("tiny", "ot-vp+ref")  # once


def test_the_calibration_sections_refinement_reaches_the_refined_method_only(tiny_evaluator):
    """The evaluation's ``calibration.refine_steps`` refines ``ot-vp+ref``; a data-free budget quantized with the
    same base calibration neither refines nor asks for a teacher."""
    from diffusers_otq.evaluation.variants import MIXED

    statistics = tiny_evaluator.calibration_statistics("tiny")
    base = tiny_evaluator.pipeline("tiny").transformer
    calibration = CalibrationConfig(refine_steps=3, refine_eval_every=2, progress=False)
    refined = quantize_variant(copy.deepcopy(base), Variant("ot-vp+ref", MIXED, 3.0), statistics=statistics,
                               calibration=calibration, teacher=tiny_evaluator.teacher("tiny", "ot-vp+ref"))  # fmt: skip
    assert refined["refine_steps"] == 3 and refined["refine_loss"][1] <= refined["refine_loss"][0]
    data_free = quantize_variant(copy.deepcopy(base), Variant("ot-vp", MIXED, 3.0), calibration=calibration)
    assert "refine_steps" not in data_free and data_free["bits_per_weight"] <= 3.01


def test_the_banded_method_refines_two_sets_of_codebooks_within_its_budget(tiny_evaluator):
    from diffusers_otq.evaluation.variants import MIXED

    statistics = tiny_evaluator.calibration_statistics("tiny")
    model = copy.deepcopy(tiny_evaluator.pipeline("tiny").transformer)
    calibration = CalibrationConfig(refine_steps=3, refine_eval_every=2, progress=False)  # sequential, as the base
    metrics = quantize_variant(model, Variant("ot-vp+bands", MIXED, 3.0), statistics=statistics,
                               calibration=calibration, teacher=tiny_evaluator.teacher("tiny", "ot-vp+ref"))  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    assert {m.noise_bands for m in layers} == {2} and metrics["refine_steps"] == 2 * 3  # 3 per band
    assert metrics["bits_per_weight"] <= 3.0 + 1e-9  # every band's codebooks inside the budget
    assert len(model.config["quantization_config"].noise_band_edges) == 1


def test_the_larger_teacher_method_records_its_own_trajectories(tiny_evaluator):
    """``ot-vp+ref+t128`` refines 1200 steps against 128 teacher trajectories (4 times the default's calls' rows),
    measured every 600 steps; the other refined methods share the base's teacher."""
    base = tiny_evaluator.config.calibration_config()
    fit = CALIBRATED["ot-vp+ref+t128"].calibration(base)
    assert (fit.refine_steps, fit.refine_samples, fit.refine_eval_every, fit.noise_bands) == (1200, 128, 600, 1)
    assert CALIBRATED["ot-vp+bands"].calibration(base).refine_samples == base.refine_samples == 32
    large, small = tiny_evaluator.teacher("tiny", "ot-vp+ref+t128"), tiny_evaluator.teacher("tiny", "ot-vp+bands")
    assert small is tiny_evaluator.teacher("tiny", "ot-vp+ref")
    assert len(large.outputs) == len(small.outputs) and large.outputs[0].shape[0] == 4 * small.outputs[0].shape[0]


def test_gptq_uniform_is_a_uniform_grid_with_error_feedback_counted_in_its_own_format(tiny_evaluator):
    statistics = tiny_evaluator.calibration_statistics("tiny")
    base = tiny_evaluator.pipeline("tiny").transformer
    gptq = CALIBRATED["gptq-uniform"].calibration(CalibrationConfig(seed=1))
    assert not gptq.refit_codebooks and gptq.error_feedback and not gptq.bias_correction
    model = copy.deepcopy(base)
    metrics = quantize_variant(model, Variant("gptq-uniform", "channel", 2), statistics=statistics,
                               calibration=CalibrationConfig(progress=False))  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    numel = sum(m.weight_shape.numel() for m in layers)
    native = sum(m.weight_shape.numel() * 2 + m.weight_shape[0] * 32 for m in layers)  # codes + fp16 scale, zero
    assert metrics["bits_per_weight"] == pytest.approx(native / numel)
    for layer in layers:  # every row's codebook is still its min-max grid: equal steps
        steps = layer.codebook.float().diff(dim=1)
        assert torch.allclose(steps, steps[:, :1].expand_as(steps), rtol=1e-2, atol=1e-3)
    data_free = copy.deepcopy(base)
    quantize_variant(data_free, Variant("uniform", "channel", 2))
    # the sweep lowers the output error on the calibration inputs (what GPTQ minimises) below plain rounding
    name = max((n for n, m in model.named_modules() if isinstance(m, OTQLayerMixin)),
               key=lambda n: model.get_submodule(n).weight_shape.numel())  # fmt: skip
    stats = statistics.get(name)
    weight = base.get_submodule(name).weight.detach().double().reshape(stats.groups, -1, stats.width)

    def output_error(quantized: torch.nn.Module) -> float:
        delta = weight - quantized.get_submodule(name).dequantize_weight(torch.float64).reshape(weight.shape)
        return sum(float(((delta[g] @ stats.gram_blocks(g)[0]) * delta[g]).sum()) for g in range(stats.groups))

    assert stats.has_gram and len(stats.gram_blocks(0)) == 1
    assert output_error(model) < 0.9 * output_error(data_free)
