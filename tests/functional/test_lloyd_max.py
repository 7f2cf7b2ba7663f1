"""Optimality of ``lloyd_max_codebook`` (1-D k-means with nearest assignment) against exact oracles."""

from __future__ import annotations

import kmeans1d
import numpy as np
import pytest
import torch

from diffusers_otq.functional import lloyd_max_codebook


REL_TOL = 0.005  # excess MSE allowed over the exact optimum


# --------------------------------------------------------------------------------------------------------------
# oracles and helpers
# --------------------------------------------------------------------------------------------------------------


def dp_optimal_mse(x: np.ndarray, k: int, w: np.ndarray | None = None) -> float:
    """Exact weighted 1-D k-means optimum by an O(K n^2) dynamic program over contiguous cells of the sorted data."""
    order = np.argsort(x, kind="stable")
    xs = x[order].astype(np.float64)
    ws = np.ones_like(xs) if w is None else w[order].astype(np.float64)
    n = xs.size
    cw = np.concatenate([[0.0], np.cumsum(ws)])
    cx = np.concatenate([[0.0], np.cumsum(ws * xs)])
    cxx = np.concatenate([[0.0], np.cumsum(ws * xs * xs)])
    # cost[i, j] = weighted SSE of xs[i:j] around its weighted mean (i < j); inf otherwise.
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + 1, n + 1):
            mass = cw[j] - cw[i]
            s = cx[j] - cx[i]
            sse = (cxx[j] - cxx[i]) - (s * s / mass if mass > 0 else 0.0)
            cost[i, j] = max(sse, 0.0)
    best = cost[0].copy()  # best[j]: one cell over xs[:j]
    for _ in range(k - 1):
        best = np.minimum(best, (best[:, None] + cost).min(axis=0))  # allowing fewer cells never hurts
    return best[n] / cw[n]


def codebook_mse(x: np.ndarray, codebook: np.ndarray, w: np.ndarray | None = None) -> float:
    """(Weighted) MSE of nearest-codeword assignment."""
    err = np.min((x.astype(np.float64)[:, None] - codebook[None, :]) ** 2, axis=1)
    return float(np.average(err, weights=w))


def kmeans1d_mse(x: np.ndarray, k: int) -> float:
    clusters, centroids = kmeans1d.cluster(x.astype(np.float64).tolist(), k)
    return float(np.mean((x.astype(np.float64) - np.asarray(centroids)[clusters]) ** 2))


def fit(rows: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """lloyd_max_codebook on (R, n) rows, sorting (and aligning weights) as the caller does."""
    values = torch.from_numpy(rows)
    sorted_values, order = values.sort(dim=1)
    sorted_weights = None if weights is None else torch.from_numpy(weights).gather(1, order)
    codebook = lloyd_max_codebook(sorted_values, k, sorted_weights)
    assert codebook.shape == (rows.shape[0], k)
    assert (codebook.diff(dim=1) >= 0).all(), "codebook rows must be ascending"
    return codebook.numpy()


def assert_near_optimal(got: float, optimum: float, scale: float) -> None:
    assert got <= optimum * (1 + REL_TOL) + 1e-12 * scale, f"MSE {got:.6g} vs optimum {optimum:.6g}"


def sample(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":
        x = rng.standard_normal(n)
    elif kind == "uniform":
        x = rng.uniform(-1, 1, n)
    elif kind == "laplace":
        x = rng.laplace(0.0, 0.05, n)
    elif kind == "student-t3":
        x = rng.standard_t(3, n)
    elif kind == "mixture":
        x = np.concatenate([rng.normal(c, s, n) for c, s in ((-3.0, 0.5), (0.5, 0.2), (4.0, 1.0))])
        x = rng.permutation(x)[:n]
    elif kind == "exponential":
        x = rng.exponential(1.0, n)
    elif kind == "duplicates":
        x = np.round(rng.standard_normal(n) * 2) / 2  # ties everywhere
    elif kind == "few-unique":
        x = rng.choice(np.array([-1.5, 0.25, 3.0]), n)
    elif kind == "twelve-unique":
        x = rng.choice(np.arange(1.0, 13.0), n)
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# (a) exact dynamic program on small rows
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "exponential", "student-t3", "duplicates", "few-unique"])
@pytest.mark.parametrize("n", [9, 23, 60], ids=lambda n: f"n{n}")
def test_matches_exact_dp_on_small_rows(n: int, kind: str) -> None:
    rng = np.random.default_rng(n * 31 + len(kind))
    rows = np.stack([sample(kind, n, rng) for _ in range(3)])
    for k in range(2, 9):
        if k >= n:
            continue
        codebook = fit(rows, k)
        for r in range(rows.shape[0]):
            optimum = dp_optimal_mse(rows[r], k)
            assert_near_optimal(codebook_mse(rows[r], codebook[r]), optimum, float(np.var(rows[r])) + 1.0)


