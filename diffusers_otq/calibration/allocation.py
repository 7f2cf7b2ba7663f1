"""Mixed precision under a bits budget: per-layer sensitivities, then an exact knapsack over the settings.

For every selected layer ``l`` and candidate setting ``s`` (bits 2-8, per-channel codebooks or group scales)
the layer is fitted once (activation-weighted when statistics exist) and its *relative output error* measured:

    e_l(s) = tr(dW H dW^T) / tr(W H W^T),     dW = W - Q_s(W),

with ``H`` the input Gram matrix (its diagonal ``E[x_j^2]`` without a Gram; the identity without statistics).
How much that error matters downstream differs by layer; with recorded denoiser calls (``probes``) and
``sensitivity="velocity"``, each layer is quantized alone at the cheapest setting and the model's velocity error
``D_l`` on the probes is measured, giving a per-layer factor ``a_l = D_l / e_l(cheapest)``. The predicted
distortion of a plan is ``sum_l a_l e_l(s_l)`` (``a_l = 1`` otherwise), minimised under the byte budget by
:func:`diffusers_otq.functional.allocation.allocate`. Sizes are the exact stored bytes of each setting
(codes, codebooks, scales), so the budget counts every bit.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import OTQConfig
from ..convert import PlannedLayer, matches_module_name, plan_layers
from ..fitting import effective_weight
from ..functional.allocation import allocate
from ..functional.error_feedback import output_error
from ..options import LayerSpec
from ..quantized_tensor import resolve_codebook_dtype, storage_layout
from ..structure import structure_nbytes
from .config import CalibrationConfig
from .fit import corrects_bias, importance_rows, quantize_calibrated
from .probes import eval_mode, model_output, velocity_error
from .statistics import CalibrationStatistics, LayerStatistics


__all__ = ["BitsPlan", "CandidateTable", "LayerChoice", "candidate_specs", "measure_candidates", "plan_bits"]

logger = logging.getLogger(__name__)

FITTED_BITS: tuple[int, ...] = (1, 2, 3, 4)  # candidates fitted and measured
EXTRAPOLATED_BITS: tuple[int, ...] = (5, 6, 7, 8)  # error of 4 bits * 4**-(b - 4): high-resolution MSE ~ 2**-2b
TENSOR_BITS: tuple[int, ...] = (2, 3)  # one codebook per weight: no per-row metadata at all
PROBE_BITS = 2  # the velocity sensitivity is measured at the cheapest 2-bit candidate
RANK_CANDIDATES: tuple[int, ...] = (16, 32)  # low-rank branches offered with 1-3 bit per-channel codes ...
MAX_RANK_BITS = 0.5  # ... where the 16-bit factors cost at most this many bits per weight (wide layers)
# Candidates are ranked after one error-feedback sweep without codebook refits; the final fit runs the refits.
_DEFAULT_GROUP = 64


@dataclass(frozen=True)
class LayerChoice:
    """The setting chosen for one layer, with its size and predicted distortion."""

    name: str
    spec: LayerSpec
    numel: int
    nbytes: int
    relative_error: float
    distortion: float
    fixed: bool = False  # set by the user's module_overrides, not by the allocator

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.numel

    def label(self) -> str:
        """``"3-bit channel"`` or ``"2-bit group 64"``."""
        spec = self.spec
        text = f"{spec.bits}-bit {spec.granularity}"
        text += f" {spec.group_size}" if spec.group_size else ""
        return text + (f" + rank {spec.rank}" if spec.rank else "")


@dataclass(frozen=True)
class BitsPlan:
    """A solved allocation: one :class:`LayerChoice` per layer, the budget and what it reached."""

    budget: float
    choices: tuple[LayerChoice, ...]
    sensitivity: str

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.choices)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.choices)

    @property
    def bits_per_weight(self) -> float:
        """Reached bits per quantized weight, every code, codebook and scale counted."""
        return self.nbytes * 8 / max(self.numel, 1)

    def overrides(self) -> dict[str, dict[str, object]]:
        """``module_overrides`` entries pinning every allocated layer by its full name.

        Deeper names come first: a name pattern also matches longer names that end in the same components
        (``"proj"`` matches ``"blocks.0.proj"``), and the first matching entry wins, so each layer must meet its
        own entry before any shorter one.
        """
        out: dict[str, dict[str, object]] = {}
        for choice in sorted(self.choices, key=lambda c: -c.name.count(".")):
            if choice.fixed:
                continue
            out[choice.name] = {
                "bits": choice.spec.bits,
                "granularity": choice.spec.granularity,
                "group_size": choice.spec.group_size,
            }
            if choice.spec.rank:
                out[choice.name]["rank"] = choice.spec.rank
        return out

    def resolved_config(self, config: OTQConfig, provenance: dict | None = None) -> OTQConfig:
        """``config`` with the plan in ``module_overrides`` (after the user's own), ``bits_per_weight`` cleared and
        the budget recorded in ``provenance``; it reloads without any allocation."""
        counts = Counter(c.spec.bits for c in self.choices)
        base = counts.most_common(1)[0][0] if counts else config.bits
        record = dict(provenance or config.provenance or {})
        record["bits_per_weight"] = {
            "budget": self.budget,
            "reached": round(self.bits_per_weight, 4),
            "sensitivity": self.sensitivity,
            "layers": {label: n for label, n in sorted(Counter(c.label() for c in self.choices).items())},
        }
        data = config.to_dict()
        data.update(
            bits=base,
            module_overrides={**(config.module_overrides or {}), **self.overrides()},
            bits_per_weight=None,
            provenance=record,
        )
        return OTQConfig.from_dict(data)

    def table(self) -> str:
        """The plan as a markdown table (layer, setting, weights, bits/weight, relative output error)."""
        lines = [
            f"Bits budget {self.budget:.3f}, reached {self.bits_per_weight:.3f} bits/weight over {self.numel:,} "
            f"weights ({self.sensitivity} sensitivity).",
            "",
            "| layer | setting | weights | bits/weight | rel. output error |",
            "|---|---|---|---|---|",
        ]
        for c in self.choices:
            fixed = " (fixed)" if c.fixed else ""
            lines.append(
                f"| {c.name} | {c.label()}{fixed} | {c.numel:,} | {c.bits_per_weight:.3f} | {c.relative_error:.3e} |"
            )
        return "\n".join(lines)


def candidate_specs(base: LayerSpec, input_width: int, group_size: int, rows: int | None = None) -> list[LayerSpec]:
    """The settings the allocator may choose for one layer: bits 1-8 with per-channel codebooks, bits 2-8 with
    group scales (when ``group_size`` divides the input width), bits 2-3 with one codebook per tensor, and
    1-3 bit per-channel codes with a low-rank branch (:data:`RANK_CANDIDATES`) on layers of ``rows`` outputs
    wide enough that the branch costs at most :data:`MAX_RANK_BITS` bits/weight. ``base``'s own rank and
    rotation stay as they are on every candidate.

    Ordered as fitted first (:data:`FITTED_BITS`, :data:`TENSOR_BITS`, ranks), extrapolated last.
    """
    groups = input_width % group_size == 0 and input_width > group_size
    fitted = [replace(base, bits=b, granularity="channel", group_size=None) for b in FITTED_BITS]
    if rows is not None and not base.rank:
        for rank in RANK_CANDIDATES:
            if rank * (rows + input_width) * 16 <= MAX_RANK_BITS * rows * input_width:
                fitted += [replace(base, bits=b, granularity="channel", group_size=None, rank=rank) for b in (1, 2, 3)]
    if groups:
        fitted += [replace(base, bits=b, granularity="group", group_size=group_size) for b in FITTED_BITS if b > 1]
    fitted += [replace(base, bits=b, granularity="tensor", group_size=None) for b in TENSOR_BITS]
    extrapolated = [replace(base, bits=b, granularity="channel", group_size=None) for b in EXTRAPOLATED_BITS]
    if groups:
        extrapolated += [replace(base, bits=b, granularity="group", group_size=group_size) for b in EXTRAPOLATED_BITS]
    return fitted + extrapolated


def _spec_bytes(weight: torch.Tensor, spec: LayerSpec) -> int:
    """Every byte a layer quantized with ``spec`` stores (codes, codebooks, scales, factors, rotation signs)."""
    dtype = resolve_codebook_dtype(spec.codebook_dtype, weight.dtype, spec.granularity)
    layout = storage_layout(tuple(weight.shape), spec, dtype)
    codes = sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for shape, dt in layout.values())
    return codes + structure_nbytes(tuple(weight.shape), spec.rank, spec.rotation_block, weight.dtype)


class _ErrorMeter:
    """Relative output error ``tr(dW H dW^T) / tr(W H W^T)`` of one layer (H per input group)."""

    def __init__(self, weight: torch.Tensor, stats: LayerStatistics | None, damping: float, centered: bool) -> None:
        self.rows = weight.shape[0]
        self.target = weight.detach().reshape(self.rows, -1).to(torch.float64)
        stats = None if stats is None else stats.to(weight.device)
        self.groups = 1 if stats is None else stats.groups
        self.grams = None if stats is None else [stats.gram_blocks(g, centered) for g in range(self.groups)]
        if self.grams is not None and any(g is None for g in self.grams):
            self.grams = None
        self.importance = None if stats is None else importance_rows(stats, self.rows, damping, centered)
        self.reference = self._energy(self.target)

    def _energy(self, delta: torch.Tensor) -> float:
        if self.grams is not None:
            per = self.rows // self.groups
            return math.fsum(
                float(output_error(delta[g * per : (g + 1) * per], self.grams[g]).sum()) for g in range(self.groups)
            )
        if self.importance is not None:
            return float((delta.square() * self.importance).sum())
        return float(delta.square().sum())

    def __call__(self, effective: torch.Tensor) -> float:
        """The relative output error of a fitted layer's effective weight (any shape with ``rows`` first)."""
        delta = self.target - effective.to(torch.float64).reshape(self.rows, -1)
        # max(0, .): rounding can leave a quadratic form of a (near-)singular covariance a hair below zero
        return max(0.0, self._energy(delta)) / self.reference if self.reference > 0 else 0.0


@dataclass(frozen=True)
class CandidateTable:
    """Every candidate setting of every layer with its exact size and predicted distortion: what a bits budget is
    allocated from. Measuring it is the expensive part (each candidate is fitted once); :meth:`allocate` then
    solves the knapsack for any budget in milliseconds, so one table serves many budgets.

    Attributes:
        layers: the planned layers, in model order.
        options: per layer, its candidate :class:`~diffusers_otq.LayerSpec` settings.
        sizes: per layer and candidate, the stored bytes (codes, codebooks, scales, low-rank factors).
        errors: per layer and candidate, the relative output error ``e_l(s)``.
        distortions: per layer and candidate, ``a_l e_l(s)`` (the quantity the knapsack minimises).
        fixed: per layer, whether the user's ``module_overrides`` pin it (one candidate).
        sensitivity: ``"velocity"``, ``"output"`` (calibration statistics) or ``"weights"`` (data-free).
    """

    layers: tuple[PlannedLayer, ...]
    options: tuple[tuple[LayerSpec, ...], ...]
    sizes: tuple[tuple[int, ...], ...]
    errors: tuple[tuple[float, ...], ...]
    distortions: tuple[tuple[float, ...], ...]
    fixed: tuple[bool, ...]
    sensitivity: str

    @property
    def numel(self) -> int:
        """Weights of the allocated layers."""
        return sum(layer.module.weight.numel() for layer in self.layers)

    def allocate(self, bits_per_weight: float) -> BitsPlan:
        """The settings with the least summed distortion whose stored bytes fit ``bits_per_weight``.

        Raises:
            ValueError: the budget is below what the cheapest settings reach (the message names the minimum).
        """
        numel = self.numel
        budget_bytes = int(bits_per_weight * numel / 8)
        floor = sum(min(s) for s in self.sizes)
        if budget_bytes < floor:
            raise ValueError(
                f"bits_per_weight={bits_per_weight} is below what this model can reach: the cheapest setting of "
                f"every layer (1-bit codes plus their codebooks, or 2-bit codes and scales) takes "
                f"{floor * 8 / numel:.3f} bits/weight over its {numel:,} quantized weights. Raise bits_per_weight to "
                f"at least {math.ceil(floor * 800 / numel) / 100:.2f}, or keep small layers in float "
                "(modules_to_not_convert)."
            )
        solution = allocate([list(s) for s in self.sizes], [list(d) for d in self.distortions], budget_bytes)
        choices = tuple(
            LayerChoice(
                name=layer.name,
                spec=specs[i],
                numel=layer.module.weight.numel(),
                nbytes=size[i],
                relative_error=errs[i],
                distortion=dist[i],
                fixed=pinned,
            )
            for layer, specs, size, errs, dist, pinned, i in zip(
                self.layers, self.options, self.sizes, self.errors, self.distortions, self.fixed, solution.choices,
                strict=True,
            )
        )  # fmt: skip
        result = BitsPlan(bits_per_weight, choices, self.sensitivity)
        logger.info("OTQ bits plan:\n%s", result.table())
        return result

    def check_model(self, model: nn.Module) -> None:
        """Refuse a table measured on another model (its layers by name and shape).

        Raises:
            ValueError: a layer of the table is missing from ``model`` or has another weight shape.
        """
        modules = dict(model.named_modules())
        for layer in self.layers:
            module = modules.get(layer.name)
            weight = getattr(module, "weight", None)
            if weight is None or tuple(weight.shape) != tuple(layer.module.weight.shape):
                raise ValueError(
                    f"the candidate table was measured on another model: its layer {layer.name!r} "
                    f"{tuple(layer.module.weight.shape)} is {'missing' if weight is None else tuple(weight.shape)} "
                    f"in {type(model).__name__}. Measure the candidates of this model (measure_candidates)."
                )


def plan_bits(
    model: nn.Module,
    config: OTQConfig,
    statistics: CalibrationStatistics | None = None,
    calibration: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> BitsPlan:
    """Choose per-layer settings that meet ``config.bits_per_weight`` with the least predicted distortion.

    ``measure_candidates(...).allocate(config.bits_per_weight)``; measure once and allocate several budgets when
    you need more than one.

    Args:
        model: the float model (its selected Linear/Conv2d layers are read, not changed).
        config: an :class:`~diffusers_otq.OTQConfig` with ``bits_per_weight`` set; its method, codebook dtype and
            scope apply to every candidate, ``group_size`` (default 64) to the group candidates, and layers its
            ``module_overrides`` match keep those settings.
        statistics: calibration statistics (sharper sensitivities); None: data-free (relative weight error).
        calibration: damping and sensitivity settings (defaults when None).
        progress: show a progress bar over the layers.

    Returns:
        The :class:`BitsPlan` (``plan.resolved_config(config)`` is the config to quantize and save with).

    Raises:
        ValueError: ``bits_per_weight`` unset, or below what the cheapest settings reach (the message names it).
    """
    if config.bits_per_weight is None:
        raise ValueError("plan_bits needs OTQConfig(bits_per_weight=...), e.g. bits_per_weight=2.5.")
    return measure_candidates(model, config, statistics, calibration, progress=progress).allocate(
        config.bits_per_weight
    )


def measure_candidates(
    model: nn.Module,
    config: OTQConfig,
    statistics: CalibrationStatistics | None = None,
    calibration: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> CandidateTable:
    """Fit every candidate setting of every layer ``config`` selects once and measure its error (module doc).

    Args:
        model: the float model (read, not changed).
        config: its method, codebook dtype and scope apply to every candidate, ``group_size`` (default 64) to the
            group candidates; layers its ``module_overrides`` match keep those settings. ``bits_per_weight`` is
            not read.
        statistics: calibration statistics (output errors); None: data-free (relative weight errors).
        calibration: damping and sensitivity settings (defaults when None).
        progress: show a progress bar over the layers.

    Returns:
        The :class:`CandidateTable`; ``table.allocate(budget)`` gives the :class:`BitsPlan` of any budget.

    Raises:
        ValueError: the config selects no layer.
    """
    with eval_mode(model), torch.no_grad():
        return _measure_candidates(model, config, statistics, calibration or CalibrationConfig(), progress)


def _measure_candidates(
    model: nn.Module,
    config: OTQConfig,
    statistics: CalibrationStatistics | None,
    calibration: CalibrationConfig,
    progress: bool,
) -> CandidateTable:
    skip = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    unresolved = OTQConfig.from_dict({**config.to_dict(), "bits_per_weight": None})
    plan = _unique(plan_layers(model, partial(unresolved.layer_spec, skip=skip), warn=False))
    if not plan:
        raise ValueError(f"the config selects no nn.Linear/nn.Conv2d layer of {type(model).__name__} to allocate.")
    group_size = config.group_size or _DEFAULT_GROUP
    probes = None if statistics is None else statistics.probes
    use_velocity = calibration.sensitivity == "velocity" and probes is not None and len(probes) > 0
    reference = [model_output(model, a, k).detach() for a, k in probes.calls] if use_velocity else None

    sizes: list[tuple[int, ...]] = []
    errors: list[tuple[float, ...]] = []
    options: list[tuple[LayerSpec, ...]] = []
    distortions: list[tuple[float, ...]] = []
    fixed: list[bool] = []
    overrides = list(config.module_overrides or {})
    for layer in tqdm(plan, desc="OTQ sensitivity", unit="layer", disable=not progress):
        weight = layer.module.weight
        stats = None if statistics is None else statistics.get(layer.name)
        pinned = any(matches_module_name(layer.name, [p]) for p in overrides)
        specs = [layer.spec] if pinned else candidate_specs(layer.spec, weight[0].numel(), group_size, weight.shape[0])
        meter = _ErrorMeter(weight, stats, calibration.damping, corrects_bias(layer, stats, calibration))
        layer_errors, layer_sizes = [], []
        fits: dict[int, torch.Tensor] = {}  # effective weights of the fitted candidates
        for i, spec in enumerate(specs):
            layer_sizes.append(_spec_bytes(weight, spec))
            if pinned or spec.bits in FITTED_BITS or spec.granularity == "tensor":
                candidate = replace(layer, spec=spec)
                fit = quantize_calibrated(weight, candidate, stats, calibration, refit_codebooks=False)
                fits[i] = effective_weight(fit)
                layer_errors.append(meter(fits[i]))
            else:  # extrapolate from the 4-bit fit of the same granularity
                anchor = next(
                    j for j, s in enumerate(specs) if s.bits == 4 and s.granularity == spec.granularity and not s.rank
                )
                layer_errors.append(layer_errors[anchor] * 4.0 ** (4 - spec.bits))
        factor = 1.0
        if use_velocity and not pinned:
            probe = min(
                (i for i in fits if specs[i].bits == PROBE_BITS), key=lambda i: (layer_sizes[i], i), default=None
            )
            if probe is not None:
                factor = _velocity_factor(model, layer, fits[probe], layer_errors[probe], probes, reference)
        options.append(tuple(specs))
        sizes.append(tuple(layer_sizes))
        errors.append(tuple(layer_errors))
        distortions.append(tuple(factor * e for e in layer_errors))
        fixed.append(pinned)
    sensitivity = "velocity" if use_velocity else "output" if statistics is not None else "weights"
    return CandidateTable(
        tuple(plan), tuple(options), tuple(sizes), tuple(errors), tuple(distortions), tuple(fixed), sensitivity
    )


def _unique(plan: Sequence[PlannedLayer]) -> list[PlannedLayer]:
    seen: set[int] = set()
    out = []
    for layer in plan:
        if id(layer.module) not in seen:
            seen.add(id(layer.module))
            out.append(layer)
    return out


def _velocity_factor(
    model: nn.Module,
    layer: PlannedLayer,
    effective: torch.Tensor,
    relative_error: float,
    probes,
    reference: list[torch.Tensor],
) -> float:
    """``D_l / e_l``: the model's velocity error per unit of this layer's relative output error."""
    if relative_error <= 0:
        return 0.0
    weight = layer.module.weight
    original = weight.data
    weight.data = effective.to(weight.dtype).reshape(weight.shape)
    try:
        distortion = velocity_error(model, probes, reference)
    finally:
        weight.data = original
    return distortion / relative_error
