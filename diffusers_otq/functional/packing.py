"""Bit packing of low-bit codes into ``uint8`` bytes.

Layout (the same for every bit width ``b`` in 1..8): the codes form one little-endian bit stream.
Code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first, and stream bit ``j``
is bit ``j % 8`` (LSB = bit 0) of byte ``j // 8``. A code may straddle two bytes when ``b`` does not
divide 8. The last byte is zero-padded, so ``n`` codes take exactly ``ceil(n * b / 8)`` bytes and no
other padding exists anywhere (no per-row padding).

Example with ``b = 3`` and codes ``[5, 3, 6]`` (binary ``101, 011, 110``)::

    stream bits 0..8  : 1 0 1 | 1 1 0 | 0 1 1     (each code written LSB first)
    byte 0 (bits 7..0): 1 0 0 1 1 1 0 1 = 0x9D    (codes 0, 1 and the two low bits of code 2)
    byte 1 (bits 7..0): 0 0 0 0 0 0 0 1 = 0x01    (the high bit of code 2, then zero padding)

Blocks of 8 codes fill exactly ``b`` bytes, so pack/unpack work block-wise with a static bit map.
"""

from __future__ import annotations

import torch


__all__ = ["packed_num_bytes", "pack_codes", "unpack_codes"]

_SUPPORTED_BITS = range(1, 9)


def packed_num_bytes(num_codes: int, bits: int) -> int:
    """Number of bytes that ``num_codes`` codes of ``bits`` bits occupy: ``ceil(num_codes * bits / 8)``."""
    return (num_codes * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected an int in 1..8.")


def _pad_to_multiple(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-t.numel()) % multiple
    if pad:
        t = torch.cat([t, t.new_zeros(pad)])
    return t


def _pieces(bits: int) -> list[tuple[int, int, int]]:
    """The static bit map of one block of 8 codes <-> ``bits`` bytes.

    Returns ``(byte j, code k, offset)`` for every byte/code pair that share stream bits, where
    ``offset = k * bits - 8 * j`` is the position of code ``k``'s LSB relative to byte ``j``'s LSB
    (negative when the code starts in an earlier byte). At most ``8 + bits`` pieces.
    """
    return [
        (j, k, k * bits - 8 * j)
        for j in range(bits)
        for k in range(8)
        if k * bits < 8 * (j + 1) and (k + 1) * bits > 8 * j
    ]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into a flat ``uint8`` tensor (layout in the module docstring).

    Codes are processed in blocks of 8, which fill exactly ``bits`` bytes; every operation is a uint8
    shift/or over whole columns, so the cost is O(n) with about 2 bytes of scratch per code.

    Args:
        codes: integer tensor of any shape with values in ``[0, 2**bits)``; it is read in row-major order.
        bits: code width, 1..8.

    Returns:
        ``uint8`` tensor of shape ``(ceil(codes.numel() * bits / 8),)`` on the device of ``codes``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}.")
    num_codes = codes.numel()
    if bits == 8:
        return codes.reshape(-1).to(torch.uint8)
    blocks = _pad_to_multiple(codes.reshape(-1).to(torch.uint8), 8).view(-1, 8)  # (n_blocks, 8)
    packed = torch.zeros(blocks.shape[0], bits, dtype=torch.uint8, device=codes.device)  # (n_blocks, bits)
    for j, k, offset in _pieces(bits):
        # uint8 shifts drop the bits that belong to the neighbouring byte, which is exactly what we want.
        packed[:, j] |= blocks[:, k] << offset if offset >= 0 else blocks[:, k] >> -offset
    return packed.reshape(-1)[: packed_num_bytes(num_codes, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: flat ``uint8`` tensor of exactly ``ceil(num_codes * bits / 8)`` bytes.
        bits: code width, 1..8.
        num_codes: number of codes to read.

    Returns:
        ``uint8`` tensor of shape ``(num_codes,)`` with values in ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(
            f"packed must be a 1-D uint8 tensor, got dtype {packed.dtype} and shape {tuple(packed.shape)}."
        )
    expected = packed_num_bytes(num_codes, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed holds {packed.numel()} bytes but {num_codes} codes of {bits} bits need exactly {expected}; "
            "the codes do not match the tensor shape or bit width."
        )
    if bits == 8:
        return packed.clone()
    blocks = _pad_to_multiple(packed, bits).view(-1, bits)  # (n_blocks, bits)
    codes = torch.zeros(blocks.shape[0], 8, dtype=torch.uint8, device=packed.device)  # (n_blocks, 8)
    for j, k, offset in _pieces(bits):
        codes[:, k] |= blocks[:, j] >> offset if offset >= 0 else blocks[:, j] << -offset
    codes &= (1 << bits) - 1
    return codes.reshape(-1)[:num_codes]
