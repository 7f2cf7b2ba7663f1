"""Storage of the structure a layer can add beyond rounding: a low-rank branch and an input rotation.

A quantized layer computes, for its input ``x``::

    x' = R x                                    (InputRotation: randomized block-Hadamard over input channels)
    y  = Q x' + U (V x') + b                    (QuantizedTensor Q, LowRankBranch U V)

so its effective weight in the original input space is ``(Q + U V) R`` (``R`` orthogonal). Both pieces are
plain tensors that live as buffers of the layer and are saved in the checkpoint; every byte counts in the
layer's bits per weight.

* :class:`LowRankBranch`: ``up`` (out, r) and ``down`` (r, n) in a 16-bit dtype, ``n`` the flattened input of
  one output row (``in/groups * kh * kw`` for a conv, whose ``down`` is applied as a conv and ``up`` as a 1x1).
* :class:`InputRotation`: the random signs, bit-packed (``ceil(c / 8)`` uint8 for ``c`` input channels), and the
  Hadamard block ``b``. For a conv the channels of every kernel tap are rotated, so the rotation commutes with
  the spatial convolution and costs one channel transform of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .functional.packing import pack_codes, packed_num_bytes, unpack_codes
from .functional.rotation import hadamard_block_size, random_signs, rotate_rows, unrotate_rows


__all__ = ["InputRotation", "LowRankBranch", "check_rotation_block", "lowrank_dtype", "structure_nbytes"]


def lowrank_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of low-rank factors: bfloat16 for bfloat16 weights, else float16."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def structure_nbytes(shape: tuple[int, ...], rank: int, rotation_block: int, weight_dtype: torch.dtype) -> int:
    """Bytes a weight of ``shape`` adds for a rank-``rank`` branch and (``rotation_block > 0``) a rotation."""
    rows, width = shape[0], math.prod(shape[1:])
    factors = rank * (rows + width) * torch.empty(0, dtype=lowrank_dtype(weight_dtype)).element_size()
    return factors + (packed_num_bytes(shape[1], 1) if rotation_block else 0)


def check_rotation_block(block: object, channels: int, name: str | None = None) -> int:
    """Return ``block`` if it is a power of two dividing ``channels`` (the input channels a rotation mixes)."""
    where = f" of layer {name!r}" if name else ""
    if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1):
        raise ValueError(f"rotation_block={block!r}{where} must be a power of two >= 2, e.g. 64 or 1024.")
    if channels % block:
        raise ValueError(
            f"rotation_block={block} does not divide the {channels} input channels{where}; use a power of two that "
            f"divides it (the largest is {hadamard_block_size(channels)}), or rotation_block=None to pick it per "
            "layer."
        )
    return block


@dataclass
class LowRankBranch:
    """The factors of ``U V``: ``up`` (out, r) and ``down`` (r, n), both in a 16-bit storage dtype."""

    up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        if self.up.dim() != 2 or self.down.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"low-rank factors must be (out, r) and (r, n); got {tuple(self.up.shape)} and {tuple(self.down.shape)}."
            )

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def nbytes(self) -> int:
        return self.up.numel() * self.up.element_size() + self.down.numel() * self.down.element_size()

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> LowRankBranch:
        """Store float factors in ``dtype``, balancing their scales first (``U D^-1``, ``D V`` with equal row/column
        norms) so neither overflows float16."""
        up64, down64 = up.to(torch.float64), down.to(torch.float64)
        balance = (down64.norm(dim=1) / up64.norm(dim=0).clamp_min(1e-300)).clamp_min(1e-300).sqrt()
        balance = torch.where(torch.isfinite(balance) & (balance > 0), balance, torch.ones_like(balance))
        # contiguous, as a reload from safetensors gives them: matmul results then do not depend on the source
        return cls((up64 * balance).to(dtype).contiguous(), (down64 / balance[:, None]).to(dtype).contiguous())

    @classmethod
    def empty(cls, rows: int, width: int, rank: int, dtype: torch.dtype, device: torch.device | str = "meta"):
        """Uninitialised factors with the stored layout (a checkpoint skeleton)."""
        return cls(
            torch.empty(rows, rank, dtype=dtype, device=device), torch.empty(rank, width, dtype=dtype, device=device)
        )

    def product(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``U V`` (out, n) in ``dtype``."""
        return self.up.to(dtype) @ self.down.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers a layer registers: ``lowrank_up``, ``lowrank_down``."""
        return {"lowrank_up": self.up, "lowrank_down": self.down}


@dataclass
class InputRotation:
    """Random signs (bit-packed) and a Hadamard block: ``R = blockdiag(H_b) diag(s)`` over ``channels`` inputs."""

    packed_signs: torch.Tensor
    channels: int
    block: int

    def __post_init__(self) -> None:
        check_rotation_block(self.block, self.channels)
        if self.packed_signs.dtype != torch.uint8 or self.packed_signs.numel() != packed_num_bytes(self.channels, 1):
            raise ValueError(
                f"packed_signs must be {packed_num_bytes(self.channels, 1)} uint8 bytes for {self.channels} channels, "
                f"got {self.packed_signs.numel()} {self.packed_signs.dtype}."
            )

    @classmethod
    def create(cls, channels: int, block: int, seed: int) -> InputRotation:
        """A rotation with signs drawn from ``seed`` (the signs are stored, so reloads never depend on the RNG)."""
        signs = random_signs(channels, seed)
        return cls(pack_codes((signs < 0).to(torch.uint8), 1), channels, block)

    @classmethod
    def empty(cls, channels: int, block: int, device: torch.device | str = "meta") -> InputRotation:
        return cls(torch.empty(packed_num_bytes(channels, 1), dtype=torch.uint8, device=device), channels, block)

    @property
    def nbytes(self) -> int:
        return self.packed_signs.numel()

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(channels,) ``+-1`` values."""
        negative = unpack_codes(self.packed_signs, 1, self.channels).to(dtype)
        return 1 - 2 * negative

    def rotate(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``R`` applied along ``dim`` of ``x`` (the channel axis of activations or of weight taps)."""
        moved = x.movedim(dim, -1)
        return rotate_rows(moved, self.signs(moved.dtype).to(moved.device), self.block).movedim(-1, dim)

    def unrotate(self, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``R^T`` applied along ``dim`` (the inverse of :meth:`rotate`)."""
        moved = y.movedim(dim, -1)
        return unrotate_rows(moved, self.signs(moved.dtype).to(moved.device), self.block).movedim(-1, dim)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffer a layer registers: ``rotation_signs``."""
        return {"rotation_signs": self.packed_signs}
