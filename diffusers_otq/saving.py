"""Byte-identical checkpoints: what ``save_pretrained`` of an OTQ model does after diffusers has written it.

Two things made the same model quantized twice give different files: safetensors writes the header's
``__metadata__`` in hash-map order (:func:`~diffusers_otq.checkpoint.sort_header_metadata` sorts it), and
diffusers writes ``_name_or_path`` (the folder the float model was loaded from) into config.json. Registration
wraps ``ModelMixin.save_pretrained`` to call :func:`make_deterministic` on the folder of a model with OTQ layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import FORMAT_VERSION_KEY, read_safetensors_header, sort_header_metadata


__all__ = ["make_deterministic"]

_MACHINE_SPECIFIC_CONFIG_KEYS = ("_name_or_path",)


def make_deterministic(folder: str | os.PathLike) -> None:
    """Sort the metadata of every OTQ safetensors file in ``folder`` and drop machine-specific config.json keys."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        if FORMAT_VERSION_KEY in read_safetensors_header(path).metadata:
            sort_header_metadata(path)
    config_path = folder / "config.json"
    if config_path.is_file():
        text = config_path.read_text()
        config = json.loads(text)
        if any(key in config for key in _MACHINE_SPECIFIC_CONFIG_KEYS):
            for key in _MACHINE_SPECIFIC_CONFIG_KEYS:
                config.pop(key, None)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
