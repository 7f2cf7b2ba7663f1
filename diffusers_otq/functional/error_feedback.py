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
  grid replaced by each row's codebook: columns are rounded left to right, and each column's rounding error,
  divided by the pivot of the upper Cholesky factor of ``H^{-1}``, is pushed onto the columns not yet rounded
  (lazily, block by block). With ``H = I`` it is nearest-codeword rounding.
  :func:`error_feedback_codes_in_order` sweeps in GPTQ's "act-order" (decreasing ``H_jj``).
* :func:`refit_codebook` solves, with the codes fixed, ``min_c E(Q(c))``: a K x K least-squares system per
  codebook (GPTVQ's codebook update, 2402.15319, in closed form).
* :func:`output_error` evaluates ``E`` row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


__all__ = [
    "block_bounds",
    "damped_gram",
    "dequantize_rows",
    "descending_order",
    "error_feedback_codes",
    "error_feedback_codes_in_order",
    "inverse_cholesky_factor",
    "nearest_codes",
    "ordered_factors",
    "output_error",
    "refit_codebook",
    "ridge_gram",
    "sort_codebook",
]

_REFIT_ELEMENTS = 1 << 23  # rows per refit chunk are chosen so that (rows, n, K) stays near this many values


def block_bounds(grams: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the column range of each diagonal block."""
    bounds, start = [], 0
    for block in grams:
        bounds.append((start, start + block.shape[0]))
        start += block.shape[0]
    return bounds


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


def inverse_cholesky_factor(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper-triangular ``U`` with ``U^T U = (H + damping * mean(diag H) * I)^{-1}`` (float64).

    This is the factor GPTQ sweeps with: rounding column ``j`` with error ``e`` changes the later columns by
    ``-e / U_jj * U_j,j+1:``, the optimal update given the columns already rounded.

    Raises:
        ValueError: the damped matrix is not positive definite (NaN/Inf statistics, or ``damping`` too small).
    """
    h = damped_gram(gram, damping)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(
            f"the damped Gram matrix ({h.shape[0]} inputs, damping={damping}) is not positive definite; increase "
            "damping (e.g. 0.1) or check the calibration statistics for NaN/Inf."
        )
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


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


def _sweep_block(
    weight: torch.Tensor,
    factor: torch.Tensor,
    midpoints: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """GPTQ's lazy-batch column sweep over one diagonal block; ``weight`` (R, b) is updated in place.

    ``midpoints`` (C, K-1) are the decision boundaries of ``codebook`` (C, K); ``scales`` (R, b) are positive
    (zero-scale weights are handled by the caller).
    """
    rows, width = weight.shape
    codes = torch.empty(rows, width, dtype=torch.int64, device=weight.device)
    shared = codebook.shape[0] == 1
    flat_book, flat_mid = codebook[0], midpoints[0].contiguous()
    for i1 in range(0, width, block_size):
        i2 = min(i1 + block_size, width)
        chunk = weight[:, i1:i2].T.contiguous()  # (B, R): this block's columns as contiguous rows, updated as we go
        errors = torch.empty_like(chunk)  # (B, R)
        local = factor[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = chunk[i]  # (R,)
            scale = None if scales is None else scales[:, i1 + i]
            value = column if scale is None else column / scale
            if shared:
                code = torch.searchsorted(flat_mid, value)
                rounded = flat_book[code]
            else:
                code = torch.searchsorted(midpoints, value[:, None])
                rounded = codebook.gather(1, code)[:, 0]
                code = code[:, 0]
            if scale is not None:
                rounded = rounded * scale
            codes[:, i1 + i] = code
            error = (column - rounded) / local[i, i]
            chunk[i:].sub_(local[i, i:, None] * error[None, :])
            errors[i] = error
        if i2 < width:  # push the block's errors onto every later column at once
            weight[:, i2:].sub_(errors.T @ factor[i1:i2, i2:])
    return codes


def error_feedback_codes(
    weight: torch.Tensor,
    factors: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    scales: torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Codes of ``weight`` in ``codebook`` chosen by the GPTQ column sweep (see the module docstring).

    The sweep runs in float32 (as GPTQ does); a weight whose scale is 0 gets the codeword nearest 0 and feeds
    its whole value back as error.

    Args:
        weight: (R, n) weights to round (not modified).
        factors: upper Cholesky factors of the damped inverse Gram, one per diagonal block
            (:func:`inverse_cholesky_factor`); their sizes add up to ``n``.
        codebook: (R, K) or (1, K) ascending codewords (already rounded to their storage dtype).
        scales: optional (R, n) non-negative per-weight scales (group absmax); the stored value is
            ``scale * codeword``.
        block_size: columns per lazy update (128, as GPTQ).

    Returns:
        (R, n) int64 codes.
    """
    work = weight.to(torch.float32).clone()
    book = codebook.to(torch.float32)
    midpoints = ((book[:, 1:] + book[:, :-1]) * 0.5).contiguous()
    scale32 = None
    if scales is not None:
        # A zero scale stores 0 whatever the code: give it a huge scale, so the value rounds to the codeword
        # nearest 0 and the stored value is ~0 (exactly 0 after dequantization, which multiplies by the true 0).
        scale32 = scales.to(torch.float32)
        scale32 = torch.where(scale32 > 0, scale32, torch.full_like(scale32, torch.finfo(torch.float32).max))
    codes = []
    for (start, end), factor in zip(block_bounds(factors), factors, strict=True):
        block_scales = None if scale32 is None else scale32[:, start:end]
        factor32 = factor.to(torch.float32)
        codes.append(_sweep_block(work[:, start:end], factor32, midpoints, book, block_scales, block_size))
    return torch.cat(codes, dim=1)


def descending_order(gram: torch.Tensor) -> torch.Tensor:
    """GPTQ's "act-order": columns by decreasing ``H_jj`` (the most important inputs are rounded first, while
    the most columns remain to absorb their error)."""
    return torch.argsort(gram.diagonal(), descending=True, stable=True)


def ordered_factors(
    grams: Sequence[torch.Tensor], damping: float, act_order: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per diagonal block, ``(order, U)``: the sweep order of its columns and the inverse Cholesky factor of
    the block permuted to that order (:func:`inverse_cholesky_factor`)."""
    out = []
    for gram in grams:
        order = descending_order(gram) if act_order else torch.arange(gram.shape[0], device=gram.device)
        out.append((order, inverse_cholesky_factor(gram[order][:, order], damping)))
    return out


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
    codes = torch.empty(weight.shape, dtype=torch.int64, device=weight.device)
    start = 0
    for order, factor in factors:
        end = start + order.numel()
        columns = start + order
        block_scales = None if scales is None else scales[:, columns]
        codes[:, columns] = error_feedback_codes(weight[:, columns], [factor], codebook, block_scales, block_size)
        start = end
    return codes


def refit_codebook(
    target: torch.Tensor,
    codes: torch.Tensor,
    grams: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    scales: torch.Tensor | None = None,
    max_block: int = 1024,
) -> torch.Tensor:
    """Least-squares codewords for fixed codes: ``argmin_c sum_r (W_r - Q_r(c)) H (W_r - Q_r(c))^T``.

    With ``Y_r = diag(s_r) onehot(k_r)`` (n, K), each codebook solves ``(sum Y_r^T H Y_r) c = sum Y_r^T H W_r``
    (sums over the rows sharing it). Building ``Y_r^T H Y_r`` costs ``n * b * K`` per row for diagonal blocks of
    size ``b``, so blocks wider than ``max_block`` are cut into diagonal sub-blocks of at most that size (a
    block-diagonal approximation of ``H`` for this least-squares step only; the sweep uses the whole block).
    Products run in float32, the K x K systems are summed and solved in float64. A relative ridge of 1e-9 pulls
    codewords nobody uses towards their old value, so they stay where they were.

    Args:
        target: (R, n) the original weights ``W``.
        codes: (R, n) int64 codes.
        grams: diagonal blocks of ``H``.
        codebook: (R, K) or (1, K) current codewords (the ridge's anchor and the output shape).
        scales: optional (R, n) per-weight scales.
        max_block: largest diagonal block of ``H`` used.

    Returns:
        (C, K) float64 codewords, not sorted (sort them with their codes afterwards).
    """
    rows, n = target.shape
    levels = codebook.shape[1]
    shared = codebook.shape[0] == 1
    blocks = []
    for gram in grams:
        width = gram.shape[0]
        step = -(-width // -(-width // max_block))  # equal sub-blocks of at most max_block
        blocks += [gram[i : i + step, i : i + step].to(torch.float32) for i in range(0, width, step)]
    bounds = block_bounds(blocks)
    system = torch.zeros(1 if shared else rows, levels, levels, dtype=torch.float64, device=target.device)
    rhs = torch.zeros(1 if shared else rows, levels, dtype=torch.float64, device=target.device)
    chunk = max(1, _REFIT_ELEMENTS // (n * levels))
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        onehot = torch.zeros(r1 - r0, n, levels, dtype=torch.float32, device=target.device)  # (r, n, K)
        fill = 1.0 if scales is None else scales[r0:r1, :, None].to(torch.float32)
        onehot.scatter_(2, codes[r0:r1, :, None], fill)
        w = target[r0:r1].to(torch.float32)
        m = torch.zeros(r1 - r0, levels, levels, dtype=torch.float64, device=target.device)
        v = torch.zeros(r1 - r0, levels, dtype=torch.float64, device=target.device)
        for (start, end), block in zip(bounds, blocks, strict=True):
            y = onehot[:, start:end, :]  # (r, b, K)
            hy = torch.matmul(block, y)  # (r, b, K) = H_b @ Y_r, float32 products
            m += (y.transpose(1, 2) @ hy).to(torch.float64)
            v += (hy * w[:, start:end, None]).sum(dim=1, dtype=torch.float64)
        if shared:
            system[0] += m.sum(dim=0)
            rhs[0] += v.sum(dim=0)
        else:
            system[r0:r1] = m
            rhs[r0:r1] = v
    anchor = codebook.to(torch.float64)
    trace = system.diagonal(dim1=1, dim2=2).sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    ridge = 1e-9 * trace / levels  # (C, 1)
    eye = torch.eye(levels, dtype=torch.float64, device=target.device)
    solved = torch.linalg.solve(system + ridge[:, :, None] * eye, rhs + ridge * anchor)
    return torch.where(torch.isfinite(solved), solved, anchor)


def sort_codebook(codebook: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each codebook row ascending and renumber the codes to match.

    Args:
        codebook: (C, K) codewords, C = 1 (shared) or one row per code row.
        codes: (R, n) int64 codes into them.

    Returns:
        ``(sorted codebook (C, K), renumbered codes (R, n))``; the dequantized values are unchanged.
    """
    order = codebook.argsort(dim=1)
    inverse = order.argsort(dim=1)  # old index -> new position
    if codebook.shape[0] == 1:
        return codebook.gather(1, order), inverse[0][codes]
    return codebook.gather(1, order), inverse.gather(1, codes)