def test_dp_oracle_sanity() -> None:
    """The oracle itself: 2 clusters of 2 points, and K >= #unique gives 0."""
    x = np.array([0.0, 1.0, 10.0, 11.0])
    assert dp_optimal_mse(x, 2) == pytest.approx(0.25)
    assert dp_optimal_mse(x, 1) == pytest.approx(np.var(x))
    assert dp_optimal_mse(np.array([1.0, 1.0, 2.0, 2.0, 5.0]), 3) == 0.0
    assert dp_optimal_mse(x, 2) == pytest.approx(kmeans1d_mse(x, 2))


# --------------------------------------------------------------------------------------------------------------
# (b) kmeans1d (exact O(kn)) on longer rows
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("n", [300, 3000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("kind", ["gaussian", "laplace", "mixture", "student-t3", "twelve-unique"])
def test_matches_kmeans1d(kind: str, n: int, k: int) -> None:
    rng = np.random.default_rng(1000 + n + 7 * k + len(kind))
    rows = np.stack([sample(kind, n, rng) for _ in range(2)])
    codebook = fit(rows, k)
    for r in range(rows.shape[0]):
        assert_near_optimal(codebook_mse(rows[r], codebook[r]), kmeans1d_mse(rows[r], k), float(np.var(rows[r])))


# --------------------------------------------------------------------------------------------------------------
# (c) Lloyd-Max theory for the Gaussian
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,theory", [(4, 0.1175), (8, 0.03454), (16, 0.009497)], ids=lambda v: f"K{v}" if isinstance(v, int) else None
)
def test_gaussian_lloyd_max_distortion(k: int, theory: float) -> None:
    rng = np.random.default_rng(2024)
    row = rng.standard_normal((1, 200_000)).astype(np.float32)
    codebook = fit(row, k)
    relative = codebook_mse(row[0], codebook[0]) / float(np.var(row[0].astype(np.float64)))
    assert relative == pytest.approx(theory, rel=0.02)


# --------------------------------------------------------------------------------------------------------------
# (d) weights = repetition counts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "duplicates", "exponential"])
@pytest.mark.parametrize("n", [12, 40], ids=lambda n: f"n{n}")
def test_integer_weights_equal_repetition_small(n: int, kind: str) -> None:
    rng = np.random.default_rng(n + len(kind))
    rows = np.stack([sample(kind, n, rng) for _ in range(2)])
    weights = rng.integers(1, 5, rows.shape).astype(np.float32)
    for k in (2, 3, 5, 8):
        codebook = fit(rows, k, weights)
        for r in range(rows.shape[0]):
            repeated = np.repeat(rows[r], weights[r].astype(np.int64))
            optimum = dp_optimal_mse(repeated, k)
            # The weighted oracle and the repetition oracle agree (sanity of the oracle).
            assert dp_optimal_mse(rows[r], k, weights[r]) == pytest.approx(optimum, rel=1e-9, abs=1e-12)
            got = codebook_mse(repeated, codebook[r])
            assert got == pytest.approx(codebook_mse(rows[r], codebook[r], weights[r]), rel=1e-9, abs=1e-12)
            assert_near_optimal(got, optimum, float(np.var(repeated)) + 1.0)


@pytest.mark.parametrize("with_zero_weights", [False, True], ids=["w1-3", "w0-3"])
@pytest.mark.parametrize("k", [4, 8], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
def test_integer_weights_equal_repetition_long(kind: str, k: int, with_zero_weights: bool) -> None:
    rng = np.random.default_rng(k + len(kind) + 10 * with_zero_weights)
    rows = np.stack([sample(kind, 1500, rng) for _ in range(2)])
    weights = rng.integers(0 if with_zero_weights else 1, 4, rows.shape).astype(np.float32)
    codebook = fit(rows, k, weights)
    for r in range(rows.shape[0]):
        repeated = np.repeat(rows[r], weights[r].astype(np.int64))
        assert_near_optimal(codebook_mse(repeated, codebook[r]), kmeans1d_mse(repeated, k), float(np.var(repeated)))


def test_weights_change_the_optimum() -> None:
    """A heavy weight on one value pulls an atom onto it (guards against ignoring the weights)."""
    x = np.linspace(-1.0, 1.0, 41).astype(np.float32)[None]
    w = np.ones_like(x)
    w[0, 30] = 1000.0
    unweighted = fit(x, 3)
    weighted = fit(x, 3, w)
    assert np.min(np.abs(weighted[0] - x[0, 30])) < 0.01
    assert np.min(np.abs(unweighted[0] - x[0, 30])) > 0.1


# --------------------------------------------------------------------------------------------------------------
# (e) contract
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, 16, 32], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("n", [40, 3000], ids=lambda n: f"n{n}")
def test_shape_dtype_and_ascending(n: int, k: int) -> None:
    rows = torch.randn(5, n).sort(dim=1).values
    codebook = lloyd_max_codebook(rows, k)
    assert codebook.shape == (5, k) and codebook.dtype == torch.float64
    assert (codebook.diff(dim=1) >= 0).all()
    assert (codebook >= rows[:, :1]).all() and (codebook <= rows[:, -1:]).all()


def constant_rows(n: int) -> torch.Tensor:
    x = torch.full((3, n), 0.7)
    x[1] = -3.0
    x[2] = torch.randn(n).sort().values  # a normal row in the same batch
    return x


@pytest.mark.parametrize("k", [2, 8, 16, 32], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("n", [50, 3000], ids=lambda n: f"n{n}")
def test_constant_rows_dequantize_to_the_constant(n: int, k: int) -> None:
    x = constant_rows(n)
    codebook = lloyd_max_codebook(x, k)
    nearest = codebook.gather(1, (x[:, :, None].double() - codebook[:, None, :]).abs().argmin(dim=2))
    assert torch.equal(nearest[:2], x[:2].double())


@pytest.mark.parametrize("n", [50, 3000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("k", [2, 8, 16], ids=lambda k: f"K{k}")
def test_constant_rows_give_the_constant_codebook(k: int, n: int) -> None:
    x = constant_rows(n)
    codebook = lloyd_max_codebook(x, k)
    assert torch.equal(codebook[0], torch.full((k,), 0.7, dtype=torch.float32).double())
    assert torch.equal(codebook[1], torch.full((k,), -3.0, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 10, 11], ids=lambda k: f"K{k}")
def test_invalid_num_levels(k: int) -> None:
    with pytest.raises(ValueError, match="num_levels"):
        lloyd_max_codebook(torch.randn(2, 10).sort(dim=1).values, k)


@pytest.mark.parametrize("k", [8, 16, 32], ids=lambda k: f"K{k}")
def test_batched_rows_are_independent_to_the_bit(k: int) -> None:
    # Uniform, Gaussian and Student-t(2) rows converge at different Lloyd iterations (uniform rows slowly): each
    # must get exactly the codebook it gets alone, so chunked and multi-threaded fits give the same bits.
    torch.manual_seed(1)
    rows = torch.cat([torch.rand(2, 2000), torch.randn(2, 2000), torch.distributions.StudentT(2.0).sample((2, 2000))])
    rows = rows.sort(dim=1).values
    together = lloyd_max_codebook(rows, k)
    for r in range(rows.shape[0]):
        assert torch.equal(together[r : r + 1], lloyd_max_codebook(rows[r : r + 1], k)), f"row {r}"


# --------------------------------------------------------------------------------------------------------------
# (f) real-valued importance weights (activation second moments), rows longer than the exact-DP limit
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 8], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("n", [200, 400], ids=lambda n: f"n{n}")
def test_activation_weights_within_half_a_percent_of_the_weighted_dp(n: int, k: int) -> None:
    """Weights shaped like E[x_j^2] (log-normal, spanning 3 decades): the micro-bin DP + Lloyd + banded-DP path
    stays within 0.5% of the exact weighted optimum."""
    rng = np.random.default_rng(n * k)
    rows = rng.standard_normal((3, n))
    weights = np.exp(rng.normal(0.0, 1.2, size=(3, n)))
    codebook = fit(rows, k, weights)
    for r in range(rows.shape[0]):
        optimum = dp_optimal_mse(rows[r], k, weights[r])
        got = codebook_mse(rows[r], codebook[r], weights[r])
        assert got <= optimum * 1.005, f"row {r}: weighted MSE {got:.6g} vs weighted DP optimum {optimum:.6g}"


@pytest.mark.parametrize("k", [2, 4, 8, 16], ids=lambda k: f"K{k}")
def test_the_cpu_dp_kernel_gives_the_same_bits_as_pytorch(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    from diffusers_otq.functional import lloyd_max
    from diffusers_otq.functional.cpu_kernels import load

    if load() is None:
        pytest.skip("the CPU extension cannot be built here")
    torch.manual_seed(k)
    rows = torch.cat([
        torch.randn(6, 1500),
        torch.randn(6, 1500).round(),  # repeated values: empty micro-bins and tied DP costs
        torch.distributions.StudentT(2.0).sample((6, 1500)),
    ]).sort(dim=1).values  # fmt: skip
    weights = torch.rand(18, 1500)
    weights[:, ::4] = 0.0
    with_kernel = [lloyd_max_codebook(rows, k), lloyd_max_codebook(rows, k, weights)]
    monkeypatch.setattr(lloyd_max, "load", lambda: None)  # the PyTorch DP
    without = [lloyd_max_codebook(rows, k), lloyd_max_codebook(rows, k, weights)]
    assert all(torch.equal(a, b) for a, b in zip(with_kernel, without, strict=True))
