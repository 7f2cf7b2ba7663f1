"""quantize_model / dequantize_model on real diffusers models built from small configs."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from diffusers_otq import OTQConfig, OTQConv2d, OTQLinear, dequantize_model, quantize_model
from diffusers_otq.convert import matches_module_name
from diffusers_otq.layers import OTQLayerMixin
from diffusers_otq.testing.tiny_models import tiny_unet


def _float_layers(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, OTQLayerMixin)
    ]


def test_quantize_model_replaces_every_linear_and_conv() -> None:
    model = tiny_unet()
    expected = _float_layers(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        reference = model(x, t).sample
    names = [r.name for r in quantize_model(model, bits=8, progress=False)]
    assert names == expected
    assert not _float_layers(model)
    assert any(isinstance(m, OTQLinear) for m in model.modules()) and any(
        isinstance(m, OTQConv2d) for m in model.modules()
    )
    with torch.no_grad():
        out = model(x, t).sample
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.999


def test_modules_to_not_convert_matches_name_components() -> None:
    model = tiny_unet()
    reports = quantize_model(model, bits=4, modules_to_not_convert=["conv_in", "time_embedding"], progress=False)
    names = [r.name for r in reports]
    assert "conv_in" not in names and not any(n.startswith("time_embedding") for n in names)
    assert type(model.conv_in) is nn.Conv2d
    assert type(model.time_embedding.linear_1) is nn.Linear
    assert isinstance(model.conv_out, OTQConv2d)


@pytest.mark.parametrize(
    "name,patterns,expected",
    [
        ("proj_out", ["proj_out"], True),
        ("blocks.0.proj_out", ["proj_out"], True),
        ("blocks.0.proj_out_2", ["proj_out"], False),
        ("blocks.0.attn.to_q", ["blocks.0"], True),
        ("blocks.10.attn.to_q", ["blocks.1"], False),
        ("down.1.attn.to_k", ["*.to_k"], True),
        ("anything", [], False),
    ],
)
def test_matches_module_name(name: str, patterns: list[str], expected: bool) -> None:
    assert matches_module_name(name, patterns) is expected


def test_summary_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="diffusers_otq.convert"):
        reports = quantize_model(tiny_unet(), bits=3, progress=False)
    text = caplog.text
    assert "bits/weight" in text and "mean W2" in text and "layers" in text
    assert len(reports) == 51 and all(r.relative_mse >= 0 and r.w2 >= 0 and r.bits_per_weight >= 3 for r in reports)
    assert sum(r.relative_mse for r in reports) > 0


def test_nan_weight_names_the_layer() -> None:
    model = tiny_unet()
    with torch.no_grad():
        model.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'conv_out'"):
        quantize_model(model, bits=4, progress=False)


def test_shared_module_is_quantized_once() -> None:
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    names = [r.name for r in quantize_model(model, bits=4, progress=False)]
    assert names == ["0", "2"]
    assert model[0] is model[2]


def test_no_target_layers_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="diffusers_otq.convert"):
        assert quantize_model(nn.Sequential(nn.ReLU()), bits=4, progress=False) == []
    assert "Found no nn.Linear/nn.Conv2d" in caplog.text


def test_group_granularity_falls_back_per_layer(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_unet()
    with caplog.at_level(logging.WARNING, logger="diffusers_otq.convert"):
        quantize_model(model, bits=4, granularity="group", group_size=8, progress=False)
    assert model.conv_in.granularity == "channel"  # 1 input channel x 3 x 3 = 9 values per row
    assert model.conv_out.granularity == "group" and model.conv_out.group_size == 8
    assert "conv_in" in caplog.text and "per-channel" in caplog.text


def test_dequantize_model_restores_plain_layers() -> None:
    model = tiny_unet()
    quantize_model(model, bits=4, granularity="group", group_size=8, progress=False)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    with torch.no_grad():
        quantized_out = model(x, t).sample
    names = dequantize_model(model)
    assert names and not any(isinstance(m, (OTQLinear, OTQConv2d)) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x, t).sample, quantized_out, atol=1e-5)


def test_quantized_model_state_dict_reloads_exactly() -> None:
    model = tiny_unet()
    quantize_model(model, bits=3, progress=False)
    other = tiny_unet()
    quantize_model(other, bits=3, method="uniform", progress=False)
    other.load_state_dict(model.state_dict())
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(other(x, t).sample, model(x, t).sample)


def test_bad_options_fail_before_touching_the_model() -> None:
    model = tiny_unet()
    with pytest.raises(ValueError, match="bits=12"):
        quantize_model(model, bits=12, progress=False)
    assert _float_layers(model) == _float_layers(tiny_unet())


def test_a_bare_layer_is_refused_with_the_way_to_quantize_it() -> None:
    for layer, hint in ((nn.Linear(16, 16), "OTQLinear.from_module"), (nn.Conv2d(2, 4, 3), "OTQConv2d.from_module")):
        with pytest.raises(TypeError, match=rf"bare {type(layer).__name__}.*{hint}"):
            quantize_model(layer, bits=3)


def test_a_hundred_thousand_patterns_are_indexed_not_scanned() -> None:
    from diffusers_otq.convert import ModulePatterns

    names = [f"blocks.{i}.attn.to_q" for i in range(50)] + ["proj_out", "blocks.7.ff.net.2"]
    patterns = [f"nomatch_{i}" for i in range(100_000)] + ["blocks.7", "proj_out", "*.to_q"]
    compiled = ModulePatterns(patterns)
    assert len(compiled.plain) == 100_002 and compiled.globs == ["*.to_q"]
    for name in names:  # the index answers exactly as the rule does on the short list of the matching patterns
        assert compiled.matches(name) == matches_module_name(name, ["blocks.7", "proj_out", "*.to_q"])
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(3)))
    quantize_model(model, OTQConfig(bits=2, modules_to_not_convert=[f"x{i}" for i in range(100_000)] + ["1"]),
                   progress=False)  # fmt: skip
    assert [type(m).__name__ for m in model] == ["OTQLinear", "Linear", "OTQLinear"]


def test_an_override_pattern_that_matches_nothing_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    config = OTQConfig(bits=2, module_overrides={"attn_typo": {"bits": 4}, "1": {"bits": 3}})
    with caplog.at_level(logging.WARNING, logger="diffusers_otq.config"):
        quantize_model(model, config, progress=False)
    warned = [r.getMessage() for r in caplog.records if "module_overrides" in r.getMessage()]
    assert len(warned) == 1 and "'attn_typo'" in warned[0] and "'1'" not in warned[0]
    assert model[1].bits == 3


def test_layers_whose_width_a_vector_does_not_divide_fall_back_to_scalar_codebooks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with caplog.at_level(logging.WARNING, logger="diffusers_otq.convert"):
        quantize_model(model, OTQConfig(bits=2, vector_dim=4, granularity="tensor"), progress=False)
    assert (model[0].vector_dim, model[2].vector_dim) == (1, 4)
    assert "vector_dim does not divide and use scalar codebooks: 0" in caplog.text
    assert model[2].codebook.shape == (1, 8, 4)  # 32 weights: eight 4-D vectors, as many codewords (lossless)
