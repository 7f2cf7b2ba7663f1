"""Streaming input statistics of Linear and Conv2d layers (no activation is stored)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_otq.calibration.statistics import _geometry
from diffusers_otq.functional.moments import NonFiniteInput, accumulate_moments, gram_block_sizes, input_rows


def accumulators(groups: int, width: int, blocks: list[int] | None) -> dict:
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    gram = None if blocks is None else [zeros(groups, b, b) for b in blocks]
    return {
        "sum_x": zeros(groups, width),
        "sum_sq": zeros(groups, width),
        "count": zeros(()),
        "gram": gram,
        "gram_sum": zeros(groups, width),
        "gram_count": zeros(()),
    }


def accumulate(x: torch.Tensor, width: int, conv, acc: dict, weight: float = 1.0, max_rows: int = 10**9, call=0):
    accumulate_moments(x, width, conv, weight, **acc, max_rows=max_rows, call_index=call)


CONVS = {
    "3x3": nn.Conv2d(6, 8, 3, padding=1),
    "strided grouped": nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2),
    "dilated reflect": nn.Conv2d(6, 8, (3, 2), dilation=2, padding=2, padding_mode="reflect"),
    "same": nn.Conv2d(6, 8, 3, padding="same"),
    "1x1": nn.Conv2d(6, 8, 1),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_rows_are_the_patches_the_conv_multiplies(name: str) -> None:
    conv = CONVS[name]
    x = torch.randn(3, 6, 9, 10)
    rows = input_rows(x, 0, _geometry(conv))  # (G, N, n)
    per_group = conv.out_channels // conv.groups
    weight = conv.weight.reshape(conv.out_channels, -1)
    out = torch.cat([rows[g] @ weight[g * per_group : (g + 1) * per_group].T for g in range(conv.groups)], dim=1)
    expected = (conv(x) - conv.bias[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_accumulation_equals_the_unfolded_reference(name: str) -> None:
    conv = CONVS[name]
    x = torch.randn(3, 6, 9, 10)
    rows = input_rows(x, 0, _geometry(conv)).double()
    groups, total, width = rows.shape
    acc = accumulators(groups, width, [width])
    accumulate(x, 0, _geometry(conv), acc)
    assert torch.allclose(acc["sum_x"], rows.sum(1), atol=1e-4)
    assert torch.allclose(acc["sum_sq"], rows.square().sum(1), rtol=1e-5)
    assert float(acc["count"]) == total == float(acc["gram_count"])
    assert torch.allclose(acc["gram"][0], rows.transpose(1, 2) @ rows, rtol=1e-5, atol=1e-4)


def test_linear_blocks_weights_and_row_stride() -> None:
    x = torch.randn(2, 50, 12) + 3.0
    rows = x.reshape(-1, 12).double()
    acc = accumulators(1, 12, gram_block_sizes(12, 5))  # blocks of 4, 4, 4
    accumulate(x, 12, None, acc, weight=0.5, max_rows=25, call=1)
    assert [b.shape[-1] for b in acc["gram"]] == [4, 4, 4]
    assert torch.allclose(acc["sum_x"][0], 0.5 * rows.sum(0))
    used = rows[1::4]  # 100 rows, at most 25 per call: every 4th row, offset rotating with the call index
    assert float(acc["gram_count"]) == 0.5 * len(used)
    assert torch.allclose(acc["gram"][1][0], 0.5 * used[:, 4:8].T @ used[:, 4:8], rtol=1e-6)
    assert torch.allclose(acc["gram_sum"][0], 0.5 * used.sum(0))
    before = {k: v.clone() for k, v in acc.items() if isinstance(v, torch.Tensor)}
    accumulate(x, 12, None, acc, weight=0.0)  # a zero weight adds nothing
    assert all(torch.equal(acc[k], v) for k, v in before.items())


def test_covariance_survives_a_dominant_mean() -> None:
    """The Gram is accumulated about each call's mean: Cov = E[xx^T] - mm^T keeps 1e-4 variances at mean 30."""
    x = torch.randn(4096, 16) * 0.01 + 30.0
    acc = accumulators(1, 16, [16])
    accumulate(x, 16, None, acc)
    mean = acc["gram_sum"][0] / acc["gram_count"]
    covariance = acc["gram"][0][0] / acc["gram_count"] - torch.outer(mean, mean)
    reference = torch.cov(x.double().T, correction=0)
    assert torch.allclose(covariance, reference, atol=1e-9)


def test_gram_block_sizes() -> None:
    assert gram_block_sizes(3072, 2048) == [1536, 1536]
    assert gram_block_sizes(12288, 2048) == [2048] * 6
    assert gram_block_sizes(100, 2048) == [100]
    assert sum(gram_block_sizes(1001, 64)) == 1001


def test_non_finite_inputs_are_refused() -> None:
    acc = accumulators(1, 4, [4])
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteInput):
        accumulate(x, 4, None, acc)
    x[1, 2] = float("inf")
    with pytest.raises(NonFiniteInput):
        accumulate(x, 4, None, acc)
