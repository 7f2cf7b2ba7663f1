"""GPU kernel (Triton): ``x W^T + bias`` straight from packed codes, the weight decoded tile by tile in registers.

Each program computes one ``(BLOCK_M, BLOCK_N)`` tile of the output. For every ``BLOCK_K`` slice of the input
dimension it decodes the ``(BLOCK_N, BLOCK_K)`` weight tile from the packed bit stream (layout in
:mod:`.packing`: code ``i`` of the flat ``rows * n`` stream at bits ``[i*b, (i+1)*b)``, little-endian), looks the
codes up in each row's codebook (``K = 2**b`` floats per row, or one shared row), multiplies by the group scale
``scales[r, j // (n / G)]``, and feeds the tile to ``tl.dot`` with a float32 accumulator. The full weight never
exists in memory: per step the kernel reads ``BLOCK_N * BLOCK_K * b / 8`` bytes of codes.

Decoding one code: ``p = i * b``; the two bytes at ``p // 8`` and ``p // 8 + 1`` hold it (``b <= 8``), so
``code = ((byte0 | byte1 << 8) >> (p % 8)) & (2**b - 1)``. Vector codebooks (``DIM = d > 1``): weight ``(r, j)``
reads code ``r * n / d + j // d`` of ``b * d`` bits (at most 8, the same two-byte window) and entry
``code * d + j % d`` of the row's flat ``(K * d)`` codebook.

The kernel is used on CUDA devices with compute capability >= 7.0 when Triton imports (:func:`triton_available`);
everywhere else callers take the CPU kernels or the reference path. It also runs in Triton's interpreter
(``TRITON_INTERPRET=1`` set before import) on CPU tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch


__all__ = ["triton_available", "triton_linear"]

logger = logging.getLogger(__name__)

_DISABLE_ENV = "DIFFUSERS_OTQ_NO_TRITON"
_MIN_CAPABILITY = (7, 0)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel():  # noqa: ANN202 - the jitted Triton function (its type lives in triton)
    import triton
    import triton.language as tl

    @triton.jit
    def otq_linear_kernel(
        x_ptr, packed_ptr, codebook_ptr, scales_ptr, bias_ptr, out_ptr,
        M, N, K, codebook_stride, groups, group_size,
        stride_xm, stride_om,
        BITS: tl.constexpr, DIM: tl.constexpr, SHARED_CODEBOOK: tl.constexpr, HAS_SCALES: tl.constexpr,
        HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        CODE_BITS: tl.constexpr = BITS * DIM
        total_bytes = (N.to(tl.int64) * (K // DIM) * CODE_BITS + 7) // 8  # int64: passes 2**31 on big layers
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.full, not tl.zeros: a builtin in the interpreter too
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
            w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
            bit = (offs_n[:, None].to(tl.int64) * (K // DIM) + offs_k[None, :] // DIM) * CODE_BITS
            byte = bit // 8
            low = tl.load(packed_ptr + byte, mask=w_mask, other=0).to(tl.int32)
            high = tl.load(packed_ptr + byte + 1, mask=w_mask & (byte + 1 < total_bytes), other=0).to(tl.int32)
            code = ((low | (high << 8)) >> (bit % 8).to(tl.int32)) & ((1 << CODE_BITS) - 1)
            if DIM > 1:
                code = code * DIM + offs_k[None, :] % DIM
            if SHARED_CODEBOOK:
                book_row = offs_n[:, None] * 0
            else:
                book_row = offs_n[:, None]
            w = tl.load(codebook_ptr + book_row * codebook_stride + code, mask=w_mask, other=0.0)
            if HAS_SCALES:
                scale = tl.load(scales_ptr + offs_n[:, None] * groups + offs_k[None, :] // group_size, mask=w_mask,
                                other=0.0)  # fmt: skip
                w = w * scale
            if FP32_DOT:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)  # fmt: skip

    return otq_linear_kernel


@functools.cache
def _triton_importable() -> bool:
    if os.environ.get(_DISABLE_ENV) == "1":
        logger.info("OTQ Triton kernel disabled by %s; GPUs use the PyTorch reference dequantization.", _DISABLE_ENV)
        return False
    if importlib.util.find_spec("triton") is None:
        logger.info("Triton is not installed; GPUs use the PyTorch reference dequantization (pip install triton).")
        return False
    return True


def triton_available(device: torch.device) -> bool:
    """Whether :func:`triton_linear` serves tensors on ``device``: a CUDA device of compute capability >= 7.0 with
    Triton importable (and ``DIFFUSERS_OTQ_NO_TRITON`` unset); CPU tensors only under Triton's interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY and _triton_importable()
    return device.type == "cpu" and _interpreted() and _triton_importable()


def _fp32_dot(dtype: torch.dtype) -> bool:
    """float32 inputs multiply in IEEE float32 (no TF32). The interpreter (numpy) has no bfloat16, so there bf16
    tiles are widened to float32 too; on a GPU they go to the tensor cores as bf16."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreted())


def _block_m(tokens: int) -> int:
    return 16 if tokens <= 16 else (32 if tokens <= 32 else 64)


def triton_linear(
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
    """``x (T, n) @ W^T + bias -> (T, rows)`` in ``x``'s dtype, ``W`` decoded from ``packed`` inside the kernel.

    Args:
        x: (T, n) float16, bfloat16 or float32 activations.
        packed: flat uint8 bit stream of the ``rows * n / vector_dim`` codes.
        codebook: (rows, C) or (1, C) float32 codewords (``C = min(2**bits, n)``; vector codebooks: flat
            ``C = K * vector_dim``).
        scales: (rows, G) float32 decoded group scales, or empty without groups.
        bias: (rows,) or empty.
        rows, n, bits: the weight's row layout and bits per weight.
        vector_dim: codeword dimension (``bits * vector_dim``-bit codes).

    Returns:
        (T, rows) tensor equal to ``F.linear(x, W, bias)`` up to the accumulation order (float32 accumulator).
    """
    x = x.contiguous()
    tokens = x.shape[0]
    out = torch.empty(tokens, rows, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block_m, block_n, block_k = _block_m(tokens), 64, 64
    groups = scales.shape[1] if scales.numel() else 1
    grid = ((tokens + block_m - 1) // block_m, (rows + block_n - 1) // block_n)
    _kernel()[grid](
        x, packed.contiguous(), codebook.contiguous(), scales.contiguous(), bias.contiguous(), out,
        tokens, rows, n, codebook.shape[1], groups, n // groups, x.stride(0), out.stride(0),
        BITS=bits, DIM=vector_dim, SHARED_CODEBOOK=codebook.shape[0] == 1 and rows > 1, HAS_SCALES=scales.numel() > 0,
        HAS_BIAS=bias.numel() > 0, FP32_DOT=_fp32_dot(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
