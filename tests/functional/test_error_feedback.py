"""Output-aware rounding: the error-feedback sweep with codebooks, least-squares codebook refits, output errors."""

from __future__ import annotations

import pytest
import torch

from diffusers_otq.functional import error_feedback
from diffusers_otq.functional.error_feedback import (
    damped_gram,
    dequantize_rows,
    error_feedback_codes,
    error_feedback_codes_in_order,
    nearest_codes,
    ordered_factors,
    output_error,
    output_errors,
    refit_codebook,
    ridge_gram,
    row_chunks,
    sort_codebook,
    sweep_factor,
)
from diffusers_otq.quantized_tensor import quantize_tensor


def correlated_inputs(n: int, samples: int = 4096, seed: int = 0) -> torch.Tensor:
    """(samples, n) inputs with strongly correlated columns and unequal energies."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 2 * torch.randn(n, n, generator=g) / n**0.5
    return (torch.randn(samples, n, generator=g) @ mix) * torch.linspace(0.2, 3.0, n)


def gram_of(n: int, seed: int = 0) -> torch.Tensor:
    x = correlated_inputs(n, seed=seed).double()
    return x.T @ x / x.shape[0]


def textbook_gptq_codes(
    weight: torch.Tensor, gram: torch.Tensor, codebook: torch.Tensor, damping: float
) -> torch.Tensor:
    """GPTQ as written in the paper (float64, no lazy batching): round column j, move the later columns by the
    optimal update ``-err_j / [H^-1]_jj * [H^-1]_j,j+1:``, then eliminate column j from ``H^-1``."""
    w = weight.double().clone()
    inverse = torch.linalg.inv(damped_gram(gram, damping))
    codes = torch.empty(w.shape, dtype=torch.int64)
    for j in range(w.shape[1]):
        codes[:, j] = nearest_codes(w[:, j : j + 1], codebook)[:, 0]
        err = (w[:, j] - dequantize_rows(codes[:, j : j + 1], codebook.double())[:, 0]) / inverse[j, j]
        w[:, j + 1 :] -= err[:, None] * inverse[j, j + 1 :][None, :]
        inverse = inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return codes


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


def test_output_errors_of_codes_match_the_quadratic_form_on_every_row_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(error_feedback, "_TASK_ROWS", 300)
    gram = gram_of(32).float()
    weight = torch.randn(900, 32)  # three row chunks
    codebook = torch.sort(torch.randn(900, 4), dim=1).values
    codes = torch.randint(0, 4, (900, 32))
    expected = output_error(weight.double() - dequantize_rows(codes, codebook.double()), [gram.double()])
    assert len(row_chunks(900, 32)) == 3
    assert torch.allclose(output_errors(weight, codes, codebook, [gram]), expected, rtol=1e-5)


def test_sweep_factor_is_the_reversed_cholesky_factor_of_the_permuted_damped_gram() -> None:
    gram = gram_of(40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    factor = sweep_factor(gram, 0.01, order).double()
    assert factor.dtype == torch.float64 and torch.equal(factor, factor.tril())
    assert torch.allclose(factor.diagonal(), torch.ones(40, dtype=torch.float64))
    # A = diag(a) F with A^T A = P H P^T  <=>  F^-T (P H P^T) F^-1 is diagonal (= diag(a^2)).
    permuted = damped_gram(gram, 0.01)[order][:, order]
    inverse = torch.linalg.solve_triangular(factor, torch.eye(40, dtype=torch.float64), upper=False)
    middle = inverse.T @ permuted @ inverse
    off_diagonal = middle - torch.diag(middle.diagonal())
    assert float(off_diagonal.abs().max()) < 1e-4 * float(middle.diagonal().abs().max())
    assert bool((middle.diagonal() > 0).all())


def test_dead_inputs_and_bad_statistics() -> None:
    gram = torch.zeros(4, 4)
    gram[0, 0] = 2.0
    damped = damped_gram(gram, 0.01)
    assert torch.all(damped.diagonal() > 0)  # dead inputs get a unit diagonal, so the factor exists
    assert torch.isfinite(sweep_factor(gram, 0.01)).all()
    with pytest.raises(ValueError, match="not positive definite"):
        sweep_factor(torch.full((3, 3), float("nan")), 0.01)


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
    factor = sweep_factor(torch.eye(96), 1e-12)
    codes = error_feedback_codes(weight, [factor], codebook)
    assert torch.equal(codes, nearest_codes(weight, codebook))
    # With per-weight scales: nearest codeword of weight / scale; a zero scale gets the codeword nearest 0.
    scales = torch.rand(32, 96) + 0.5
    scales[3, :7] = 0.0
    codes = error_feedback_codes(weight, [factor], codebook[:1], scales)
    assert torch.equal(codes, nearest_codes(weight, codebook[:1], scales))


def test_the_sweep_is_gptq_as_written_in_the_paper() -> None:
    gram = gram_of(48)
    weight = torch.randn(16, 48)
    codebook = quantize_tensor(weight, bits=2, method="ot").codebook.float()
    reference = textbook_gptq_codes(weight, gram, codebook, 0.01)
    codes = error_feedback_codes(weight, [sweep_factor(gram, 0.01)], codebook, block_size=8)
    agreement = float((codes == reference).double().mean())
    assert agreement > 0.99, f"{agreement:.4f} of the codes agree with the textbook sweep"


@pytest.mark.parametrize("bits", [2, 3])
def test_sweep_and_refit_lower_the_output_error_on_correlated_inputs(bits: int) -> None:
    x = correlated_inputs(128)
    gram = (x.T @ x / x.shape[0]).double()
    weight = torch.randn(64, 128)
    start = quantize_tensor(weight, bits=bits, method="ot")
    codebook = start.codebook.float()
    data_free = output_error(weight.double() - start.dequantize(torch.float64), [gram]).sum()
    codes = error_feedback_codes(weight, [sweep_factor(gram, 0.01)], codebook)
    swept = output_error(weight.double() - dequantize_rows(codes, codebook.double()), [gram]).sum()
    refit = refit_codebook(weight, codes, [gram.float()], codebook)
    refitted = output_error(weight.double() - dequantize_rows(codes, refit.codebook), [gram]).sum()
    assert swept < 0.9 * data_free, f"sweep {swept:.4g} vs data-free {data_free:.4g}"
    assert refitted <= swept * (1 + 1e-6), f"refit {refitted:.4g} vs sweep {swept:.4g}"
    assert float(refit.start_errors.sum()) == pytest.approx(float(swept), rel=1e-5)
    # ||X (W - Q)^T||, measured on the activations themselves, drops accordingly.
    direct = lambda q: float(((x.double() @ (weight.double() - q).T) ** 2).mean(0).sum())  # noqa: E731
    assert direct(dequantize_rows(codes, refit.codebook)) < 0.9 * direct(start.dequantize(torch.float64))


def normal_equations_optimum(weight, codes, gram, levels):  # noqa: ANN001, ANN201
    """Per-row least-squares codewords from the explicit K x K systems (float64 oracle)."""
    onehot = torch.nn.functional.one_hot(codes, levels).double()  # (R, n, K)
    system = onehot.transpose(1, 2) @ gram @ onehot
    rhs = (onehot.transpose(1, 2) @ gram @ weight.double()[:, :, None])[:, :, 0]
    return torch.linalg.solve(system + 1e-12 * torch.eye(levels, dtype=torch.float64), rhs)


def test_refit_reaches_the_least_squares_optimum_and_reports_its_error() -> None:
    gram = gram_of(40)
    weight = torch.randn(6, 40)
    codes = torch.randint(0, 4, (6, 40))
    refit = refit_codebook(weight, codes, [gram.float()], torch.zeros(6, 4), iterations=4, tolerance=0.0)
    oracle = normal_equations_optimum(weight, codes, gram, 4)
    assert torch.allclose(refit.codebook, oracle, rtol=1e-3, atol=1e-4)
    exact = output_error(weight.double() - dequantize_rows(codes, refit.codebook), [gram])
    assert torch.allclose(refit.errors, exact, rtol=1e-5)
    best = output_error(weight.double() - dequantize_rows(codes, oracle), [gram])
    assert torch.all(exact <= best * (1 + 1e-5))
    # Rounded to float16 storage: the codewords are float16 values and the reported error is still right.
    stored = refit_codebook(weight, codes, [gram.float()], torch.zeros(6, 4), storage_dtype=torch.float16)
    assert torch.equal(stored.codebook, stored.codebook.half().double())
    exact = output_error(weight.double() - dequantize_rows(codes, stored.codebook), [gram])
    assert torch.allclose(stored.errors, exact, rtol=1e-5)


def test_a_shared_codebook_solves_one_system_and_unused_codewords_keep_their_value() -> None:
    gram = gram_of(40)
    weight = torch.randn(6, 40)
    codes = torch.randint(0, 3, (6, 40))
    anchor = torch.tensor([[-1.0, 0.0, 1.0, 7.0]])
    shared = refit_codebook(weight, codes, [gram.float()], anchor, iterations=4, tolerance=0.0)
    assert shared.codebook.shape == (1, 4) and float(shared.codebook[0, 3]) == 7.0
    stacked = normal_equations_optimum(weight.reshape(1, -1), codes.reshape(1, -1), torch.block_diag(*[gram] * 6), 3)
    assert torch.allclose(shared.codebook[0, :3], stacked[0], rtol=1e-3, atol=1e-4)
    exact = output_error(weight.double() - dequantize_rows(codes, shared.codebook), [gram]).sum()
    assert shared.errors.shape == (1,) and float(shared.errors[0]) == pytest.approx(float(exact), rel=1e-5)


def test_refit_overflowing_the_storage_dtype_keeps_the_old_codebook() -> None:
    gram = gram_of(16)
    weight = torch.randn(2, 16) * 1e6  # least-squares codewords far beyond float16
    codes = torch.randint(0, 4, (2, 16))
    start = torch.tensor([[-1.0, 0.0, 1.0, 2.0]] * 2)
    refit = refit_codebook(weight, codes, [gram.float()], start, storage_dtype=torch.float16)
    assert torch.equal(refit.codebook, start.double())
    assert torch.equal(refit.errors, refit.start_errors)


def test_act_order_sweep_returns_codes_in_the_original_column_order() -> None:
    gram = gram_of(48)
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


def test_results_are_the_same_bits_for_one_and_two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(error_feedback, "_TASK_ROWS", 32)  # several row chunks on a small problem
    grams = [gram_of(256, seed=1), gram_of(24, seed=2)]  # 256: a multi-threaded Cholesky would differ
    weight = torch.randn(96, 280)
    codebook = quantize_tensor(weight, bits=3, method="ot").codebook.float()
    scales = torch.rand(96, 280) + 0.5
    grams32 = [gram.float() for gram in grams]
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            factors = ordered_factors(grams, 0.01)
            codes = error_feedback_codes_in_order(weight, factors, codebook, scales, block_size=16)
            shared = error_feedback_codes_in_order(weight, factors, codebook[:1], None, block_size=16)
            refit = refit_codebook(weight, codes, grams32, codebook, scales)
            errors = output_errors(weight, codes, codebook, grams32)
            alone = ordered_factors(grams[:1], 0.01)[0][1]  # one block: factorised in the calling thread
            results.append((factors[0][1], alone, codes, shared, refit.codebook, refit.errors, errors))
    finally:
        torch.set_num_threads(previous)
    assert len(row_chunks(96, 280)) == 3
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("rows", [1, 3])
def test_sort_codebook_sorts_the_first_band_and_permutes_every_band_alike(rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    book = torch.randn(2 * rows, 4, generator=g)  # two bands of `rows` codebooks over the same codes
    codes = torch.randint(0, 4, (3, 5), generator=g)
    book_rows = (lambda c, b: b[0][c]) if rows == 1 else (lambda c, b: b.gather(1, c))

    def values(b: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
        return [book_rows(c, b[band * rows : (band + 1) * rows]) for band in range(2)]

    sorted_book, renumbered = sort_codebook(book, codes, bands=2)
    assert bool((sorted_book[:rows, 1:] >= sorted_book[:rows, :-1]).all())
    for before, after in zip(values(book, codes), values(sorted_book, renumbered), strict=True):
        assert torch.equal(before, after)  # every band decodes the same values as before
