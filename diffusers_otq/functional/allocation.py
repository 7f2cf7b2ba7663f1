"""Bit allocation under a storage budget: a multiple-choice knapsack over per-layer settings.

Layer ``l`` can be stored with one of its options ``s``; option ``s`` costs ``size[l][s]`` bytes and is
predicted to add ``distortion[l][s]`` to the model's error. With errors that add up over layers (the usual
assumption of HAWQ and MixDQ for small perturbations), the best plan solves

    min  sum_l distortion[l][s_l]     subject to     sum_l size[l][s_l] <= budget,

a multiple-choice knapsack. :func:`allocate` solves it exactly by dynamic programming over the capacity in
units of ``unit`` bytes; sizes are rounded *up* to whole units, so the returned plan always fits the budget,
and it is exact when ``unit == 1`` (the default whenever the budget has at most ``max_cells`` bytes; above
that, the unit grows and the plan can leave at most ``len(layers) * unit`` bytes unused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


__all__ = ["Allocation", "allocate", "minimum_size"]


@dataclass(frozen=True)
class Allocation:
    """A solved plan.

    Attributes:
        choices: index of the chosen option of each layer.
        size: total bytes of the chosen options.
        distortion: total predicted distortion of the chosen options.
        unit: the capacity unit in bytes the dynamic programme used (1 = exact).
    """

    choices: tuple[int, ...]
    size: int
    distortion: float
    unit: int


def minimum_size(sizes: Sequence[Sequence[int]]) -> int:
    """Bytes of the smallest possible plan: every layer at its cheapest option."""
    return sum(min(options) for options in sizes)


def allocate(
    sizes: Sequence[Sequence[int]],
    distortions: Sequence[Sequence[float]],
    budget: int,
    *,
    max_cells: int = 1 << 18,
) -> Allocation:
    """Minimise the summed distortion over one option per layer with total size at most ``budget`` bytes.

    Args:
        sizes: per layer, the size in bytes of each option (non-negative ints).
        distortions: per layer, the predicted distortion of each option (finite, same shape as ``sizes``).
        budget: total bytes allowed.
        max_cells: the capacity grid has at most this many cells (sets ``unit``; time and memory are
            O(layers * options * max_cells)).

    Returns:
        The optimal :class:`Allocation` on the capacity grid (ties: the smaller total size, then the
        lower option index).

    Raises:
        ValueError: shapes differ, a layer has no option, a value is negative or not finite, or even the
            cheapest plan exceeds ``budget`` (the message gives the minimum).

    Example:
        >>> allocate([[1, 2], [1, 2]], [[4.0, 1.0], [5.0, 0.0]], budget=3).choices
        (0, 1)
    """
    if len(sizes) != len(distortions):
        raise ValueError(f"{len(sizes)} layers have sizes but {len(distortions)} have distortions.")
    for index, (size, distortion) in enumerate(zip(sizes, distortions, strict=True)):
        if len(size) == 0 or len(size) != len(distortion):
            raise ValueError(f"layer {index}: {len(size)} sizes and {len(distortion)} distortions; need >= 1 each.")
        if any(s < 0 for s in size) or not all(math.isfinite(d) and d >= 0 for d in distortion):
            raise ValueError(f"layer {index}: sizes must be >= 0 and distortions finite and >= 0.")
    floor = minimum_size(sizes)
    if budget < floor:
        raise ValueError(f"the budget of {budget} bytes is below the smallest possible plan ({floor} bytes).")
    unit = max(1, math.ceil(budget / max_cells))
    cells = budget // unit
    inf = float("inf")
    best = torch.zeros(cells + 1, dtype=torch.float64)  # best[c]: least distortion using at most c units
    picks = []
    for size, distortion in zip(sizes, distortions, strict=True):
        units = [math.ceil(s / unit) for s in size]
        candidates = torch.full((len(units), cells + 1), inf, dtype=torch.float64)
        for option, (u, d) in enumerate(zip(units, distortion, strict=True)):
            if u <= cells:
                candidates[option, u:] = best[: cells + 1 - u] + d
        best, pick = candidates.min(dim=0)  # min returns the first (lowest) index among ties
        picks.append(pick)
    if not math.isfinite(float(best[cells])):  # pragma: no cover - unreachable once budget >= floor with unit 1
        raise ValueError(f"no plan fits {budget} bytes on a grid of {unit}-byte units; raise the budget or max_cells.")
    # The least-distortion cell; among equal distortions the smallest capacity.
    target = float(best[cells])
    capacity = int(torch.nonzero(best <= target, as_tuple=False)[0])
    choices = []
    for size, pick in zip(reversed(sizes), reversed(picks), strict=True):
        option = int(pick[capacity])
        choices.append(option)
        capacity -= math.ceil(size[option] / unit)
    choices.reverse()
    total_size = sum(size[c] for size, c in zip(sizes, choices, strict=True))
    total_distortion = math.fsum(d[c] for d, c in zip(distortions, choices, strict=True))
    return Allocation(tuple(choices), total_size, total_distortion, unit)
