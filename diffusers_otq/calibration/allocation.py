"""Mixed precision under a bits budget: per-layer sensitivities, then an exact knapsack over the settings.

For every selected layer ``l`` and candidate setting ``s`` (bits 1-8, per-channel codebooks, group scales or one
codebook per tensor, low-rank branches on wide layers) the layer is fitted once (activation-weighted when
statistics exist, one error-feedback sweep) and its *relative output error* measured:

    e_l(s) = tr(dW H dW^T) / tr(W H W^T),     dW = W - Q_s(W),

with ``H`` the input Gram matrix (its diagonal ``E[x_j^2]`` without a Gram; the identity without statistics).
By default the fit covers a deterministic sample ``S`` of the layer's rows only and ``e_l(s)`` is estimated as
``sum_{r in S} dW_r H dW_r^T / sum_{r in S} W_r H W_r^T`` (:func:`measure_candidates`, ``estimate="sampled"``): the
rows are fitted independently given ``H``, so the cost per candidate falls from the layer's rows to the sample's
(:mod:`.estimate`).
How much that error matters downstream differs by layer; with recorded denoiser calls (``probes``) and
``sensitivity="velocity"``, each layer is quantized alone at the cheapest setting and the model's velocity error
``D_l`` on the probes is measured, giving a per-layer factor ``a_l = D_l / e_l(cheapest)`` (or any other
``factor_fn``, e.g. a block-output error). The predicted distortion of a plan is ``sum_l a_l e_l(s_l)``
(``a_l = 1`` otherwise), minimised under the byte budget by :func:`diffusers_otq.functional.allocation.allocate`.
Sizes are the exact stored bytes of each setting (codes, codebooks, scales, low-rank factors), so the budget
counts every bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import OTQConfig
from ..convert import PlannedLayer, matches_module_name, plan_layers
from ..functional.allocation import Allocation, allocate
from ..options import VECTOR_METHODS, LayerSpec, setting_label
from ..quantized_tensor import resolve_codebook_dtype, storage_layout
from ..structure import structure_nbytes
from .config import CalibrationConfig
from .estimate import ErrorMeter, Subject, fit_candidate
from .probes import ProbeInputs, eval_mode, model_output, velocity_error
from .statistics import CalibrationStatistics, LayerStatistics


__all__ = [
    "ESTIMATES",
    "BitsPlan",
    "CandidateTable",
    "FactorFn",
    "LayerChoice",
    "candidate_specs",
    "measure_candidates",
    "plan_bits",
    "spec_nbytes",
]

logger = logging.getLogger(__name__)

FITTED_BITS: tuple[int, ...] = (1, 2, 3, 4)  # candidates fitted and measured
EXTRAPOLATED_BITS: tuple[int, ...] = (5, 6, 7, 8)  # error of 4 bits * 4**-(b - 4): high-resolution MSE ~ 2**-2b
TENSOR_BITS: tuple[int, ...] = (2, 3)  # one codebook per weight: no per-row metadata at all
PROBE_BITS = 2  # the velocity sensitivity is measured at the cheapest 2-bit candidate
VECTOR_CANDIDATES: tuple[tuple[int, int], ...] = ((2, 1), (2, 2), (2, 3), (4, 1), (4, 2), (8, 1))
"""(vector_dim, bits) of the vector-codebook candidates: one codebook per tensor, and with group scales (2-3 bits
in 2-D, 2 bits in 4-D) where groups apply; offered for the ``"ot"``/``"ot-vp"`` fitters where the codebook costs at
most :data:`MAX_VECTOR_CODEBOOK_BITS` bits/weight. Their codebooks are int8 (:data:`VECTOR_CODEBOOK_DTYPE`) unless
the config sets a ``codebook_dtype``."""
VECTOR_CODEBOOK_DTYPE = torch.int8  # half the bits of float16; results/two-bit.md, section 3d
MAX_VECTOR_CODEBOOK_BITS = 1.0
RANK_CANDIDATES: tuple[int, ...] = (16, 32)  # low-rank branches offered with 1-3 bit per-channel codes ...
MAX_RANK_BITS = 0.5  # ... where the 16-bit factors cost at most this many bits per weight (wide layers)
# Candidates are ranked after one error-feedback sweep without codebook refits; the final fit runs the refits.
_DEFAULT_GROUP = 64
ESTIMATES: tuple[str, ...] = ("sampled", "exhaustive")  # how measure_candidates measures each candidate's error
SAMPLE_ROWS = 64  # rows per layer the sampled estimate fits


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
        """:func:`~diffusers_otq.options.setting_label`, with ``" + rank r"`` for a low-rank branch."""
        spec = self.spec
        text = setting_label(spec.bits, spec.granularity, spec.group_size, spec.vector_dim, spec.codebook_dtype)
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
                "vector_dim": choice.spec.vector_dim,
            }
            if choice.spec.rank:
                out[choice.name]["rank"] = choice.spec.rank
            if choice.spec.codebook_dtype is not None:  # int8 vector codebooks (or the user's codebook dtype)
                out[choice.name]["codebook_dtype"] = str(choice.spec.codebook_dtype).removeprefix("torch.")
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
    group scales (when ``group_size`` divides the input width), bits 2-3 with one codebook per tensor,
    1-3 bit per-channel codes with a low-rank branch (:data:`RANK_CANDIDATES`) on layers of ``rows`` outputs
    wide enough that the branch costs at most :data:`MAX_RANK_BITS` bits/weight, and vector codebooks
    (:data:`VECTOR_CANDIDATES`, int8 codewords unless ``base`` sets a codebook dtype) where they fit. ``base``'s
    own rank and rotation stay as they are on every candidate; its ``vector_dim`` does not (every candidate sets
    its own).

    Ordered as fitted first (:data:`FITTED_BITS`, :data:`TENSOR_BITS`, ranks, vectors), extrapolated last.
    """
    base = replace(base, vector_dim=1)
    groups = input_width % group_size == 0 and input_width > group_size
    fitted = [replace(base, bits=b, granularity="channel", group_size=None) for b in FITTED_BITS]
    if rows is not None and not base.rank:
        for rank in RANK_CANDIDATES:
            if rank * (rows + input_width) * 16 <= MAX_RANK_BITS * rows * input_width:
                fitted += [replace(base, bits=b, granularity="channel", group_size=None, rank=rank) for b in (1, 2, 3)]
    if groups:
        fitted += [replace(base, bits=b, granularity="group", group_size=group_size) for b in FITTED_BITS if b > 1]
    fitted += [replace(base, bits=b, granularity="tensor", group_size=None) for b in TENSOR_BITS]
    if rows is not None and base.method in VECTOR_METHODS:
        vector = replace(base, codebook_dtype=base.codebook_dtype or VECTOR_CODEBOOK_DTYPE)
        value_bits = vector.codebook_dtype.itemsize * 8
        for dim, bits in VECTOR_CANDIDATES:
            codebook_bits = (1 << (bits * dim)) * dim * value_bits
            if input_width % dim or codebook_bits > MAX_VECTOR_CODEBOOK_BITS * rows * input_width:
                continue
            fitted.append(replace(vector, bits=bits, granularity="tensor", group_size=None, vector_dim=dim))
            if groups and dim in (2, 4) and bits > 1 and bits * dim <= 8 and group_size % dim == 0:
                fitted.append(replace(vector, bits=bits, granularity="group", group_size=group_size, vector_dim=dim))
    extrapolated = [replace(base, bits=b, granularity="channel", group_size=None) for b in EXTRAPOLATED_BITS]
    if groups:
        extrapolated += [replace(base, bits=b, granularity="group", group_size=group_size) for b in EXTRAPOLATED_BITS]
    return fitted + extrapolated


