"""OTQConfig: validation, JSON round trips, per-module decisions."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from diffusers_otq import FORMAT_VERSION, LayerSpec, OTQConfig
from diffusers_otq.config import OTQMethod


def test_defaults_and_quant_method() -> None:
    config = OTQConfig()
    assert config.quant_method is OTQMethod.OTQ and config.quant_method.value == "otq" and config.quant_method == "otq"
    assert config.base_spec() == LayerSpec(bits=4, method="ot-vp", granularity="channel")
    assert config.format_version == FORMAT_VERSION


def test_to_dict_is_json_and_round_trips() -> None:
    config = OTQConfig(
        bits=3,
        method="ot-equal-mass",
        granularity="group",
        group_size=32,
        modules_to_not_convert=["proj_out"],
        codebook_dtype=torch.bfloat16,
        codebook_scope="channel",
        module_overrides={"attn*": {"bits": 4, "codebook_dtype": "fp32"}, "ff*": {"codebook_dtype": torch.int8}},
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["quant_method"] == "otq" and data["codebook_dtype"] == "bfloat16"
    assert data["module_overrides"] == [["attn*", {"bits": 4, "codebook_dtype": "float32"}],
                                        ["ff*", {"codebook_dtype": "int8"}]]  # fmt: skip
    assert OTQConfig(**data) == config
    assert OTQConfig.from_dict(data) == config
    assert json.loads(config.to_json_string()) == config.to_diff_dict()
    assert json.loads(config.to_json_string(use_diff=False)) == config.to_dict()


def test_diff_dict_keeps_only_changes() -> None:
    assert OTQConfig(bits=3).to_diff_dict() == {"quant_method": "otq", "format_version": FORMAT_VERSION, "bits": 3}


def test_repr_is_diffusers_form_and_as_code_rebuilds_it() -> None:
    config = OTQConfig(bits=2, modules_to_not_convert=["x"])
    name, _, body = repr(config).partition(" ")
    assert name == "OTQConfig" and json.loads(body) == config.to_diff_dict()
    code = config.as_code()
    assert code == "OTQConfig(bits=2, method='ot-vp', granularity='channel', modules_to_not_convert=['x'])"
    assert eval(code, {"OTQConfig": OTQConfig}) == config  # the constructor call it claims to be


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 9}, r"bits=9 is out of range"),
        ({"bits": "3"}, r"bits='3'"),
        ({"method": "kmeans"}, r"method='kmeans' is unknown.*'ot'"),
        ({"granularity": "row"}, r"granularity='row' is unknown"),
        ({"granularity": "group"}, r"needs group_size"),
        ({"group_size": 64}, r"group_size=64 only applies"),
        ({"codebook_dtype": "uint8"}, r"codebook_dtype='uint8' is not supported.*float16.*int8"),
        ({"codebook_scope": "row"}, r"codebook_scope='row'"),
        ({"modules_to_not_convert": "proj_out"}, r"must be a list"),
        ({"module_overrides": {"attn*": {"bitz": 4}}}, r"unknown option\(s\) \['bitz'\]"),
        ({"module_overrides": ["attn"]}, r"must map module-name patterns"),
        ({"format_version": FORMAT_VERSION + 1}, rf"format_version={FORMAT_VERSION + 1}.*upgrade"),
        ({"format_version": 0}, r"format_version=0 is invalid"),
        ({"quant_method": "bitsandbytes"}, r"quant_method='otq'"),
        ({"blocksize": 64}, r"unknown option\(s\) \['blocksize'\].*upgrade"),
    ],
)
def test_bad_values_name_the_value_and_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        OTQConfig(**kwargs)


def test_layer_spec_skips_and_overrides() -> None:
    config = OTQConfig(
        bits=3,
        modules_to_not_convert=["proj_out"],
        module_overrides={"*.attn.*": {"bits": 4}, "blocks.0": {"method": "uniform"}, "*": {"bits": 2}},
    )
    linear = nn.Linear(8, 8)
    assert config.layer_spec("blocks.1.proj_out", linear) is None
    assert config.layer_spec("blocks.0.attn.to_q", linear).bits == 4  # first match wins
    assert config.layer_spec("blocks.0.ff", linear) == LayerSpec(bits=3, method="uniform")
    assert config.layer_spec("conv_in", linear).bits == 2
    assert config.layer_spec("conv_in", linear, skip=("conv_in",)) is None


def test_override_order_survives_a_sorted_json_round_trip() -> None:
    """config.json is written with sort_keys=True; the first-match order must come back unchanged."""
    import json

    config = OTQConfig(module_overrides={"to_q": {"bits": 4}, "*": {"bits": 2}})
    text = json.dumps(config.to_dict(), sort_keys=True)
    again = OTQConfig.from_dict(json.loads(text))
    assert again == config and list(again.module_overrides) == ["to_q", "*"]
    assert again.layer_spec("blocks.0.attn.to_q", nn.Linear(8, 8)).bits == 4
    assert OTQConfig(module_overrides={"a": {"bits": 5}}) == OTQConfig(module_overrides=[["a", {"bits": 5}]])
    with pytest.raises(ValueError, match="must map module-name patterns"):
        OTQConfig(module_overrides=[["a", {"bits": 5}], ["a", {"bits": 4}]])


def test_bad_overrides_are_refused_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match=r"module_overrides\['attn'\].*needs group_size"):
        OTQConfig(module_overrides={"attn": {"granularity": "group"}})
    with pytest.raises(ValueError, match=r"module_overrides\['nomatch'\].*bits=99 is out of range"):
        OTQConfig(module_overrides={"nomatch": {"bits": 99}})  # even a pattern no layer will ever match


def test_modules_to_not_convert_takes_any_iterable_of_names_once() -> None:
    assert OTQConfig(modules_to_not_convert=(p for p in ["proj_out", "x"])).modules_to_not_convert == ["proj_out", "x"]
    for bad in (42, "proj_out", [1]):
        with pytest.raises(
            ValueError, match=re.escape(f"modules_to_not_convert={bad!r} must be a list of module-name patterns")
        ):
            OTQConfig(modules_to_not_convert=bad)


def test_for_pipeline_wraps_the_config() -> None:
    config = OTQConfig(bits=3)
    wrapped = config.for_pipeline(["transformer", "text_encoder"])
    assert wrapped.quant_mapping == {"transformer": config, "text_encoder": config}
