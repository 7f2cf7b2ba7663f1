"""diffusers_otq.evaluation.scale_models: the random SD3-style model, the Euler recorder, the held-out error, variants."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_otq.evaluation import scale_models as sm


TINY = sm.SamplerSettings(steps=2, batch_size=1, text_tokens=4)


@pytest.fixture
def one_thread():
    """64-wide layers gain nothing from a second torch thread; on a busy machine it only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return sm.build_sd3_style_model(sm.sd3_style_config(64, 1, sample_size=8))


def test_config_sizes_like_sd3():
    config = sm.sd3_style_config(1536, 24)
    assert config["num_attention_heads"] * config["attention_head_dim"] == 1536  # SD3-medium
    assert (config["joint_attention_dim"], config["pooled_projection_dim"]) == (4096, 2048)
    assert config["caption_projection_dim"] == 1536
    small = sm.sd3_style_config(64, 1)
    assert (small["joint_attention_dim"], small["pooled_projection_dim"]) == (256, 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        sm.sd3_style_config(100, 2)
    with pytest.raises(ValueError, match="at least 1"):
        sm.sd3_style_config(64, 0)


def test_build_is_seeded(tiny_model):
    config = sm.sd3_style_config(64, 1, sample_size=8)
    again = sm.build_sd3_style_model(config)
    assert sm.weights_fingerprint(again) == sm.weights_fingerprint(tiny_model)
    assert sm.weights_fingerprint(sm.build_sd3_style_model(config, seed=1)) != sm.weights_fingerprint(tiny_model)
    assert sm.quantizable_weights(tiny_model) < sum(p.numel() for p in tiny_model.parameters())


def test_euler_records_every_call_and_forward_fn_uses_calibration_seeds(tiny_model):
    calls: list = []
    final = sm.euler_trajectory(tiny_model, TINY, seed=5, record=calls)
    assert len(calls) == TINY.steps and final.shape == calls[0]["hidden_states"].shape
    assert [float(c["timestep"][0]) for c in calls] == [1000.0, 500.0]
    # x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v_k
    torch.testing.assert_close(calls[1]["hidden_states"], calls[0]["hidden_states"] - 0.5 * calls[0]["velocity"])
    seen: list = []
    handle = tiny_model.register_forward_hook(lambda m, a, kw, out: seen.append(kw["hidden_states"]), with_kwargs=True)
    try:
        sm.calibration_forward_fn(tiny_model, TINY)(3)
    finally:
        handle.remove()
    expected = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(sm.CALIBRATION_SEED + 3))
    torch.testing.assert_close(seen[0], expected)


def test_heldout_roundtrip_and_error(tiny_model, tmp_path):
    heldout = sm.HeldOutCalls.record(tiny_model, TINY, trajectories=2)
    assert len(heldout.calls) == 4
    heldout.check_velocity()
    stats = heldout.velocity_stats()
    assert 1e-2 < stats["rms"] < 1e2 and stats["variation"] > 1e-3
    heldout.save(tmp_path / "calls.pt")
    loaded = sm.HeldOutCalls.load(tmp_path / "calls.pt")
    assert loaded.fingerprint == sm.weights_fingerprint(tiny_model)
    assert loaded.velocity_error(tiny_model) == 0.0
    noisy = sm.build_sd3_style_model(sm.sd3_style_config(64, 1, sample_size=8), seed=1)
    assert 0.1 < loaded.velocity_error(noisy) < math.inf


def test_check_velocity_refuses_trivial_models():
    call = {"velocity": torch.zeros(1, 4)}
    with pytest.raises(RuntimeError, match="RMS"):
        sm.HeldOutCalls([call, call]).check_velocity()
    with pytest.raises(RuntimeError, match="NaN"):
        sm.HeldOutCalls([{"velocity": torch.full((1, 4), math.nan)}]).check_velocity()
    constant = {"velocity": torch.ones(1, 4)}
    with pytest.raises(RuntimeError, match="barely changes"):
        sm.HeldOutCalls([constant, constant]).check_velocity()


def test_variants_and_api_choice(tiny_model):
    assert list(sm.SCALE_VARIANTS) == ["data-free", "calibrated-3bit", "budget-2.5", "budget-2.5+refine50"]
    assert sm.SCALE_VARIANTS["budget-2.5"].otq_config().bits_per_weight == 2.5
    refine = sm.SCALE_VARIANTS["budget-2.5+refine50"].calibration_config(lambda b: None, 3)
    assert (refine.refine_steps, refine.refine_scope, refine.num_batches) == (50, "blocks", 3)
    assert sm.resolve_api("two-step") == "two-step"
    with pytest.raises(ValueError, match="unknown"):
        sm.resolve_api("three-step")
    with pytest.raises(sm.VariantUnavailable, match="one-call"):
        sm.quantize_scale_variant(
            tiny_model, sm.SCALE_VARIANTS["budget-2.5+refine50"], lambda b: None, 1, api="two-step"
        )


def test_one_call_guard_matches_the_probe(one_thread):
    """--api one-call on a library that ignores forward_fn must fail loudly, never quantize data-free silently."""
    model = sm.build_sd3_style_model(sm.sd3_style_config(64, 1, sample_size=8))
    forward_fn = sm.calibration_forward_fn(model, TINY)
    variant = sm.SCALE_VARIANTS["calibrated-3bit"]
    if sm.one_call_api_available():
        timings = sm.quantize_scale_variant(model, variant, forward_fn, 1, api="one-call")
        assert timings["calibrate_s"] > 0
    else:
        with pytest.raises(RuntimeError, match="two-step"):
            sm.quantize_scale_variant(model, variant, forward_fn, 1, api="one-call")


def test_two_step_path_calibrates(one_thread):
    """The old path (calibrate, then quantize_model(statistics=...)) the benchmark keeps as its baseline."""
    model = sm.build_sd3_style_model(sm.sd3_style_config(64, 1, sample_size=8))
    forward_fn = sm.calibration_forward_fn(model, TINY)
    timings = sm.quantize_scale_variant(model, sm.SCALE_VARIANTS["calibrated-3bit"], forward_fn, 1, api="two-step")
    assert timings["forward_calls"] == 1 and 0 < timings["calibrate_s"] <= timings["calibrate_call_s"]
    assert "calibration" in model.hf_quantizer.quantization_config.provenance
