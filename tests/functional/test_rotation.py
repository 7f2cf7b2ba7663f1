"""Randomized block-Hadamard rotations: orthogonality, the block rule, and function preservation."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

from diffusers_otq.functional.rotation import (
    hadamard_block_size,
    random_signs,
    rotate_rows,
    unrotate_rows,
    walsh_hadamard,
)


@pytest.mark.parametrize(("width", "block"), [(64, 64), (96, 32), (3072, 1024), (576, 64), (7, 1)])
def test_block_is_the_largest_power_of_two_dividing_the_width(width: int, block: int) -> None:
    assert hadamard_block_size(width) == block
    assert hadamard_block_size(3072, max_block=256) == 256


def test_walsh_hadamard_matches_the_sylvester_matrix_and_is_its_own_inverse() -> None:
    x = torch.randn(3, 96, dtype=torch.float64)
    h = torch.tensor(scipy.linalg.hadamard(32), dtype=torch.float64) / 32**0.5
    expected = x @ torch.block_diag(h, h, h).T
    assert torch.allclose(walsh_hadamard(x, 32), expected, atol=1e-12)
    assert torch.allclose(walsh_hadamard(walsh_hadamard(x, 32), 32), x, atol=1e-12)


def test_rotation_is_orthogonal_and_preserves_the_layer_function() -> None:
    signs = random_signs(96, seed=5)
    assert set(signs.tolist()) == {-1.0, 1.0} and torch.equal(signs, random_signs(96, seed=5))
    assert not torch.equal(signs, random_signs(96, seed=6))
    eye = torch.eye(96, dtype=torch.float64)
    r = rotate_rows(eye, signs.double(), 32)  # rows of R^T ... as a matrix: I @ R^T
    assert torch.allclose(r @ r.T, eye, atol=1e-12)
    x, w = torch.randn(10, 96, dtype=torch.float64), torch.randn(16, 96, dtype=torch.float64)
    rotated_x, rotated_w = rotate_rows(x, signs, 32), rotate_rows(w, signs, 32)
    assert torch.allclose(rotated_x @ rotated_w.T, x @ w.T, atol=1e-10)
    assert torch.allclose(unrotate_rows(rotated_w, signs, 32), w, atol=1e-12)


def test_half_precision_inputs_keep_their_dtype() -> None:
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = rotate_rows(x, random_signs(64, 0), 64)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), rotate_rows(x.float(), random_signs(64, 0), 64), atol=2e-2)


@pytest.mark.parametrize(("width", "block", "match"), [(96, 64, "does not divide|divide"), (96, 24, "power of two")])
def test_bad_blocks_are_refused(width: int, block: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        walsh_hadamard(torch.randn(2, width), block)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_block_size(96, max_block=24)
