"""Model conversion: one flat walk over ``named_modules()`` that swaps Linear/Conv2d for OTQ layers."""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .functional.metrics import relative_mse, wasserstein2
from .layers import OTQConv2d, OTQLayerMixin, OTQLinear
from .options import (
    check_bits,
    check_codebook_dtype,
    check_codebook_scope,
    check_granularity,
    check_group_size,
    check_method,
)


__all__ = ["quantize_model", "dequantize_model", "matches_module_name", "LayerReport"]

logger = logging.getLogger(__name__)

_LAYER_TYPES: dict[type[nn.Module], type[OTQLayerMixin]] = {nn.Linear: OTQLinear, nn.Conv2d: OTQConv2d}


@dataclass(frozen=True)
class LayerReport:
    """Per-layer outcome of :func:`quantize_model`."""

    name: str
    parameters: int
    bits_per_weight: float
    relative_mse: float
    w2: float


def matches_module_name(name: str, patterns: Iterable[str]) -> bool:
    """True if a pattern names ``name`` or a run of its dot-separated components.

    ``"proj_out"`` matches ``"proj_out"`` and ``"blocks.0.proj_out"`` but not ``"proj_out_2"``;
    ``"blocks.0"`` matches everything below ``blocks.0``; patterns with ``*``/``?`` are fnmatch globs on the
    full name.
    """
    parts = name.split(".")
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
            continue
        wanted = pattern.split(".")
        width = len(wanted)
        if any(parts[i : i + width] == wanted for i in range(len(parts) - width + 1)):
            return True
    return False


def _target_class(module: nn.Module) -> type[OTQLayerMixin] | None:
    if isinstance(module, OTQLayerMixin):
        return None
    for base, target in _LAYER_TYPES.items():
        if isinstance(module, base):
            return target
    return None


def _input_dim(module: nn.Module) -> int:
    """Values per output channel of the weight (``in_features``, or ``in/groups * kh * kw`` for a conv)."""
    return module.weight[0].numel()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    method: str = "ot",
    granularity: str = "channel",
    group_size: int | None = None,
    modules_to_not_convert: Iterable[str] | None = None,
    *,
    codebook_dtype: torch.dtype | None = None,
    codebook_scope: str = "tensor",
    progress: bool = True,
    compute_metrics: bool = True,
) -> list[str]:
    """Replace every ``nn.Linear``/``nn.Conv2d`` of ``model`` in place by an :class:`OTQLinear`/:class:`OTQConv2d`.

    Args:
        model: any ``nn.Module``; its Linear/Conv2d weights must hold real values (not meta).
        bits, method, granularity, group_size, codebook_dtype, codebook_scope: see :func:`quantize_tensor`.
        modules_to_not_convert: module-name patterns to keep in full precision (see :func:`matches_module_name`).
            With ``granularity="group"``, layers whose input dimension ``group_size`` does not divide (e.g. a
            3x3 conv on 1 channel) fall back to per-channel codebooks, with a warning naming them.
        progress: show a tqdm bar over the layers.
        compute_metrics: measure relative MSE and W2 per layer for the logged summary (costs one sort per layer).

    Returns:
        The names of the replaced modules, in ``named_modules()`` order.
    """
    check_bits(bits)
    check_method(method)
    check_granularity(granularity)
    check_codebook_dtype(codebook_dtype)
    check_codebook_scope(codebook_scope)
    check_group_size(granularity, group_size)
    skip = list(modules_to_not_convert or [])
    targets = [
        (name, module, cls)
        for name, module in model.named_modules(remove_duplicate=False)
        if name and (cls := _target_class(module)) is not None and not matches_module_name(name, skip)
    ]
    if not targets:
        logger.warning("quantize_model found no nn.Linear/nn.Conv2d to quantize in %s.", type(model).__name__)
        return []

    done: dict[int, nn.Module] = {}  # a module registered under several names is quantized once
    reports: list[LayerReport] = []
    per_channel_fallback: list[str] = []
    for name, module, cls in tqdm(targets, desc=f"OTQ {method} {bits}-bit", unit="layer", disable=not progress):
        if id(module) not in done:
            layer_granularity, layer_group_size = granularity, group_size
            if granularity == "group" and _input_dim(module) % group_size != 0:
                layer_granularity, layer_group_size = "channel", None
                per_channel_fallback.append(name)
            layer = cls.from_module(
                module,
                bits,
                method,
                layer_granularity,
                layer_group_size,
                name=name,
                codebook_dtype=codebook_dtype,
                codebook_scope=codebook_scope,
            )
            done[id(module)] = layer
            if compute_metrics:
                restored = layer.dequantize_weight(module.weight.dtype)
                reports.append(
                    LayerReport(
                        name=name,
                        parameters=module.weight.numel(),
                        bits_per_weight=layer.quantized_weight().bits_per_weight,
                        relative_mse=relative_mse(module.weight, restored),
                        w2=wasserstein2(module.weight, restored),
                    )
                )
        _set_submodule(model, name, done[id(module)])
    if per_channel_fallback:
        logger.warning(
            "%d layer(s) have an input dimension that group_size=%d does not divide and use per-channel codebooks: %s",
            len(per_channel_fallback),
            group_size,
            ", ".join(per_channel_fallback),
        )
    _log_summary(reports, len(done))
    return [name for name, _, _ in targets]


def _log_summary(reports: list[LayerReport], layers: int) -> None:
    if not reports:
        logger.info("Quantized %d layers.", layers)
        return
    params = sum(r.parameters for r in reports)
    bpw = sum(r.bits_per_weight * r.parameters for r in reports) / params
    logger.info(
        "Quantized %d layers, %s parameters: %.3f bits/weight, mean W2 %.4g, mean relative MSE %.4g, worst %s (%.4g).",
        layers,
        f"{params:,}",
        bpw,
        math.fsum(r.w2 for r in reports) / len(reports),
        math.fsum(r.relative_mse for r in reports) / len(reports),
        max(reports, key=lambda r: r.relative_mse).name,
        max(r.relative_mse for r in reports),
    )


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every OTQ layer of ``model`` in place by the plain float layer it reconstructs; returns the names."""
    names = [name for name, module in model.named_modules() if isinstance(module, OTQLayerMixin)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).dequantize())
    return names
