"""Low-rank approximations of a weight in a weighted Frobenius norm (the SVDQuant-style side branch).

For a weight (or residual) ``T`` (R, n) and an input Gram ``H = L L^T`` (n, n), the best rank-``r`` ``U V``
in the output-error norm ``||(T - U V) L||_F^2 = tr((T - U V) H (T - U V)^T)`` comes from the SVD of ``T L``
(Eckart-Young in the transformed space)::

    T L = P S Q^T,     U = P_r S_r,     V = Q_r^T L^{-1}

Without a Gram it is the plain truncated SVD (``L = I``); with only second moments ``E[x_j^2]`` it is the
diagonal case ``L = diag(sqrt(E[x_j^2]))``. A block-diagonal ``H`` (wide layers) uses the block Cholesky
factors. All products and the SVD run in float64 on the weight's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .error_feedback import damped_gram


__all__ = ["check_rank", "lowrank_bytes", "weighted_lowrank"]


def check_rank(rank: object, rows: int, width: int, name: str | None = None) -> int:
    """Return ``rank`` if it is an int in ``0..min(rows, width)`` (0: no branch)."""
    where = f" for layer {name!r}" if name else ""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank={rank!r}{where} must be an int >= 0 (0 disables the low-rank branch), e.g. rank=16.")
    if rank > min(rows, width):
        raise ValueError(
            f"rank={rank}{where} exceeds min(out, in) = min({rows}, {width}) = {min(rows, width)}; a weight of "
            f"that shape has no higher rank. Use rank <= {min(rows, width)} (small ranks such as 8-32 are typical)."
        )
    return rank


def lowrank_bytes(rows: int, width: int, rank: int, itemsize: int = 2) -> int:
    """Bytes of the two factors ``U`` (rows, rank) and ``V`` (rank, width) stored with ``itemsize`` bytes."""
    return rank * (rows + width) * itemsize


def _factor(gram_blocks: Sequence[torch.Tensor] | None, moments: torch.Tensor | None, damping: float, width: int):
    """Lower factors ``L`` of the (damped) Gram: a list of (start, end, L_block), or a (n,) diagonal, or None."""
    if gram_blocks is not None:
        blocks, start = [], 0
        for block in gram_blocks:
            size = block.shape[0]
            blocks.append((start, start + size, torch.linalg.cholesky(damped_gram(block, damping))))
            start += size
        if start != width:
            raise ValueError(f"the Gram blocks cover {start} inputs, but the weight has {width}.")
        return blocks
    if moments is not None:
        if moments.shape != (width,):
            raise ValueError(f"moments of shape {tuple(moments.shape)} do not match the weight width {width}.")
        m = moments.to(torch.float64)
        return (m + damping * m.mean()).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    return None


def weighted_lowrank(
    target: torch.Tensor,
    rank: int,
    gram_blocks: Sequence[torch.Tensor] | None = None,
    moments: torch.Tensor | None = None,
    damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` ``U V`` closest to ``target`` in the output-error norm of the given input statistics.

    Args:
        target: (R, n) weight or residual.
        rank: ``r`` in ``1..min(R, n)``.
        gram_blocks: diagonal blocks of the input Gram ``H`` (their sizes sum to ``n``), or None.
        moments: (n,) second moments ``E[x_j^2]`` when no Gram is available, or None (plain SVD).
        damping: relative ridge ``H + damping * mean(diag H) I`` that keeps ``L`` invertible.

    Returns:
        ``(U, V)``: float64 (R, r) and (r, n), ``U V`` the weighted-optimal rank-``r`` approximation.
    """
    rows, width = target.shape
    check_rank(rank, rows, width)
    if rank == 0:
        raise ValueError("rank=0 has no factors; skip the low-rank branch instead.")
    t = target.to(torch.float64)
    factor = _factor(gram_blocks, moments, damping, width)
    if factor is None:
        scaled = t
    elif isinstance(factor, torch.Tensor):
        scaled = t * factor
    else:
        scaled = torch.cat([t[:, a:b] @ lower for a, b, lower in factor], dim=1)
    p, s, qh = torch.linalg.svd(scaled, full_matrices=False)
    up = p[:, :rank] * s[:rank]
    down = qh[:rank]  # V L (r, n)
    if factor is None:
        return up, down
    if isinstance(factor, torch.Tensor):
        return up, down / factor
    parts = [
        torch.linalg.solve_triangular(lower, down[:, a:b], upper=False, left=False) for a, b, lower in factor
    ]  # (V L)_b L_b^{-1}
    return up, torch.cat(parts, dim=1)
