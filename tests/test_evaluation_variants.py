"""Quantized variants for the evaluation grid: deploy scope, paper scope and peer formats on a real UNet."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_otq.evaluation.variants import Variant, family_of, quantize_variant
from diffusers_otq.layers import OTQLayerMixin
from tests.tiny_models import tiny_unet, unet_inputs


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
    assert [family_of(m) for m in ("ot", "uniform", "bnb-nf4", "fp")] == ["otq", "paper", "peer", "reference"]
    with pytest.raises(ValueError, match="kmeans"):
        family_of("kmeans")


def test_a_variant_that_fails_to_build_gives_error_rows_not_a_crash(tmp_path, monkeypatch):
    from diffusers_otq.evaluation import runner
    from diffusers_otq.evaluation.config import Unit, load_config

    def broken(model, variant):
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
