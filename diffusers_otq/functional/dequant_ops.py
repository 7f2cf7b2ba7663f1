"""Dequantization and lookup-table GEMV as ``torch.library`` custom ops (one op each under ``torch.compile``).

* :func:`dequantize_rows` -> ``(rows, n)``: ``w[r, j] = codebook[r|0, code] * scale[r, j // group]`` in the
  output dtype. CPU: the fused kernel of :mod:`.cpu_kernels` (bit stream -> output dtype in one pass, no index
  tensor); elsewhere, or where the kernel cannot be built: the reference path (unpack to uint8, gather,
  scale), bit-identical to it.
* :func:`tiled_linear` -> ``(T, rows)``: ``x W^T`` in ``x``'s dtype. CPU: the weight dequantized
  :data:`LINEAR_TILE_ROWS` rows at a time into a scratch buffer reused across tiles and calls (no full-size
  temporary, no fresh pages), each tile multiplied with ``at::mm``, equal to ``x @ dequantize_rows(...).T``.
  CUDA with Triton (:mod:`.triton_kernels`): codes decoded tile by tile in registers and fed to ``tl.dot``,
  equal up to the float32 accumulation order.
* :func:`lut_gemv` -> ``(T, rows)``: ``x W^T`` for a few tokens without building ``W`` (CPU kernel), float32;
  it sums in another order than a matmul, so it agrees with ``x @ dequantize_rows(...).T`` to float tolerance.

Before a fused kernel first serves a (kernel, device, dtype) combination it is checked against this module's
reference on a few small layers (:mod:`.kernel_check`, milliseconds); a kernel that disagrees logs one warning and
that combination takes the reference path for the rest of the process.

Both ops take the codebook and the decoded group scales (:func:`~.scales.decode_group_scales`) as float32 and an
empty ``scales`` tensor without groups. They have no autograd formula: callers that need gradients through the
codebook or scales (refinement) use :func:`reference_dequantize`, which is differentiable.
"""

from __future__ import annotations

import torch

from .cpu_kernels import load, loaded
from .kernel_check import CheckLayer, kernel_verified
from .packing import unpack_codes
from .triton_kernels import triton_available, triton_linear
from .vector_codebooks import scalar_view_codes


__all__ = [
    "LINEAR_TILE_ROWS",
    "dequantize_rows",
    "fast_path_available",
    "fused_linear_available",
    "lut_gemv",
    "reference_dequantize",
    "tiled_linear",
]

LINEAR_TILE_ROWS = {torch.float32: 128, torch.float64: 128, torch.float16: 512, torch.bfloat16: 512}
"""Rows of the weight :func:`tiled_linear` dequantizes at a time, per compute dtype (its scratch: ``rows * n``
values, reused). 16-bit GEMMs are about 3x faster here, so their tiles are longer to amortise each call's
overhead (measured on 3072x3072 at 64 tokens, bf16: 1.92x nn.Linear with 128 rows, 1.41x with 512)."""


