"""Model conversion: plan which Linear/Conv2d layers to quantize, then swap them for OTQ layers in place.

The plan (:func:`plan_layers`) depends only on module names, types and weight shapes, so the same plan is
rebuilt on a meta skeleton when a checkpoint is loaded (:func:`replace_with_empty_layers`) and on real weights
when quantizing (:func:`convert_model`, or layer by layer with :func:`quantize_layer`).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .fitting import LayerFit, fit_data_free
from .functional.metrics import relative_mse, wasserstein2
from .layers import OTQConv2d, OTQLayerMixin, OTQLinear
from .memory import release_freed_memory
from .options import LayerSpec
from .quantized_tensor import QuantizedTensor


__all__ = [
    "LayerFit",
    "LayerQuantizer",
    "LayerReport",
    "PlannedLayer",
    "SpecFn",
    "convert_model",
    "dequantize_model",
    "ModulePatterns",
    "matches_module_name",
    "plan_layers",
    "quantize_layer",
    "replace_with_empty_layers",
    "set_submodule",
]

logger = logging.getLogger(__name__)

_LAYER_TYPES: dict[type[nn.Module], type[OTQLayerMixin]] = {nn.Linear: OTQLinear, nn.Conv2d: OTQConv2d}


@dataclass(frozen=True)
class LayerReport:
    """Per-layer outcome of :func:`convert_model` (metrics are NaN when not computed)."""

    name: str
    parameters: int
    bits_per_weight: float
    relative_mse: float
    w2: float


class ModulePatterns:
    """A compiled list of module-name patterns (see :func:`matches_module_name` for the rules).

    Plain patterns go into a set of dot-component tuples, so a name of ``L`` components costs ``O(L^2)`` set
    lookups however many patterns there are (100,000 names in ``modules_to_not_convert`` stay fast); glob
    patterns are tried one by one.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.plain: set[tuple[str, ...]] = set()
        self.globs: list[str] = []
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                self.globs.append(pattern)
            else:
                self.plain.add(tuple(pattern.split(".")))
        self.widths = sorted({len(p) for p in self.plain})

    def matches(self, name: str) -> bool:
        """True if a pattern names ``name`` or a run of its dot-separated components."""
        parts = tuple(name.split("."))
        for width in self.widths:
            if width > len(parts):
                break
            if any(parts[i : i + width] in self.plain for i in range(len(parts) - width + 1)):
                return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.globs)


@functools.lru_cache(maxsize=32)
def _compiled(patterns: tuple[str, ...]) -> ModulePatterns:
    return ModulePatterns(patterns)


def matches_module_name(name: str, patterns: Iterable[str]) -> bool:
    """True if a pattern names ``name`` or a run of its dot-separated components.

    ``"proj_out"`` matches ``"proj_out"`` and ``"blocks.0.proj_out"`` but not ``"proj_out_2"``;
    ``"blocks.0"`` matches everything below ``blocks.0``; patterns with ``*``/``?`` are fnmatch globs on the
    full name. The compiled form of the last pattern lists is cached (:class:`ModulePatterns`).
    """
    return _compiled(tuple(patterns)).matches(name)


SpecFn = Callable[[str, nn.Module], LayerSpec | None]
"""Decides per module: ``spec_fn(name, module)`` is the :class:`LayerSpec` to quantize it with, or None to skip."""


@dataclass(frozen=True)
class PlannedLayer:
    """One layer :func:`plan_layers` selected: where it is, what it becomes and how it is quantized."""

    name: str
    module: nn.Module
    target: type[OTQLayerMixin]
    spec: LayerSpec


def _target_class(module: nn.Module) -> type[OTQLayerMixin] | None:
    if isinstance(module, OTQLayerMixin):
        return None
    for base, target in _LAYER_TYPES.items():
        if isinstance(module, base):
            return target
    return None


def _input_dim(module: nn.Module) -> int:
    """Values per output channel of the weight (``in_features``, or ``in/groups * kh * kw`` for a conv)."""
    shape = module.weight.shape
    return math.prod(shape[1:]) if len(shape) > 1 else shape[0]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def plan_layers(model: nn.Module, spec_fn: SpecFn, *, warn: bool = True) -> list[PlannedLayer]:
    """Every ``nn.Linear``/``nn.Conv2d`` of ``model`` that ``spec_fn`` selects, in ``named_modules()`` order.

    Works on meta models (only shapes are read). A group spec whose ``group_size`` does not divide the layer's
    input dimension (e.g. a 3x3 conv on 1 channel) falls back to per-channel codebooks, with one warning that
    names those layers (``warn=False`` silences it when rebuilding a saved checkpoint's skeleton); the fallback
    is deterministic, so that skeleton matches the saved layout. Likewise a vector spec whose ``vector_dim`` does
    not divide the input dimension falls back to scalar codebooks (``vector_dim=1``).
    """
    planned: list[PlannedLayer] = []
    per_channel_fallback: list[str] = []
    scalar_fallback: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        target = _target_class(module)
        if not name or target is None or (spec := spec_fn(name, module)) is None:
            continue
        if spec.granularity == "group" and _input_dim(module) % spec.group_size != 0:
            spec = replace(spec, granularity="channel", group_size=None)
            per_channel_fallback.append(name)
        if spec.vector_dim > 1 and _input_dim(module) % spec.vector_dim != 0:
            spec = replace(spec, vector_dim=1)
            scalar_fallback.append(name)
        planned.append(PlannedLayer(name, module, target, spec))
    if per_channel_fallback and warn:
        logger.warning(
            "%d layer(s) have an input dimension that their group_size does not divide and use per-channel "
            "codebooks: %s",
            len(per_channel_fallback),
            ", ".join(per_channel_fallback),
        )
    if scalar_fallback and warn:
        logger.warning(
            "%d layer(s) have an input dimension that their vector_dim does not divide and use scalar codebooks: %s",
            len(scalar_fallback),
            ", ".join(scalar_fallback),
        )
    return planned