def spec_nbytes(weight: torch.Tensor, spec: LayerSpec) -> int:
    """Every byte a layer quantized with ``spec`` stores (codes, codebooks, scales, factors, rotation signs)."""
    dtype = resolve_codebook_dtype(spec.codebook_dtype, weight.dtype, spec.granularity)
    layout = storage_layout(tuple(weight.shape), spec, dtype)
    codes = sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for shape, dt in layout.values())
    return codes + structure_nbytes(tuple(weight.shape), spec.rank, spec.rotation_block, weight.dtype)


def _band_bytes(layer: PlannedLayer, spec: LayerSpec) -> int:
    """Bytes that ``spec.noise_bands - 1`` more sets of codebooks (and int8 codebook scales) add to one."""
    if spec.noise_bands == 1:
        return 0
    weight = layer.module.weight
    return spec_nbytes(weight, spec) - spec_nbytes(weight, replace(spec, noise_bands=1))


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
        sensitivity: ``"velocity"``, ``"output"`` (calibration statistics), ``"weights"`` (data-free) or
            ``"custom"`` (a ``factor_fn``).
        estimate: how the errors were measured: ``"sampled"`` (a row sample per layer), ``"exhaustive"`` or
            ``"mixed"`` (:meth:`concat` of both).
    """

    layers: tuple[PlannedLayer, ...]
    options: tuple[tuple[LayerSpec, ...], ...]
    sizes: tuple[tuple[int, ...], ...]
    errors: tuple[tuple[float, ...], ...]
    distortions: tuple[tuple[float, ...], ...]
    fixed: tuple[bool, ...]
    sensitivity: str
    estimate: str = "exhaustive"

    @classmethod
    def concat(cls, tables: Sequence[CandidateTable]) -> CandidateTable:
        """One table of the layers of ``tables``, in order: tables measured apart (e.g. block by block, with
        ``measure_candidates(..., names=...)``) allocated together, one budget over all their weights. Its
        ``estimate`` is the tables' common one, or ``"mixed"``.

        Raises:
            ValueError: no table, tables of different sensitivities (their distortions are not comparable), or a
                layer in several tables.
        """
        if not tables:
            raise ValueError("CandidateTable.concat needs at least one table.")
        sensitivities = sorted({t.sensitivity for t in tables})
        if len(sensitivities) > 1:
            raise ValueError(
                f"CandidateTable.concat joins tables of one sensitivity, got {sensitivities}: their distortions are "
                "not comparable. Measure every table with the same statistics, sensitivity and factor_fn."
            )
        estimates = {t.estimate for t in tables}
        names = Counter(layer.name for t in tables for layer in t.layers)
        repeated = sorted(name for name, count in names.items() if count > 1)
        if repeated:
            raise ValueError(f"CandidateTable.concat joins tables of disjoint layers; {repeated} are in several.")
        return cls(
            *(tuple(item for t in tables for item in getattr(t, part)) for part in _TABLE_PARTS),
            sensitivity=sensitivities[0],
            estimate=estimates.pop() if len(estimates) == 1 else "mixed",
        )

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
        solution = self._solve(budget_bytes)
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

    def _solve(self, budget_bytes: int) -> Allocation:
        """The knapsack for ``budget_bytes``. With codebooks per noise band (``noise_bands > 1``), the plan is chosen
        on the cost of one set of codebooks, under a budget lowered by the other sets' bytes until the plan with
        every set fits (at most 8 rounds; else the plan on the full cost): the errors are those of one set, and
        charging a plan for sets that refinement per band then improves steers it away from the large (vector)
        codebooks that gain most from them (results/two-bit.md section 3f: -1.2 dB on the bundled DiT)."""
        sizes, distortions = [list(s) for s in self.sizes], [list(d) for d in self.distortions]
        extra = [[_band_bytes(layer, spec) for spec in specs] for layer, specs in zip(self.layers, self.options,
                                                                                    strict=True)]  # fmt: skip
        if not any(any(row) for row in extra):
            return allocate(sizes, distortions, budget_bytes)
        one_set = [[size - e for size, e in zip(row, extra_row, strict=True)] for row, extra_row in zip(sizes, extra,
                                                                                                      strict=True)]  # fmt: skip
        target, floor = budget_bytes, sum(min(row) for row in one_set)
        for _ in range(8):
            if target < floor:
                break
            solution = allocate(one_set, distortions, target)
            total = sum(row[i] for row, i in zip(sizes, solution.choices, strict=True))
            if total <= budget_bytes:
                return solution
            target -= total - budget_bytes
        return allocate(sizes, distortions, budget_bytes)

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


_TABLE_PARTS = ("layers", "options", "sizes", "errors", "distortions", "fixed")  # per-layer fields, in order


def plan_bits(
    model: nn.Module,
    config: OTQConfig,
    statistics: CalibrationStatistics | None = None,
    calibration: CalibrationConfig | None = None,
    *,
    progress: bool = True,
    estimate: str = "sampled",
    sample_rows: int = SAMPLE_ROWS,
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
        estimate: ``"sampled"`` (default: each candidate fitted on a row sample) or ``"exhaustive"``
            (:func:`measure_candidates`).
        sample_rows: rows per layer of the ``"sampled"`` estimate.

    Returns:
        The :class:`BitsPlan` (``plan.resolved_config(config)`` is the config to quantize and save with).

    Raises:
        ValueError: ``bits_per_weight`` unset, or below what the cheapest settings reach (the message names it).
    """
    if config.bits_per_weight is None:
        raise ValueError("plan_bits needs OTQConfig(bits_per_weight=...), e.g. bits_per_weight=2.5.")
    table = measure_candidates(
        model, config, statistics, calibration, progress=progress, estimate=estimate, sample_rows=sample_rows
    )
    return table.allocate(config.bits_per_weight)


