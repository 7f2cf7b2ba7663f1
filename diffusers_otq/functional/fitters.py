"""Codebook fitters: every quantization method is a function ``rows -> (codebook, optional codes)``.

All fitters share one contract, so storage, packing and layers never depend on the method:

* input ``values``: (R, n) float tensor, one row per codebook, with ``n > K`` (rows with ``n <= 2**bits``
  are stored losslessly by the caller and never reach a fitter);
* input ``num_levels``: K = 2**bits;
* input ``weights``: optional (R, n) non-negative importance weights (only ``"ot"`` uses them: with group
  scales the error of a normalised value counts ``scale**2`` times);
* output :class:`CodebookFit`: ``codebook`` (R, K) ascending along dim 1 and ``codes`` (R, n) int64, or
  ``codes=None`` when the method assigns every value to its nearest codeword (the caller then assigns
  against the codebook *after* rounding it to its storage dtype).

Methods (see ../shared/docs/paper.md for the paper's exact definitions):

* ``"ot"``: W2-optimal K atoms with free masses (1-D k-means / Lloyd-Max), nearest-codeword assignment.
* ``"ot-vp"``: variance-preserving OT: the Lloyd-Max cells, with the codewords stretched about the row mean so
  the quantized row keeps the row's variance (:func:`fit_ot_variance_preserving`).
* ``"ot-equal-mass"``: the paper's OT quantizer: sort, cut into K contiguous equal-count chunks with numpy
  ``array_split`` sizes (the first ``n % K`` chunks hold one more value), codeword = chunk mean,
  assignment by rank.
* ``"uniform"``: min-max affine grid ``min + k * (max - min) / (K - 1)``, code = ``round((x - min) / step)``.
* ``"piecewise"``: K + 1 linearly interpolated empirical quantiles at probabilities ``k / K`` as
  breakpoints, codeword = interval midpoint, assignment by interval.
* ``"log2"``: sign-split geometric levels between the smallest and largest magnitude of each sign
  (K/2 levels per sign, K for an all-positive row, K/2 for an all-negative row), nearest assignment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .lloyd_max import FULL_EFFORT, START_EFFORT, LloydEffort, accumulation_dtype, lloyd_max_codebook


__all__ = ["CodebookFit", "EFFORTS", "FITTERS", "METHODS", "fit_codebook", "stretch_to_variance"]


@dataclass(frozen=True)
class CodebookFit:
    """Result of a fitter.

    Attributes:
        codebook: (R, K) codewords, ascending along dim 1, in a float dtype of at least the input's precision.
        codes: (R, n) int64 codeword indices, or None for nearest-codeword assignment by the caller.
    """

    codebook: torch.Tensor
    codes: torch.Tensor | None


Fitter = Callable[[torch.Tensor, int, "torch.Tensor | None"], CodebookFit]


def fit_ot(
    values: torch.Tensor, num_levels: int, weights: torch.Tensor | None = None, effort: LloydEffort = FULL_EFFORT
) -> CodebookFit:
    """W2-optimal codebook with free atom masses (see :mod:`.lloyd_max`); nearest-codeword assignment.
    ``effort`` sets how closely Lloyd-Max approaches the optimum."""
    if weights is None:
        sorted_values = values.sort(dim=1).values
        sorted_weights = None
    else:
        sorted_values, order = values.sort(dim=1)
        sorted_weights = weights.gather(1, order)
        del order
    codebook = lloyd_max_codebook(
        sorted_values, num_levels, sorted_weights, effort.max_iterations, effort.num_microbins,
        refine_rounds=effort.refine_rounds,
    )  # fmt: skip
    return CodebookFit(codebook, None)


def fit_ot_variance_preserving(
    values: torch.Tensor, num_levels: int, weights: torch.Tensor | None = None, effort: LloydEffort = FULL_EFFORT
) -> CodebookFit:
    """Lloyd-Max cells with codewords stretched about the mean so that the quantized row keeps the row's variance.

    Lloyd-Max codewords are cell means, so the quantized row ``Q`` satisfies ``E[W | Q] = Q``, hence
    ``E[Q] = E[W]`` and ``Var(Q) = Var(W) - MSE``: every quantized layer shrinks its weights' spread, and the
    shrinkage compounds through the network (measured: activations lose variance layer after layer at 2 bits).
    This fitter keeps the cells (codes = nearest Lloyd-Max codeword) and maps every codeword ``c`` to

        c' = m + (c - m) * sqrt(Var(W) / Var(Q)),        m = E[W] = E[Q],

    so ``Var(Q') = Var(W)``. Because ``E[W | Q] = Q`` the cross term vanishes and the price in error is exact:
    ``MSE' = MSE + (std(W) - std(Q))**2``. Means and variances are weighted by ``weights`` when given (with
    group scales: the moments of the actual weights). The map is increasing, so codebooks stay ascending.

    Returns:
        :class:`CodebookFit` with the stretched (R, K) codebook and the (R, n) Lloyd-Max cell codes.
    """
    fit = fit_ot(values, num_levels, weights, effort)
    midpoints = ((fit.codebook[:, 1:] + fit.codebook[:, :-1]) * 0.5).contiguous()
    codes = torch.searchsorted(midpoints, values.contiguous())  # nearest codeword of an ascending codebook
    return CodebookFit(stretch_to_variance(values, fit.codebook, codes, weights), codes)


def stretch_to_variance(
    values: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``m + (codebook - m) * sqrt(Var(values) / Var(codebook[codes]))`` per row (see :func:`fit_ot_variance_preserving`).

    Args:
        values: (R, n) the values the codebook quantizes.
        codebook: (R, K) ascending codewords, or (1, K) shared by all rows (moments are then over all values).
        codes: (R, n) codeword indices of ``values``.
        weights: optional (R, n) non-negative weights of the moments.

    Returns:
        The stretched codebook, same shape and dtype as ``codebook``; rows whose quantized variance is 0 are kept.
    """
    acc = accumulation_dtype(values.device)
    x, book = values.to(acc), codebook.to(acc)
    w = torch.ones_like(x) if weights is None else weights.to(acc)
    if book.shape[0] == 1 and x.shape[0] != 1:
        x, w, codes = x.reshape(1, -1), w.reshape(1, -1), codes.reshape(1, -1)
    quantized = book.gather(1, codes.to(torch.int64))
    total = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    mean = (w * x).sum(dim=1, keepdim=True) / total
    var_values = (w * (x - mean).square()).sum(dim=1, keepdim=True) / total
    var_quantized = (w * (quantized - mean).square()).sum(dim=1, keepdim=True) / total
    ratio = var_values / var_quantized.clamp_min(torch.finfo(acc).tiny)
    stretch = torch.where(var_quantized > 0, ratio.sqrt(), torch.ones_like(ratio))
    return (mean + (book - mean) * stretch).to(codebook.dtype)


