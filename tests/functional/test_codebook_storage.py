"""int8 codebooks: 8-bit codewords times one float32 scale per codebook."""

from __future__ import annotations

import pytest
import torch

from diffusers_otq.functional.codebook_storage import (
    INT8_LEVELS,
    decode_scaled_codebook,
    encode_scaled_codebook,
    round_to_storage,
    store_codebook,
)
from diffusers_otq.functional.vector_codebooks import weighted_kmeans


@pytest.mark.parametrize("shape", [(3, 16), (2, 256, 4), (1, 256, 8)])
def test_round_trip_error_is_at_most_half_a_step_of_each_codebook(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-3, 1.0, 40.0])[: shape[0]].reshape(-1, *([1] * (len(shape) - 1)))
    codebook = torch.randn(shape, generator=generator) * scales
    q, scale = encode_scaled_codebook(codebook)
    assert q.dtype == torch.int8 and q.shape == codebook.shape and scale.shape == (shape[0],)
    assert scale.dtype == torch.float32 and int(q.abs().max()) == INT8_LEVELS  # the peak of each codebook is +-127
    error = (decode_scaled_codebook(q, scale) - codebook).abs().reshape(shape[0], -1).amax(dim=1)
    peak = codebook.abs().reshape(shape[0], -1).amax(dim=1)
    assert bool((error <= peak / (2 * INT8_LEVELS) * (1 + 1e-5)).all()), (error, peak)


def test_zero_codewords_and_signs_are_kept_and_an_all_zero_codebook_gets_scale_one() -> None:
    codebook = torch.tensor([[-0.5, 0.0, 0.25, 1.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = encode_scaled_codebook(codebook)
    assert scale[1] == 1 and torch.equal(q[1], torch.zeros(4, dtype=torch.int8))
    decoded = decode_scaled_codebook(q, scale)
    assert decoded[0, 1] == 0 and torch.equal(torch.sign(decoded), torch.sign(codebook))


def test_non_finite_codewords_are_refused_and_left_alone_by_the_rounding() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_scaled_codebook(torch.tensor([[1.0, float("inf")]]))
    books = torch.tensor([[1.0, float("nan")], [0.3, -0.7]], dtype=torch.float64)
    rounded = round_to_storage(books, torch.int8)
    assert rounded.dtype == torch.float64 and torch.isnan(rounded[0, 1]) and rounded[0, 0] == 1.0
    assert torch.allclose(rounded[1], books[1], atol=0.7 / 254) and not torch.equal(rounded[1], books[1])
    assert torch.equal(round_to_storage(books[1:], torch.float16), books[1:].half().double())


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16])
def test_stored_codebook_decodes_to_what_the_rounding_predicts(dtype: torch.dtype) -> None:
    codebook = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    stored, scale = store_codebook(codebook, dtype)
    assert stored.dtype == dtype and stored.shape == codebook.shape and not stored.requires_grad
    assert (scale is not None) == (dtype == torch.int8)
    decoded = stored.float() if scale is None else decode_scaled_codebook(stored, scale)
    assert torch.equal(decoded, round_to_storage(codebook.detach(), dtype))


def test_int8_costs_a_tenth_of_the_quantization_error_of_a_2_bit_4_d_codebook_at_half_the_bits() -> None:
    """Gaussian data at 2 bits/weight in 4-D: rounding the 256 codewords to int8 adds well under 1% of MSE."""
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(1, 1 << 15, 4, generator=generator, dtype=torch.float64)
    codebook = weighted_kmeans(points, 256)

    def mse(book: torch.Tensor) -> float:
        distances = torch.cdist(points[0], book[0])
        return float((points[0] - book[0][distances.argmin(dim=1)]).square().mean())

    q, scale = encode_scaled_codebook(codebook)
    exact, rounded = mse(codebook), mse(decode_scaled_codebook(q, scale).double())
    assert 0.09 < exact < 0.11 and rounded < exact * 1.01, (exact, rounded)
    assert q.numel() * q.element_size() + scale.numel() * 4 < codebook.half().numel() * 2 // 2 + 8