FactorFn = Callable[[PlannedLayer, torch.Tensor, float], float]
"""``factor_fn(layer, effective_weight, relative_error) -> a_l``: how much one unit of ``layer``'s relative output
error costs downstream, given the whole layer quantized at its probe setting (``effective_weight``, the weight's
shape, float64) and that fit's relative output error."""


def measure_candidates(
    model: nn.Module,
    config: OTQConfig,
    statistics: CalibrationStatistics | None = None,
    calibration: CalibrationConfig | None = None,
    *,
    progress: bool = True,
    estimate: str = "sampled",
    sample_rows: int = SAMPLE_ROWS,
    names: Collection[str] | None = None,
    factor_fn: FactorFn | None = None,
) -> CandidateTable:
    """Measure the relative output error of every candidate setting of every layer ``config`` selects.

    ``estimate="exhaustive"`` fits every candidate on the whole layer. ``"sampled"`` (the default) fits it on
    ``sample_rows`` rows of the layer only (:func:`~diffusers_otq.functional.allocation.stratified_rows`, the same
    rows for every candidate, ``sample_rows / G`` from each of a grouped conv's ``G`` row groups) and estimates

        e_l(s) ~ sum_{r in S} dW_r H dW_r^T / sum_{r in S} W_r H W_r^T;

    per-channel codes and the error-feedback sweep treat rows independently given ``H``, so the sampled rows get
    the codes the whole fit would give them; a codebook shared by the tensor (group scales, tensor granularity) is
    fitted to the sample's values; a low-rank branch is fitted to the whole weight and the sample's residual
    quantized (one alternation round instead of three: slightly pessimistic). Layers with at most ``sample_rows``
    rows (per group: ``sample_rows / G``) are fitted whole. Sizes are always the exact stored bytes of the whole
    layer.

    Args:
        model: the float model (read, not changed).
        config: its method, codebook dtype and scope apply to every candidate, ``group_size`` (default 64) to the
            group candidates; layers its ``module_overrides`` match keep those settings. ``bits_per_weight`` is
            not read.
        statistics: calibration statistics (output errors); None: data-free (relative weight errors).
        calibration: damping and sensitivity settings (defaults when None).
        progress: show a progress bar over the layers.
        estimate: ``"sampled"`` or ``"exhaustive"`` (see above).
        sample_rows: rows per layer of the sampled estimate.
        names: measure only these layers (full module names in ``model``); None: every selected layer.
        factor_fn: per-layer sensitivity factor ``a_l`` (:data:`FactorFn`), called with the layer quantized whole
            at its cheapest 2-bit candidate; it replaces ``calibration.sensitivity="velocity"``'s velocity factor
            (the table's sensitivity is then ``"custom"``). Layers pinned by ``module_overrides`` keep ``a_l = 1``.

    Returns:
        The :class:`CandidateTable`; ``table.allocate(budget)`` gives the :class:`BitsPlan` of any budget.

    Raises:
        ValueError: the config selects no layer, ``names`` names a layer it does not select, or a bad ``estimate``
            or ``sample_rows``.
    """
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate={estimate!r} is unknown; expected one of {list(ESTIMATES)}.")
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1:
        raise ValueError(f"sample_rows={sample_rows!r} must be a positive int, e.g. sample_rows={SAMPLE_ROWS}.")
    settings = _Settings(calibration or CalibrationConfig(), estimate, sample_rows if estimate == "sampled" else None)
    with eval_mode(model), torch.no_grad():
        return _measure_candidates(model, config, statistics, settings, names, factor_fn, progress)


