"""Old import paths of modules that moved: :func:`alias` makes an old module re-export the new one, with a
``DeprecationWarning``. Nothing in the package imports the aliases; they only keep existing code working."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def alias(old: str, new: str, namespace: dict[str, Any]) -> None:
    """Fill ``namespace`` (the old module's globals) with the public names of module ``new`` and warn once.

    Args:
        old: the old module's dotted name (``__name__`` of the alias module).
        new: where it moved, e.g. ``"diffusers_otq.evaluation.fid"``.
        namespace: ``globals()`` of the alias module.
    """
    module = importlib.import_module(new)
    namespace["__all__"] = list(module.__all__)
    namespace.update({name: getattr(module, name) for name in module.__all__})
    warnings.warn(f"{old} moved to {new}; import it from there.", DeprecationWarning, stacklevel=3)
