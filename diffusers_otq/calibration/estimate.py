"""What one layer's bits-allocation candidates are fitted to, and their relative output errors, whole or sampled.

The allocator (:mod:`.allocation`) needs, for every candidate setting ``s`` of a layer, the relative output error

    e(s) = sum_r d_r / sum_r E_r,     d_r = dW_r H dW_r^T,     E_r = W_r H W_r^T,

over the layer's rows ``r`` (``H``: the Gram of the row's input group). Given ``H``, rows are fitted independently
(per-row codebooks; the error-feedback sweep updates each row on its own), so a :class:`Subject` may be a
deterministic sample ``S`` of the rows (:func:`row_sample`: the same count from every input group, spread over the
rows' energies) and ``e(s)`` is estimated by the ratio ``sum_S d_r / sum_S E_r``. What does not split by rows is
handled apart: a codebook shared by the tensor is fitted to the sample's values; a low-rank branch is fitted to
the whole weight (:func:`lowrank_product`, on a randomized range sketch) and the sample's residual quantized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..convert import PlannedLayer
from ..fitting import effective_weight
from ..functional.allocation import stratified_rows
from ..functional.error_feedback import damped_gram, output_error
from ..functional.lowrank import weighted_lowrank
from ..options import LayerSpec
from ..structure import LowRankBranch, lowrank_dtype
from .config import CalibrationConfig
from .fit import corrects_bias, importance_rows, quantize_calibrated
from .statistics import LayerStatistics


__all__ = ["ErrorMeter", "RowSample", "Subject", "fit_candidate", "lowrank_product", "range_basis", "row_sample"]

SKETCH_OVERSAMPLING = 10  # range sketch of a sampled low-rank candidate: rank + this many columns ...
SKETCH_ITERATIONS = 2  # ... and this many power iterations


class ErrorMeter:
    """Relative output error ``tr(dW H dW^T) / tr(W H W^T)`` of a weight's rows (``H`` per input group).

    Args:
        weight: the reference rows, (R, ...) with rows first (a whole layer, or a sample taking the same number of
            rows from each of the statistics' input groups, in group order).
        stats: the layer's input statistics: the Gram blocks, else ``importance_rows`` (the diagonal), else none
            (the relative weight error).
        damping: the importance floor (without a Gram).
        centered: use the input covariance (layers whose bias absorbs the mean error).
    """

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


class RowSample(nn.Module):
    """Rows ``rows`` of a Linear/Conv2d: the weight and bias a candidate of the sampled estimate is fitted to."""

    def __init__(self, module: nn.Module, rows: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(module.weight.detach()[rows], requires_grad=False)
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach()[rows], requires_grad=False)


@dataclass(frozen=True)
class Subject:
    """What one layer's candidates are fitted to and measured on: the whole layer, or a sample of its rows."""

    layer: PlannedLayer  # the whole layer
    part: PlannedLayer  # its sampled rows (the layer itself when whole)
    rows: torch.Tensor | None  # (S,) the sampled rows, None: whole
    meter: ErrorMeter  # relative output error of ``part``
    centered: bool

    @classmethod
    def create(
        cls,
        layer: PlannedLayer,
        stats: LayerStatistics | None,
        calibration: CalibrationConfig,
        sample_rows: int | None,
    ) -> Subject:
        """``layer`` whole (``sample_rows`` None, or at least its rows) or its :func:`row_sample`."""
        centered = corrects_bias(layer, stats, calibration)
        rows = row_sample(layer.module.weight, stats, sample_rows, calibration.damping, centered)
        part = layer if rows is None else replace(layer, module=RowSample(layer.module, rows))
        meter = ErrorMeter(part.module.weight, stats, calibration.damping, centered)
        return cls(layer, part, rows, meter, centered)


def row_sample(
    weight: torch.Tensor, stats: LayerStatistics | None, sample_rows: int | None, damping: float, centered: bool
) -> torch.Tensor | None:
    """The rows a sampled estimate fits, or None to fit the whole layer.

    ``ceil(sample_rows / G)`` rows from each of the ``G`` input groups (:func:`stratified_rows` by the row energy
    ``sum_j importance_rj W_rj^2``, the diagonal of the output energy); None when ``sample_rows`` is None or a group
    has no more rows than that.

    Args:
        weight: (R, ...) the layer's weight.
        stats: its statistics (None: energy ``sum_j W_rj^2``, one group).
        sample_rows: rows to sample, or None.
        damping: the importance floor.
        centered: the importance of the input variance rather than ``E[x_j^2]``.

    Returns:
        (S,) ascending row indices on the weight's device, or None.
    """
    if sample_rows is None:
        return None
    rows = weight.shape[0]
    groups = 1 if stats is None else stats.groups
    per_group = -(-sample_rows // groups)
    if per_group >= rows // groups:
        return None
    flat = weight.detach().reshape(rows, -1).to(torch.float64)
    importance = 1.0 if stats is None else importance_rows(stats.to(weight.device), rows, damping, centered)
    return stratified_rows((flat.square() * importance).sum(dim=1), per_group, groups).to(weight.device)


def fit_candidate(
    subject: Subject,
    spec: LayerSpec,
    stats: LayerStatistics | None,
    calibration: CalibrationConfig,
    branches: dict[int, torch.Tensor],
) -> torch.Tensor:
    """(rows of ``subject.part``, n) float64 effective weight of ``subject.part`` fitted with ``spec``.

    One error-feedback sweep, no codebook refits (how the allocator ranks candidates). A low-rank ``spec`` on a row
    sample takes the branch of the whole weight (:func:`lowrank_product`) and quantizes the sample's residual;
    with an input rotation as well, the whole layer is fitted and the sampled rows read.

    Args:
        subject: the layer and what is fitted (whole or sampled rows).
        spec: the candidate setting.
        stats: the layer's statistics (None: data-free).
        calibration: damping and error-feedback settings.
        branches: ``rank -> U V`` of the whole weight, filled on first use and shared by a layer's candidates.
    """
    part = subject.part
    weight = part.module.weight
    if subject.rows is not None and spec.rank and spec.rotation_block:  # rotated branch: fit whole, read the rows
        whole = replace(subject.layer, spec=spec)
        fit = quantize_calibrated(whole.module.weight, whole, stats, calibration, refit_codebooks=False)
        return effective_weight(fit).reshape(whole.module.weight.shape[0], -1)[subject.rows]
    if subject.rows is None or not spec.rank:
        fit = quantize_calibrated(weight, replace(part, spec=spec), stats, calibration, refit_codebooks=False)
        return effective_weight(fit).reshape(weight.shape[0], -1)
    if spec.rank not in branches:
        weight_all = subject.layer.module.weight
        branches[spec.rank] = lowrank_product(weight_all, spec.rank, stats, calibration.damping, subject.centered)
    product = branches[spec.rank][subject.rows]  # (S, n)
    residual = (weight.detach().reshape(weight.shape[0], -1).to(torch.float64) - product).reshape(weight.shape)
    codes = replace(part, spec=replace(spec, rank=0))
    fit = quantize_calibrated(residual.to(weight.dtype), codes, stats, calibration, refit_codebooks=False)
    return effective_weight(fit).reshape(weight.shape[0], -1) + product


def lowrank_product(
    weight: torch.Tensor,
    rank: int,
    stats: LayerStatistics | None,
    damping: float,
    centered: bool,
) -> torch.Tensor:
    """(out, n) float64 ``U V`` of the whole weight in its storage dtype: the first alternation round's branch (the
    output-error-weighted rank-``rank`` approximation :func:`weighted_lowrank` gives), computed on a randomized
    range sketch (:func:`range_basis`) instead of the SVD of the whole weight."""
    flat = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    blocks = moments = None
    if stats is not None:
        stats = stats.to(weight.device)
        blocks, moments = stats.gram_blocks(0, centered), stats.second_moments(centered)[0]
    basis = range_basis(flat, rank + SKETCH_OVERSAMPLING, blocks, moments, damping)
    if basis is None:
        up, down = weighted_lowrank(flat, rank, blocks, moments, damping)
    else:
        up, down = weighted_lowrank(basis.T @ flat, rank, blocks, moments, damping)
        up = basis @ up
    return LowRankBranch.from_factors(up, down, lowrank_dtype(weight.dtype)).product(torch.float64)


def range_basis(
    flat: torch.Tensor,
    width: int,
    blocks: Sequence[torch.Tensor] | None,
    moments: torch.Tensor | None,
    damping: float,
) -> torch.Tensor | None:
    """(R, width) orthonormal basis of the dominant column space of ``T L`` (``T = flat`` (R, n), ``L L^T = H``
    the damped Gram, its diagonal, or I), or None when ``width >= min(R, n)``.

    A randomized range finder with two power iterations (Halko et al., 0909.4061): ``Y = (T H T^T)^2 T Omega``.
    If the basis ``P`` spans the top-``r`` left singular vectors of ``T L``, the weighted rank-``r`` approximation
    of ``P^T T`` (a ``width x n`` matrix) lifted by ``P`` is that of ``T``, for an SVD of ``width`` rows instead of
    ``R``. Deterministic (fixed seed).
    """
    rows, n = flat.shape
    if width >= min(rows, n):
        return None
    if blocks is not None:
        damped = [damped_gram(block, damping) for block in blocks]

        def gram(z: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [block @ part for block, part in zip(damped, z.split([b.shape[0] for b in damped]), strict=True)]
            )
    elif moments is not None:
        diagonal = (moments + damping * moments.mean())[:, None]

        def gram(z: torch.Tensor) -> torch.Tensor:
            return diagonal * z
    else:

        def gram(z: torch.Tensor) -> torch.Tensor:
            return z

    omega = torch.randn(n, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sketch = flat @ omega.to(flat.device)
    for _ in range(SKETCH_ITERATIONS):
        basis = torch.linalg.qr(sketch).Q
        sketch = flat @ gram(flat.T @ basis)
    return torch.linalg.qr(sketch).Q
