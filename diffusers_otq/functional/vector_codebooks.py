"""Vector optimal-transport codebooks: weighted k-means in ``d`` dimensions, batched over codebooks.

A row of ``n`` weights is cut into ``n / d`` consecutive vectors of ``d`` values; each vector is stored as the
index of one of ``K`` codewords of a ``d``-dimensional codebook. At ``b`` bits per weight a code has ``b * d``
bits, so ``K = 2**(b * d)``: 16 codewords of 2 values or 256 of 4 values at 2 bits per weight. The best such
codebook for a weighted empirical measure of vectors ``x_p`` (weights ``w_p``, one per component) is the
W2-optimal ``K``-atom approximation with free masses, i.e. weighted k-means with a diagonal metric per point:

    min over c_1..c_K of  sum_p min_k sum_i w_pi (x_pi - c_ki)^2.

For ``d = 1`` it is the Lloyd-Max problem of :mod:`.lloyd_max`. Space filling is what the extra dimensions buy:
on Gaussian data at 2 bits per weight the scalar optimum has MSE 0.1175, 16 codewords in 2-D about 0.10 and
256 in 4-D about 0.09 (the rate-distortion bound is 0.0625; tests/functional/test_vector_codebooks.py measures
it).

Algorithm: k-means++ seeding (deterministic, from a fixed seed), then Lloyd iterations (assignment by two GEMMs
per chunk of points, ``argmin_k ||c_k||^2_w - 2 <x, c_k>_w``; codewords = weighted cell means; an empty cell
keeps its codeword) until a round lowers the error by less than ``tolerance``.

Inside the calibrated fit a vector code is treated as ``d`` *virtual scalar codes* into the flattened codebook
(``K * d`` entries): :func:`scalar_view_codes` turns (R, n / d) vector codes into (R, n) indices
``k * d + i``, with which every scalar routine (output errors, least-squares codebook refits, dequantization)
applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


__all__ = [
    "VECTOR_DIMS",
    "KMeansEffort",
    "FULL_KMEANS",
    "START_KMEANS",
    "check_vector_layout",
    "nearest_codewords",
    "scalar_view_codes",
    "weighted_kmeans",
]

VECTOR_DIMS: tuple[int, ...] = (1, 2, 4, 8)
"""Supported codeword dimensions (1: scalar codebooks)."""

_DISTANCE_ELEMENTS = 1 << 22  # bound on points * codewords per chunk of the assignment
_SEED = 0x07C0DE


@dataclass(frozen=True)
class KMeansEffort:
    """How hard :func:`weighted_kmeans` works: at most ``max_iterations`` Lloyd rounds, stopping once a round
    lowers the error by less than ``tolerance`` (relative)."""

    max_iterations: int
    tolerance: float


FULL_KMEANS = KMeansEffort(max_iterations=60, tolerance=1e-4)
START_KMEANS = KMeansEffort(max_iterations=12, tolerance=1e-3)


def check_vector_layout(bits: int, vector_dim: int) -> int:
    """The code width ``bits * vector_dim`` of a vector codebook, checked to fit the packed format's 1..8 bits.

    Raises:
        ValueError: ``vector_dim`` is not one of :data:`VECTOR_DIMS`, or the code would need more than 8 bits.
    """
    if isinstance(vector_dim, bool) or vector_dim not in VECTOR_DIMS:
        raise ValueError(f"vector_dim={vector_dim!r} is not supported; expected one of {list(VECTOR_DIMS)}.")
    code_bits = bits * vector_dim
    if code_bits > 8:
        best = max(d for d in VECTOR_DIMS if bits * d <= 8) if bits <= 8 else 1
        raise ValueError(
            f"bits={bits} with vector_dim={vector_dim} needs {code_bits}-bit codes ({1 << min(code_bits, 62)} "
            f"codewords); codes are stored in at most 8 bits, so use vector_dim<={best} at {bits} bits per weight."
        )
    return code_bits


def scalar_view_codes(codes: torch.Tensor, vector_dim: int) -> torch.Tensor:
    """(R, m) vector codes -> (R, m * d) int64 indices ``k * d + i`` into the flattened (C, K * d) codebook.

    With them a vector-quantized row is ``flat_codebook[c, scalar_view_codes(codes)]`` (times scales), the form
    the scalar routines take.
    """
    if vector_dim == 1:
        return codes.to(torch.int64)
    offsets = torch.arange(vector_dim, device=codes.device, dtype=torch.int64)
    return (codes.to(torch.int64)[..., None] * vector_dim + offsets).reshape(codes.shape[0], -1)


def nearest_codewords(
    points: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(G, N) int64 index of the codeword nearest to each point in the weighted norm.

    Args:
        points: (G, N, d) vectors, one batch per codebook.
        codebook: (G, K, d) codewords (G = 1 with G > 1 batches of points: shared).
        weights: optional (G, N, d) non-negative weight of each component (``sum_i w_i (x_i - c_i)^2``).

    Returns:
        (G, N) codes; ties go to the lowest index.
    """
    groups, count, dim = points.shape
    book = codebook.to(points.dtype).expand(groups, -1, -1)
    levels = book.shape[1]
    codes = torch.empty(groups, count, dtype=torch.int64, device=points.device)
    chunk = max(1, _DISTANCE_ELEMENTS // max(1, levels * groups))
    book_t = book.transpose(1, 2)  # (G, d, K)
    norms = book.square().sum(dim=2)  # (G, K): ||c||^2 (unweighted)
    for start in range(0, count, chunk):
        x = points[:, start : start + chunk]
        if weights is None:
            cost = norms[:, None, :] - 2.0 * torch.bmm(x, book_t)
        else:
            w = weights[:, start : start + chunk].to(points.dtype)
            cost = torch.bmm(w, book_t.square()) - 2.0 * torch.bmm(w * x, book_t)
        codes[:, start : start + chunk] = cost.argmin(dim=2)
    return codes


def _pick(score: torch.Tensor, uniform: float) -> torch.Tensor:
    """(G,) index ``i`` of each row of ``score`` (G, N) >= 0 with ``cdf[i - 1] <= uniform * total < cdf[i]``: a
    draw proportional to ``score`` from one shared uniform number, so each batch's pick depends on its own scores
    only (the same codebook whatever the batches are fitted with); a row of zeros picks its first point."""
    cdf = score.cumsum(dim=1)
    threshold = cdf[:, -1:] * uniform
    index = torch.searchsorted(cdf, threshold, right=True).clamp_(max=score.shape[1] - 1)
    return torch.where(cdf[:, -1:] > 0, index, torch.zeros_like(index))[:, 0]


def _seed(points: torch.Tensor, weights: torch.Tensor | None, levels: int) -> torch.Tensor:
    """k-means++ seeding, batched over codebooks: the first seed drawn by each point's total weight, the next ones
    by the weighted squared distance to the nearest seed (D^2 sampling); deterministic (one fixed sequence of
    uniform numbers, shared by every batch)."""
    groups, count, dim = points.shape
    uniforms = torch.rand(levels, generator=torch.Generator().manual_seed(_SEED), dtype=torch.float64).tolist()
    w = torch.ones_like(points) if weights is None else weights
    book = torch.empty(groups, levels, dim, dtype=points.dtype, device=points.device)
    batches = torch.arange(groups, device=points.device)
    book[:, 0] = points[batches, _pick(w.sum(dim=2), uniforms[0])]
    nearest = (w * (points - book[:, :1]).square()).sum(dim=2)  # (G, N) weighted distance to the nearest seed
    for k in range(1, levels):
        book[:, k] = points[batches, _pick(nearest, uniforms[k])]
        nearest = torch.minimum(nearest, (w * (points - book[:, k : k + 1]).square()).sum(dim=2))
    return book


def weighted_kmeans(
    points: torch.Tensor,
    levels: int,
    weights: torch.Tensor | None = None,
    effort: KMeansEffort = FULL_KMEANS,
) -> torch.Tensor:
    """The ``K``-codeword vector codebook of each batch of points (see the module docstring).

    Args:
        points: (G, N, d) vectors; each of the G batches gets its own codebook.
        levels: K, the number of codewords (a batch with N <= K points gets its points, padded by repeating the
            last one: lossless).
        weights: optional (G, N, d) non-negative component weights.
        effort: iteration budget (:data:`FULL_KMEANS` or :data:`START_KMEANS`).

    Returns:
        (G, K, d) codewords in the float64 accumulation of the points (float32 on MPS).
    """
    groups, count, dim = points.shape
    acc = torch.float32 if points.device.type == "mps" else torch.float64
    x = points.to(acc)
    w = None if weights is None else weights.to(acc)
    if count <= levels:
        pad = x[:, -1:].expand(groups, levels - count, dim)
        return torch.cat([x, pad], dim=1)
    book = _seed(x, w, levels)
    ones = torch.ones_like(x) if w is None else w
    x32, w32 = points.to(torch.float32), None if weights is None else weights.to(torch.float32)
    previous = torch.full((groups,), float("inf"), dtype=acc, device=x.device)
    active = torch.ones(groups, dtype=torch.bool, device=x.device)  # batches still improving by > tolerance
    for _ in range(effort.max_iterations):
        codes = nearest_codewords(x32, book.to(torch.float32), w32)  # (G, N); float32 GEMMs rank the codewords
        index = codes[:, :, None].expand(groups, count, dim)
        mass = torch.zeros(groups, levels, dim, dtype=acc, device=x.device).scatter_add_(1, index, ones)
        sums = torch.zeros_like(mass).scatter_add_(1, index, ones * x)
        updated = torch.where(mass > 0, sums / mass.clamp_min(torch.finfo(acc).tiny), book)  # empty cell: kept
        error = (ones * (x - updated.gather(1, index)).square()).sum(dim=(1, 2))  # (G,)
        book = torch.where(active[:, None, None], updated, book)
        active &= error < previous * (1 - effort.tolerance)
        previous = torch.where(active, error, previous)
        if not bool(active.any()):
            break
    return book
