"""Integer codebook storage: 8-bit codewords times one float32 scale per codebook.

A codebook ``c`` of shape (C, K) or (C, K, d) (C codebooks of K codewords) is stored as::

    scale[i] = max |c[i]| / 127                      (1 where codebook i is all zero)
    q[i]     = round(c[i] / scale[i]), clamped to -127..127, int8
    c'[i]    = q[i] * scale[i]                       (decoded in float32)

so ``|c - c'| <= max |c[i]| / 254`` per value: at 2 bits per weight in 4-D (256 codewords of 4 values) that is
a rounding error far below the quantization error of the codes (tests/functional/test_codebook_storage.py).
The storage is ``8 K d`` bits plus 32 per codebook, half of float16's ``16 K d`` when K d is large: what makes
vector codebooks affordable on narrow layers. Symmetric and zero-preserving: a zero codeword stays zero, and
the sign pattern of the codewords is kept.
"""

from __future__ import annotations

import torch


__all__ = [
    "INT8_LEVELS",
    "decode_scaled_codebook",
    "encode_scaled_codebook",
    "round_to_storage",
    "store_codebook",
]

INT8_LEVELS = 127
"""Largest stored magnitude: codes span -127..127 (symmetric; -128 is never used)."""


def encode_scaled_codebook(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: the int8 codewords (shape of ``codebook``) and (C,) float32 scales of a float codebook
    (C, K) or (C, K, d); see the module docstring. Non-finite codewords raise a ValueError."""
    values = codebook.detach().to(torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("the codebook holds NaN or Inf values; an int8 codebook cannot store them.")
    peak = values.abs().reshape(values.shape[0], -1).amax(dim=1)
    scale = torch.where(peak > 0, peak / INT8_LEVELS, torch.ones_like(peak))
    shaped = scale.reshape(-1, *([1] * (values.dim() - 1)))
    q = torch.round(values / shaped).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return q, scale


def decode_scaled_codebook(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 codewords ``q * scale`` of an int8 codebook ``q`` (C, K) or (C, K, d) with (C,) ``scale``;
    differentiable in ``scale`` (and in ``q`` when it is a float tensor being trained)."""
    return q.to(torch.float32) * scale.to(torch.float32).reshape(-1, *([1] * (q.dim() - 1)))


def store_codebook(codebook: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(stored, scale)``: float codewords ``codebook`` (C, K) or (C, K, d) as stored in ``dtype``: int8 encoded
    with its (C,) float32 scales (:func:`encode_scaled_codebook`), a float dtype cast, its scale None."""
    if dtype == torch.int8:
        return encode_scaled_codebook(codebook)
    return codebook.detach().to(dtype), None


def round_to_storage(codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codebook`` (C, ...) rounded as storing it in ``dtype`` would, in its own dtype: a float dtype by a cast
    there and back, int8 by encoding and decoding each codebook (rows with NaN or Inf are left as they are, for
    the caller to reject)."""
    if dtype != torch.int8:
        return codebook.to(dtype).to(codebook.dtype)
    finite = torch.isfinite(codebook.reshape(codebook.shape[0], -1)).all(dim=1)
    rows = finite.reshape(-1, *([1] * (codebook.dim() - 1)))
    rounded = decode_scaled_codebook(*encode_scaled_codebook(torch.where(rows, codebook, 0.0)))
    return torch.where(rows, rounded.to(codebook.dtype), codebook)
