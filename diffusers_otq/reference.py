"""The bundled reference flow-matching pipelines, loadable by short name after a plain ``pip install``.

They live in ``diffusers_otq/reference_pipelines/``, package data (see pyproject.toml). Each is a complete diffusers pipeline folder
(``model_index.json``, ``transformer/``, ``scheduler/``) with fp16 weights, a ``README.md`` model card and a
``reference.json`` (dataset, classes, training and measured quality). ``classifiers/<dataset>/`` holds the
classifier that scores class accuracy of samples (safetensors + JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


__all__ = ["INFO_NAME", "PREFIX", "reference_info", "reference_models", "resolve_reference"]

PREFIX = "otq/"


def _root() -> Path:
    """The bundled pipelines: package data, ``diffusers_otq/reference_pipelines/``."""
    return Path(__file__).resolve().parent / "reference_pipelines"


def reference_models() -> list[str]:
    """Short names of the bundled pipelines, e.g. ``["otq/digits-unet", "otq/fashion-mnist-unet", ...]``."""
    root = _root()
    if not root.is_dir():
        return []
    return sorted(PREFIX + p.name for p in root.iterdir() if (p / "model_index.json").is_file())


def resolve_reference(name: str | os.PathLike) -> str | os.PathLike:
    """The local folder of a bundled short name (``"otq/<name>"``); any other value is returned unchanged.

    Raises:
        ValueError: ``name`` starts with ``otq/`` but names no bundled pipeline (the message lists them).
    """
    if not isinstance(name, str) or not name.startswith(PREFIX) or os.path.exists(name):
        return name
    available = reference_models()
    folder = _root() / name[len(PREFIX) :]
    if name not in available:  # only the listed names: "otq/../.." must not reach outside the bundled folder
        raise ValueError(
            f"{name!r} is not a bundled reference pipeline; available: {available or 'none (not installed)'}. "
            "Pass one of these, or a local pipeline folder."
        )
    return str(folder)


INFO_NAME = "reference.json"
"""Per bundled pipeline: ``{"dataset": ..., "classes": [...], "training": {...}, "metrics": {...}}``."""


def reference_info(source: str | os.PathLike) -> dict | None:
    """The ``reference.json`` of a bundled pipeline (by short name or folder), or None for other pipelines."""
    path = Path(resolve_reference(source)) / INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def __getattr__(name: str) -> object:
    """``reference_classifier`` moved to :mod:`diffusers_otq.evaluation.classifier` (it scores samples, which is
    evaluation); the old name keeps working with a ``DeprecationWarning``."""
    if name == "reference_classifier":
        import warnings

        from .evaluation.classifier import reference_classifier

        warnings.warn(
            "diffusers_otq.reference.reference_classifier moved to diffusers_otq.evaluation.classifier; "
            "import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        return reference_classifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
