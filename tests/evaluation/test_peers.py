"""Peer weight formats on the real libraries: shapes, fidelity per bit width, stored-bit accounting, bad input.

Each peer's tests skip when its library is not installed. The libraries are slow to import (seconds each), so
every format quantizes the shared seeded Gaussian weight once (cached) and the tests read that result.
"""

from __future__ import annotations

import importlib.util
import math
import re
from functools import cache

import pytest
import torch

from diffusers_otq.evaluation.peers import (
    PEER_FORMATS,
    PeerFormat,
    PeerNotApplicable,
    PeerWeight,
    available_peer_formats,
    peer_format,
)


_NAMES = [
    "bnb-nf4",
    "bnb-fp4",
    "quanto-int4",
    "quanto-int2",
    "hqq-4",
    "hqq-3",
    "hqq-2",
    "torchao-int4",
    "torchao-int3",
    "torchao-int2",
    "sdnq-uint4",
    "sdnq-uint3",
    "sdnq-uint2",
    "sdnq-uint4-codebook",
    "sdnq-uint3-codebook",
    "sdnq-uint2-codebook",
]
_MODULES = {  # pip package -> module to importorskip
    "bitsandbytes": "bitsandbytes",
    "optimum-quanto": "optimum.quanto",
    "hqq": "hqq",
    "torchao": "torchao",
    "sdnq": "sdnq",
}
_SHAPE = (96, 320)  # 320 = 5 groups of 64: every format quantizes it with its default grouping
# Measured on _SHAPE (worst format in brackets): 4 bits <= 0.015 (bnb-fp4), 3 bits <= 0.049 (torchao-int3),
# 2 bits <= 0.27 (torchao-int2, symmetric); the bounds leave about 1.5x margin.
_MAX_REL_MSE = {4: 0.025, 3: 0.08, 2: 0.4}
# Metadata bits per weight above the code bits; SDNQ's default group at 2 bits is 16 values, so its float scale
# and zero point add 2 * 16 / 16 = 2 bits (sdnq-uint2 stores 4.0 bits/weight).
_MAX_OVERHEAD = {"sdnq-uint2": 2.0}
_DEFAULT_MAX_OVERHEAD = 1.1


