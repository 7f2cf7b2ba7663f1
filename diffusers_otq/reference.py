"""The bundled reference flow-matching pipelines, loadable by short name after a plain ``pip install``.

They live in the repository's ``pipelines/`` folder, which is shipped inside the package as
``diffusers_otq/reference_pipelines`` (see pyproject.toml). Each is a complete diffusers pipeline folder
(``model_index.json``, ``transformer/``, ``scheduler/``) with fp16 weights, a ``README.md`` model card and a
``reference.json`` (dataset, classes, training and measured quality). ``classifiers/<dataset>/`` holds the
classifier that scores class accuracy of samples (safetensors + JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


__all__ = ["PREFIX", "reference_classifier", "reference_info", "reference_models", "resolve_reference"]

PREFIX = "otq/"
_REPO_ROOT_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def _root() -> Path:
    """Installed package data (``diffusers_otq/reference_pipelines``), or ``pipelines/`` in a source checkout."""
    packaged = Path(__file__).resolve().parent / "reference_pipelines"
    return packaged if packaged.is_dir() else _REPO_ROOT_PIPELINES


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


def reference_classifier(source: str | os.PathLike) -> torch.nn.Module | None:
    """The classifier of the pipeline's dataset (``classifiers/<dataset>/`` next to it), in eval mode, or None."""
    from .classifier import load_classifier

    info = reference_info(source)
    if info is None:
        return None
    folder = Path(resolve_reference(source)).parent / "classifiers" / info["dataset"]
    return load_classifier(folder).eval() if folder.is_dir() else None