LayerQuantizer = Callable[[PlannedLayer, torch.Tensor], "QuantizedTensor | LayerFit"]
"""Fits one planned layer's weight: ``quantizer(layer, weight)`` returns the :class:`QuantizedTensor` in the layout
``layer.spec`` implies, or a :class:`LayerFit` that also replaces the bias and carries the spec's low-rank branch
and rotation. The default is data-free :func:`~diffusers_otq.fitting.fit_data_free`; calibration supplies its
own."""


def quantize_layer(
    layer: PlannedLayer, weight: torch.Tensor | None = None, quantizer: LayerQuantizer | None = None
) -> OTQLayerMixin:
    """The OTQ layer for ``layer``, quantized from ``weight`` (default: the module's own weight) by ``quantizer``
    (default: data-free :func:`~diffusers_otq.fitting.fit_data_free` with the layer's spec); with
    ``spec.noise_bands > 1`` every band holds the fitted codebooks (refinement per band makes them differ)."""
    weight = layer.module.weight if weight is None else weight
    if quantizer is None:
        fit = fit_data_free(weight, layer.spec, layer.name)
    else:
        result = quantizer(layer, weight)
        fit = result if isinstance(result, LayerFit) else LayerFit(result)
    banded = fit.quantized.with_noise_bands(layer.spec.noise_bands)  # every band starts from the fitted codebooks
    quantized = layer.target.from_quantized(banded, layer.module, fit.lowrank, fit.rotation)
    if fit.bias is not None:
        if quantized.bias is None or quantized.bias.shape != fit.bias.shape:
            raise ValueError(
                f"layer {layer.name!r}: the fit returned a bias of shape {tuple(fit.bias.shape)}, but the layer has "
                f"{'no bias' if quantized.bias is None else f'a bias of shape {tuple(quantized.bias.shape)}'}."
            )
        with torch.no_grad():
            quantized.bias.copy_(fit.bias)
    return quantized


def replace_with_empty_layers(
    model: nn.Module, plan: list[PlannedLayer], dtype: torch.dtype | None = None, device: str = "meta"
) -> None:
    """Swap each planned layer for an uninitialised OTQ layer with the exact storage layout (checkpoint skeleton)."""
    for layer in plan:
        set_submodule(model, layer.name, layer.target.empty_like(layer.module, layer.spec, dtype, device))


def convert_model(
    model: nn.Module,
    plan: list[PlannedLayer],
    *,
    progress: bool = True,
    compute_metrics: bool = True,
    quantizer: LayerQuantizer | None = None,
) -> list[LayerReport]:
    """Replace every planned layer of ``model`` in place by its quantized OTQ layer.

    Args:
        model: any ``nn.Module``; the planned weights must hold real values (not meta).
        plan: the layers to quantize, from :func:`plan_layers`.
        progress: show a tqdm bar over the layers.
        compute_metrics: measure relative MSE and W2 per layer (costs one sort per layer); otherwise the
            reports carry NaN for both.
        quantizer: fits each layer (:data:`LayerQuantizer`); default: data-free :func:`quantize_tensor`.

    Returns:
        One :class:`LayerReport` per replaced module name, in ``named_modules()`` order.
    """
    if not plan:
        logger.warning("Found no nn.Linear/nn.Conv2d to quantize in %s.", type(model).__name__)
        return []
    done: dict[int, tuple[OTQLayerMixin, LayerReport]] = {}  # a module registered under several names: once
    reports: list[LayerReport] = []
    for layer in tqdm(plan, desc="OTQ quantize", unit="layer", disable=not progress):
        if id(layer.module) not in done:
            quantized = quantize_layer(layer, quantizer=quantizer)
            done[id(layer.module)] = (quantized, _report(layer, quantized, compute_metrics))
            release_freed_memory()
        quantized, report = done[id(layer.module)]
        set_submodule(model, layer.name, quantized)
        reports.append(replace(report, name=layer.name))
    _log_summary(reports)
    return reports


def _report(layer: PlannedLayer, quantized: OTQLayerMixin, compute_metrics: bool) -> LayerReport:
    original = layer.module.weight
    mse = w2 = float("nan")
    if compute_metrics:
        restored = quantized.dequantize_weight(original.dtype)
        mse, w2 = relative_mse(original, restored), wasserstein2(original, restored)
    return LayerReport(
        name=layer.name,
        parameters=original.numel(),
        bits_per_weight=quantized.bits_per_weight,
        relative_mse=mse,
        w2=w2,
    )


def _log_summary(reports: list[LayerReport]) -> None:
    params = sum(r.parameters for r in reports)
    bpw = sum(r.bits_per_weight * r.parameters for r in reports) / params
    measured = [r for r in reports if not math.isnan(r.relative_mse)]
    if not measured:
        logger.info("Quantized %d layers, %s parameters: %.3f bits/weight.", len(reports), f"{params:,}", bpw)
        return
    worst = max(measured, key=lambda r: r.relative_mse)
    logger.info(
        "Quantized %d layers, %s parameters: %.3f bits/weight, mean W2 %.4g, mean relative MSE %.4g, worst %s (%.4g).",
        len(reports),
        f"{params:,}",
        bpw,
        math.fsum(r.w2 for r in measured) / len(measured),
        math.fsum(r.relative_mse for r in measured) / len(measured),
        worst.name,
        worst.relative_mse,
    )


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every OTQ layer of ``model`` in place by the plain float layer it reconstructs; returns the names."""
    names = [name for name, module in model.named_modules() if isinstance(module, OTQLayerMixin)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).dequantize())
    return names
