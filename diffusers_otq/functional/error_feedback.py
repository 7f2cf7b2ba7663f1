"""Output-aware rounding to a codebook: GPTQ-style error feedback and least-squares codebook refits.

Every function here minimises (or measures) the error of a layer's *output* on its calibration inputs rather
than the error of its weights. With inputs ``X`` (N, n) and Gram matrix ``H = X^T X / N`` (n, n), the output
error of a quantized weight ``Q`` against ``W`` (R, n) is

    E(Q) = || X (W - Q)^T ||^2 / N = sum_r (W_r - Q_r) H (W_r - Q_r)^T,

so only ``H`` is needed, never the activations. ``H`` may be given as diagonal blocks (a block-diagonal
approximation for wide layers): a sequence of (b_i, b_i) matrices whose sizes add up to ``n``; a full Gram is
one block.

A quantized row is ``Q_r[j] = s_rj * c_{r'}[k_rj]``: codes ``k`` (R, n) into codebook ``c`` (C, K) with
``C = R`` (row ``r' = r``) or ``C = 1`` (shared), and a scale ``s`` (R, n) per weight (all ones without group
scales, a group's absmax otherwise).

* :func:`error_feedback_codes` is the column sweep of GPTQ/OPTQ (Frantar et al., 2210.17323) with the uniform
  grid replaced by each row's codebook: columns are rounded left to right, each to the codeword nearest its
  *target*, the weight plus the best continuous compensation of the errors already made. With the damped Gram
  factored as ``H = A^T A`` (``A`` lower triangular) that target is ``t_j = w_j + sum_{i<j} F_ji e_i`` with
  ``F = diag(A)^-1 A`` and ``e_i = w_i - q_i`` (:func:`sweep_factor`; this is Babai's nearest-plane form of the
  sweep, equal to GPTQ's update with the Cholesky factor of ``H^-1``, but it needs one Cholesky factorisation and
  no inverse). The targets are updated lazily, block by block. With ``H = I`` it is nearest-codeword rounding.
  :func:`error_feedback_codes_in_order` sweeps in GPTQ's "act-order" (decreasing ``H_jj``).
* :func:`refit_codebook` lowers ``E(Q(c))`` over the codewords with the codes fixed (GPTVQ's codebook update,
  2402.15319): the normal equations ``(sum_r Y_r^T H Y_r) c = sum_r Y_r^T H W_r`` with ``Y_r = diag(s_r)
  onehot(k_r)`` (n, K), solved by a few preconditioned conjugate-gradient steps that each cost one product with
  ``H`` (instead of the ``K`` products that forming the K x K systems costs).
* :func:`output_error` and :func:`output_errors` evaluate ``E`` row by row.

Rows are independent given ``H``: the sweep, the refits of per-row codebooks and the errors run on row chunks
side by side on the CPU cores torch may use (:mod:`.parallel`). The chunks depend only on the shape, so the
results are the same bits for any thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from .codebook_storage import round_to_storage
from .parallel import fit_workers, run_tasks_single_threaded


__all__ = [
    "CodebookRefit",
    "block_bounds",
    "damped_gram",
    "dequantize_rows",
    "descending_order",
    "error_feedback_codes",
    "error_feedback_codes_in_order",
    "nearest_codes",
    "ordered_factors",
    "output_error",
    "output_errors",
    "refit_codebook",
    "reversed_cholesky",
    "ridge_gram",
    "row_chunks",
    "sort_codebook",
    "sweep_factor",
]

T = TypeVar("T")

REFIT_ITERATIONS = 8
"""At most this many conjugate-gradient steps per codebook refit (K steps solve the K x K systems exactly)."""

REFIT_STEP_TOLERANCE = 1e-3
"""Refit steps stop once a step lowers the output error by less than this fraction of it."""

_TASK_ROWS = 768  # rows per chunk of row-parallel work (chunks depend on the shape only, never on the threads)
_INNER_BLOCK = 16  # columns per inner lazy update of the sweep (rank-1 updates only inside these)


def block_bounds(grams: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the column range of each diagonal block."""
    bounds, start = [], 0
    for block in grams:
        bounds.append((start, start + block.shape[0]))
        start += block.shape[0]
    return bounds