def reference_dequantize(
    packed: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor | None,
    rows: int,
    n: int,
    bits: int,
    dtype: torch.dtype,
    vector_dim: int = 1,
) -> torch.Tensor:
    """Pure-PyTorch dequantization (differentiable in ``codebook`` and ``scales``); shapes as in the module doc.

    With ``vector_dim = d > 1``, ``packed`` holds ``rows * n / d`` codes of ``bits * d`` bits and ``codebook`` is
    the flat (C, K * d) vector codebook (vector ``k`` at entries ``k * d .. k * d + d - 1``)."""
    count = rows * n // vector_dim
    vector_codes = unpack_codes(packed, bits * vector_dim, count).view(rows, n // vector_dim)
    codes = scalar_view_codes(vector_codes, vector_dim)
    values = codebook[0][codes] if codebook.shape[0] == 1 else codebook.gather(1, codes)
    if scales is None or scales.numel() == 0:
        return values.to(dtype)
    groups = scales.shape[1]
    values = values.to(torch.float32).view(rows, groups, n // groups) * scales[:, :, None]
    return values.to(dtype).view(rows, n)


def fast_path_available(device: torch.device) -> bool:
    """Whether the fused CPU kernels serve tensors on ``device`` (CPU with the extension built). While
    ``torch.compile`` traces, only an already loaded extension counts (building it is not traceable)."""
    if device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return loaded() is not None
    return load() is not None


_fused_linear_decisions: dict[tuple[str, int | None], bool] = {}


def fused_linear_available(device: torch.device) -> bool:
    """Whether :func:`tiled_linear` runs a fused kernel on ``device``: Triton on a GPU
    (:func:`~.triton_kernels.triton_available`) or the CPU extension (:func:`fast_path_available`).

    Decided once per device in eager mode and remembered, so ``torch.compile`` only reads a dict; a device first
    seen while tracing gets the CPU answer of :func:`fast_path_available` (a GPU: the traceable reference path)."""
    key = (device.type, device.index)
    if key in _fused_linear_decisions:
        return _fused_linear_decisions[key]
    if torch.compiler.is_compiling():
        return fast_path_available(device)
    decision = _fused_linear_decisions[key] = triton_available(device) or fast_path_available(device)
    return decision


_CHECK_TILE_ROWS = 32  # the self-test's 70-row layers then span three tiles, the last one partial


def _check_inputs(layer: CheckLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (3 tokens) and a bias (odd bit widths; empty otherwise) for a self-test layer."""
    generator = torch.Generator().manual_seed(layer.bits)
    x = torch.randn(3, layer.n, generator=generator).to(layer.packed.device, dtype)
    bias = torch.randn(layer.rows, generator=generator).to(layer.packed.device, dtype)
    return x, bias if layer.bits % 2 else bias[:0]


def _exact_linear(layer: CheckLayer, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear`` on the reference weight in float64, from operands rounded to ``x``'s dtype as the kernels get
    them: the exact result the kernels approximate."""
    weight = reference_dequantize(layer.packed, layer.codebook, layer.scales, layer.rows, layer.n, layer.bits, x.dtype,
                                  layer.vector_dim)  # fmt: skip
    bias = bias.double() if bias.numel() else None
    return torch.nn.functional.linear(x.double(), weight.double(), bias)


def _compare_cpu_dequantize(layer: CheckLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    args = (layer.packed, layer.codebook, layer.scales, layer.rows, layer.n, layer.bits, dtype, layer.vector_dim)
    return load().dequantize(*args), reference_dequantize(*args)


def _compare_cpu_linear(layer: CheckLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, bias = _check_inputs(layer, dtype)
    out = load().linear(x, layer.packed, layer.codebook, layer.scales, bias, layer.rows, layer.n, layer.bits,
                        _CHECK_TILE_ROWS, layer.vector_dim)  # fmt: skip
    return out, _exact_linear(layer, x, bias)


def _compare_cpu_gemv(layer: CheckLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = _check_inputs(layer, torch.float32)
    out = load().gemv(x, layer.packed, layer.codebook, layer.scales, layer.rows, layer.n, layer.bits, layer.vector_dim)
    return out, _exact_linear(layer, x, x.new_empty(0))


def _compare_triton_linear(layer: CheckLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, bias = _check_inputs(layer, dtype)
    out = triton_linear(x, layer.packed, layer.codebook, layer.scales, bias, layer.rows, layer.n, layer.bits,
                        layer.vector_dim)  # fmt: skip
    return out, _exact_linear(layer, x, bias)


@torch.library.custom_op("diffusers_otq::dequantize_rows", mutates_args=())
def dequantize_rows(
    packed: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    rows: int,
    n: int,
    bits: int,
    dtype: torch.dtype,
    vector_dim: int = 1,
) -> torch.Tensor:
    """The ``(rows, n)`` weight in ``dtype`` (see module doc); ``codebook``/``scales`` float32."""
    device = packed.device
    if fast_path_available(device) and kernel_verified(
        "cpu_kernels.dequantize", device, dtype, _compare_cpu_dequantize
    ):
        return load().dequantize(packed.contiguous(), codebook.contiguous(), scales.contiguous(), rows, n, bits, dtype,
                                 vector_dim)  # fmt: skip
    return reference_dequantize(packed, codebook, scales, rows, n, bits, dtype, vector_dim)


@dequantize_rows.register_fake
def _(packed, codebook, scales, rows, n, bits, dtype, vector_dim=1):  # noqa: ANN001, ANN202 - torch.library fake signature
    return packed.new_empty((rows, n), dtype=dtype)


@torch.library.custom_op("diffusers_otq::lut_gemv", mutates_args=())
def lut_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    rows: int,
    n: int,
    bits: int,
    vector_dim: int = 1,
) -> torch.Tensor:
    """``x (T, n) @ W^T -> (T, rows)`` in float32 without building ``W`` on the CPU (see module doc)."""
    x = x.to(torch.float32).contiguous()
    device = packed.device
    if fast_path_available(device) and kernel_verified("cpu_kernels.gemv", device, torch.float32, _compare_cpu_gemv):
        return load().gemv(x, packed.contiguous(), codebook.contiguous(), scales.contiguous(), rows, n, bits,
                           vector_dim)  # fmt: skip
    return x @ reference_dequantize(packed, codebook, scales, rows, n, bits, torch.float32, vector_dim).T


@lut_gemv.register_fake
def _(x, packed, codebook, scales, rows, n, bits, vector_dim=1):  # noqa: ANN001, ANN202 - torch.library fake signature
    return x.new_empty((x.shape[0], rows), dtype=torch.float32)


@torch.library.custom_op("diffusers_otq::tiled_linear", mutates_args=())
def tiled_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor,
    rows: int,
    n: int,
    bits: int,
    vector_dim: int = 1,
) -> torch.Tensor:
    """``x (T, n) @ W^T + bias -> (T, rows)`` in ``x``'s dtype (``bias`` empty: none), ``W`` dequantized tile by tile
    (see module doc); equal to ``F.linear(x, W, bias)``."""
    device = packed.device
    if triton_available(device) and kernel_verified("triton_kernels.linear", device, x.dtype, _compare_triton_linear):
        return triton_linear(x, packed, codebook, scales, bias, rows, n, bits, vector_dim)
    if fast_path_available(device) and kernel_verified("cpu_kernels.linear", device, x.dtype, _compare_cpu_linear):
        return load().linear(x.contiguous(), packed.contiguous(), codebook.contiguous(), scales.contiguous(),
                             bias.contiguous(), rows, n, bits, LINEAR_TILE_ROWS[x.dtype], vector_dim)  # fmt: skip
    weight = reference_dequantize(packed, codebook, scales, rows, n, bits, x.dtype, vector_dim)
    return torch.nn.functional.linear(x, weight, bias if bias.numel() else None)


@tiled_linear.register_fake
def _(x, packed, codebook, scales, bias, rows, n, bits, vector_dim=1):  # noqa: ANN001, ANN202 - torch.library fake signature
    return x.new_empty((x.shape[0], rows))
