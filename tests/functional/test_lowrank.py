"""Weighted low-rank approximations: optimality in the output-error norm, shapes, and rank checks."""

from __future__ import annotations

import pytest
import torch

from diffusers_otq.functional.lowrank import check_rank, lowrank_bytes, weighted_lowrank


def _output_error(target: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> float:
    delta = target - up @ down
    return float(torch.trace(delta @ gram @ delta.T))


def test_weighted_fit_beats_the_plain_svd_in_the_output_norm() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(40, 64, generator=g, dtype=torch.float64)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    gram = x.T @ x
    up, down = weighted_lowrank(target, 8, [gram], damping=1e-9)
    plain_up, plain_down = weighted_lowrank(target, 8)
    block_up, block_down = weighted_lowrank(target, 8, [gram[:32, :32], gram[32:, 32:]], damping=1e-9)
    diag_up, diag_down = weighted_lowrank(target, 8, moments=gram.diagonal() / 512)
    full = _output_error(target, up, down, gram)
    assert up.shape == (40, 8) and down.shape == (8, 64)
    assert full < _output_error(target, block_up, block_down, gram) < _output_error(target, plain_up, plain_down, gram)
    assert full < _output_error(target, diag_up, diag_down, gram)
    # plain SVD: the Eckart-Young optimum in the Frobenius norm
    s = torch.linalg.svdvals(target)
    assert float((target - plain_up @ plain_down).square().sum()) == pytest.approx(float(s[8:].square().sum()))


def test_full_rank_is_exact() -> None:
    target = torch.randn(6, 10, dtype=torch.float64)
    up, down = weighted_lowrank(target, 6, [torch.eye(10, dtype=torch.float64) * 3.0])
    assert torch.allclose(up @ down, target, atol=1e-10)


def test_rank_checks_name_the_limit() -> None:
    assert check_rank(0, 8, 4) == 0 and check_rank(4, 8, 4) == 4
    with pytest.raises(ValueError, match=r"rank=5 for layer 'proj' exceeds min\(out, in\) = min\(8, 4\) = 4"):
        check_rank(5, 8, 4, "proj")
    with pytest.raises(ValueError, match="rank=-1"):
        check_rank(-1, 8, 4)
    with pytest.raises(ValueError, match="rank=0 has no factors"):
        weighted_lowrank(torch.randn(4, 4), 0)
    assert lowrank_bytes(3072, 3072, 32) == 32 * 6144 * 2
