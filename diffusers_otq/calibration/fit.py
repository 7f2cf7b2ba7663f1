"""Calibrated quantization of one layer: activation-weighted codebooks, then error feedback with codebook refits.

For a layer with input statistics (:class:`~.statistics.LayerStatistics`) the fit runs in two stages, both
producing the ordinary packed format (:class:`~diffusers_otq.QuantizedTensor`), so nothing changes at load
time:

1. **Activation-aware codebooks.** ``quantize_tensor(..., importance=E[x_j^2] + damping * mean)``: weighted
   Lloyd-Max (and its variance-preserving stretch for ``"ot-vp"``) minimising ``sum_j E[x_j^2] (w_j - q_j)^2``,
   the expected output error under uncorrelated inputs.
2. **Error feedback** (with a Gram matrix and ``error_feedback=True``): the GPTQ column sweep (in act-order)
   rounds each weight to its row's codebook while pushing the rounding error onto the columns not yet rounded,
   then the codewords are refitted by least squares on the output error
   (:mod:`diffusers_otq.functional.error_feedback`), at most ``refit_rounds`` times: the alternation stops once a
   round lowers the output error by less than ``refit_tolerance``, or once a refit does (the next sweep would
   start from nearly the same codebook and find the same codes). For each row (each codebook, if shared) the
   result with the lowest output error ``tr((W - Q) (H + weight_ridge * mean(diag H) I) (W - Q)^T)`` is kept,
   including the stage-1 result, so stage 2 never makes it worse; the small ridge bounds the weight error where
   ``H`` is (nearly) singular. Rows are independent given ``H``: the sweeps, refits and errors run on row chunks
   on every core torch may use, with the same bits for any thread count.
3. **Bias correction** (layers with a bias, ``bias_correction=True``): the quantized layer's mean output error
   ``(W - Q) E[x]`` is added to the bias, which removes it exactly. Then only the input *covariance* matters,
   so stages 1 and 2 use centred statistics (``Var[x_j]``, ``Cov[x]``) for such layers.

With an input rotation in the layer's spec, the weight and the statistics are rotated first
(:meth:`~.statistics.LayerStatistics.rotated`); with a rank, stages 1-2 fit the residual of a low-rank branch
fitted in the same output-error norm, alternating (:func:`~diffusers_otq.fitting.alternate_lowrank`), and the
bias correction uses the whole approximation ``U V + Q``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import replace

import torch

from ..convert import LayerFit, PlannedLayer
from ..fitting import alternate_lowrank, fit_data_free, layer_rotation
from ..functional.codebook_storage import store_codebook
from ..functional.error_feedback import (
    error_feedback_codes_in_order,
    ordered_factors,
    output_error,
    output_errors,
    refit_codebook,
    ridge_gram,
    sort_codebook,
)
from ..functional.lowrank import weighted_lowrank
from ..functional.packing import pack_codes
from ..functional.scales import decode_group_scales
from ..functional.vector_codebooks import scalar_view_codes
from ..functional.vector_feedback import vector_error_feedback_codes, vector_sweep_factors
from ..options import LayerSpec
from ..quantized_tensor import QuantizedTensor, quantize_tensor
from ..structure import lowrank_dtype
from .config import CalibrationConfig
from .statistics import CalibrationStatistics, LayerStatistics


__all__ = ["LayerQuantizer", "calibrated_quantizer", "corrects_bias", "importance_rows", "quantize_calibrated"]

logger = logging.getLogger(__name__)

LayerQuantizer = Callable[[PlannedLayer, torch.Tensor], "QuantizedTensor | LayerFit"]
_WEIGHTED_METHODS = ("ot", "ot-vp")
STOP_WHEN_REFIT_STALLS = True
"""End the sweep/refit alternation after a refit that lowers the output error by less than ``refit_tolerance``
(scripts/bench_fit.py measures the fit with and without this stop)."""


def importance_rows(stats: LayerStatistics, out_features: int, damping: float, centered: bool = False) -> torch.Tensor:
    """(out, n) float64 importance of each weight: its input's ``E[x_j^2]`` (``Var[x_j]`` when ``centered``)
    plus ``damping * mean``.

    Row ``r`` of a grouped conv reads input group ``r // (out / G)``.
    """
    moments = stats.second_moments(centered)  # (G, n)
    floor = damping * moments.mean(dim=1, keepdim=True)
    moments = moments + floor.clamp_min(torch.finfo(torch.float64).tiny)
    return moments.repeat_interleave(out_features // stats.groups, dim=0)


def _row_scales(quantized: QuantizedTensor, rows: int, n: int) -> torch.Tensor | None:
    if quantized.scale_codes is None:
        return None
    scales = decode_group_scales(quantized.scale_codes, quantized.scale_max, quantized.scale_step, torch.float64)
    groups = scales.shape[1]
    return scales[:, :, None].expand(rows, groups, n // groups).reshape(rows, n)


_last_operators: tuple[weakref.ref, tuple, tuple[list, list]] | None = None
"""The last layer's sweep factors and objective Grams: every candidate setting of a layer (the bits allocator fits
a dozen) sweeps with the same ones, so they are computed once per layer (one entry: memory of one layer)."""


def _sweep_operators(
    stats: LayerStatistics, centered: bool, calibration: CalibrationConfig, vector_dim: int = 1
) -> tuple[list[list], list[list[torch.Tensor]]]:
    """Per input group: the sweep's factors of each Gram block (scalar codes: ``(order, F)`` of
    :func:`ordered_factors`; vector codes: :func:`~diffusers_otq.functional.vector_feedback.vector_sweep_factors`),
    and the objective's float32 Gram blocks ``H + weight_ridge * mean(diag H) I`` (the ridge keeps directions ``H``
    never excites from absorbing large weight changes)."""
    global _last_operators
    key = (centered, calibration.damping, calibration.act_order, calibration.weight_ridge, vector_dim)
    last = _last_operators
    if last is not None and last[0]() is stats and last[1] == key:
        return last[2]
    grams64 = [stats.gram_blocks(g, centered) for g in range(stats.groups)]
    if vector_dim > 1:
        factors = [vector_sweep_factors(g, vector_dim, calibration.damping, calibration.act_order) for g in grams64]
    else:
        factors = [ordered_factors(g, calibration.damping, calibration.act_order) for g in grams64]
    grams = [[ridge_gram(block, calibration.weight_ridge).to(torch.float32) for block in g] for g in grams64]
    _last_operators = (weakref.ref(stats), key, (factors, grams))
    return factors, grams


def _error_feedback(
    weight: torch.Tensor,
    start: QuantizedTensor,
    stats: LayerStatistics,
    calibration: CalibrationConfig,
    name: str,
    centered: bool,
    refit_codebooks: bool,
) -> QuantizedTensor:
    """Stage 2 on top of the stage-1 result ``start`` (see the module docstring); returns the best of all.

    Per-row codebooks are kept row by row (each row's codes and codebook from the round where that row's output
    error was lowest; rows are independent given the Gram); a shared codebook is kept whole.

    Vector codebooks (``d > 1``) are handled through their scalar view: (R, n) codes ``k * d + i`` into the flat
    (C, K * d) codebook (:func:`~diffusers_otq.functional.vector_codebooks.scalar_view_codes`), with which the
    output errors and the least-squares refits are those of the scalar case; only the sweep differs (block by
    block, :mod:`diffusers_otq.functional.vector_feedback`), and codewords are not sorted.
    """
    rows = weight.shape[0]
    n = weight[0].numel()
    dim = start.vector_dim
    target = weight.detach().reshape(rows, n).to(torch.float32)
    storage = start.codebook.dtype  # int8: the codewords are refitted in float and rounded per codebook
    scales = _row_scales(start, rows, n) if start.granularity == "group" else None
    scales = None if scales is None else scales.to(torch.float32)
    codes = scalar_view_codes(start.codes().reshape(rows, n // dim), dim)
    codebook = start.flat_codebook.to(torch.float32)
    groups = stats.groups
    per_group = rows // groups
    factors, grams = _sweep_operators(stats, centered, calibration, dim)
    shared = codebook.shape[0] == 1
    refit = refit_codebooks and not (shared and groups > 1)  # one codebook over several input groups: sweep only

    def group_rows(g: int) -> slice:
        return slice(g * per_group, (g + 1) * per_group)

    def group_scales(g: int) -> torch.Tensor | None:
        return None if scales is None else scales[group_rows(g)]

    def group_book(book: torch.Tensor, g: int) -> torch.Tensor:
        return book if shared else book[group_rows(g)]

    def row_errors(c: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """(R,) float64 output error of each row."""
        return torch.cat(
            [output_errors(target[group_rows(g)], c[group_rows(g)], group_book(book, g), grams[g], group_scales(g))
             for g in range(groups)]
        )  # fmt: skip

    def sweep(book: torch.Tensor) -> torch.Tensor:
        """(R, n) codes (scalar view) of the error-feedback sweep of every input group's rows into ``book``."""

        def group_codes(g: int) -> torch.Tensor:
            weight_g, book_g, scales_g = target[group_rows(g)], group_book(book, g), group_scales(g)
            if dim == 1:
                return error_feedback_codes_in_order(weight_g, factors[g], book_g, scales_g, calibration.sweep_block)
            vectors = book_g.reshape(book_g.shape[0], -1, dim)
            codes_g = vector_error_feedback_codes(weight_g, factors[g], vectors, scales_g, calibration.sweep_block)
            return scalar_view_codes(codes_g, dim)

        return torch.cat([group_codes(g) for g in range(groups)])

    def refitted(c: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(errors of (c, book), sorted refitted codebook, renumbered codes, their errors)``; errors per row, or
        (1,) sums for a shared codebook."""
        fits = [
            refit_codebook(
                target[group_rows(g)],
                c[group_rows(g)],
                grams[g],
                group_book(book, g),
                group_scales(g),
                storage_dtype=storage,
            )
            for g in range(groups)  # one group when the codebook is shared
        ]
        start_errors = torch.cat([fit.start_errors for fit in fits])
        solved = torch.cat([fit.codebook for fit in fits]).to(torch.float32)
        errors = torch.cat([fit.errors for fit in fits])
        if shared:
            start_errors = start_errors.sum(dim=0, keepdim=True)
        if dim > 1:  # a vector's entries are not interchangeable: no sorting
            return start_errors, solved, c, errors
        return start_errors, *sort_codebook(solved, c), errors

    best_codes, best_book = codes.clone(), codebook.clone()
    best_errors = row_errors(codes, codebook)
    if shared:
        best_errors = best_errors.sum(dim=0, keepdim=True)
    first_error = float(best_errors.sum())

    def keep(c: torch.Tensor, book: torch.Tensor, errors: torch.Tensor) -> None:
        """Keep the rows (or the shared codebook) of ``(c, book)`` whose ``errors`` beat the best so far."""
        better = errors < best_errors  # (R,) or (1,)
        if shared:
            if bool(better[0]):
                best_codes.copy_(c)
                best_book.copy_(book)
                best_errors.copy_(errors)
            return
        best_codes[better] = c[better]
        best_book[better] = book[better]
        best_errors[better] = errors[better]

    for round_index in range(max(1, calibration.refit_rounds)):
        round_start = float(best_errors.sum())
        codes = sweep(codebook)
        if not refit:
            errors = row_errors(codes, codebook)
            keep(codes, codebook, errors.sum(dim=0, keepdim=True) if shared else errors)
            break
        swept_errors, refit_book, refit_codes, refit_errors = refitted(codes, codebook)
        keep(codes, codebook, swept_errors)
        codebook, codes = refit_book, refit_codes
        keep(codes, codebook, refit_errors)
        if round_index > 0 and float(best_errors.sum()) > round_start * (1 - calibration.refit_tolerance):
            break  # converged: this round bought less than refit_tolerance
        stalled = float(refit_errors.sum()) > float(swept_errors.sum()) * (1 - calibration.refit_tolerance)
        if STOP_WHEN_REFIT_STALLS and stalled:
            break  # the refit barely moved the codebook: the next sweep would find the same codes
    logger.debug("%s: output error %.4g -> %.4g with error feedback", name, first_error, float(best_errors.sum()))
    stored_codes = best_codes[:, ::dim] // dim  # the scalar view's first entry of each vector -> vector codes
    book = best_book.reshape(start.codebook.shape)
    codebook, codebook_scale = store_codebook(book, storage)
    return replace(
        start,
        packed=pack_codes(stored_codes.to(torch.uint8), start.code_bits),
        codebook=codebook,
        codebook_scale=codebook_scale,
    )


def corrects_bias(layer: PlannedLayer, stats: LayerStatistics | None, calibration: CalibrationConfig) -> bool:
    """Whether the fit of ``layer`` corrects its bias (and therefore works with centred statistics)."""
    return calibration.bias_correction and stats is not None and getattr(layer.module, "bias", None) is not None


def quantize_calibrated(
    weight: torch.Tensor,
    layer: PlannedLayer,
    stats: LayerStatistics | None,
    calibration: CalibrationConfig,
    *,
    refit_codebooks: bool = True,
) -> LayerFit:
    """Quantize one layer's ``weight`` with its statistics (data-free when ``stats`` is None).

    With a rotation in ``layer.spec`` the weight and the statistics are rotated first; with a rank, the low-rank
    branch is fitted in the activation-weighted norm and alternated with the codes
    (:func:`~diffusers_otq.fitting.alternate_lowrank`), the kept round having the lowest output error.

    Args:
        weight: the float weight, (out, in) or (out, in/groups, kh, kw).
        layer: the planned layer (name, module and :class:`~diffusers_otq.LayerSpec`).
        stats: the layer's input statistics, or None.
        calibration: damping, error feedback, refit and bias-correction settings.
        refit_codebooks: False runs a single error-feedback sweep without codebook refits (the bits allocator
            ranks its candidates that way).

    Returns:
        A :class:`~diffusers_otq.convert.LayerFit`: the quantized weight in the layout ``layer.spec`` implies,
        the spec's low-rank branch and rotation and, with bias correction, the corrected bias.
    """
    if stats is None:
        return fit_data_free(weight, layer.spec, layer.name)
    stats = stats.to(weight.device)
    out = weight.shape[0]
    if weight[0].numel() != stats.width:
        raise ValueError(
            f"layer {layer.name!r}: the statistics describe inputs of width {stats.width}, but the weight "
            f"{tuple(weight.shape)} reads {weight[0].numel()}; they come from another model."
        )
    rotation = layer_rotation(weight, layer.spec, layer.name)
    target = weight.detach()
    if rotation is not None:
        taps = weight[0, 0].numel()
        stats = stats.rotated(rotation.signs(torch.float64), rotation.block, taps, layer.name)
        target = rotation.rotate(target.to(torch.float32), dim=1).to(weight.dtype)
    centered = corrects_bias(layer, stats, calibration)

    def fit_codes(residual: torch.Tensor) -> QuantizedTensor:
        return _fit_codes(
            residual, layer, stats, calibration, centered, refit_codebooks and calibration.refit_codebooks
        )

    quantized, branch = alternate_lowrank(
        target,
        layer.spec.rank,
        quantize=fit_codes,
        lowrank=lambda residual: weighted_lowrank(
            residual,
            layer.spec.rank,
            stats.gram_blocks(0, centered),
            moments=stats.second_moments(centered)[0],
            damping=calibration.damping,
        ),
        error=lambda delta: _objective(delta, stats, calibration, centered),
        storage_dtype=lowrank_dtype(weight.dtype),
    )
    bias = None
    if centered:
        effective = quantized.dequantize(torch.float64).reshape(out, -1)
        if branch is not None:
            effective = effective + branch.product(torch.float64)
        bias = _corrected_bias(target, effective, stats, layer.module.bias)
    return LayerFit(quantized, bias, branch, rotation)


def _fit_codes(
    weight: torch.Tensor,
    layer: PlannedLayer,
    stats: LayerStatistics,
    calibration: CalibrationConfig,
    centered: bool,
    refit_codebooks: bool,
) -> QuantizedTensor:
    """Stages 1 and 2 (see the module docstring) on ``weight``: the codes of one weight or residual."""
    kwargs = layer.spec.quantize_kwargs()
    importance = importance_rows(stats, weight.shape[0], calibration.damping, centered)  # (out, n)
    if layer.spec.granularity == "tensor":
        importance = importance.reshape(1, -1)
    use_importance = layer.spec.method in _WEIGHTED_METHODS
    feedback = calibration.error_feedback and stats.has_gram  # (gram_blocks() would copy every block)
    # codebooks the refits replace only need to be a good start (see functional.fitters.EFFORTS)
    effort = "start" if feedback and _starts_coarse(layer.spec, refit_codebooks) else "full"
    quantized = quantize_tensor(
        weight, name=layer.name, importance=importance if use_importance else None, effort=effort, **kwargs
    )
    lossless = (
        quantized.codebook.shape[1] * quantized.vector_dim >= weight[0].numel() and quantized.codebook.shape[0] > 1
    )
    if feedback and not lossless:
        quantized = _error_feedback(weight, quantized, stats, calibration, layer.name, centered, refit_codebooks)
    return quantized


def _starts_coarse(spec: LayerSpec, refit_codebooks: bool) -> bool:
    """Whether stage 1 of a layer fitted with ``spec`` may fit coarse codebooks: per-row codebooks that the
    error feedback refits (one codebook per tensor costs little to fit well, and stays closer to its start)."""
    per_row = spec.granularity == "channel" or (spec.granularity == "group" and spec.codebook_scope == "channel")
    return refit_codebooks and per_row


def _objective(delta: torch.Tensor, stats: LayerStatistics, calibration: CalibrationConfig, centered: bool) -> float:
    """Output error of a (R, n) weight error: ``tr(D (H + weight_ridge mean(diag H) I) D^T)`` with the Gram, or
    ``sum_j E[x_j^2] D_j^2`` with second moments only (one input group)."""
    blocks = stats.gram_blocks(0, centered)
    if blocks is None:
        return float((delta.square() * stats.second_moments(centered)[0]).sum())
    grams = [ridge_gram(block, calibration.weight_ridge) for block in blocks]
    return float(output_error(delta, grams).sum())


def _corrected_bias(
    weight: torch.Tensor, effective: torch.Tensor, stats: LayerStatistics, bias: torch.Tensor
) -> torch.Tensor:
    """``b + (W - W_hat) E[x]`` per output (row ``r`` reads the mean input of its group), in the bias's dtype;
    ``effective`` is the (out, n) float64 stored approximation ``W_hat`` of ``weight``."""
    rows = weight.shape[0]
    delta = weight.detach().reshape(rows, -1).to(torch.float64) - effective
    mean = stats.mean().repeat_interleave(rows // stats.groups, dim=0)  # (out, n)
    shift = (delta * mean).sum(dim=1)
    return (bias.detach().to(torch.float64) + shift).to(bias.dtype)


def calibrated_quantizer(statistics: CalibrationStatistics | None, calibration: CalibrationConfig) -> LayerQuantizer:
    """A ``(layer, weight) -> QuantizedTensor`` function for :func:`~diffusers_otq.convert.convert_model`."""

    def quantize(layer: PlannedLayer, weight: torch.Tensor) -> LayerFit:
        stats = None if statistics is None else statistics.get(layer.name)
        return quantize_calibrated(weight, layer, stats, calibration)

    return quantize
