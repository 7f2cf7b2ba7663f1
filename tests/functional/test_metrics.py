"""Weight-level metrics: W2 between empirical distributions and relative MSE."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from diffusers_otq.functional import fit_codebook, relative_mse, wasserstein2


SHAPES = [(1,), (7,), (64,), (5, 13), (3, 4, 5), (2, 1, 3, 3)]


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def pot_w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """POT's exact 1-D OT: ot.wasserstein_1d with p=2 returns W2**2."""
    x = a.reshape(-1).double().numpy()
    y = b.reshape(-1).double().numpy()
    return float(np.sqrt(ot.wasserstein_1d(x, y, p=2)))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_pot(shape: tuple[int, ...]) -> None:
    a = torch.randn(shape)
    b = torch.rand(shape) * 3.0 - 0.5
    assert wasserstein2(a, b) == pytest.approx(pot_w2(a, b), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_matches_pot_for_low_precision_inputs(dtype: torch.dtype) -> None:
    a = torch.randn(6, 11).to(dtype)
    b = (torch.randn(66) * 0.5 + 0.2).to(dtype)
    result = wasserstein2(a, b)
    assert isinstance(result, float)
    assert result == pytest.approx(pot_w2(a.double(), b.double()), rel=1e-9, abs=1e-12)


def test_known_value() -> None:
    """Shifting every value by c moves the distribution by exactly c."""
    a = torch.randn(100, dtype=torch.float64)
    assert wasserstein2(a, a + 0.25) == pytest.approx(0.25, rel=1e-12)
    assert wasserstein2(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 0.0])) == pytest.approx(np.sqrt(2.0))


@pytest.mark.parametrize("method", ["ot-equal-mass", "uniform", "ot"])
@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"{b}bit")
def test_equals_root_mse_for_monotone_quantization(method: str, bits: int) -> None:
    """A quantizer with monotone assignment (rank or nearest) has W2 == sqrt(MSE)."""
    x = torch.randn(1, 500, dtype=torch.float64)
    fit = fit_codebook(x, 1 << bits, method)
    if fit.codes is None:
        codes = (x[:, :, None] - fit.codebook[:, None, :]).abs().argmin(dim=2)
    else:
        codes = fit.codes
    q = fit.codebook.gather(1, codes).reshape(20, 25)
    root_mse = (x.reshape(20, 25) - q).square().mean().sqrt().item()
    assert wasserstein2(x.reshape(20, 25), q) == pytest.approx(root_mse, rel=1e-9)
    assert wasserstein2(x, q) == pytest.approx(pot_w2(x, q), rel=1e-9)


def test_non_monotone_map_is_below_root_mse() -> None:
    """W2 only looks at distributions: a permutation-like (non-monotone) error costs nothing in W2."""
    x = torch.randn(200, dtype=torch.float64)
    y = x.flip(0)
    assert (x - y).square().mean().sqrt().item() > 0.1
    assert wasserstein2(x, y) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_symmetric(shape: tuple[int, ...]) -> None:
    a = torch.randn(shape)
    b = torch.randn(shape).exp()
    assert wasserstein2(a, b) == pytest.approx(wasserstein2(b, a), rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_zero_for_identical_and_permuted(shape: tuple[int, ...]) -> None:
    a = torch.randn(shape)
    assert wasserstein2(a, a) == 0.0
    permuted = a.reshape(-1)[torch.randperm(a.numel())]
    assert wasserstein2(a, permuted) == 0.0
    assert wasserstein2(a, permuted.reshape(-1, 1)) == 0.0


def test_shapes_may_differ_when_sizes_match() -> None:
    a = torch.randn(4, 6)
    b = torch.randn(24)
    assert wasserstein2(a, b) == pytest.approx(pot_w2(a, b), rel=1e-9)


@pytest.mark.parametrize(
    "a_shape,b_shape", [((5,), (6,)), ((2, 3), (7,)), ((0,), (1,))], ids=["5-vs-6", "2x3-vs-7", "0-vs-1"]
)
def test_size_mismatch_raises(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        wasserstein2(torch.randn(a_shape), torch.randn(b_shape))


@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=shape_id)
def test_empty_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        wasserstein2(torch.randn(shape), torch.randn(shape))


def test_does_not_modify_or_require_grad() -> None:
    a = torch.randn(30, requires_grad=True)
    b = torch.randn(30)
    before = a.detach().clone()
    assert isinstance(wasserstein2(a, b), float)
    assert torch.equal(a.detach(), before)


# --------------------------------------------------------------------------------------------------------------
# relative_mse
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_relative_mse_matches_numpy(shape: tuple[int, ...]) -> None:
    a = torch.randn(shape)
    b = a + 0.1 * torch.randn(shape)
    x, y = a.double().numpy(), b.double().numpy()
    expected = np.mean((x - y) ** 2) / np.mean(x**2)
    assert relative_mse(a, b) == pytest.approx(expected, rel=1e-9)


def test_relative_mse_basics() -> None:
    a = torch.randn(50)
    assert relative_mse(a, a) == 0.0
    assert relative_mse(a, torch.zeros_like(a)) == pytest.approx(1.0)
    assert relative_mse(a, 2 * a) == pytest.approx(1.0)
    assert relative_mse(a, 1.1 * a) == pytest.approx(0.01, rel=1e-5)
    assert relative_mse(3.0 * a, 3.3 * a) == pytest.approx(relative_mse(a, 1.1 * a), rel=1e-5)  # scale invariant
    assert isinstance(relative_mse(a, a), float)


def test_relative_mse_zero_original() -> None:
    z = torch.zeros(10)
    assert relative_mse(z, z) == 0.0
    assert relative_mse(z, torch.ones(10)) == float("inf")


def test_relative_mse_low_precision_quantized() -> None:
    a = torch.randn(64)
    b = a.to(torch.float16)
    expected = ((a.double() - b.double()) ** 2).mean() / (a.double() ** 2).mean()
    assert relative_mse(a, b) == pytest.approx(expected.item(), rel=1e-9)