@dataclass(frozen=True)
class _Settings:
    calibration: CalibrationConfig
    estimate: str
    sample_rows: int | None  # None: every layer fitted whole


def _selected_layers(model: nn.Module, config: OTQConfig, names: Collection[str] | None) -> list[PlannedLayer]:
    skip = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    unresolved = OTQConfig.from_dict({**config.to_dict(), "bits_per_weight": None})
    plan = _unique(plan_layers(model, partial(unresolved.layer_spec, skip=skip), warn=False))
    if not plan:
        raise ValueError(f"the config selects no nn.Linear/nn.Conv2d layer of {type(model).__name__} to allocate.")
    if names is None:
        return plan
    wanted = set(names)
    missing = sorted(wanted - {layer.name for layer in plan})
    if missing:
        raise ValueError(
            f"names lists {missing}, which the config does not select as nn.Linear/nn.Conv2d layers of "
            f"{type(model).__name__}; pass full module names (model.named_modules())."
        )
    return [layer for layer in plan if layer.name in wanted]


def _measure_candidates(
    model: nn.Module,
    config: OTQConfig,
    statistics: CalibrationStatistics | None,
    settings: _Settings,
    names: Collection[str] | None,
    factor_fn: FactorFn | None,
    progress: bool,
) -> CandidateTable:
    started = time.perf_counter()
    plan = _selected_layers(model, config, names)
    calibration = settings.calibration
    group_size = config.group_size or _DEFAULT_GROUP
    probes = None if statistics is None else statistics.probes
    use_velocity = (
        factor_fn is None and calibration.sensitivity == "velocity" and probes is not None and len(probes) > 0
    )
    if use_velocity:
        reference = [model_output(model, a, k).detach() for a, k in probes.calls]
        factor_fn = partial(_velocity_factor, model, probes=probes, reference=reference)
    overrides = list(config.module_overrides or {})
    rows: list[_LayerCandidates] = []
    for layer in tqdm(plan, desc="OTQ sensitivity", unit="layer", disable=not progress):
        stats = None if statistics is None else statistics.get(layer.name)
        pinned = any(matches_module_name(layer.name, [p]) for p in overrides)
        weight = layer.module.weight
        specs = [layer.spec] if pinned else candidate_specs(layer.spec, weight[0].numel(), group_size, weight.shape[0])
        rows.append(_layer_candidates(layer, specs, stats, settings, pinned, None if pinned else factor_fn))
    if factor_fn is not None:
        sensitivity = "velocity" if use_velocity else "custom"
    else:
        sensitivity = "output" if statistics is not None else "weights"
    logger.info(
        "OTQ candidates of %d layers measured (%s, %s sensitivity) in %.1f s",
        len(plan), settings.estimate, sensitivity, time.perf_counter() - started,
    )  # fmt: skip
    return CandidateTable(
        layers=tuple(plan),
        options=tuple(r.specs for r in rows),
        sizes=tuple(r.sizes for r in rows),
        errors=tuple(r.errors for r in rows),
        distortions=tuple(tuple(r.factor * e for e in r.errors) for r in rows),
        fixed=tuple(r.pinned for r in rows),
        sensitivity=sensitivity,
        estimate=settings.estimate,
    )


