"""Group absmax scales: 8-bit log-domain codes plus (s_max, step) per row."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffusers_otq.functional import GroupScales, decode_group_scales, encode_group_scales


def random_scales(rows: int, groups: int, spread: float, seed: int) -> torch.Tensor:
    """Positive scales whose ratio max/min within a row is up to ``spread``."""
    gen = torch.Generator().manual_seed(seed)
    log_spread = math.log(spread)
    base = torch.rand(rows, 1, generator=gen) * 4.0 - 6.0  # row magnitude ~ e^-6..e^-2
    return torch.exp(base + torch.rand(rows, groups, generator=gen) * log_spread)


def stored_tensors(encoded: GroupScales) -> tuple[torch.Tensor, ...]:
    """Everything ``decode_group_scales`` takes besides dtype, in field order (codes first)."""
    return tuple(getattr(encoded, f.name) for f in dataclasses.fields(encoded))


def row_max(encoded: GroupScales) -> torch.Tensor:
    """(rows,) stored maximum of each row."""
    return encoded.meta[:, 0] if hasattr(encoded, "meta") else encoded.row_max


def row_step(encoded: GroupScales) -> torch.Tensor:
    """(rows,) log2 step that applies to each row (per row, or one tensor-wide step broadcast to the rows)."""
    if hasattr(encoded, "meta"):
        return encoded.meta[:, 1]
    return encoded.step.reshape(-1).expand(encoded.codes.shape[0])


def decode(encoded: GroupScales, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return decode_group_scales(*stored_tensors(encoded), dtype=dtype)


def round_trip(scales: torch.Tensor) -> tuple[GroupScales, torch.Tensor]:
    encoded = encode_group_scales(scales)
    return encoded, decode(encoded)


@pytest.mark.parametrize("spread", [1.001, 2.0, 1e3, 1e8], ids=lambda s: f"spread{s:g}")
@pytest.mark.parametrize("rows,groups", [(1, 2), (5, 17), (64, 128)], ids=lambda v: str(v))
def test_shapes_dtypes_and_relative_error_bound(rows: int, groups: int, spread: float) -> None:
    scales = random_scales(rows, groups, spread, seed=rows * groups)
    encoded, decoded = round_trip(scales)
    assert encoded.codes.dtype == torch.uint8 and encoded.codes.shape == (rows, groups)
    for t in stored_tensors(encoded)[1:]:
        assert t.dtype == torch.float32 and t.shape[0] in (1, rows)
    assert decoded.dtype == torch.float32 and decoded.shape == (rows, groups)
    s_max, step = row_max(encoded), row_step(encoded)
    assert torch.equal(s_max, scales.amax(dim=1))
    # The step spreads the 254 non-zero codes over the row's log2 range (or the widest row's, if tensor-wide).
    spreads = torch.log2(scales.amax(dim=1).double() / scales.amin(dim=1).double()) / 254
    assert (step.double() >= spreads * (1 - 1e-5) - 1e-9).all()
    assert step.double().max() == pytest.approx(spreads.max().item(), rel=1e-5, abs=1e-9)
    bound = torch.exp2(step.double() / 2) - 1  # (rows,)
    relative = (decoded.double() - scales.double()).abs() / scales.double()
    assert (relative <= bound[:, None] * (1 + 1e-3) + 1e-6).all(), f"max excess {(relative - bound[:, None]).max()}"
    # Non-zero scales never use code 0, which is reserved for exact zeros.
    assert (encoded.codes >= 1).all()


@pytest.mark.parametrize("spread", [2.0, 1e3], ids=lambda s: f"spread{s:g}")
def test_max_scale_of_every_row_is_exact(spread: float) -> None:
    scales = random_scales(32, 40, spread, seed=3)
    scales[5, 7] = 0.0
    encoded, decoded = round_trip(scales)
    idx = scales.argmax(dim=1, keepdim=True)
    assert torch.equal(decoded.gather(1, idx), scales.gather(1, idx))
    assert (encoded.codes.gather(1, idx) == 255).all()


def test_widest_row_spans_codes_1_to_255() -> None:
    scales = random_scales(8, 30, 1e3, seed=4)
    scales[5, 3] = scales[5].amax() * 1e-4  # row 5 has the widest spread
    encoded, decoded = round_trip(scales)
    min_codes = encoded.codes.gather(1, scales.argmin(dim=1, keepdim=True))[:, 0]
    assert min_codes[5] == 1 and (min_codes >= 1).all()
    torch.testing.assert_close(decoded[5, 3], scales[5, 3], rtol=1e-5, atol=0)


@pytest.mark.parametrize("value", [1e-6, 0.37, 3.0, 1e4], ids=lambda v: f"{v:g}")
def test_all_equal_scales_are_exact(value: float) -> None:
    scales = torch.full((3, 9), value)
    scales[1] = value * 2.5
    encoded, decoded = round_trip(scales)
    assert torch.equal(decoded, scales)
    assert (row_step(encoded) == 0).all()


def test_all_equal_non_zero_scales_with_zeros_are_exact() -> None:
    scales = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.5]])
    _, decoded = round_trip(scales)
    assert torch.equal(decoded, scales)


def test_zero_scales_decode_to_zero() -> None:
    scales = random_scales(4, 12, 100.0, seed=5)
    scales[0, 0] = 0.0
    scales[2, 5:9] = 0.0
    scales[3] = 0.0  # a whole row of zeros
    encoded, decoded = round_trip(scales)
    zero = scales == 0
    assert (encoded.codes[zero] == 0).all() and (encoded.codes[~zero] > 0).all()
    assert (decoded[zero] == 0).all()
    assert all(torch.isfinite(t).all() for t in stored_tensors(encoded)) and torch.isfinite(decoded).all()
    assert row_max(encoded)[3] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_decode_dtype(dtype: torch.dtype) -> None:
    scales = random_scales(3, 5, 10.0, seed=6)
    encoded = encode_group_scales(scales)
    decoded = decode(encoded, dtype)
    assert decoded.dtype == dtype
    torch.testing.assert_close(decoded.float(), decode(encoded), rtol=1e-2, atol=0)


def test_input_dtype_is_accepted() -> None:
    scales = random_scales(3, 5, 10.0, seed=7)
    a = encode_group_scales(scales.to(torch.bfloat16))
    assert a.codes.dtype == torch.uint8 and all(t.dtype == torch.float32 for t in stored_tensors(a)[1:])
    assert torch.equal(row_max(a), scales.to(torch.bfloat16).float().amax(dim=1))


def test_codes_are_monotone_in_the_scale() -> None:
    scales = torch.linspace(0.01, 1.0, 300)[None]
    encoded, decoded = round_trip(scales)
    assert (encoded.codes[0].to(torch.int64).diff() >= 0).all()
    assert (decoded[0].diff() >= 0).all()


def test_huge_spread_stays_finite_and_exact_at_the_max() -> None:
    scales = torch.tensor([[1e30, 1.0, 1e-30]])
    encoded, decoded = round_trip(scales)
    assert all(torch.isfinite(t).all() for t in stored_tensors(encoded))
    assert decoded[0, 0] == scales[0, 0]
    bound = 2 ** (row_step(encoded)[0].item() / 2) - 1
    assert ((decoded - scales).abs() / scales <= bound * 1.001).all()


def test_subnormal_scale_relative_error() -> None:
    scales = torch.tensor([[1.0, 0.5, 1e-39]])
    encoded, decoded = round_trip(scales)
    bound = 2 ** (row_step(encoded)[0].item() / 2) - 1
    assert ((decoded - scales).abs() / scales <= bound * 1.001).all()


def test_constant_row_next_to_spread_rows_is_exact() -> None:
    scales = random_scales(4, 16, 500.0, seed=8)
    scales[1] = 0.123
    scales[3, ::2] = 0.0
    scales[3, 1::2] = 7.5  # all non-zero scales equal
    _, decoded = round_trip(scales)
    assert torch.equal(decoded[1], scales[1]) and torch.equal(decoded[3], scales[3])
