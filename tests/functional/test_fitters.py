"""Codebook fitters against numpy references of the paper's quantizers (paper.md sections 1 and 2)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from diffusers_otq.functional import METHODS, fit_codebook
from diffusers_otq.functional.fitters import array_split_edges, linear_quantiles


PAPER_METHODS = ["ot-equal-mass", "uniform", "piecewise", "log2"]
SHAPES = [(3, 17), (2, 100), (3, 257), (2, 1000)]  # includes n not divisible by K
LEVELS = [2, 4, 8, 16]


# --------------------------------------------------------------------------------------------------------------
# numpy references, written from paper.md without looking at the torch implementation's tricks
# --------------------------------------------------------------------------------------------------------------


def ref_equal_mass(x: np.ndarray, k: int) -> np.ndarray:
    """Sort, np.array_split into K chunks, codeword = chunk mean, every value gets its rank chunk's mean."""
    order = np.argsort(x, kind="stable")
    out = np.empty(x.shape, dtype=np.float64)
    start = 0
    for chunk in np.array_split(x[order].astype(np.float64), k):
        out[order[start : start + chunk.size]] = chunk.mean()
        start += chunk.size
    return out


def ref_uniform(x: np.ndarray, k: int) -> np.ndarray:
    """min + step * round((w - min) / step), step = (max - min) / (K - 1); constant rows unchanged (float32 math)."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / np.float32(k - 1)
    if step == 0:
        return x.astype(np.float64)
    return (lo + step * np.round((x - lo) / step)).astype(np.float64)


def ref_piecewise(x: np.ndarray, k: int) -> np.ndarray:
    """np.quantile (linear) breakpoints at i/K, midpoints, interval = searchsorted(side=right) - 1 clipped."""
    breakpoints = np.quantile(x.astype(np.float64), np.arange(k + 1) / k)
    mids = (breakpoints[:-1] + breakpoints[1:]) / 2
    idx = np.clip(np.searchsorted(breakpoints, x, side="right") - 1, 0, k - 1)
    return mids[idx]


def ref_log2_levels(x: np.ndarray, k: int) -> np.ndarray:
    x = x.astype(np.float64)
    pos, neg = x[x > 0], -x[x < 0]
    if pos.size and not neg.size:
        return np.geomspace(pos.min(), pos.max(), k)
    if neg.size and not pos.size:
        return -np.geomspace(neg.min(), neg.max(), k // 2)[::-1]
    if not pos.size and not neg.size:
        return np.zeros(1)
    return np.concatenate(
        [-np.geomspace(neg.min(), neg.max(), k // 2)[::-1], np.geomspace(pos.min(), pos.max(), k // 2)]
    )


def ref_log2(x: np.ndarray, k: int) -> np.ndarray:
    """Sign-split geometric levels; nearest level in the linear domain (argmin: ties to the lower level)."""
    levels = np.sort(ref_log2_levels(x, k))
    dist = np.abs(x.astype(np.float64)[:, None] - levels[None, :])
    return levels[dist.argmin(axis=1)]


REFERENCES = {"ot-equal-mass": ref_equal_mass, "uniform": ref_uniform, "piecewise": ref_piecewise, "log2": ref_log2}


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def nearest_codes(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """What the caller does when codes is None: nearest codeword, ties to the lower one."""
    x = values.to(codebook.dtype)
    dist = (x[:, :, None] - codebook[:, None, :]).abs()  # (R, n, K)
    return dist.argmin(dim=2)  # first minimum -> lower codeword of an ascending codebook


def dequantize(
    values: torch.Tensor, num_levels: int, method: str, weights: torch.Tensor | None = None
) -> torch.Tensor:
    fit = fit_codebook(values, num_levels, method, weights)
    codes = fit.codes if fit.codes is not None else nearest_codes(values, fit.codebook)
    return fit.codebook.gather(1, codes).to(torch.float64)


def mse(values: torch.Tensor, quantized: torch.Tensor) -> float:
    return (values.to(torch.float64) - quantized.to(torch.float64)).square().mean().item()


def random_rows(shape: tuple[int, int], kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal(shape)
    elif kind == "laplace":
        x = rng.laplace(size=shape) * 0.02 + 0.003
    elif kind == "positive":
        x = rng.lognormal(size=shape)
    elif kind == "negative":
        x = -rng.lognormal(size=shape)
    elif kind == "with-zeros":
        x = rng.standard_normal(shape)
        x[:, ::5] = 0.0
    elif kind == "ties":
        x = np.round(rng.standard_normal(shape) * 3) / 3  # ~20 distinct values, many ties
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


def assert_rows_close(actual: torch.Tensor, expected: np.ndarray, x: np.ndarray, rel: float = 1e-6) -> None:
    scale = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True)
    err = np.abs(actual.cpu().numpy() - expected)
    tol = rel * np.maximum(np.abs(expected), scale)
    bad = err > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} values differ; worst {err.max():.3g}"


# --------------------------------------------------------------------------------------------------------------
# parity with the paper's quantizers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
@pytest.mark.parametrize("num_levels", LEVELS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_parity_with_numpy_reference(
    method: str, shape: tuple[int, int], num_levels: int, kind: str, device: str
) -> None:
    x = random_rows(shape, kind, seed=zlib.crc32(repr((method, shape, num_levels, kind)).encode()))
    out = dequantize(torch.from_numpy(x).to(device), num_levels, method)
    expected = np.stack([REFERENCES[method](row, num_levels) for row in x])
    assert_rows_close(out, expected, x)


@pytest.mark.parametrize(
    "method,kind",
    [
        ("ot-equal-mass", "ties"),
        ("uniform", "ties"),
        ("log2", "positive"),
        ("log2", "negative"),
        ("log2", "with-zeros"),
        ("piecewise", "positive"),
        ("uniform", "negative"),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("num_levels", [2, 4, 16], ids=lambda k: f"K{k}")
def test_parity_special_rows(method: str, kind: str, num_levels: int) -> None:
    x = random_rows((3, 131), kind, seed=num_levels)
    out = dequantize(torch.from_numpy(x), num_levels, method)
    expected = np.stack([REFERENCES[method](row, num_levels) for row in x])
    assert_rows_close(out, expected, x)


def test_log2_zero_goes_to_smallest_magnitude_level() -> None:
    x = np.array([[-8.0, -2.0, -1.0, 0.0, 0.5, 1.0, 4.0, 32.0, 0.0]], dtype=np.float32)
    out = dequantize(torch.from_numpy(x), 4, "log2")[0]
    assert out[3].item() == pytest.approx(0.5) and out[8].item() == pytest.approx(0.5)
    assert_rows_close(out[None], ref_log2(x[0], 4)[None], x)


@pytest.mark.parametrize("method", ["uniform", "ot-equal-mass", "piecewise"])
def test_constant_rows_are_exact(method: str) -> None:
    x = torch.full((2, 50), 0.375)
    x[1] = -1.25
    assert torch.equal(dequantize(x, 4, method), x.to(torch.float64))


# --------------------------------------------------------------------------------------------------------------
# equal-mass (the paper's OT quantizer)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_levels", [2, 3, 4, 8, 16], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("n", [17, 100, 257, 1001], ids=lambda n: f"n{n}")
def test_equal_mass_buckets(n: int, num_levels: int) -> None:
    x = torch.randn(3, n)
    fit = fit_codebook(x, num_levels, "ot-equal-mass")
    assert fit.codes is not None and fit.codes.dtype == torch.int64 and fit.codes.shape == (3, n)
    expected_sizes = [len(c) for c in np.array_split(np.arange(n), num_levels)]
    for r in range(3):
        codes = fit.codes[r]
        assert torch.bincount(codes, minlength=num_levels).tolist() == expected_sizes
        # Assignment by rank: codes are non-decreasing along the sorted row.
        assert (codes[x[r].argsort()].diff() >= 0).all()
        for k in range(num_levels):
            bucket = x[r][codes == k].to(torch.float64)
            assert fit.codebook[r, k].item() == pytest.approx(bucket.mean().item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("num_levels", [4, 16], ids=lambda k: f"K{k}")
def test_equal_mass_permutation_invariance(num_levels: int) -> None:
    x = torch.randn(2, 203)
    perm = torch.randperm(203)
    a = dequantize(x, num_levels, "ot-equal-mass")
    b = dequantize(x[:, perm], num_levels, "ot-equal-mass")
    assert torch.allclose(a[:, perm], b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_levels", [2, 4, 16], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("method", METHODS)
def test_at_most_k_distinct_values_and_ascending_codebooks(method: str, num_levels: int) -> None:
    x = torch.randn(4, 300)
    fit = fit_codebook(x, num_levels, method)
    assert fit.codebook.shape == (4, num_levels)
    assert fit.codebook.is_floating_point()
    assert (fit.codebook.diff(dim=1) >= 0).all(), "codebook rows must be ascending"
    if fit.codes is not None:
        assert fit.codes.dtype == torch.int64 and fit.codes.shape == x.shape
        assert int(fit.codes.min()) >= 0 and int(fit.codes.max()) < num_levels
    out = dequantize(x, num_levels, method)
    for row in out:
        assert row.unique().numel() <= num_levels


def gaussian_rows(rows: int = 4, n: int = 4608) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(rows, n, generator=gen)


def test_equal_mass_beats_uniform_at_2_bits_but_not_at_8_bits() -> None:
    """paper.md section 5.4: rho = OT/uniform is ~0.27 at 2 bits and ~9.9 at 8 bits on Gaussian rows."""
    x = gaussian_rows()
    rho2 = mse(x, dequantize(x, 4, "ot-equal-mass")) / mse(x, dequantize(x, 4, "uniform"))
    rho8 = mse(x, dequantize(x, 256, "ot-equal-mass")) / mse(x, dequantize(x, 256, "uniform"))
    assert rho2 < 0.5
    assert rho8 > 2.0


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_ot_beats_equal_mass(bits: int) -> None:
    x = gaussian_rows()
    ot_mse = mse(x, dequantize(x, 1 << bits, "ot"))
    em_mse = mse(x, dequantize(x, 1 << bits, "ot-equal-mass"))
    assert ot_mse < em_mse * 0.95


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_equal_mass_beats_piecewise(bits: int) -> None:
    """paper.md section 5.4: PWL (midpoints) is always worse than OT (means) on the same bins."""
    x = gaussian_rows(rows=2)
    assert mse(x, dequantize(x, 1 << bits, "ot-equal-mass")) < mse(x, dequantize(x, 1 << bits, "piecewise"))


def test_ot_unit_weights_match_unweighted() -> None:
    x = torch.randn(3, 400)
    a = fit_codebook(x, 8, "ot").codebook
    b = fit_codebook(x, 8, "ot", torch.ones_like(x)).codebook
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["ot", "ot-vp"])
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_start_effort_is_a_close_valid_codebook(method: str, bits: int) -> None:
    """The coarse start of a calibrated fit: ascending codebooks within 3% of the full fit's MSE, and never the
    full fit itself at 3 and 4 bits (a cheaper search, not a relabelled one)."""
    x = gaussian_rows(rows=8)
    full = fit_codebook(x, 1 << bits, method)
    start = fit_codebook(x, 1 << bits, method, effort="start")
    assert torch.all(start.codebook[:, 1:] >= start.codebook[:, :-1])
    full_mse = mse(x, dequantize(x, 1 << bits, method))
    codes = start.codes if start.codes is not None else nearest_codes(x, start.codebook)
    start_mse = mse(x, start.codebook.gather(1, codes))
    assert full_mse <= start_mse * (1 + 1e-9) and start_mse < 1.03 * full_mse, (full_mse, start_mse)
    if bits > 2:
        assert not torch.equal(full.codebook, start.codebook)


def test_start_effort_leaves_other_methods_alone() -> None:
    x = gaussian_rows(rows=2)
    for method in ("ot-equal-mass", "uniform", "piecewise", "log2"):
        assert torch.equal(fit_codebook(x, 8, method).codebook, fit_codebook(x, 8, method, effort="start").codebook)


def test_unknown_effort_is_refused() -> None:
    with pytest.raises(ValueError, match="effort='quick'.*'full', 'start'"):
        fit_codebook(torch.randn(1, 10), 4, "ot", effort="quick")


def test_unknown_method_lists_methods() -> None:
    with pytest.raises(ValueError) as info:
        fit_codebook(torch.randn(1, 10), 4, "kmeans")
    message = str(info.value)
    assert "kmeans" in message
    for method in METHODS:
        assert method in message


def test_methods_registry() -> None:
    assert set(PAPER_METHODS) | {"ot", "ot-vp"} == set(METHODS)


# --------------------------------------------------------------------------------------------------------------
# ot-vp: Lloyd-Max cells, variance-preserving codewords
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_levels", [4, 8, 16])
def test_ot_vp_keeps_lloyd_cells_and_row_variance(num_levels: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 500, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 3, 6)[:, None] + 0.3
    lloyd = fit_codebook(x, num_levels, "ot").codebook
    fit = fit_codebook(x, num_levels, "ot-vp")
    lloyd_codes = (x[:, :, None] - lloyd[:, None, :]).abs().argmin(dim=2)
    assert torch.equal(fit.codes, lloyd_codes)  # the same cells as Lloyd-Max
    assert (fit.codebook.diff(dim=1) > 0).all()  # still ascending
    plain = lloyd.gather(1, fit.codes)
    stretched = fit.codebook.gather(1, fit.codes)
    torch.testing.assert_close(stretched.var(dim=1, unbiased=False), x.var(dim=1, unbiased=False))
    torch.testing.assert_close(stretched.mean(dim=1), x.mean(dim=1))
    assert (plain.var(dim=1) < x.var(dim=1)).all()  # Lloyd-Max shrinks the spread: Var(Q) = Var(W) - MSE
    # exact price: MSE' = MSE + (std(W) - std(Q))^2, because E[W | Q] = Q makes the cross term vanish
    mse_plain = (x - plain).square().mean(dim=1)
    mse_vp = (x - stretched).square().mean(dim=1)
    gap = (x.std(dim=1, unbiased=False) - plain.std(dim=1, unbiased=False)).square()
    torch.testing.assert_close(mse_vp, mse_plain + gap, rtol=1e-6, atol=1e-12)


def test_ot_vp_weighted_moments_and_constant_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, generator=generator, dtype=torch.float64)
    w = torch.rand(3, 300, generator=generator, dtype=torch.float64) + 0.1
    fit = fit_codebook(x, 4, "ot-vp", w)
    q = fit.codebook.gather(1, fit.codes)

    def weighted_var(v: torch.Tensor) -> torch.Tensor:
        mean = (w * x).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        return (w * (v - mean).square()).sum(1) / w.sum(1)

    torch.testing.assert_close(weighted_var(q), weighted_var(x))
    constant = torch.full((2, 50), 1.5, dtype=torch.float64)
    constant_fit = fit_codebook(constant, 4, "ot-vp")
    assert torch.equal(constant_fit.codebook.gather(1, constant_fit.codes), constant)


# --------------------------------------------------------------------------------------------------------------
# helpers against numpy
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 4, 7, 16, 256], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("n", [1, 5, 16, 17, 100, 1001], ids=lambda n: f"n{n}")
def test_array_split_edges_match_numpy(n: int, num_chunks: int) -> None:
    sizes = [len(c) for c in np.array_split(np.arange(n), num_chunks)]
    expected = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    assert array_split_edges(n, num_chunks).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [2, 3, 10, 257], ids=lambda n: f"n{n}")
def test_linear_quantiles_match_numpy(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(3, n, dtype=dtype).sort(dim=1).values
    probabilities = torch.cat([torch.tensor([0.0, 1.0, 0.5]), torch.rand(20), torch.arange(9) / 8]).to(torch.float64)
    got = linear_quantiles(x, probabilities)
    assert got.shape == (3, probabilities.numel())
    expected = np.quantile(x.to(torch.float64).numpy(), probabilities.numpy(), axis=1).T
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(got.to(torch.float64).numpy(), expected, rtol=rtol, atol=rtol)
    # The end points are exactly the row minimum and maximum.
    assert torch.equal(got[:, 0], x[:, 0]) and torch.equal(got[:, 1], x[:, -1])