def row_chunks(rows: int, n: int) -> list[slice]:
    """Equal row ranges of at most ``_TASK_ROWS`` rows: the tasks of row-parallel work on an (rows, n) weight.

    They depend on the shape only, so per-row results are the same bits whatever the number of threads. (The
    sweep's cost per task has a part proportional to ``n`` alone, Python's per-column ops, so the rows per task
    are not scaled down for wide rows.)
    """
    count = max(1, -(-rows // _TASK_ROWS))
    size = -(-rows // count)
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _run_chunks(task: Callable[[slice], T], chunks: Sequence[slice], device: torch.device) -> list[T]:
    """``[task(chunk) for chunk in chunks]`` side by side, each with one intra-op thread (same bits for any
    thread count)."""
    return run_tasks_single_threaded([lambda chunk=chunk: task(chunk) for chunk in chunks], fit_workers(device))


def damped_gram(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``H + damping * mean(diag H) * I`` in float64, with dead inputs (``H_jj = 0``) given ``H_jj = 1`` first.

    Args:
        gram: (n, n) symmetric positive semi-definite matrix.
        damping: relative ridge, e.g. 0.01 (GPTQ's default); must be > 0 unless ``H`` is positive definite.

    Returns:
        (n, n) float64 positive definite matrix (a fresh tensor).
    """
    h = gram.to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag <= 0
    if bool(dead.any()):
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        diag[dead] = 1.0
    diag += damping * diag.mean()
    return h


def ridge_gram(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``H + damping * mean(diag H) * I`` in float64: the objective a calibrated fit minimises.

    For a weight error ``D`` it charges ``tr(D H D^T) + damping * mean(diag H) * ||D||^2``, so the directions the
    calibration inputs never excite (a rank-deficient ``H``, e.g. a timestep embedding seen at a few timesteps)
    cannot absorb large weight changes that would surface on other inputs. Unlike :func:`damped_gram` (the
    sweep's factor) it leaves dead inputs at the ridge alone, so the objective keeps the scale of ``H``.

    Args:
        gram: (n, n) symmetric positive semi-definite matrix.
        damping: relative ridge (> 0 bounds the weight error).

    Returns:
        (n, n) float64 matrix (a fresh tensor).
    """
    h = gram.to(torch.float64).clone()
    h.diagonal().add_(damping * float(h.diagonal().mean()))
    return h


def sweep_factor(gram: torch.Tensor, damping: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """(n, n) float32 unit lower-triangular ``F = diag(A)^-1 A``, where ``A^T A = P (H + damping * mean(diag H) I)
    P^T`` (:func:`damped_gram`) with ``A`` lower triangular and ``P`` the permutation to the sweep ``order``.

    Rounding columns ``0..j-1`` (in sweep order) with errors ``e_i = w_i - q_i`` leaves ``||A e||^2`` smallest when
    column ``j`` is rounded from ``t_j = w_j + sum_{i<j} F_ji e_i`` (row ``j`` of ``A e`` is then zero before
    rounding). ``A`` is the reversed Cholesky factor: with ``J`` the reversal permutation, ``J P H P^T J = L L^T``
    gives ``A = J L^T J``: one factorisation (``n^3 / 3`` flops), in float32 like the sweep itself (float64 if
    float32 fails; the damping keeps the condition number near ``n / damping`` at most).

    Args:
        gram: (n, n) symmetric positive semi-definite matrix ``H``.
        damping: relative ridge (GPTQ's 0.01).
        order: (n,) sweep order of the columns (None: storage order).

    Raises:
        ValueError: the damped matrix is not positive definite (NaN/Inf statistics, or ``damping`` too small).
    """
    a = reversed_cholesky(gram, damping, order)
    return (a / a.diagonal()[:, None]).to(torch.float32)


def reversed_cholesky(gram: torch.Tensor, damping: float, order: torch.Tensor | None = None) -> torch.Tensor:
    """(n, n) lower-triangular ``A`` with ``A^T A = P (H + damping * mean(diag H) I) P^T`` (see
    :func:`sweep_factor`), in float32 (float64 where float32 fails).

    Raises:
        ValueError: the damped matrix is not positive definite.
    """
    n = gram.shape[0]
    reverse = torch.arange(n - 1, -1, -1, device=gram.device) if order is None else order.flip(0)
    damped = damped_gram(gram, damping)
    for dtype in (torch.float32, torch.float64):
        # J P H P^T J = H[reverse][:, reverse]; H is symmetric, so the column gather is a row gather of H[reverse]^T
        h = damped.to(dtype).index_select(0, reverse).T.contiguous().index_select(0, reverse)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0 and bool(torch.isfinite(lower.diagonal()).all()):
            return lower.flip(0, 1).T  # (n, n) lower triangular, A^T A = P H P^T
    raise ValueError(
        f"the damped Gram matrix ({n} inputs, damping={damping}) is not positive definite; increase "
        "damping (e.g. 0.1) or check the calibration statistics for NaN/Inf."
    )


def nearest_codes(values: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """(R, m) int64 index of the codeword nearest to each ``values / scales`` (ascending codebook rows).

    Args:
        values: (R, m) weights.
        codebook: (R, K) or (1, K) ascending codewords.
        scales: optional (R, m) non-negative scales; a zero scale maps to the codeword nearest 0.
    """
    if scales is not None:
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        values = torch.where(scales > 0, values / safe, torch.zeros_like(values))
    book = codebook.to(values.dtype)
    midpoints = ((book[:, 1:] + book[:, :-1]) * 0.5).contiguous()
    if midpoints.shape[0] == 1:
        return torch.searchsorted(midpoints[0], values.contiguous())
    return torch.searchsorted(midpoints, values.contiguous())


def dequantize_rows(codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """``s * c[k]``: (R, n) values of ``codes`` (R, n) in ``codebook`` (R, K) or (1, K), times ``scales``."""
    if codebook.shape[0] == 1:
        values = codebook[0][codes]
    else:
        values = codebook.gather(1, codes)
    return values if scales is None else values * scales


def output_error(delta: torch.Tensor, grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """(R,) ``delta_r H delta_r^T`` for each row of ``delta`` (R, n), ``H`` given by its diagonal blocks.

    The products run in ``delta``'s dtype (float32 is accurate to ~1e-7 relative, plenty to rank candidate
    quantizations); the row sums are accumulated in float64.
    """
    total = torch.zeros(delta.shape[0], dtype=torch.float64, device=delta.device)
    for (start, end), block in zip(block_bounds(grams), grams, strict=True):
        part = delta[:, start:end]
        total += ((part @ block.to(part.dtype)) * part).sum(dim=1, dtype=torch.float64)
    return total


def _gram_product(delta: torch.Tensor, grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """(r, n) ``delta @ H`` with ``H`` block-diagonal (blocks in ``delta``'s dtype)."""
    if len(grams) == 1:
        return delta @ grams[0]
    bounds = block_bounds(grams)
    return torch.cat([delta[:, start:end] @ block for (start, end), block in zip(bounds, grams, strict=True)], 1)


def _chunk_book(codebook: torch.Tensor, chunk: slice) -> torch.Tensor:
    return codebook if codebook.shape[0] == 1 else codebook[chunk]


def output_errors(
    target: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    grams: Sequence[torch.Tensor],
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R,) float64 output error ``(W_r - Q_r) H (W_r - Q_r)^T`` of each row of the quantized ``target``.

    Args:
        target: (R, n) float32 weights ``W``.
        codes: (R, n) int64 codes.
        codebook: (R, K) or (1, K) float32 codewords.
        grams: float32 diagonal blocks of ``H``.
        scales: optional (R, n) float32 per-weight scales.
    """

    def task(chunk: slice) -> torch.Tensor:
        rec = dequantize_rows(codes[chunk], _chunk_book(codebook, chunk), None if scales is None else scales[chunk])
        delta = target[chunk] - rec
        return (_gram_product(delta, grams) * delta).sum(dim=1, dtype=torch.float64)

    return torch.cat(_run_chunks(task, row_chunks(*target.shape), target.device))


def _sweep_rows(
    weight_t: torch.Tensor,
    factor: torch.Tensor,
    codebook: torch.Tensor,
    inverse_scales_t: torch.Tensor | None,
    scales_t: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """The sweep over one diagonal block for one chunk of rows, columns already in sweep order.

    The targets ``t_j = w_j + sum_{i<j} F_ji e_i`` are completed lazily at three levels: the columns of earlier
    blocks of ``block_size`` in one GEMM per block, earlier sub-blocks of ``_INNER_BLOCK`` columns of the same
    block in one GEMM per sub-block, and the earlier columns of the same sub-block in one matrix-vector product
    per column (so a column costs four small ops on ``r`` values: that product, the nearest-codeword search, the
    codeword lookup and the error).

    Args:
        weight_t: (b, r) float32, the chunk's weights transposed (column ``j`` of the block is row ``j``).
        factor: (b, b) float32 unit lower-triangular :func:`sweep_factor` of the block.
        codebook: (r, K) or (1, K) float32 ascending codewords of the chunk's rows.
        inverse_scales_t: (b, r) ``1 / s`` (0 where ``s = 0``) or None; scales_t: (b, r) ``s`` or None.
        block_size: columns per lazy update from earlier blocks (one GEMM each).

    Returns:
        (b, r) int64 codes, transposed like ``weight_t``.
    """
    width, rows = weight_t.shape
    shared = codebook.shape[0] == 1
    midpoints = ((codebook[:, 1:] + codebook[:, :-1]) * 0.5).contiguous()  # (C, K-1)
    book = codebook[0].contiguous() if shared else codebook
    midpoints = midpoints[0].contiguous() if shared else midpoints
    target = weight_t.clone()  # (b, r): the targets t_j, completed lazily
    errors = torch.zeros_like(weight_t)  # (b, r): e_j = w_j - q_j; zero until column j is rounded
    codes = torch.empty(width, rows, dtype=torch.int64, device=weight_t.device)
    rounded = torch.empty(rows, dtype=weight_t.dtype, device=weight_t.device)  # (r,) q_j
    scaled = torch.empty_like(rounded)  # (r,) t_j / s_j
    targets, errs, weights, code_rows = target.unbind(0), errors.unbind(0), weight_t.unbind(0), codes.unbind(0)
    targets2, codes2 = target.unsqueeze(2).unbind(0), codes.unsqueeze(2).unbind(0)  # (r, 1) views
    rounded2, scaled2 = rounded.unsqueeze(1), scaled.unsqueeze(1)
    for i1 in range(0, width, block_size):
        i2 = min(i1 + block_size, width)
        if i1 > 0:  # everything the earlier blocks owe this block's targets, in one GEMM
            target[i1:i2].addmm_(factor[i1:i2, :i1], errors[:i1])
        for s1 in range(i1, i2, _INNER_BLOCK):
            s2 = min(s1 + _INNER_BLOCK, i2)
            if s1 > i1:
                target[s1:s2].addmm_(factor[s1:s2, i1:s1], errors[i1:s1])
            inner = factor[s1:s2, s1:s2].unbind(0)  # row j - s1: F[j, s1:s2] (zero right of the diagonal)
            pending = errors[s1:s2].T  # (r, s2 - s1): this sub-block's errors, zero where not yet rounded
            for j in range(s1, s2):
                if j > s1:
                    targets[j].addmv_(pending, inner[j - s1])
                if inverse_scales_t is None:
                    value, value2 = targets[j], targets2[j]
                else:
                    value, value2 = torch.mul(targets[j], inverse_scales_t[j], out=scaled), scaled2
                if shared:
                    torch.searchsorted(midpoints, value, out=code_rows[j])
                    torch.index_select(book, 0, code_rows[j], out=rounded)
                else:
                    torch.searchsorted(midpoints, value2, out=codes2[j])
                    torch.gather(book, 1, codes2[j], out=rounded2)
                if scales_t is not None:
                    rounded.mul_(scales_t[j])
                torch.sub(weights[j], rounded, out=errs[j])
    return codes


def error_feedback_codes(
    weight: torch.Tensor,
    factors: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    scales: torch.Tensor | None = None,
    block_size: int = 128,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes of ``weight`` in ``codebook`` chosen by the error-feedback sweep (see the module docstring).

    The sweep runs in float32 (as GPTQ does), on row chunks in parallel (:func:`row_chunks`); a weight whose
    scale is 0 stores 0, gets the codeword nearest 0 and feeds its whole value back as error.

    Args:
        weight: (R, n) weights to round (not modified).
        factors: :func:`sweep_factor` of each diagonal block of the Gram, in sweep order; sizes add up to ``n``.
        codebook: (R, K) or (1, K) ascending codewords (already rounded to their storage dtype).
        scales: optional (R, n) non-negative per-weight scales (group absmax); the stored value is
            ``scale * codeword``.
        block_size: columns per lazy update (128, as GPTQ).
        columns: (n,) sweep order of the columns (a permutation keeping each block's columns within the block),
            or None for storage order.

    Returns:
        (R, n) int64 codes in storage order.
    """
    rows, n = weight.shape
    book = codebook.to(torch.float32)
    factors32 = [factor.to(torch.float32) for factor in factors]
    bounds = block_bounds(factors)
    codes = torch.empty(rows, n, dtype=torch.int64, device=weight.device)

    def transposed(values: torch.Tensor) -> torch.Tensor:
        """(r, n) -> (n, r) float32, rows in sweep order."""
        values_t = values.to(torch.float32).T
        return values_t.contiguous() if columns is None else values_t.index_select(0, columns)

    def task(chunk: slice) -> None:
        weight_t = transposed(weight[chunk])  # (n, r)
        chunk_book = _chunk_book(book, chunk).contiguous()
        scales_t = inverse_t = None
        if scales is not None:
            scales_t = transposed(scales[chunk])
            inverse_t = torch.where(scales_t > 0, 1.0 / scales_t.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        codes_t = torch.cat(
            [
                _sweep_rows(
                    weight_t[start:end],
                    factor,
                    chunk_book,
                    None if inverse_t is None else inverse_t[start:end],
                    None if scales_t is None else scales_t[start:end],
                    block_size,
                )
                for (start, end), factor in zip(bounds, factors32, strict=True)
            ]
        )  # (n, r) in sweep order
        if columns is not None:
            codes_t = torch.empty_like(codes_t).index_copy_(0, columns, codes_t)
        codes[chunk] = codes_t.T  # disjoint rows per task

    _run_chunks(task, row_chunks(rows, n), weight.device)
    return codes


def descending_order(gram: torch.Tensor) -> torch.Tensor:
    """GPTQ's "act-order": columns by decreasing ``H_jj`` (the most important inputs are rounded first, while
    the most columns remain to absorb their error)."""
    return torch.argsort(gram.diagonal(), descending=True, stable=True)


def ordered_factors(
    grams: Sequence[torch.Tensor], damping: float, act_order: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per diagonal block, ``(order, F)``: the sweep order of its columns and the :func:`sweep_factor` of the
    block permuted to that order (float32, what the sweep multiplies with); the same bits for any thread count."""

    def factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = descending_order(gram) if act_order else torch.arange(gram.shape[0], device=gram.device)
        return order, sweep_factor(gram, damping, order)

    # one thread per factorisation (a multi-threaded Cholesky sums in another order), blocks side by side
    device = grams[0].device if grams else torch.device("cpu")
    return run_tasks_single_threaded([lambda gram=gram: factor(gram) for gram in grams], fit_workers(device))


def error_feedback_codes_in_order(
    weight: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    codebook: torch.Tensor,
    scales: torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """:func:`error_feedback_codes` with each block's columns swept in the order of :func:`ordered_factors`.

    Returns:
        (R, n) int64 codes in the original column order.
    """
    bounds = block_bounds([factor for _, factor in factors])
    columns = torch.cat([start + order for (start, _), (order, _) in zip(bounds, factors, strict=True)])
    return error_feedback_codes(weight, [factor for _, factor in factors], codebook, scales, block_size, columns)


def _code_sums(values: torch.Tensor, codes: torch.Tensor, levels: int) -> torch.Tensor:
    """(r, K) float64 ``sum_{j: k_rj = k} values_rj`` of (r, n) ``values``."""
    sums = torch.zeros(values.shape[0], levels, dtype=values.dtype, device=values.device)
    return sums.scatter_add_(1, codes, values).to(torch.float64)


@dataclass(frozen=True)
class CodebookRefit:
    """What :func:`refit_codebook` returns.

    Attributes:
        codebook: (C, K) float64 refitted codewords (representable in the storage dtype when one was given),
            not sorted (sort them with their codes afterwards).
        start_errors: (R,) float64 output error of each row with the starting codebook (exact).
        errors: (C,) float64 output error with the refitted codebook, per codebook: per row for per-row
            codebooks, the sum over all rows for a shared one. Computed in codeword space from the quantities
            of the solve (no extra product with ``H``), exact up to the square of the storage rounding.
    """

    codebook: torch.Tensor
    start_errors: torch.Tensor
    errors: torch.Tensor


def refit_codebook(
    target: torch.Tensor,
    codes: torch.Tensor,
    grams: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    scales: torch.Tensor | None = None,
    iterations: int = REFIT_ITERATIONS,
    storage_dtype: torch.dtype | None = None,
    tolerance: float = REFIT_STEP_TOLERANCE,
) -> CodebookRefit:
    """Codewords lowering the output error for fixed codes (see :class:`CodebookRefit` for what it returns).

    Minimises ``f(c) = sum_r (W_r - Y_r c_r) H (W_r - Y_r c_r)^T`` with ``Y_r = diag(s_r) onehot(k_r)`` (n, K) by
    conjugate gradients on the normal equations ``M c = b`` (``M = sum_r Y_r^T H Y_r`` over the rows sharing a
    codebook), warm-started at ``codebook`` and preconditioned by ``sum_r Y_r^T diag(H) Y_r``. A step costs one
    product ``(R, n) @ H``; ``K`` steps solve the K x K systems exactly, fewer give most of the gain (no step
    raises ``f``). An unused codeword keeps its value. Products run in float32, the K-vectors in float64.

    With ``g = Y^T H (W - Y c_0)`` (the first product) and ``u = M (c - c_0)`` (accumulated from the steps),
    ``f(c) = f(c_0) - 2 (c - c_0) . g + (c - c_0) . u``; after rounding ``c`` to ``storage_dtype`` (a change
    ``rho``), ``f`` is evaluated as ``f(c_0) - 2 (c_r - c_0) . g + (c - c_0 + 2 rho) . u`` (``rho^T M rho``
    dropped).

    Args:
        target: (R, n) float32 weights ``W``.
        codes: (R, n) int64 codes.
        grams: float32 diagonal blocks of ``H``.
        codebook: (R, K) or (1, K) current codewords (the starting point and the output shape).
        scales: optional (R, n) float32 per-weight scales.
        iterations: at most this many conjugate-gradient steps.
        storage_dtype: round the codewords to this dtype (None: no rounding; int8: one scale per codebook,
            :mod:`.codebook_storage`); a codebook with a codeword it cannot hold (overflow) keeps its starting
            codewords.
        tolerance: stop once a step lowers the output error by less than this fraction of it (a step lowers
            ``f`` by ``alpha * r.z`` per codebook).
    """
    rows, n = target.shape
    levels = codebook.shape[1]
    shared = codebook.shape[0] == 1
    chunks = row_chunks(rows, n)
    diagonal = torch.cat([block.diagonal() for block in grams])  # (n,)
    book32 = codebook.to(torch.float32)

    def start(chunk: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = None if scales is None else scales[chunk]
        c = codes[chunk]
        delta = target[chunk] - dequantize_rows(c, _chunk_book(book32, chunk), s)
        product = _gram_product(delta, grams)  # (r, n) H e_r
        error = (product * delta).sum(dim=1, dtype=torch.float64)
        gradient = _code_sums(product if s is None else product * s, c, levels)  # Y^T H e = b - M c
        energy = diagonal.expand_as(delta) if s is None else diagonal * s.square()
        return error, gradient, _code_sums(energy, c, levels)

    def curvature(direction: torch.Tensor) -> Callable[[slice], torch.Tensor]:
        direction32 = direction.to(torch.float32)

        def task(chunk: slice) -> torch.Tensor:
            s = None if scales is None else scales[chunk]
            c = codes[chunk]
            product = _gram_product(dequantize_rows(c, _chunk_book(direction32, chunk), s), grams)
            return _code_sums(product if s is None else product * s, c, levels)  # Y^T H Y p

        return task

    def gather(parts: list[torch.Tensor]) -> torch.Tensor:
        whole = torch.cat(parts)
        return whole.sum(dim=0, keepdim=True) if shared else whole

    tiny = torch.finfo(torch.float64).tiny
    started = _run_chunks(start, chunks, target.device)
    start_errors = torch.cat([part[0] for part in started])
    gradient = gather([part[1] for part in started])  # (C, K)
    precondition = gather([part[2] for part in started])
    inverse = torch.where(precondition > 0, 1.0 / precondition.clamp_min(tiny), 0.0)
    anchor = codebook.to(torch.float64)
    step = torch.zeros_like(anchor)  # c - c_0
    moved = torch.zeros_like(anchor)  # u = M (c - c_0)
    residual = gradient.clone()
    z = residual * inverse
    direction = z
    rz = (residual * z).sum(dim=1, keepdim=True)
    remaining = float(start_errors.sum())  # f(c), lowered by alpha * rz at each step
    for _ in range(iterations):
        if not bool((rz > 0).any()):
            break
        mp = gather(_run_chunks(curvature(direction), chunks, target.device))
        pmp = (direction * mp).sum(dim=1, keepdim=True)
        alpha = torch.where(pmp > 0, rz / pmp.clamp_min(tiny), 0.0)
        decrease = float((alpha * rz).sum())
        remaining -= decrease
        step += alpha * direction
        moved += alpha * mp
        residual -= alpha * mp
        z = residual * inverse
        rz_next = (residual * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(tiny), 0.0)
        direction = z + beta * direction
        rz = rz_next
        if decrease <= tolerance * max(remaining, 0.0):
            break
    solved = anchor + step
    if storage_dtype is not None:
        solved = round_to_storage(solved, storage_dtype)
    rounded_step = solved - anchor
    start_total = start_errors if not shared else start_errors.sum(dim=0, keepdim=True)
    errors = start_total - 2 * (rounded_step * gradient).sum(dim=1) + ((2 * rounded_step - step) * moved).sum(dim=1)
    # A codebook that overflowed (the storage dtype) or diverged keeps its starting codewords and error.
    bad = ~(torch.isfinite(solved).all(dim=1) & torch.isfinite(errors))
    solved = torch.where(bad[:, None], anchor, solved)
    errors = torch.where(bad, start_total, errors)
    return CodebookRefit(solved, start_errors, errors)


def sort_codebook(codebook: torch.Tensor, codes: torch.Tensor, bands: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each codebook row ascending and renumber the codes to match.

    Args:
        codebook: (C, K) codewords, C = 1 (shared) or one row per code row; with ``bands`` sets of codebooks over
            the same codes, (bands * C, K): the first set is sorted and every set permuted as it is.
        codes: (R, n) int64 codes into them.
        bands: sets of codebooks stacked in ``codebook`` (:mod:`diffusers_otq.noise_bands`).

    Returns:
        ``(sorted codebook, renumbered codes (R, n))``; the dequantized values of every set are unchanged.
    """
    per_band = codebook.shape[0] // bands
    order = codebook[:per_band].argsort(dim=1)  # (C, K)
    inverse = order.argsort(dim=1)  # old index -> new position
    stacked = codebook.reshape(bands, per_band, -1)
    books = stacked.gather(2, order.expand(bands, -1, -1)).reshape(codebook.shape)
    if per_band == 1:
        return books, inverse[0][codes]
    return books, inverse.gather(1, codes)
