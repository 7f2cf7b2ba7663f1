"""Error feedback for vector codebooks: the GPTQ/GPTVQ column sweep, ``d`` columns at a time.

The scalar sweep (:mod:`.error_feedback`) rounds column ``j`` to the codeword nearest its target
``t_j = w_j + sum_{i<j} F_ji e_i``, which zeroes row ``j`` of ``A e`` before rounding (``A^T A = H``, ``A`` lower
triangular, :func:`~.error_feedback.reversed_cholesky`). With vector codebooks a block ``b`` of ``d`` consecutive
columns is one code, so the sweep works block by block (Babai's nearest plane over blocks, the form of GPTVQ,
arXiv 2402.15319): with the errors of the earlier blocks fixed, the rows ``b`` of ``A e`` are

    A_bb e_b + A_b,<b e_<b = A_bb (t_b - q_b),      t_b = w_b + G_b,<b e_<b,   G = blockdiag(A_bb)^-1 A,

so the block is rounded to the codeword minimising ``|| A_bb (t_b - s c_k) ||^2`` (``s`` the row's scale in the
block: group sizes are multiples of ``d``), the metric of the block's own inputs given the earlier ones. With
``H = I`` it is nearest-codeword rounding. For each chunk of rows the ``K`` codewords are mapped once per block
(``P = A_bb C^T``, (d, K)) and the choice is ``argmin_k s^2 ||P_k||^2 - 2 s <A_bb t_b, P_k>``: one small GEMM.

"Act-order" orders whole blocks by decreasing ``sum_{j in b} H_jj`` (a vector's columns stay together).
Targets are completed lazily as in the scalar sweep: earlier ``block_size`` windows in one GEMM, the earlier
blocks of the same window in one GEMM per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .error_feedback import block_bounds, reversed_cholesky, row_chunks
from .parallel import fit_workers, run_tasks_single_threaded


__all__ = ["VectorSweepFactor", "vector_error_feedback_codes", "vector_sweep_factors"]


@dataclass(frozen=True)
class VectorSweepFactor:
    """The sweep operators of one diagonal Gram block for ``d``-dimensional codes.

    Attributes:
        columns: (b,) sweep order of the block's columns (whole vectors, each in storage order).
        transfer: (b, b) float32 ``G = blockdiag(A_bb)^-1 A`` in sweep order (identity blocks on the diagonal).
        metrics: (b / d, d, d) float32 ``A_bb``, the lower-triangular metric of each vector in sweep order.
    """

    columns: torch.Tensor
    transfer: torch.Tensor
    metrics: torch.Tensor


def _vector_order(gram: torch.Tensor, dim: int, act_order: bool) -> torch.Tensor:
    """(b,) columns in sweep order: vectors of ``dim`` consecutive columns, by decreasing summed ``H_jj`` when
    ``act_order`` (ties and otherwise: storage order)."""
    width = gram.shape[0]
    vectors = torch.arange(width // dim, device=gram.device)
    if act_order:
        weight = gram.diagonal().reshape(-1, dim).sum(dim=1)
        vectors = torch.argsort(weight, descending=True, stable=True)
    return (vectors[:, None] * dim + torch.arange(dim, device=gram.device)).reshape(-1)


def _block_factor(gram: torch.Tensor, dim: int, damping: float, act_order: bool) -> VectorSweepFactor:
    width = gram.shape[0]
    if width % dim:
        raise ValueError(
            f"a Gram block of {width} inputs is not a multiple of vector_dim={dim}; set CalibrationConfig("
            f"max_gram_block=...) to a multiple of {dim} (or use vector_dim=1)."
        )
    columns = _vector_order(gram, dim, act_order)
    a = reversed_cholesky(gram, damping, columns).to(torch.float64)
    vectors = width // dim
    metrics = torch.stack([a[v * dim : (v + 1) * dim, v * dim : (v + 1) * dim] for v in range(vectors)])
    rows = a.reshape(vectors, dim, width)
    transfer = torch.linalg.solve_triangular(metrics, rows, upper=False).reshape(width, width)
    return VectorSweepFactor(columns, transfer.to(torch.float32), metrics.to(torch.float32))


def vector_sweep_factors(
    grams: Sequence[torch.Tensor], dim: int, damping: float, act_order: bool = True
) -> list[VectorSweepFactor]:
    """:class:`VectorSweepFactor` of each diagonal Gram block (sizes must be multiples of ``dim``), one thread per
    factorisation, blocks side by side (the same bits for any thread count).

    Raises:
        ValueError: a block whose size ``dim`` does not divide, or a damped block that is not positive definite.
    """
    device = grams[0].device if grams else torch.device("cpu")
    tasks = [lambda gram=gram: _block_factor(gram, dim, damping, act_order) for gram in grams]
    return run_tasks_single_threaded(tasks, fit_workers(device))


def _sweep_vectors(
    weight_t: torch.Tensor,
    factor: VectorSweepFactor,
    codebook: torch.Tensor,
    scales: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """The sweep over one diagonal block for one chunk of rows, columns in sweep order.

    Args:
        weight_t: (b, r) float32 weights transposed, rows in sweep order.
        factor: the block's :class:`VectorSweepFactor`.
        codebook: (1, K, d) shared or (r, K, d) per-row float32 codewords.
        scales: (b / d, r) float32 scale of each vector, or None.
        block_size: columns per lazy update (a multiple of ``d``).

    Returns:
        (b / d, r) int64 codes in sweep order.
    """
    width, rows = weight_t.shape
    dim = codebook.shape[2]
    shared = codebook.shape[0] == 1
    transfer = factor.transfer
    target = weight_t.clone()
    errors = torch.zeros_like(weight_t)
    codes = torch.empty(width // dim, rows, dtype=torch.int64, device=weight_t.device)
    window = max(dim, block_size - block_size % dim)
    for i1 in range(0, width, window):
        i2 = min(i1 + window, width)
        if i1 > 0:
            target[i1:i2].addmm_(transfer[i1:i2, :i1], errors[:i1])
        for j in range(i1, i2, dim):
            v = j // dim
            if j > i1:
                target[j : j + dim].addmm_(transfer[j : j + dim, i1:j], errors[i1:j])
            metric = factor.metrics[v]  # (d, d)
            mapped_target = metric @ target[j : j + dim]  # (d, r)
            if shared:
                mapped = metric @ codebook[0].T  # (d, K)
                cross = mapped_target.T @ mapped  # (r, K)
                norms = mapped.square().sum(dim=0)[None, :]  # (1, K)
            else:
                mapped = torch.matmul(metric, codebook.transpose(1, 2))  # (r, d, K)
                cross = torch.einsum("dr,rdk->rk", mapped_target, mapped)
                norms = mapped.square().sum(dim=1)  # (r, K)
            if scales is None:
                cost = norms - 2.0 * cross
            else:
                s = scales[v][:, None]  # (r, 1)
                cost = s.square() * norms - 2.0 * s * cross
            chosen = cost.argmin(dim=1)  # (r,)
            codes[v] = chosen
            vectors = codebook[0][chosen] if shared else codebook[torch.arange(rows), chosen]  # (r, d)
            if scales is not None:
                vectors = vectors * scales[v][:, None]
            errors[j : j + dim] = weight_t[j : j + dim] - vectors.T
    return codes


def vector_error_feedback_codes(
    weight: torch.Tensor,
    factors: Sequence[VectorSweepFactor],
    codebook: torch.Tensor,
    scales: torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Codes of ``weight`` in the vector ``codebook`` chosen by the block sweep (see the module docstring).

    Runs in float32 on row chunks in parallel (:func:`~.error_feedback.row_chunks`), the same bits for any thread
    count.

    Args:
        weight: (R, n) weights.
        factors: :func:`vector_sweep_factors` of the diagonal Gram blocks (sizes add up to ``n``).
        codebook: (R, K, d) per-row or (1, K, d) shared codewords (already rounded to their storage dtype).
        scales: optional (R, n) non-negative per-weight scales, constant over each vector.
        block_size: columns per lazy update.

    Returns:
        (R, n / d) int64 codes in storage order.
    """
    rows, n = weight.shape
    dim = codebook.shape[2]
    book = codebook.to(torch.float32)
    bounds = block_bounds([factor.transfer for factor in factors])
    codes = torch.empty(rows, n // dim, dtype=torch.int64, device=weight.device)

    def task(chunk: slice) -> None:
        chunk_book = book if book.shape[0] == 1 else book[chunk]
        parts = []
        for (start, _), factor in zip(bounds, factors, strict=True):
            columns = start + factor.columns
            weight_t = weight[chunk].to(torch.float32).T.index_select(0, columns)  # (b, r) in sweep order
            vector_scales = None
            if scales is not None:
                vector_scales = scales[chunk].to(torch.float32).T.index_select(0, columns[::dim])  # (b / d, r)
            swept = _sweep_vectors(weight_t, factor, chunk_book, vector_scales, block_size)  # (b / d, r)
            placed = torch.empty_like(swept).index_copy_(0, factor.columns[::dim] // dim, swept)
            parts.append(placed)
        codes[chunk] = torch.cat(parts).T  # disjoint rows per task

    tasks = [lambda chunk=chunk: task(chunk) for chunk in row_chunks(rows, n)]
    run_tasks_single_threaded(tasks, fit_workers(weight.device))
    return codes
