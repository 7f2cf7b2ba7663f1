"""Post-hoc quantization of an already loaded model: :func:`quantize_model`.

On a diffusers ``ModelMixin`` the result is indistinguishable from ``from_pretrained(...,
quantization_config=config)`` (same layers, same codes, same config entry and quantizer), so it saves with
``save_pretrained`` and reloads with ``from_pretrained`` like any OTQ checkpoint.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from .config import OTQConfig
from .convert import LayerQuantizer, LayerReport, PlannedLayer, convert_model, plan_layers


__all__ = ["attach_quantizer", "quantize_model"]


def quantize_model(
    model: nn.Module,
    config: OTQConfig | None = None,
    *,
    progress: bool = True,
    compute_metrics: bool = True,
    quantizer: LayerQuantizer | None = None,
    **config_kwargs: Any,
) -> list[LayerReport]:
    """Quantize ``model`` in place: every ``nn.Linear``/``nn.Conv2d`` that ``config`` selects becomes an OTQ layer.

    Args:
        model: any ``nn.Module``; a diffusers ``ModelMixin`` also gets its ``quantization_config`` and quantizer,
            so ``save_pretrained`` writes a loadable OTQ checkpoint. Its ``_keep_in_fp32_modules`` stay float.
        config: the :class:`OTQConfig`; or leave it out and pass its fields as keywords
            (``quantize_model(model, bits=3, modules_to_not_convert=["proj_out"])``).
        progress: show a tqdm bar over the layers.
        compute_metrics: measure relative MSE and W2 per layer (one sort per layer) for the reports and log.
        quantizer: fits each layer (``(layer, weight) -> QuantizedTensor | LayerFit``, see
            :data:`~diffusers_otq.convert.LayerQuantizer`); default: data-free :func:`~diffusers_otq.quantize_tensor`.
            Calibration (:mod:`diffusers_otq.calibration`) passes its own.

    Returns:
        One :class:`~diffusers_otq.convert.LayerReport` per quantized module (name, parameters, bits/weight,
        relative MSE, W2), in ``named_modules()`` order.

    Raises:
        TypeError: ``config`` is not an OTQConfig, or both ``config`` and keywords were given.
        ValueError: invalid options; the model is already quantized; ``config.bits_per_weight`` is set (the
            bits budget needs the allocator: use :func:`diffusers_otq.quantize_model`, which resolves it).
    """
    if config is None:
        config = OTQConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError(f"Pass either an OTQConfig or its fields as keywords, not both (got {sorted(config_kwargs)}).")
    elif not isinstance(config, OTQConfig):
        raise TypeError(
            f"config must be an OTQConfig, got {type(config).__name__} ({config!r}); e.g. OTQConfig(bits=3)."
        )
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already quantized ({getattr(model, 'quantization_method', 'unknown')}); "
            "quantize the original float model instead (or call model.dequantize() first)."
        )
    config.check_resolved()
    if isinstance(model, nn.Linear | nn.Conv2d):
        raise TypeError(
            f"quantize_model got a bare {type(model).__name__}; it quantizes the layers inside a model. For one "
            f"layer use OTQ{type(model).__name__}.from_module(layer, bits=...), or wrap "
            "it: quantize_model(torch.nn.Sequential(layer), ...)."
        )
    skip = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    plan = plan_layers(model, partial(config.layer_spec, skip=skip))
    config.warn_unmatched_overrides(
        [name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    )
    if _is_diffusers_model(model):
        return _quantize_diffusers_model(model, config, plan, progress, compute_metrics, quantizer)
    return convert_model(model, plan, progress=progress, compute_metrics=compute_metrics, quantizer=quantizer)


def _is_diffusers_model(model: nn.Module) -> bool:
    from diffusers import ModelMixin

    return isinstance(model, ModelMixin)


def _quantize_diffusers_model(
    model: nn.Module,
    config: OTQConfig,
    plan: list[PlannedLayer],
    progress: bool,
    compute_metrics: bool,
    quantizer: LayerQuantizer | None,
) -> list[LayerReport]:
    """Convert, then attach what ``from_pretrained`` would (:func:`attach_quantizer`)."""
    original_dtype = model.dtype
    reports = convert_model(model, plan, progress=progress, compute_metrics=compute_metrics, quantizer=quantizer)
    attach_quantizer(model, config, plan, original_dtype)
    return reports


def attach_quantizer(
    model: nn.Module, config: OTQConfig, plan: list[PlannedLayer], original_dtype: torch.dtype | None = None
) -> None:
    """Give a converted diffusers model what ``from_pretrained(..., quantization_config=config)`` gives it: the
    quantizer (with ``plan``, the planned layers and their specs), the flags, the config entry and a model card,
    so ``save_pretrained`` writes a checkpoint that reloads with plain ``from_pretrained``. Other modules are left
    as they are.

    Args:
        model: a model whose planned layers are OTQ layers already.
        config: the resolved config (no ``bits_per_weight``: a budget's plan is in ``module_overrides``).
        plan: the converted layers, in ``named_modules()`` order.
        original_dtype: the float model's dtype (recorded as ``_pre_quantization_dtype``); default ``model.dtype``.
    """
    if not _is_diffusers_model(model):
        return
    from .hub import attach_model_card
    from .quantizer import OTQQuantizer, adapt_quantized_model

    hf_quantizer = OTQQuantizer(config, pre_quantized=True)  # "pre-quantized" from now on: reloads skip fitting
    hf_quantizer.plan = {layer.name: layer for layer in plan}
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = hf_quantizer
    model.register_to_config(quantization_config=config, _pre_quantization_dtype=original_dtype or model.dtype)
    attach_model_card(model)
    adapt_quantized_model(model)
