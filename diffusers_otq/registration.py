"""Register the "otq" backend with diffusers and transformers (run once by ``import diffusers_otq``).

diffusers has no registration API: its two ``AUTO_*`` mappings are plain module-level dicts that every lookup
reads at call time, so adding our keys in place is visible everywhere (sdnq and fouroversix do the same).
transformers' public ``register_quantization_config`` and ``register_quantizer`` are used for the config and
:class:`~diffusers_otq.transformers_quantizer.OTQTransformersQuantizer`, which lets
``PipelineQuantizationConfig(quant_backend="otq", ...)`` validate and quantize text encoders. Both registrations are idempotent and never
replace another package's "otq" entry.

``DiffusionPipeline.from_pretrained`` rejects a bare model config with a terse "must be an instance of
PipelineQuantizationConfig"; registration wraps it so that an :class:`OTQConfig` gets an error that shows how to
wrap it (``config.for_pipeline([...])``). Every other call passes through unchanged.

A checkpoint saved with OTQ can only be loaded after ``import diffusers_otq``; without it diffusers fails with
"Unknown quantization type, got otq". Loading through :class:`~diffusers_otq.FlowMatchPipeline` or the
``diffusers-otq`` CLI imports it for you.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from .config import OTQConfig
from .quantizer import OTQQuantizer


__all__ = ["QUANT_METHOD", "register"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "otq"


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
    from diffusers.quantizers import auto as diffusers_auto

    _guard_pipeline_from_pretrained()

    _claim(diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, OTQConfig, "diffusers AUTO_QUANTIZATION_CONFIG_MAPPING")
    _claim(diffusers_auto.AUTO_QUANTIZER_MAPPING, OTQQuantizer, "diffusers AUTO_QUANTIZER_MAPPING")
    try:
        from transformers.quantizers import auto as transformers_auto
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        transformers_auto.register_quantization_config(QUANT_METHOD)(OTQConfig)
    else:
        _claim(transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, OTQConfig, "transformers quantization configs")
    from .transformers_quantizer import OTQTransformersQuantizer

    if transformers_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        transformers_auto.register_quantizer(QUANT_METHOD)(OTQTransformersQuantizer)
    else:
        _claim(transformers_auto.AUTO_QUANTIZER_MAPPING, OTQTransformersQuantizer, "transformers quantizers")


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

    wrapper._otq_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _guard_pipeline_from_pretrained() -> None:
    from diffusers import DiffusionPipeline

    current = DiffusionPipeline.__dict__["from_pretrained"]
    if not getattr(current.__func__, "_otq_wrapped", False):
        DiffusionPipeline.from_pretrained = classmethod(_explain_bare_config(current.__func__))
