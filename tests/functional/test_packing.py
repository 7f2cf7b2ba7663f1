"""Bit packing: exact round trips, byte counts, the documented layout and error handling."""

from __future__ import annotations

import math
import re

import pytest
import torch

from diffusers_otq.functional import pack_codes, packed_num_bytes, unpack_codes


ALL_BITS = list(range(1, 9))
LENGTHS = [0, 1, 7, 8, 9, 13, 1001]


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Independent pure-Python packer: one LSB-first bit stream, stream bit j = bit j % 8 of byte j // 8."""
    stream = []
    for code in codes:
        stream.extend((code >> i) & 1 for i in range(bits))
    out = bytearray(math.ceil(len(stream) / 8))
    for j, bit in enumerate(stream):
        out[j // 8] |= bit << (j % 8)
    return bytes(out)


def reference_unpack(data: bytes, bits: int, num_codes: int) -> list[int]:
    stream = [(data[j // 8] >> (j % 8)) & 1 for j in range(len(data) * 8)]
    return [sum(stream[i * bits + t] << t for t in range(bits)) for i in range(num_codes)]


def random_codes(n: int, bits: int, dtype: torch.dtype = torch.int64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("bits", ALL_BITS, ids=lambda b: f"{b}bit")
def test_round_trip_exact(bits: int, n: int) -> None:
    codes = random_codes(n, bits, seed=bits * 10_000 + n)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_num_bytes(n, bits)
    unpacked = unpack_codes(packed, bits, n)
    assert unpacked.dtype == torch.uint8 and unpacked.shape == (n,)
    assert torch.equal(unpacked.to(torch.int64), codes)


@pytest.mark.parametrize("bits", ALL_BITS, ids=lambda b: f"{b}bit")
def test_round_trip_extreme_codes(bits: int) -> None:
    """All-zero and all-ones codes (every bit set) survive, so no bit leaks into a neighbour."""
    top = (1 << bits) - 1
    for codes in (torch.zeros(13, dtype=torch.int64), torch.full((13,), top), torch.tensor([top, 0] * 9)):
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes(packed, bits, codes.numel()).to(torch.int64), codes)
    # The only non-zero bits of an all-ones stream are the n * bits payload bits: the padding stays zero.
    ones = pack_codes(torch.full((13,), top), bits)
    assert sum(bin(b).count("1") for b in ones.tolist()) == 13 * bits


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (4, 1, 1, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8], ids=lambda b: f"{b}bit")
def test_multi_dim_input_is_read_row_major(bits: int, shape: tuple[int, ...]) -> None:
    codes = random_codes(math.prod(shape), bits, seed=bits).reshape(shape)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, pack_codes(codes.reshape(-1), bits))
    assert packed.numel() == packed_num_bytes(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).to(torch.int64).reshape(shape), codes)


def test_documented_example() -> None:
    packed = pack_codes(torch.tensor([5, 3, 6]), 3)
    assert packed.tolist() == [0x9D, 0x01]
    assert unpack_codes(torch.tensor([0x9D, 0x01], dtype=torch.uint8), 3, 3).tolist() == [5, 3, 6]


def test_reference_packer_matches_documented_example() -> None:
    """Sanity check of the test's own reference implementation."""
    assert reference_pack([5, 3, 6], 3) == bytes([0x9D, 0x01])
    assert reference_unpack(bytes([0x9D, 0x01]), 3, 3) == [5, 3, 6]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 13, 101], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("bits", ALL_BITS, ids=lambda b: f"{b}bit")
def test_matches_reference_bitstream(bits: int, n: int, dtype: torch.dtype) -> None:
    codes = random_codes(n, bits, seed=7 * bits + n)
    packed = pack_codes(codes.to(dtype), bits)
    expected = reference_pack(codes.tolist(), bits)
    assert bytes(packed.tolist()) == expected
    assert unpack_codes(torch.tensor(list(expected), dtype=torch.uint8), bits, n).tolist() == codes.tolist()
    assert reference_unpack(expected, bits, n) == codes.tolist()


@pytest.mark.parametrize("bits", [0, 9, -1, True, False, 3.0, "3", None], ids=repr)
def test_invalid_bits_raise_value_error(bits: object) -> None:
    codes = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="bits"):
        pack_codes(codes, bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), bits, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bool], ids=str)
def test_non_integer_codes_raise_type_error(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.zeros(4, dtype=dtype), 2)


@pytest.mark.parametrize("delta", [-1, 1], ids=["one_byte_short", "one_byte_long"])
@pytest.mark.parametrize("bits,n", [(3, 13), (1, 9), (8, 5), (5, 8)], ids=lambda v: str(v))
def test_wrong_packed_length_names_both_byte_counts(bits: int, n: int, delta: int) -> None:
    expected = packed_num_bytes(n, bits)
    actual = expected + delta
    with pytest.raises(ValueError) as info:
        unpack_codes(torch.zeros(actual, dtype=torch.uint8), bits, n)
    numbers = {int(t) for t in re.findall(r"\d+", str(info.value))}
    assert {actual, expected} <= numbers


def test_packed_must_be_flat_uint8() -> None:
    with pytest.raises(TypeError):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 3, 3)
    with pytest.raises(TypeError):
        unpack_codes(torch.zeros(1, 2, dtype=torch.uint8), 3, 3)


def test_packing_on_device(device: str) -> None:
    codes = random_codes(1001, 5).to(device)
    packed = pack_codes(codes, 5)
    assert packed.device.type == torch.device(device).type
    assert bytes(packed.cpu().tolist()) == reference_pack(codes.cpu().tolist(), 5)
    assert torch.equal(unpack_codes(packed, 5, 1001).to(torch.int64), codes)
