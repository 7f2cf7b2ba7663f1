"""Weight-level fidelity metrics shared by the quantizer's summary, tests, benchmarks and evaluation."""

from __future__ import annotations

import torch

from .lloyd_max import accumulation_dtype


__all__ = ["wasserstein2", "relative_mse"]


def wasserstein2(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """W2 distance between the empirical distributions of two equally sized tensors (all entries, flattened).

    In 1-D the optimal coupling of two n-point empirical measures with equal masses is monotone, so

        W2(a, b)^2 = (1/n) * sum_i (a_(i) - b_(i))^2

    with ``a_(i)`` and ``b_(i)`` the sorted values. For a quantizer with monotone assignment (nearest codeword,
    or the paper's rank assignment) this equals the root of the MSE between the tensors.

    Args:
        original: tensor of any shape.
        quantized: tensor with the same number of elements.

    Returns:
        W2 as a Python float, computed in float64 (float32 on MPS).
    """
    if original.numel() != quantized.numel():
        raise ValueError(
            f"wasserstein2 needs equally sized tensors, got {original.numel()} and {quantized.numel()} elements."
        )
    if original.numel() == 0:
        raise ValueError("wasserstein2 of empty tensors is undefined; pass tensors with at least one element.")
    acc = accumulation_dtype(original.device)
    a = original.detach().reshape(-1).to(acc).sort().values
    b = quantized.detach().reshape(-1).to(device=original.device, dtype=acc).sort().values
    return (a - b).square().mean().sqrt().item()


def relative_mse(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """``mean((original - quantized)^2) / mean(original^2)``; 0 for an exact copy, inf for an all-zero original."""
    acc = accumulation_dtype(original.device)
    a = original.detach().to(acc)
    err = (a - quantized.detach().to(device=original.device, dtype=acc)).square().mean()
    power = a.square().mean()
    if power == 0:
        return 0.0 if err == 0 else float("inf")
    return (err / power).item()
