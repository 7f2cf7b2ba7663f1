"""Modules that moved keep their old import paths, as aliases that warn."""

from __future__ import annotations

import importlib
import sys

import pytest


MOVED = {
    "diffusers_otq.fid": "diffusers_otq.evaluation.fid",
    "diffusers_otq.classifier": "diffusers_otq.evaluation.classifier",
    "diffusers_otq.datasets": "diffusers_otq.evaluation.datasets",
    "diffusers_otq.image_metrics": "diffusers_otq.evaluation.image_metrics",
    "diffusers_otq.fuzzing": "diffusers_otq.testing.fuzzing",
}


@pytest.mark.parametrize("old", list(MOVED))
def test_an_old_module_path_is_an_alias_that_warns(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        alias = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    assert alias.__all__ == new.__all__
    assert all(getattr(alias, name) is getattr(new, name) for name in new.__all__)


def test_reference_classifier_keeps_working_from_its_old_module() -> None:
    from diffusers_otq import reference
    from diffusers_otq.evaluation.classifier import reference_classifier

    with pytest.warns(DeprecationWarning, match="moved to diffusers_otq.evaluation.classifier"):
        assert reference.reference_classifier is reference_classifier
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        reference.nope  # noqa: B018