def array_split_edges(n: int, num_chunks: int, device: torch.device | None = None) -> torch.Tensor:
    """(K+1,) chunk edges of ``numpy.array_split(range(n), K)``: the first ``n % K`` chunks get one extra."""
    k = torch.arange(num_chunks + 1, device=device)
    return k * (n // num_chunks) + k.clamp(max=n % num_chunks)


def fit_equal_mass(values: torch.Tensor, num_levels: int, weights: torch.Tensor | None = None) -> CodebookFit:
    """The paper's equal-mass OT codebook: chunk means of the sorted row, assignment by rank."""
    rows, n = values.shape
    sorted_values, order = values.sort(dim=1, stable=True)
    edges = array_split_edges(n, num_levels, values.device)  # (K+1,)
    acc = accumulation_dtype(values.device)
    prefix = torch.zeros(rows, n + 1, dtype=acc, device=values.device)
    torch.cumsum(sorted_values, dim=1, dtype=acc, out=prefix[:, 1:])
    sums = prefix[:, edges[1:]] - prefix[:, edges[:-1]]  # (R, K)
    codebook = sums / (edges[1:] - edges[:-1]).to(acc)
    chunk_of_rank = torch.bucketize(torch.arange(n, device=values.device), edges[1:], right=True)  # (n,)
    codes = torch.empty(rows, n, dtype=torch.int64, device=values.device)
    codes.scatter_(1, order, chunk_of_rank.expand(rows, n))
    return CodebookFit(codebook, codes)


def fit_uniform(values: torch.Tensor, num_levels: int, weights: torch.Tensor | None = None) -> CodebookFit:
    """Asymmetric min-max grid with ``K`` levels including both end points; constant rows stay exact."""
    lo = values.amin(dim=1, keepdim=True)
    hi = values.amax(dim=1, keepdim=True)
    step = (hi - lo) / (num_levels - 1)  # (R, 1)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((values - lo) / safe_step).clamp_(0, num_levels - 1).to(torch.int64)
    codes = torch.where(step > 0, codes, torch.zeros_like(codes))
    levels = torch.arange(num_levels, device=values.device, dtype=values.dtype)
    return CodebookFit(lo + levels * step, codes)


def linear_quantiles(sorted_values: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Row-wise empirical quantiles with linear interpolation (numpy's default ``"linear"`` method).

    Args:
        sorted_values: (R, n) rows sorted ascending.
        probabilities: (Q,) in [0, 1].

    Returns:
        (R, Q) quantiles ``x[lo] + frac * (x[lo + 1] - x[lo])`` at positions ``p * (n - 1)``.
    """
    n = sorted_values.shape[1]
    position = probabilities.to(torch.float64) * (n - 1)
    lo = position.floor().to(torch.int64).clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (position - lo.to(torch.float64)).to(sorted_values.dtype)
    x_lo, x_hi = sorted_values[:, lo], sorted_values[:, hi]
    return x_lo + frac * (x_hi - x_lo)


def fit_piecewise(values: torch.Tensor, num_levels: int, weights: torch.Tensor | None = None) -> CodebookFit:
    """The paper's "piecewise" quantizer: equal-probability quantile intervals, codeword = interval midpoint."""
    sorted_values = values.sort(dim=1).values
    probabilities = torch.arange(num_levels + 1, device=values.device, dtype=torch.float64) / num_levels
    breakpoints = linear_quantiles(sorted_values, probabilities)  # (R, K+1), first = min, last = max
    codebook = (breakpoints[:, :-1] + breakpoints[:, 1:]) * 0.5
    codes = torch.searchsorted(breakpoints[:, 1:-1].contiguous(), values, right=True)  # interval index 0..K-1
    return CodebookFit(codebook, codes)


def _geometric_levels(smallest: torch.Tensor, largest: torch.Tensor, count: int) -> torch.Tensor:
    """(R, count) levels ``a * (b / a) ** (i / (count - 1))``; a single level is ``a``. Needs a, b > 0."""
    if count == 1:
        return smallest
    exponents = torch.arange(count, device=smallest.device, dtype=smallest.dtype) / (count - 1)
    return smallest * (largest / smallest) ** exponents


def fit_log2(values: torch.Tensor, num_levels: int, weights: torch.Tensor | None = None) -> CodebookFit:
    """The paper's "LogBase2" quantizer: sign-split geometric levels, nearest assignment in the linear domain."""
    acc = accumulation_dtype(values.device)
    x = values.to(acc)
    inf = torch.tensor(float("inf"), dtype=acc, device=x.device)
    positive, negative = x > 0, x < 0
    has_pos, has_neg = positive.any(dim=1, keepdim=True), negative.any(dim=1, keepdim=True)
    magnitude = x.abs()
    # Guards (1.0) keep the geometric formula finite on rows without values of that sign.
    pos_lo = torch.where(has_pos, torch.where(positive, magnitude, inf).amin(dim=1, keepdim=True), 1.0)
    pos_hi = torch.where(has_pos, torch.where(positive, magnitude, -inf).amax(dim=1, keepdim=True), 1.0)
    neg_lo = torch.where(has_neg, torch.where(negative, magnitude, inf).amin(dim=1, keepdim=True), 1.0)
    neg_hi = torch.where(has_neg, torch.where(negative, magnitude, -inf).amax(dim=1, keepdim=True), 1.0)
    half = num_levels // 2
    positive_only = _geometric_levels(pos_lo, pos_hi, num_levels)  # (R, K)
    negative_part = -_geometric_levels(neg_lo, neg_hi, half).flip(1)  # (R, K/2), ascending
    positive_part = torch.where(has_pos, _geometric_levels(pos_lo, pos_hi, half), negative_part[:, -1:])
    split = torch.cat([negative_part, positive_part], dim=1)
    codebook = torch.where(has_neg, split, torch.where(has_pos, positive_only, torch.zeros_like(split)))
    return CodebookFit(codebook.sort(dim=1).values, None)


FITTERS: dict[str, Fitter] = {
    "ot": fit_ot,
    "ot-vp": fit_ot_variance_preserving,
    "ot-equal-mass": fit_equal_mass,
    "uniform": fit_uniform,
    "piecewise": fit_piecewise,
    "log2": fit_log2,
}
METHODS: tuple[str, ...] = tuple(FITTERS)


EFFORTS: tuple[str, ...] = ("full", "start")
"""``"full"``: the method's own fit. ``"start"``: for ``"ot"``/``"ot-vp"`` a coarser, several times faster
Lloyd-Max (:data:`~.lloyd_max.START_EFFORT`), for fits that only start from it (error feedback with codebook
refits); the other methods have one effort."""


def fit_codebook(
    values: torch.Tensor, num_levels: int, method: str, weights: torch.Tensor | None = None, effort: str = "full"
) -> CodebookFit:
    """Dispatch to the fitter of ``method`` (one of :data:`METHODS`) with ``effort`` (one of :data:`EFFORTS`);
    see the module docstring for the contract."""
    try:
        fitter = FITTERS[method]
    except KeyError:
        raise ValueError(f"method={method!r} is unknown; expected one of {list(METHODS)}.") from None
    if effort not in EFFORTS:
        raise ValueError(f"effort={effort!r} is unknown; expected one of {list(EFFORTS)}.")
    if effort == "start" and fitter in (fit_ot, fit_ot_variance_preserving):
        fitter = partial(fitter, effort=START_EFFORT)
    # Every fitter is equivariant to scaling a row, and scaling by a power of two is exact in floating point, so
    # rows (and weights) are brought to absmax in [0.5, 1) first: the same bits for ordinary rows, and rows at
    # 1e30 or 1e-40 no longer overflow or underflow the squares inside the fits.
    values, row_scale = _power_of_two_normalised(values)
    if weights is not None:
        weights, _ = _power_of_two_normalised(weights)
    fit = fitter(values, num_levels, weights)
    return CodebookFit(torch.ldexp(fit.codebook, row_scale.to(fit.codebook.device)), fit.codes)


def _power_of_two_normalised(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values * 2**-e, e)`` with ``e`` (R, 1) int32 chosen per row so that the row's absmax lies in [0.5, 1)
    (``e = 0`` for all-zero rows); exact, as only exponents change."""
    _, exponent = torch.frexp(values.abs().amax(dim=1, keepdim=True))
    if not bool(exponent.any()):
        return values, exponent
    return torch.ldexp(values, -exponent), exponent
