"""The multiple-choice knapsack behind the bits budget."""

from __future__ import annotations

import itertools
import random

import pytest

from diffusers_otq.functional.allocation import allocate, minimum_size


def brute_force(sizes, distortions, budget):
    best = None
    for choice in itertools.product(*(range(len(s)) for s in sizes)):
        size = sum(s[c] for s, c in zip(sizes, choice, strict=True))
        if size > budget:
            continue
        value = sum(d[c] for d, c in zip(distortions, choice, strict=True))
        if best is None or value < best[0] - 1e-12:
            best = (value, choice)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_exact_on_small_problems(seed: int) -> None:
    rng = random.Random(seed)
    layers = rng.randint(2, 5)
    sizes = [[rng.randint(1, 30) for _ in range(rng.randint(1, 4))] for _ in range(layers)]
    distortions = [[rng.random() for _ in s] for s in sizes]
    budget = minimum_size(sizes) + rng.randint(0, 40)
    result = allocate(sizes, distortions, budget)
    value, _ = brute_force(sizes, distortions, budget)
    assert result.unit == 1
    assert result.size <= budget
    assert abs(result.distortion - value) < 1e-9


def test_coarse_grid_still_fits_the_budget() -> None:
    rng = random.Random(0)
    sizes = [[rng.randint(1000, 9000) for _ in range(6)] for _ in range(20)]
    distortions = [[rng.random() for _ in s] for s in sizes]
    budget = 100_000
    result = allocate(sizes, distortions, budget, max_cells=1000)
    assert result.unit > 1 and result.size <= budget
    # The slack a coarse grid can leave is at most one unit per layer.
    assert budget - result.size < len(sizes) * result.unit + max(max(s) for s in sizes)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="below the smallest possible plan"):
        allocate([[5, 6]], [[1.0, 0.0]], 4)
    with pytest.raises(ValueError, match="distortions"):
        allocate([[1, 2]], [[1.0]], 10)
    with pytest.raises(ValueError, match="finite"):
        allocate([[1]], [[float("nan")]], 10)
    with pytest.raises(ValueError, match="layers"):
        allocate([[1]], [], 10)
