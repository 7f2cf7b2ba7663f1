"""Fitting one layer's stored form: codes, plus the optional low-rank branch and input rotation of its spec.

``W ~ (U V + Q(W R^T - U V)) R`` is fitted by alternation (SVDQuant-style, with any codebook fitter for ``Q``):

1. rotate: ``W' = W R^T`` over the input channels (:class:`~diffusers_otq.structure.InputRotation`; identity
   without a rotation);
2. ``U V`` <- the best rank-``r`` approximation of ``W' - Q`` (``Q = 0`` in the first round), then
   ``Q`` <- the codebook fit of ``W' - U V``; repeated ``rounds`` times, keeping the round with the lowest error.

The callers choose the norms: data-free, the plain SVD and the weight error ``||W' - U V - Q||^2``
(:func:`fit_data_free`); calibrated, the activation-weighted SVD and the output error on the layer's
statistics (:mod:`diffusers_otq.calibration.fit`). Both give a :class:`LayerFit`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .functional.lowrank import weighted_lowrank
from .options import LayerSpec
from .quantized_tensor import QuantizedTensor, quantize_tensor
from .structure import InputRotation, LowRankBranch, lowrank_dtype


__all__ = [
    "LayerFit",
    "alternate_lowrank",
    "effective_weight",
    "fit_data_free",
    "layer_rotation",
    "rotation_seed_for",
]

LOWRANK_ROUNDS = 3
"""Low-rank/codebook alternations (the weight error of the bundled models stops improving after two or three)."""


@dataclass(frozen=True)
class LayerFit:
    """A fitted layer: its quantized weight, optionally a corrected bias (same shape as the module's bias), a
    low-rank branch and the input rotation the codes were fitted in."""

    quantized: QuantizedTensor
    bias: torch.Tensor | None = None
    lowrank: LowRankBranch | None = None
    rotation: InputRotation | None = None


def effective_weight(fit: LayerFit, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(Q + U V) R``: the weight the fitted layer computes with, in the original input space and shape."""
    quantized = fit.quantized
    weight = quantized.dequantize(dtype)
    if fit.lowrank is not None:
        weight = weight + fit.lowrank.product(dtype).reshape(weight.shape)
    if fit.rotation is not None:
        weight = fit.rotation.unrotate(weight, dim=1)
    return weight


def rotation_seed_for(base_seed: int, name: str) -> int:
    """A per-layer seed: ``base_seed`` mixed with the CRC-32 of the layer name (stable across runs and machines)."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


def layer_rotation(weight: torch.Tensor, spec: LayerSpec, name: str) -> InputRotation | None:
    """The input rotation ``spec`` asks for (over ``weight.shape[1]`` input channels), or None."""
    if not spec.rotation_block:
        return None
    return InputRotation.create(weight.shape[1], spec.rotation_block, rotation_seed_for(spec.rotation_seed, name))


def alternate_lowrank(
    target: torch.Tensor,
    rank: int,
    quantize: Callable[[torch.Tensor], QuantizedTensor],
    lowrank: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    error: Callable[[torch.Tensor], float],
    storage_dtype: torch.dtype,
    rounds: int = LOWRANK_ROUNDS,
) -> tuple[QuantizedTensor, LowRankBranch | None]:
    """Alternate ``U V`` and ``Q`` fits on ``target`` (the rotated weight, any shape with rows first).

    Args:
        target: the weight to approximate by ``U V + Q``.
        rank: ``r``; 0 returns ``quantize(target)`` and no branch.
        quantize: fits codes to a residual of ``target``'s shape.
        lowrank: ``(R, n) residual -> (U (R, r), V (r, n))``.
        error: objective of an ``(R, n)`` float64 weight error (the kept round has the lowest).
        storage_dtype: dtype the factors are stored in (the error is measured after that rounding).
        rounds: alternations.

    Returns:
        The codes and the branch of the best round.
    """
    if rank == 0:
        return quantize(target), None
    rows = target.shape[0]
    flat = target.detach().reshape(rows, -1).to(torch.float64)
    codes = torch.zeros_like(flat)
    best: tuple[float, QuantizedTensor, LowRankBranch] | None = None
    for _ in range(max(1, rounds)):
        up, down = lowrank(flat - codes)
        branch = LowRankBranch.from_factors(up, down, storage_dtype)
        product = branch.product(torch.float64)
        quantized = quantize((flat - product).reshape(target.shape).to(target.dtype))
        codes = quantized.dequantize(torch.float64).reshape(rows, -1)
        value = error(flat - product - codes)
        if best is None or value < best[0]:
            best = (value, quantized, branch)
    return best[1], best[2]


def fit_data_free(weight: torch.Tensor, spec: LayerSpec, name: str | None = None) -> LayerFit:
    """Data-free fit of one weight with ``spec``: codes by :func:`quantize_tensor`, the low-rank branch by the
    plain SVD, the weight error as the objective (quantize-on-load uses this too).

    Args:
        weight: (out, in) or (out, in/groups, kh, kw) float weight.
        spec: the layer's settings (bits, method, granularity, rank, rotation).
        name: the layer name (seeds the rotation, names the layer in errors).
    """
    kwargs = spec.quantize_kwargs()
    rotation = layer_rotation(weight, spec, name or "")
    target = weight.detach() if rotation is None else rotation.rotate(weight.detach().to(torch.float32), dim=1)
    target = target.to(weight.dtype)
    quantized, branch = alternate_lowrank(
        target,
        spec.rank,
        quantize=lambda residual: quantize_tensor(residual, name=name, **kwargs),
        lowrank=lambda residual: weighted_lowrank(residual, spec.rank),
        error=lambda delta: float(delta.square().sum()),
        storage_dtype=lowrank_dtype(weight.dtype),
    )
    return LayerFit(quantized, lowrank=branch, rotation=rotation)
