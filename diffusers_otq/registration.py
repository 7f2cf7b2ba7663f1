"""Register the "otq" backend with diffusers and transformers (run once by ``import diffusers_otq``).

diffusers has no registration API: its two ``AUTO_*`` mappings are plain module-level dicts that every lookup
reads at call time, so adding our keys in place is visible everywhere (sdnq and fouroversix do the same).
transformers' public ``register_quantization_config`` and ``register_quantizer`` are used for the config and
:class:`~diffusers_otq.transformers_quantizer.OTQTransformersQuantizer`, which lets
``PipelineQuantizationConfig(quant_backend="otq", ...)`` validate and quantize text encoders. Both registrations are idempotent and never
replace another package's "otq" entry.

``ModelMixin.from_pretrained`` and transformers' ``PreTrainedModel.from_pretrained`` are wrapped too: when loading a
folder fails before the quantizer's checks run (a damaged single file or shard index, a config.json the library
cannot build a model from), the files are examined and a damaged or mis-described OTQ checkpoint gets a
:class:`~diffusers_otq.checkpoint.CheckpointError` with the cause (:mod:`diffusers_otq.load_errors`), chained to the
library's error; every other failure passes through unchanged. ``ModelMixin.save_pretrained`` of a model with OTQ
layers tells its quantizer which model is being saved (its config's checksums go into the headers) and makes the
saved files byte-identical for identical models (:mod:`diffusers_otq.saving`).

``DiffusionPipeline.from_pretrained`` rejects a bare model config with a terse "must be an instance of
PipelineQuantizationConfig"; registration wraps it so that an :class:`OTQConfig` gets an error that shows how to
wrap it (``config.for_pipeline([...])``). Every other call passes through unchanged.

A checkpoint saved with OTQ can only be loaded after ``import diffusers_otq``; without it diffusers fails with
"Unknown quantization type, got otq". Loading through :class:`~diffusers_otq.FlowMatchPipeline` or the
``diffusers-otq`` CLI imports it for you.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from .checkpoint import CheckpointError
from .config import OTQConfig, OTQMethod
from .layers import OTQLayerMixin
from .load_errors import explain_load_failure
from .quantizer import OTQQuantizer
from .saving import make_deterministic


__all__ = ["QUANT_METHOD", "register"]

logger = logging.getLogger(__name__)

QUANT_METHOD = OTQMethod.OTQ.value


def _claim(mapping: dict, cls: type, where: str) -> bool:
    """Put ``cls`` under "otq" unless another class holds it; True if ``cls`` is registered afterwards."""
    current = mapping.get(QUANT_METHOD)
    if current is None:
        mapping[QUANT_METHOD] = cls
        return True
    if current is cls or getattr(current, "__qualname__", None) == cls.__qualname__:
        mapping[QUANT_METHOD] = cls  # same class (or a reloaded copy of this module)
        return True
    logger.warning("%s already maps %r to %r; diffusers-otq leaves it in place.", where, QUANT_METHOD, current)
    return False


def register() -> None:
    """Register :class:`OTQConfig`/:class:`OTQQuantizer` under "otq" with diffusers and transformers."""
    from diffusers import DiffusionPipeline, ModelMixin
    from diffusers.quantizers import auto as diffusers_auto

    _wrap_once(DiffusionPipeline, "from_pretrained", _explain_bare_config)
    _wrap_once(ModelMixin, "from_pretrained", _explain_load_failures)
    _wrap_once(ModelMixin, "save_pretrained", _save_deterministically)

    _claim(diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, OTQConfig, "diffusers AUTO_QUANTIZATION_CONFIG_MAPPING")
    _claim(diffusers_auto.AUTO_QUANTIZER_MAPPING, OTQQuantizer, "diffusers AUTO_QUANTIZER_MAPPING")
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers import auto as transformers_auto
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    _wrap_once(PreTrainedModel, "from_pretrained", _explain_load_failures)
    if transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        transformers_auto.register_quantization_config(QUANT_METHOD)(OTQConfig)
    else:
        _claim(transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, OTQConfig, "transformers quantization configs")
    from .transformers_quantizer import OTQTransformersQuantizer

    if transformers_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        transformers_auto.register_quantizer(QUANT_METHOD)(OTQTransformersQuantizer)
    else:
        _claim(transformers_auto.AUTO_QUANTIZER_MAPPING, OTQTransformersQuantizer, "transformers quantizers")


def _wrap_once(owner: type, name: str, wrap: Callable[[Any], Any]) -> None:
    """Replace the method ``owner.name`` by ``wrap(method)`` (a classmethod stays one), once per process."""
    current = owner.__dict__[name]
    function = current.__func__ if isinstance(current, classmethod) else current
    if getattr(function, "_otq_wrapped", False):
        return
    wrapped = wrap(function)
    wrapped._otq_wrapped = True
    setattr(owner, name, classmethod(wrapped) if isinstance(current, classmethod) else wrapped)


def _explain_bare_config(from_pretrained: Any) -> Any:
    """Wrap ``DiffusionPipeline.from_pretrained`` so a bare OTQConfig fails with the fix spelled out."""

    @functools.wraps(from_pretrained)
    def wrapper(cls: type, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("quantization_config")
        if isinstance(config, OTQConfig):
            raise ValueError(
                f"{cls.__name__}.from_pretrained got quantization_config={config.as_code()}, a per-model config; pipelines "
                "need a PipelineQuantizationConfig that says which components to quantize. Wrap it: "
                f"quantization_config=PipelineQuantizationConfig(quant_mapping={{'transformer': {config.as_code()}}}), "
                "or config.for_pipeline(['transformer'])."
            )
        return from_pretrained(cls, *args, **kwargs)

    return wrapper


def _explain_load_failures(from_pretrained: Any) -> Any:
    """Wrap ``ModelMixin.from_pretrained`` or ``PreTrainedModel.from_pretrained``: a failure gets the cause the
    checkpoint's files show (:func:`~diffusers_otq.load_errors.explain_load_failure`), chained to the library's
    error."""

    @functools.wraps(from_pretrained)
    def wrapper(cls: type, pretrained_model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)
        except CheckpointError:
            raise
        except Exception as error:
            explained = explain_load_failure(pretrained_model_name_or_path, kwargs.get("subfolder"), error)
            if explained is None:
                raise
            raise explained from error

    return wrapper


def _save_deterministically(save_pretrained: Any) -> Any:
    """Wrap ``ModelMixin.save_pretrained``: an OTQ quantizer learns which model it saves
    (:meth:`~diffusers_otq.quantizer.OTQQuantizer.saving`), and a model with OTQ layers is saved as byte-identical
    files (:func:`~diffusers_otq.saving.make_deterministic`)."""

    @functools.wraps(save_pretrained)
    def wrapper(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        quantizer = getattr(self, "hf_quantizer", None)
        saving = quantizer.saving(self) if isinstance(quantizer, OTQQuantizer) else contextlib.nullcontext()
        with saving:
            result = save_pretrained(self, save_directory, *args, **kwargs)
        if any(isinstance(module, OTQLayerMixin) for module in self.modules()) and os.path.isdir(save_directory):
            make_deterministic(save_directory)
        return result

    return wrapper
