"""Randomized block-Hadamard rotations of a layer's input dimension (QuIP#-style incoherence processing).

A rotation ``R = blockdiag(H_b, ..., H_b) @ diag(s)`` of width ``n`` multiplies by random signs ``s`` and then
applies the normalised Walsh-Hadamard matrix ``H_b`` (``b`` a power of two dividing ``n``, ``H_b H_b = I``) to
each contiguous block of ``b`` values. ``R`` is orthogonal, so for a weight ``W`` (out, n) and an input
``x`` (..., n)::

    x @ W.T == (x @ R.T) @ (W @ R.T).T        # rotate_rows(x) @ rotate_rows(W).T

A rotated weight row mixes its ``n`` values, which removes outliers and makes rows close to Gaussian, the case
an optimal scalar codebook is built for. Widths that are not a power of two use the largest power of two that
divides them (3072 = 3 x 1024 gives blocks of 1024).

Everything here is pure tensor math; the transform is ``O(n log b)`` per row (the fast Walsh-Hadamard
butterflies), never an ``n x n`` matrix.
"""

from __future__ import annotations

import torch


__all__ = [
    "hadamard_block_size",
    "rotate_channel_gram",
    "rotate_channel_vector",
    "random_signs",
    "rotate_rows",
    "unrotate_rows",
    "walsh_hadamard",
]


def hadamard_block_size(width: int, max_block: int | None = None) -> int:
    """The largest power of two that divides ``width`` (and is at most ``max_block``).

    Args:
        width: the input dimension ``n`` (> 0).
        max_block: optional cap (a power of two), e.g. to bound the mixing span.

    Returns:
        ``b``; 1 means no rotation is possible (odd ``width``).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r} must be a positive int.")
    block = width & -width  # lowest set bit: the largest power of two dividing width
    if max_block is not None:
        if max_block < 1 or max_block & (max_block - 1):
            raise ValueError(f"max_block={max_block!r} must be a power of two, e.g. 1024.")
        block = min(block, max_block)
    return block


def random_signs(width: int, seed: int) -> torch.Tensor:
    """(width,) float32 random ``+-1`` signs, deterministic for ``seed`` (a CPU generator)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    bits = torch.randint(0, 2, (width,), generator=generator, dtype=torch.int64)
    return (1 - 2 * bits).to(torch.float32)


def walsh_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """The normalised Walsh-Hadamard transform of each contiguous block of ``block`` values of the last dim.

    ``H_b`` (Sylvester order) scaled by ``1/sqrt(b)``: symmetric and orthogonal, so it is its own inverse.

    Args:
        x: (..., n) floating tensor, ``n`` divisible by ``block``.
        block: a power of two.

    Returns:
        (..., n) tensor of the same dtype (float16/bfloat16 inputs are transformed in float32).
    """
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(
            f"block={block} must be a power of two that divides the last dimension {n}; "
            f"use hadamard_block_size({n}) = {hadamard_block_size(n) if n > 0 else 'n/a'}."
        )
    work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = x.to(work_dtype).reshape(-1, n // block, block)
    half = 1
    while half < block:
        pairs = y.reshape(y.shape[0], y.shape[1], block // (2 * half), 2, half)
        a, b = pairs[:, :, :, 0, :], pairs[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3).reshape(y.shape)
        half *= 2
    y = y * (block**-0.5)
    return y.reshape(x.shape).to(x.dtype)


def rotate_rows(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ R.T`` with ``R = blockdiag(H_b) diag(signs)``: rotate each row (last dim) of ``x``.

    Args:
        x: (..., n) weight rows or activations.
        signs: (n,) ``+-1`` values.
        block: the Hadamard block ``b`` (a power of two dividing ``n``).
    """
    return walsh_hadamard(x * signs.to(device=x.device, dtype=x.dtype), block)


def unrotate_rows(y: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of :func:`rotate_rows`: ``y @ R`` (``R`` orthogonal)."""
    return walsh_hadamard(y, block) * signs.to(device=y.device, dtype=y.dtype)


def rotate_channel_vector(v: torch.Tensor, signs: torch.Tensor, block: int, taps: int) -> torch.Tensor:
    """Rotate the channel axis of flattened input rows: ``v`` (..., c * taps) in (channel, tap) order, the
    rotation acting on the ``c`` channels of every tap (a conv's unfolded input; ``taps = 1`` for a Linear)."""
    shape = v.shape
    channels = shape[-1] // taps
    view = v.reshape(*shape[:-1], channels, taps).movedim(-1, -2)  # (..., taps, c)
    return rotate_rows(view, signs, block).movedim(-1, -2).reshape(shape)


def rotate_channel_gram(gram: torch.Tensor, signs: torch.Tensor, block: int, taps: int) -> torch.Tensor:
    """``(R (x) I) H (R (x) I)^T`` for a Gram ``H`` (m, m) of flattened rows in (channel, tap) order.

    ``signs`` are the ``m / taps`` channels' signs; ``block`` must divide ``m / taps`` (the Gram covers whole
    Hadamard blocks of channels).
    """
    once = rotate_channel_vector(gram, signs, block, taps)  # H R^T: rotate each row
    return rotate_channel_vector(once.T, signs, block, taps).T  # R (H R^T)