@dataclass(frozen=True)
class _LayerCandidates:
    specs: tuple[LayerSpec, ...]
    sizes: tuple[int, ...]
    errors: tuple[float, ...]
    factor: float
    pinned: bool


def _layer_candidates(
    layer: PlannedLayer,
    specs: Sequence[LayerSpec],
    stats: LayerStatistics | None,
    settings: _Settings,
    pinned: bool,
    factor_fn: FactorFn | None,
) -> _LayerCandidates:
    """Sizes, (estimated) relative errors and the sensitivity factor of one layer's candidates ``specs``."""
    weight = layer.module.weight
    subject = Subject.create(layer, stats, settings.calibration, settings.sample_rows)
    calibration = settings.calibration
    branches: dict[int, torch.Tensor] = {}  # rank -> U V of the whole weight (sampled low-rank candidates)
    sizes = [spec_nbytes(weight, spec) for spec in specs]
    errors: list[float] = []
    fits: dict[int, torch.Tensor] = {}  # candidate -> effective weight of the whole layer (when fitted whole)
    for i, spec in enumerate(specs):
        if not pinned and spec.bits not in FITTED_BITS and spec.granularity != "tensor":
            anchor = next(
                j for j, s in enumerate(specs) if s.bits == 4 and s.granularity == spec.granularity and not s.rank
            )  # extrapolate from the 4-bit fit of the same granularity
            errors.append(errors[anchor] * 4.0 ** (4 - spec.bits))
            continue
        effective = fit_candidate(subject, spec, stats, calibration, branches)
        if subject.rows is None:
            fits[i] = effective
        errors.append(subject.meter(effective))
    factor = 1.0
    probe = min((i for i, s in enumerate(specs) if s.bits == PROBE_BITS), key=lambda i: (sizes[i], i), default=None)
    if factor_fn is not None and probe is not None:
        if probe in fits:
            effective, error = fits[probe], errors[probe]
        else:  # the factor needs the whole layer quantized
            whole = replace(subject, part=layer, rows=None)
            effective = fit_candidate(whole, specs[probe], stats, calibration, {})
            error = ErrorMeter(weight, stats, calibration.damping, subject.centered)(effective)
        factor = factor_fn(layer, effective.reshape(weight.shape), error) if error > 0 else 0.0
    return _LayerCandidates(tuple(specs), tuple(sizes), tuple(errors), factor, pinned)


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
    *,
    probes: ProbeInputs,
    reference: list[torch.Tensor],
) -> float:
    """``D_l / e_l``: the model's velocity error with ``layer`` alone at ``effective``, per unit of its relative
    output error (the :data:`FactorFn` of ``sensitivity="velocity"``)."""
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
