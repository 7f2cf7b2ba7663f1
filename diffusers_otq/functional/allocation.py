"""Bit allocation under a storage budget: a multiple-choice knapsack over per-layer settings.

Layer ``l`` can be stored with one of its options ``s``; option ``s`` costs ``size[l][s]`` bytes and is
predicted to add ``distortion[l][s]`` to the model's error. With errors that add up over layers (the usual
assumption of HAWQ and MixDQ for small perturbations), the best plan solves

    min  sum_l distortion[l][s_l]     subject to     sum_l size[l][s_l] <= budget,

a multiple-choice knapsack. :func:`allocate` solves it exactly by dynamic programming over the capacity in
units of ``unit`` bytes; sizes are rounded *up* to whole units, so the returned plan always fits the budget,
and it is exact when ``unit == 1`` (the default whenever the budget has at most ``max_cells`` bytes; above
that, the unit grows and the plan can leave at most ``len(layers) * unit`` bytes unused).

The distortions are per-layer relative output errors ``e_l(s) = sum_r d_r / sum_r E_r`` (row ``r``'s output error
``d_r = dW_r H dW_r^T`` over its reference energy ``E_r = W_r H W_r^T``). Rows are fitted independently given
``H``, so ``e_l`` can be estimated from a sample of rows by the ratio ``sum_{r in S} d_r / sum_{r in S} E_r``;
:func:`stratified_rows` picks that sample deterministically, spread over the rows' energies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


__all__ = ["Allocation", "allocate", "minimum_size", "stratified_rows"]


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


def stratified_rows(energy: torch.Tensor, per_group: int, groups: int = 1) -> torch.Tensor | None:
    """A deterministic row sample spread over the rows' energies, the same number of rows from every row group.

    The ``R`` rows form ``groups`` consecutive groups of ``P = R / groups`` rows (a grouped conv: rows of group
    ``g`` read input group ``g``). Within each group the rows are ranked by ``energy`` (ascending, ties by index)
    and the rows of rank ``floor((i + 1/2) P / k)``, ``i = 0 .. k-1``, are taken (``k = per_group``): a systematic
    sample of the energy distribution, so a ratio estimate ``sum_S d_r / sum_S E_r`` sees low- and high-energy rows
    in their proportions.

    Args:
        energy: (R,) non-negative energy of each row (e.g. ``sum_j E[x_j^2] W_rj^2``).
        per_group: rows to take from each group (``k >= 1``).
        groups: row groups (``R`` must be a multiple).

    Returns:
        (groups * k,) int64 row indices, ascending (group by group), or None when ``k >= P`` (every row is taken:
        fit the whole layer).

    Raises:
        ValueError: ``per_group < 1``, or ``groups`` does not divide the rows.

    Example:
        >>> stratified_rows(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0]), per_group=2).tolist()
        [1, 2]
    """
    rows = energy.shape[0]
    if per_group < 1:
        raise ValueError(f"per_group={per_group} must be >= 1.")
    if groups < 1 or rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} equal groups.")
    size = rows // groups
    if per_group >= size:
        return None
    ranks = ((torch.arange(per_group, dtype=torch.float64) + 0.5) * size / per_group).floor().to(torch.int64)
    by_group = energy.detach().reshape(groups, size).to(torch.float64).cpu()
    order = torch.argsort(by_group, dim=1, stable=True)  # (G, P): row offsets by ascending energy
    picked = order[:, ranks].sort(dim=1).values  # (G, k)
    return (picked + torch.arange(groups)[:, None] * size).reshape(-1)
