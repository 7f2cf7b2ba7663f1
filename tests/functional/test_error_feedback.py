"""Output-aware rounding: the GPTQ-style sweep with codebooks, least-squares codebook refits, output errors."""

from __future__ import annotations

import pytest
import torch

from diffusers_otq.functional.error_feedback import (
    damped_gram,
    dequantize_rows,
    error_feedback_codes,
    error_feedback_codes_in_order,
    inverse_cholesky_factor,
    nearest_codes,
    ordered_factors,
    output_error,
    refit_codebook,
    ridge_gram,
)
from diffusers_otq.quantized_tensor import quantize_tensor


def correlated_inputs(n: int, samples: int = 4096, seed: int = 0) -> torch.Tensor:
    """(samples, n) inputs with strongly correlated columns and unequal energies."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 2 * torch.randn(n, n, generator=g) / n**0.5
    return (torch.randn(samples, n, generator=g) @ mix) * torch.linspace(0.2, 3.0, n)


def test_output_error_is_the_quadratic_form() -> None:
    x = correlated_inputs(24).double()
    gram = x.T @ x / x.shape[0]
    delta = torch.randn(5, 24, dtype=torch.float64)
    direct = ((x @ delta.T) ** 2).mean(dim=0)
    assert torch.allclose(output_error(delta, [gram]), direct, rtol=1e-9)
    # Two diagonal blocks = the block-diagonal part of the Gram only.
    blocks = [gram[:10, :10], gram[10:, 10:]]
    expected = output_error(delta[:, :10], [blocks[0]]) + output_error(delta[:, 10:], [blocks[1]])
    assert torch.allclose(output_error(delta, blocks), expected)


def test_inverse_cholesky_factor_inverts_the_damped_gram() -> None:
    x = correlated_inputs(16)
    gram = x.T @ x / x.shape[0]
    factor = inverse_cholesky_factor(gram, 0.01)
    assert torch.equal(factor, factor.triu())
    identity = factor.T @ factor @ damped_gram(gram, 0.01)
    assert torch.allclose(identity, torch.eye(16, dtype=torch.float64), atol=1e-8)


def test_dead_inputs_and_bad_statistics() -> None:
    gram = torch.zeros(4, 4)
    gram[0, 0] = 2.0
    damped = damped_gram(gram, 0.01)
    assert torch.all(damped.diagonal() > 0)  # dead inputs get a unit diagonal, so the factor exists
    inverse_cholesky_factor(gram, 0.01)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky_factor(torch.full((3, 3), float("nan")), 0.01)


def test_ridge_gram_adds_a_relative_ridge_and_keeps_the_scale() -> None:
    x = torch.randn(64, 8, dtype=torch.float64) * 1e-3
    gram = x.T @ x
    ridged = ridge_gram(gram, 0.1)
    offset = ridged - gram
    assert torch.allclose(offset, 0.1 * gram.diagonal().mean() * torch.eye(8, dtype=torch.float64))
    dead = gram.clone()
    dead[2, :] = dead[:, 2] = 0.0
    # no unit diagonal: a dead input keeps only the ridge, on the scale of H
    assert float(ridge_gram(dead, 0.1)[2, 2]) == pytest.approx(0.1 * float(dead.diagonal().mean()))
    assert ridged.dtype == torch.float64 and ridge_gram(gram.float(), 0.1).dtype == torch.float64


def test_identity_gram_reduces_to_nearest_codeword_assignment() -> None:
    weight = torch.randn(32, 96)
    codebook = quantize_tensor(weight, bits=3, method="ot").codebook.float()
    factor = inverse_cholesky_factor(torch.eye(96), 1e-12)
    codes = error_feedback_codes(weight, [factor], codebook)
    assert torch.equal(codes, nearest_codes(weight, codebook))
    # With per-weight scales: nearest codeword of weight / scale.
    scales = torch.rand(32, 96) + 0.5
    codes = error_feedback_codes(weight, [factor], codebook[:1], scales)
    assert torch.equal(codes, nearest_codes(weight / scales, codebook[:1]))


@pytest.mark.parametrize("bits", [2, 3])
def test_sweep_and_refit_lower_the_output_error_on_correlated_inputs(bits: int) -> None:
    x = correlated_inputs(128)
    gram = (x.T @ x / x.shape[0]).double()
    weight = torch.randn(64, 128)
    start = quantize_tensor(weight, bits=bits, method="ot")
    codebook = start.codebook.double()
    data_free = output_error(weight.double() - start.dequantize(torch.float64), [gram]).sum()
    codes = error_feedback_codes(weight, [inverse_cholesky_factor(gram, 0.01)], codebook)
    swept = output_error(weight.double() - dequantize_rows(codes, codebook), [gram]).sum()
    refitted = refit_codebook(weight, codes, [gram], codebook)
    refit = output_error(weight.double() - dequantize_rows(codes, refitted), [gram]).sum()
    assert swept < 0.9 * data_free, f"sweep {swept:.4g} vs data-free {data_free:.4g}"
    assert refit <= swept * (1 + 1e-9), f"refit {refit:.4g} vs sweep {swept:.4g}"
    # ||X (W - Q)^T||, measured on the activations themselves, drops accordingly.
    direct = lambda q: float(((x.double() @ (weight.double() - q).T) ** 2).mean(0).sum())  # noqa: E731
    assert direct(dequantize_rows(codes, refitted)) < 0.9 * direct(start.dequantize(torch.float64))


def test_refit_is_the_least_squares_optimum_for_fixed_codes() -> None:
    x = correlated_inputs(40)
    gram = (x.T @ x / x.shape[0]).double()
    weight = torch.randn(6, 40, dtype=torch.float64)
    codes = torch.randint(0, 4, (6, 40))
    best = refit_codebook(weight, codes, [gram], torch.zeros(6, 4, dtype=torch.float64))
    error = output_error(weight - dequantize_rows(codes, best), [gram])
    for _ in range(20):  # no perturbation of the codewords does better, row by row
        moved = best + 1e-3 * torch.randn_like(best)
        assert torch.all(output_error(weight - dequantize_rows(codes, moved), [gram]) >= error - 1e-12)
    # A shared codebook solves one system over every row; an unused codeword keeps its old value.
    anchor = torch.tensor([[-1.0, 0.0, 1.0, 7.0]], dtype=torch.float64)
    shared = refit_codebook(weight, codes.clamp(max=2), [gram], anchor)
    assert shared.shape == (1, 4) and abs(float(shared[0, 3]) - 7.0) < 1e-6


def test_refit_sub_blocks_match_an_explicit_block_diagonal_gram() -> None:
    x = correlated_inputs(64)
    gram = (x.T @ x / x.shape[0]).double()
    weight = torch.randn(4, 64, dtype=torch.float64)
    codes = torch.randint(0, 8, (4, 64))
    codebook = torch.zeros(4, 8, dtype=torch.float64)
    cut = refit_codebook(weight, codes, [gram], codebook, max_block=32)
    explicit = refit_codebook(weight, codes, [gram[:32, :32], gram[32:, 32:]], codebook)
    assert torch.allclose(cut, explicit)


def test_act_order_sweep_returns_codes_in_the_original_column_order() -> None:
    x = correlated_inputs(48)
    gram = (x.T @ x / x.shape[0]).double()
    weight = torch.randn(8, 48)
    codebook = quantize_tensor(weight, bits=2, method="ot").codebook.float()
    natural = ordered_factors([gram], 0.01, act_order=False)
    assert torch.equal(natural[0][0], torch.arange(48))
    plain = error_feedback_codes(weight, [natural[0][1]], codebook)
    assert torch.equal(error_feedback_codes_in_order(weight, natural, codebook), plain)
    ordered = ordered_factors([gram], 0.01, act_order=True)
    order = ordered[0][0]
    assert torch.all(gram.diagonal()[order][:-1] >= gram.diagonal()[order][1:])
    codes = error_feedback_codes_in_order(weight, ordered, codebook)
    # Same as sweeping the permuted problem by hand, then undoing the permutation.
    by_hand = error_feedback_codes(weight[:, order], [ordered[0][1]], codebook)
    assert torch.equal(codes[:, order], by_hand)
