"""GGUF peers through llama.cpp's own quantizer (built by scripts/install_gguf.sh; skipped where it is not built)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusers_otq.evaluation.gguf import GGUF_FORMATS, gguf_available, gguf_quantize
from diffusers_otq.evaluation.variants import Variant, family_of, quantize_variant


needs_ggml = pytest.mark.skipif(
    not gguf_available(), reason="llama.cpp's quantizer is not built (scripts/install_gguf.sh)"
)


def test_gguf_variants_are_calibrated_peers_at_their_nominal_bits() -> None:
    assert {family_of(name) for name in GGUF_FORMATS} == {"calibrated-peer"}
    assert Variant("gguf-iq2_xs", "native", 2).calibrated
    with pytest.raises(ValueError, match="bits=3"):
        Variant("gguf-q3_k", "native", 2)


@needs_ggml
@pytest.mark.parametrize(("name", "bits"), [("gguf-q2_k", 2.625), ("gguf-q3_k", 3.4375), ("gguf-iq2_xs", 2.3125),
                                            ("gguf-iq3_xxs", 3.0625)])  # fmt: skip
def test_rows_of_256_use_the_format_and_count_every_byte(name: str, bits: float) -> None:
    weight = torch.randn(32, 512, generator=torch.Generator().manual_seed(0))
    decoded, nbytes, stored = gguf_quantize(weight, name, importance=torch.ones(512))
    assert stored == name.removeprefix("gguf-").replace("_k", "_K") and nbytes * 8 / weight.numel() == bits
    error = float((decoded - weight).square().mean())
    assert 0 < error < (0.12 if "2" in name else 0.05)


@needs_ggml
def test_the_importance_matrix_moves_the_error_to_unimportant_inputs() -> None:
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    importance = torch.ones(256)
    importance[::2] = 100.0  # within every 16-value sub-block (each has its own scale): relative weights matter
    plain, _, _ = gguf_quantize(weight, "gguf-iq2_xs", importance=torch.ones(256))
    weighted, _, _ = gguf_quantize(weight, "gguf-iq2_xs", importance=importance)

    def important_error(decoded: torch.Tensor) -> float:
        return float((decoded - weight)[:, ::2].square().mean())

    assert important_error(weighted) < 0.8 * important_error(plain)


@needs_ggml
def test_rows_the_block_does_not_divide_take_llama_cpps_fallback() -> None:
    weight = torch.randn(8, 128)  # not a multiple of 256
    assert gguf_quantize(weight, "gguf-q2_k")[2] == "q4_0" and gguf_quantize(weight, "gguf-iq2_xs")[2] == "iq4_nl"
    with pytest.raises(ValueError, match="needs an importance matrix"):
        gguf_quantize(torch.randn(8, 256), "gguf-iq2_xs")
    odd = torch.randn(8, 36)  # not a multiple of 32 either: float16
    decoded, nbytes, stored = gguf_quantize(odd, "gguf-q3_k")
    assert stored == "f16" and nbytes == odd.numel() * 2 and torch.equal(decoded, odd.half().float())


@needs_ggml
def test_a_gguf_variant_quantizes_every_layer_with_its_statistics() -> None:
    from diffusers_otq import OTQConfig, calibrate
    from diffusers_otq.layers import OTQLayerMixin

    from ..calibration.helpers import quick, unet_pipeline

    pipe = unet_pipeline()
    statistics = calibrate(pipe, OTQConfig(bits=4), quick())
    model = copy.deepcopy(pipe.transformer)
    metrics = quantize_variant(model, Variant("gguf-q3_k", "native", 3), statistics=statistics)
    layers = {row["name"]: row for row in metrics["layers"]}
    assert set(layers) == set(statistics) and not any(isinstance(m, OTQLayerMixin) for m in model.modules())
    assert 3 < metrics["bits_per_weight"] <= 16 and all(0 <= row["rel_mse"] < 0.2 for row in layers.values())
    with pytest.raises(ValueError, match="statistics"):
        quantize_variant(copy.deepcopy(pipe.transformer), Variant("gguf-q3_k", "native", 3))


@needs_ggml
def test_the_runner_gives_a_gguf_unit_its_statistics(tmp_path) -> None:  # noqa: ANN001 - pytest's tmp_path
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_otq import FlowMatchPipeline
    from diffusers_otq.evaluation.config import Unit, load_config
    from diffusers_otq.evaluation.runner import Evaluator
    from diffusers_otq.testing.tiny_models import tiny_unet

    config = load_config({"models": ["tiny"], "blocks": [{"name": "b", "peers": ["gguf-q2_k"], "metrics": ["weights"]}],
                          "calibration": {"num_samples": 4, "batch_size": 4}, "sampling": {"steps": 2, "batch_size": 4}})  # fmt: skip
    evaluator = Evaluator(config, tmp_path, tmp_path)
    pipe = FlowMatchPipeline(tiny_unet(num_class_embeds=11), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    evaluator._pipes["tiny"] = pipe
    (row,) = evaluator.run_unit(Unit("tiny", Variant("gguf-q2_k", "native", 2), (("weights", 0),)), skip=set())
    assert row["status"] == "ok" and row["family"] == "calibrated-peer", row.get("error")
    assert row["metrics"]["bits_per_weight"] > 2 and row["metrics"]["calibrate_s"] > 0