def _require(name: str) -> PeerFormat:
    """The format ``name``, skipping the test when its library is missing."""
    fmt = peer_format(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDNQ_USE_TORCH_COMPILE", "0")  # as peers.py does: eager sdnq, no compile per shape
        pytest.importorskip(_MODULES[fmt.library])
    return fmt


def _gaussian(shape: tuple[int, int] = _SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _rel_mse(original: torch.Tensor, restored: torch.Tensor) -> float:
    """``mean((original - restored)^2) / var(original)``."""
    return float((original.float() - restored.float()).square().mean() / original.float().var())


@cache
def _quantized(name: str) -> PeerWeight:
    """``name`` applied to the shared (96, 320) Gaussian weight, once per session."""
    return _require(name).quantize(_gaussian())


def _family(name: str) -> str:
    """Formats that differ only in their bit width: 'hqq-4' and 'hqq-2' -> 'hqq-'."""
    return re.sub(r"\d", "", name)


_FAMILIES = sorted({_family(n) for n in _NAMES if sum(_family(m) == _family(n) for m in _NAMES) > 1})


def test_registry_names_order_and_fields() -> None:
    assert list(PEER_FORMATS) == _NAMES
    for name, fmt in PEER_FORMATS.items():
        assert fmt.name == name and fmt.library in _MODULES
        assert str(fmt.bits) in name, (name, fmt.bits)
        assert fmt.description and "\n" not in fmt.description
        assert fmt.native_coverage and "\n" not in fmt.native_coverage


@pytest.mark.parametrize("name", _NAMES)
def test_shape_dtype_and_input_untouched(name: str) -> None:
    weight = _gaussian(seed=1)
    before = weight.clone()
    result = _require(name).quantize(weight)
    assert result.dequantized.shape == weight.shape and result.dequantized.dtype == weight.dtype
    assert bool(torch.isfinite(result.dequantized).all())
    assert torch.equal(weight, before), f"{name} modified its input"


@pytest.mark.parametrize("name", _NAMES)
def test_relative_mse_bound(name: str) -> None:
    error = _rel_mse(_gaussian(), _quantized(name).dequantized)
    bound = _MAX_REL_MSE[PEER_FORMATS[name].bits]
    # the lower bound catches a format that silently left the weight in float
    assert 1e-4 < error < bound, f"{name}: relative MSE {error:.5f}, expected in (1e-4, {bound})"


@pytest.mark.parametrize("family", _FAMILIES)
def test_relative_mse_decreases_with_bits(family: str) -> None:
    members = sorted((n for n in _NAMES if _family(n) == family), key=lambda n: -PEER_FORMATS[n].bits)
    errors = {n: _rel_mse(_gaussian(), _quantized(n).dequantized) for n in members}
    values = list(errors.values())
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), f"not decreasing with bits: {errors}"


@pytest.mark.parametrize("name", _NAMES)
def test_bits_per_weight_band(name: str) -> None:
    bits = PEER_FORMATS[name].bits
    result = _quantized(name)
    upper = bits + _MAX_OVERHEAD.get(name, _DEFAULT_MAX_OVERHEAD)
    assert result.bits_per_weight == result.stored_bits / math.prod(_SHAPE)
    assert bits <= result.bits_per_weight <= upper, f"{name}: {result.bits_per_weight} bits/weight"


@pytest.mark.parametrize("shape", [_SHAPE, (7, 9)], ids=str)
def test_bnb_nf4_stored_bits_by_hand(shape: tuple[int, int]) -> None:
    numel = math.prod(shape)
    blocks = math.ceil(numel / 64)
    expected = (
        math.ceil(numel / 2) * 8  # two 4-bit codes per byte
        + blocks * 8  # absmax per block of 64, itself 8-bit quantized (nested)
        + math.ceil(blocks / 256) * 32  # float32 absmax of each block of 256 absmaxes
        + 32  # float32 offset (mean of the absmaxes)
    )
    assert _require("bnb-nf4").quantize(_gaussian(shape)).stored_bits == expected


def test_hqq_stored_bits_by_hand() -> None:
    numel = math.prod(_SHAPE)
    metadata = 2 * 16 * numel // 64  # fp16 scale and zero per group of 64
    assert _quantized("hqq-4").stored_bits == numel * 4 + metadata
    # 3-bit codes pack 10 to an int32 word: 3.2 bits per code
    assert _quantized("hqq-3").stored_bits == numel // 10 * 32 + metadata


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_sdnq_codebook_layout_differs_from_plain(bits: int) -> None:
    plain, codebook = _quantized(f"sdnq-uint{bits}"), _quantized(f"sdnq-uint{bits}-codebook")
    assert plain.stored_bits != codebook.stored_bits
    assert "codebook" in codebook.layout and "codebook" not in plain.layout
    # one 2**bits-entry codebook per row of 320 vs scale + zero per group of 2**(bits + 2): several groups per row
    distinct_codebook = max(len(row.unique()) for row in codebook.dequantized)
    distinct_plain = max(len(row.unique()) for row in plain.dequantized)
    assert distinct_codebook <= 2**bits < distinct_plain, (distinct_codebook, distinct_plain)


def test_hqq_rejects_numel_not_divisible_by_64() -> None:
    fmt = _require("hqq-4")
    with pytest.raises(PeerNotApplicable, match=r"\(7, 9\).*64"):
        fmt.quantize(_gaussian((7, 9)))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_torchao_falls_back_to_per_row_scales(bits: int) -> None:
    weight = _gaussian((50, 96))  # 96 is not a multiple of 64
    result = _require(f"torchao-int{bits}").quantize(weight)
    assert result.dequantized.shape == weight.shape
    assert "per row" in result.layout
    assert result.stored_bits == weight.numel() * bits + 50 * (16 + 8)  # codes + fp16 scale + int8 zero per row
    # one scale per row of 96 is coarser than groups of 64; 2 bits gets extra room
    assert _rel_mse(weight, result.dequantized) < _MAX_REL_MSE[bits] * 1.25


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="bnb-nf9") as info:
        peer_format("bnb-nf9")
    assert all(name in str(info.value) for name in _NAMES)


@pytest.mark.parametrize(
    ("weight", "error", "pattern"),
    [
        (torch.randn(320), ValueError, r"2-D.*\(320,\)"),
        (torch.randn(2, 3, 4), ValueError, r"2-D.*\(2, 3, 4\)"),
        (torch.ones(4, 64, dtype=torch.int64), TypeError, r"hqq-4.*torch\.int64.*floating-point"),
        (torch.full((4, 64), float("nan")), ValueError, r"NaN"),
    ],
    ids=["1-D", "3-D", "int64", "nan"],
)
def test_bad_weight_is_rejected_before_the_library_runs(weight: torch.Tensor, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        peer_format("hqq-4").quantize(weight)


@pytest.mark.parametrize("name", ["bnb-nf4", "sdnq-uint4-codebook"])
def test_bfloat16_weight_round_trips_in_bfloat16(name: str) -> None:
    weight = _gaussian().to(torch.bfloat16)
    result = _require(name).quantize(weight)
    assert result.dequantized.dtype == torch.bfloat16
    assert _rel_mse(weight, result.dequantized) < _MAX_REL_MSE[4]


def test_available_peer_formats_are_the_installed_ones_in_order() -> None:
    available = available_peer_formats()
    assert available == [n for n in _NAMES if n in available]
    installed = {lib for lib, module in _MODULES.items() if importlib.util.find_spec(module)}
    assert {PEER_FORMATS[n].library for n in available} == installed
