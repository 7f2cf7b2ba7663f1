"""The evaluation config: YAML parsing, validation messages and expansion into units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_otq import CalibrationConfig
from diffusers_otq.evaluation.config import Calibration, expand_units, load_config
from diffusers_otq.evaluation.store import row_key
from diffusers_otq.evaluation.variants import Variant


REPO = Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------------------------ calibrated and mixed


def test_budgets_give_mixed_variants_whose_bits_is_the_budget():
    config = load_config(
        _config(methods=["ot-vp", "ot-vp+cal"], bits=[3], budgets=[2, 2.5], metrics=["weights"], seeds=[0])
    )
    variants = [u.variant for u in expand_units(config)]
    assert variants == [
        Variant("ot-vp", "channel", 3),
        Variant("ot-vp+cal", "channel", 3),
        Variant("ot-vp", "mixed", 2.0),
        Variant("ot-vp", "mixed", 2.5),
        Variant("ot-vp+cal", "mixed", 2.0),
        Variant("ot-vp+cal", "mixed", 2.5),
    ]
    budget = next(u for u in expand_units(config) if u.variant == Variant("ot-vp+cal", "mixed", 2))
    assert budget.calibrated and isinstance(budget.row_fields()["bits"], float)
    # a budget of 2 reads 2.0 in the key, so it never collides with the 2-bit code width
    assert (
        row_key({**budget.row_fields(), "metric_set": "weights", "seed": 0})
        == "m|ot-vp+cal|mixed|2.0|deploy|weights|0"
    )
    assert config.calibration == Calibration()  # defaults: 64 samples, batches of 32, seed 1234


def test_calibration_section_sets_the_statistics_config():
    config = load_config(
        {
            **_config(methods=["ot-vp+aw"], bits=[3]),
            "sampling": {"steps": 6, "guidance_scale": 1.5},
            "calibration": {"num_samples": 8, "batch_size": 4, "seed": 77, "refine_steps": 12, "refine_eval_every": 6},
        }
    )
    calibration = config.calibration_config()
    assert (calibration.num_samples, calibration.batch_size, calibration.seed) == (8, 4, 77)
    assert (calibration.num_inference_steps, calibration.guidance_scale, calibration.progress) == (6, 1.5, False)
    assert (calibration.refine_steps, calibration.refine_eval_every) == (12, 6)
    unset = load_config(_config(methods=["ot-vp+aw"], bits=[3])).calibration_config()
    defaults = CalibrationConfig()
    assert (unset.refine_steps, unset.refine_eval_every) == (0, defaults.refine_eval_every)  # 0: REFINE_STEPS


@pytest.mark.parametrize(
    "block, message",
    [
        ({"methods": ["ot-vp+cal"], "bits": [3], "scopes": ["paper"]}, r"calibrated method\(s\) \['ot-vp\+cal'\]"),
        ({"methods": ["ot-vp"], "budgets": [2.5], "scopes": ["deploy", "paper"]}, "budgets run in the deploy"),
        ({"methods": ["uniform"], "budgets": [2.5]}, r"got \['uniform'\]"),
        ({"methods": ["ot-vp"], "budgets": ["2.5"]}, "budgets"),
        ({"methods": ["ot-vp"], "budgets": [0]}, r"\(0, 32\]"),
        ({"methods": ["ot-vp"], "budgets": [True]}, "budgets"),
        ({"budgets": [2.5]}, "no methods"),
        ({"methods": ["ot-vp+cal"], "granularities": ["mixed"], "bits": [3]}, "budgets: "),
        ({"methods": ["ot-vp+xyz"], "bits": [3]}, "ot-vp\\+xyz"),
        ({"methods": ["ot-vp+cal"]}, "no bits or budgets"),
    ],
)
def test_bad_calibrated_and_budget_blocks_name_the_value(block, message):
    with pytest.raises(ValueError, match=message):
        load_config(_config(**block))


@pytest.mark.parametrize(
    "calibration, message",
    [
        ({"seed": 1}, "calibration.seed=1 is also an evaluation seed"),
        ({"num_samples": 0}, r"calibration.num_samples=0 must be an int >= 1"),
        ({"batch_size": 2.5}, "calibration.batch_size"),
        ({"refine_steps": -1}, r"calibration.refine_steps=-1 must be an int >= 0"),
        ({"refine_eval_every": 0}, r"calibration.refine_eval_every=0 must be an int >= 1"),
        ({"steps": 4}, "unknown key"),
        ([64], "mapping"),
    ],
)
def test_bad_calibration_sections_name_the_value(calibration, message):
    data = {**_config(methods=["ot-vp+ef"], bits=[3], seeds=[0, 1]), "calibration": calibration}
    with pytest.raises(ValueError, match=message):
        load_config(data)


def test_a_calibration_seed_may_equal_an_evaluation_seed_without_calibrated_methods():
    load_config({**_config(methods=["ot-vp"], bits=[3], seeds=[1]), "calibration": {"seed": 1}})


def test_the_full_config_keeps_every_finished_row_key_and_unit_order():
    """The calibration blocks come last and add no task to an older unit: the 1196 finished rows are not rerun."""
    import yaml

    data = yaml.safe_load((REPO / "scripts" / "configs" / "evaluate-full.yaml").read_text())
    new = {"calibrated", "fid-calibrated", "budgets", "fid-budgets", "calibration-ablation", "refined-budgets",
           "calibrated-2.25", "fid-refined-budgets"}  # fmt: skip
    old_data = {**data, "blocks": [b for b in data["blocks"] if b["name"] not in new]}
    old_data.pop("calibration")
    old_units = expand_units(load_config(old_data))
    units = expand_units(load_config(data))
    assert [u for u in units if u.variant is None or not (u.calibrated or u.variant.mixed)] == old_units
    keys = {row_key({**u.row_fields(), "metric_set": m, "seed": s}) for u in old_units for m, s in u.tasks}
    # an old row key still maps to the same unit fields
    unet = "otq/fashion-mnist-unet"
    assert f"{unet}|ot-vp|group|3|deploy|samples|1" in keys and f"{unet}|fp|none|32|deploy|samples|2" in keys
    results = REPO / "results" / "evaluation" / "results.jsonl"
    if results.is_file():
        finished = {json.loads(line)["key"] for line in results.read_text().splitlines() if line.strip()}
        every = {row_key({**u.row_fields(), "metric_set": m, "seed": s}) for u in units for m, s in u.tasks}
        assert finished <= every, sorted(finished - every)[:5]  # every finished row still belongs to the grid
        assert all(not u.pending(finished) for u in old_units if u.model == unet)
