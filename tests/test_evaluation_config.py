"""The evaluation config: YAML parsing, validation messages and expansion into units."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_otq.evaluation.config import expand_units, load_config
from diffusers_otq.evaluation.store import row_key
from diffusers_otq.evaluation.variants import Variant


REPO = Path(__file__).resolve().parent.parent


def _config(**block) -> dict:
    return {"models": ["m"], "blocks": [{"name": "b", **block}]}


def test_shipped_configs_parse():
    for path in sorted((REPO / "scripts" / "configs").glob("evaluate-*.yaml")):
        config = load_config(path)
        assert config.models and expand_units(config), path


def test_units_merge_tasks_of_overlapping_blocks():
    config = load_config(
        {
            "models": ["a", "b"],
            "blocks": [
                {"name": "grid", "methods": ["ot"], "bits": [2, 3], "metrics": ["weights", "probe"], "seeds": [5]},
                {
                    "name": "head",
                    "methods": ["ot"],
                    "bits": [3],
                    "metrics": ["samples"],
                    "seeds": [0, 1],
                    "peers": ["hqq-3"],
                    "reference": True,
                },
            ],
        }
    )
    units = expand_units(config)
    by_key = {(u.model, u.variant): u.tasks for u in units}
    ot3 = Variant("ot", "channel", 3, "deploy", 64)
    # weights/probe ignore the seed (always 0); samples keep the block's seeds
    assert by_key[("a", ot3)] == (("weights", 0), ("probe", 0), ("samples", 0), ("samples", 1))
    assert by_key[("a", Variant("ot", "channel", 2, "deploy", 64))] == (("weights", 0), ("probe", 0))
    assert by_key[("b", None)] == (("samples", 0), ("samples", 1))
    assert by_key[("a", Variant("hqq-3", "native", 3, "deploy"))] == (("samples", 0), ("samples", 1))
    assert len(units) == 2 * 4  # per model: ot2, ot3, hqq-3, fp
    assert [u.model for u in units] == ["a"] * 4 + ["b"] * 4


def test_unit_pending_skips_the_finished_row_keys():
    config = load_config(_config(methods=["ot"], bits=[3], metrics=["weights", "samples"], seeds=[0, 1]))
    (unit,) = expand_units(config)
    assert unit.pending(set()) == list(unit.tasks)
    finished = row_key({**unit.row_fields(), "metric_set": "samples", "seed": 1})
    other_seed = row_key({**unit.row_fields(), "metric_set": "samples", "seed": 7})
    assert unit.pending({finished, other_seed}) == [("weights", 0), ("samples", 0)]


@pytest.mark.parametrize(
    "block, message",
    [
        ({"methods": ["ot"], "bits": [9]}, "bits"),
        ({"methods": ["kmeans"], "bits": [3]}, "kmeans"),
        ({"methods": ["ot"], "bits": [3], "metrics": ["lpips"]}, "lpips"),
        ({"methods": ["ot"], "bits": [3], "peers": ["gguf-q4"]}, "gguf-q4"),
        ({"methods": ["ot"]}, "no bits"),
        ({"methods": ["ot"], "bits": [3], "colour": "red"}, "colour"),
        ({"methods": ["ot"], "bits": ["3"]}, "int"),
    ],
)
def test_bad_blocks_name_the_value(block, message):
    with pytest.raises(ValueError, match=message):
        load_config(_config(**block))


def test_bad_top_level_keys_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        load_config({"models": ["m"], "blocks": [{"name": "b"}], "model": "x"})
    with pytest.raises(ValueError, match="models"):
        load_config({"models": [], "blocks": [{"name": "b"}]})
    with pytest.raises(FileNotFoundError, match="scripts/configs"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


def test_peer_variants_must_be_native_deploy():
    with pytest.raises(ValueError, match="native"):
        Variant("bnb-nf4", "channel", 4)
    with pytest.raises(ValueError, match="4-bit"):
        Variant("bnb-nf4", "native", 3)
    with pytest.raises(ValueError, match="scope"):
        Variant("ot", "channel", 3, "everything")
