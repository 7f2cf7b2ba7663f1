"""Compact group scales: absmax per group, stored as 8-bit log-domain codes, one fp32 per row and one per tensor.

For row ``r`` with group absmax values ``s_g >= 0`` let ``s_max[r] = max_g s_g``. One tensor-wide
``step = max_r log2(s_max[r] / s_min[r]) / 254`` (``s_min[r]``: smallest non-zero scale of the row; 0 when
every row's non-zero scales are equal) spreads the 254 non-zero codes over the widest row. Each scale is
stored as a uint8 code::

    code = 0                                   if s_g == 0
    code = 255 - round(log2(s_max / s_g) / step) in 1..255 otherwise

and decoded as ``s_max * 2 ** (-(255 - code) * step)`` (0 for code 0). Relative error is at most
``2 ** (step / 2) - 1``: 0.7% for a 1000x spread of scales within a row. The largest scale of every row,
and every scale of a row whose scales are all equal, decode exactly, so constant rows stay exact.

Storage for ``R`` rows of ``G`` groups: ``R * G`` bytes of codes + ``4 * R`` bytes of row maxima + 4 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lloyd_max import accumulation_dtype


__all__ = ["GroupScales", "encode_group_scales", "decode_group_scales"]


@dataclass(frozen=True)
class GroupScales:
    """Encoded group scales.

    Attributes:
        codes: (rows, groups) uint8 log-domain codes.
        row_max: (rows,) float32 largest scale of each row.
        step: (1,) float32 tensor-wide log2 step between codes.
    """

    codes: torch.Tensor
    row_max: torch.Tensor
    step: torch.Tensor


def encode_group_scales(scales: torch.Tensor) -> GroupScales:
    """Encode non-negative (rows, groups) absmax scales; see the module docstring."""
    s32 = scales.to(torch.float32)
    s = s32.to(accumulation_dtype(scales.device))  # precise logs
    nonzero = s > 0
    # log2 of each value separately: a ratio s_max / s_min could overflow, and subnormal scales must not be clamped.
    log_s = torch.log2(torch.where(nonzero, s, torch.ones_like(s)))
    log_max = torch.where(nonzero, log_s, torch.full_like(log_s, -float("inf"))).amax(dim=1, keepdim=True)
    log_min = torch.where(nonzero, log_s, torch.full_like(log_s, float("inf"))).amin(dim=1, keepdim=True)
    has_scale = torch.isfinite(log_max)  # (rows, 1): False for an all-zero row
    log_max = torch.where(has_scale, log_max, torch.zeros_like(log_max))
    spread = torch.where(has_scale, log_max - log_min, torch.zeros_like(log_max))
    step = (spread.amax().reshape(1) / 254).to(torch.float32)
    safe_step = torch.where(step > 0, step, torch.ones_like(step)).to(s.dtype)
    offset = torch.round((log_max - log_s) / safe_step)
    offset = torch.where(step > 0, offset, torch.zeros_like(offset)).clamp(0, 254)
    codes = torch.where(nonzero, 255 - offset, torch.zeros_like(offset)).to(torch.uint8)
    return GroupScales(codes, s32.amax(dim=1), step)


def decode_group_scales(
    codes: torch.Tensor, row_max: torch.Tensor, step: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode to (rows, groups) scales in ``dtype`` (computed in float32)."""
    s_max = row_max.to(torch.float32)[:, None]
    # exp2 of the summed logs: s_max * exp2(-k * step) would underflow for very wide spreads.
    log_max = torch.log2(torch.where(s_max > 0, s_max, torch.ones_like(s_max)))
    decoded = torch.exp2(log_max - (255.0 - codes.to(torch.float32)) * step.to(torch.float32))
    decoded = torch.where(codes == 255, s_max, decoded)  # the row maximum is exact
    return torch.where(codes == 0, torch.zeros_like(decoded), decoded).to(dtype)
