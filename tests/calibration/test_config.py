"""CalibrationConfig validation: every bad value is refused with a message that names it."""

from __future__ import annotations

import pytest

from diffusers_otq import CalibrationConfig, CalibrationError


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "empty calibration set"),
        ({"prompts": []}, "empty calibration set"),
        ({"prompts": "a cat"}, "list of strings"),
        ({"class_labels": []}, "non-empty list of ints"),
        ({"class_labels": [0.5]}, "non-empty list of ints"),
        ({"prompts": ["a"], "class_labels": [0]}, "not both"),
        ({"forward_fn": print}, "num_batches"),
        ({"forward_fn": 3, "num_batches": 2}, "not callable"),
        ({"num_batches": 2}, "only applies with forward_fn"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"gram": "dense"}, "gram='dense' is unknown"),
        ({"gram": "diagonal"}, "needs the Gram matrix"),
        ({"damping": 0}, "damping must be > 0"),
        ({"sensitivity": "hessian"}, "sensitivity='hessian'"),
        ({"unseen_layers": "skip"}, "unseen_layers='skip'"),
        ({"act_order": 1}, "act_order=1 must be True or False"),
        ({"refine_float_params": "yes"}, "refine_float_params='yes' must be True or False"),
        ({"guidance_scale": float("nan")}, "guidance_scale=nan"),
        ({"timestep_weighting": 2.0}, "callable"),
    ],
)
def test_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        CalibrationConfig(**kwargs)


def test_calibration_error_is_a_value_error_and_describe_is_json_safe() -> None:
    import json

    assert issubclass(CalibrationError, ValueError)
    record = CalibrationConfig(prompts=["a photo of a cat"], gram="diagonal", error_feedback=False).describe()
    assert json.loads(json.dumps(record)) == record
    assert record["source"] == "prompts" and record["num_prompts"] == 1 and record["refit_rounds"] == 0
