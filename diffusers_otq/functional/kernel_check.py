"""Self-test of the fused kernels: no unverified kernel serves a user's device.

The first time a fused kernel (the C++ CPU kernels of :mod:`.cpu_kernels`, the Triton kernel of
:mod:`.triton_kernels`) is about to serve a ``(kernel, device, dtype)`` combination, :func:`kernel_verified` runs
it on the small layers of :func:`check_layers` (1, 3, 4 and 8 bits; per-row and shared codebooks; with and
without group scales; shapes that are not multiples of the kernels' blocks or tiles) and compares its output
with the PyTorch reference computed by the caller's ``compare`` function. That takes milliseconds on the device.

A mismatch larger than :data:`TOLERANCE` (relative to the output's scale), a non-finite output, or an exception
logs ONE warning naming the kernel, device, dtype and the size of the mismatch, and the combination takes the
reference path for the rest of the process. Verdicts are remembered in a dict, so the hot path is one lookup.
The ops call this inside their bodies, which ``torch.compile`` never traces (they are custom ops), so the check
always runs eagerly; a caller that is being traced gets ``False`` (the traceable reference path) until an eager
call has decided.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .packing import pack_codes


__all__ = ["TOLERANCE", "CheckLayer", "check_layers", "kernel_verified", "mismatch"]

logger = logging.getLogger(__name__)

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Largest accepted ``max |kernel - reference| / max(max |reference|, 1)`` per output dtype: a few roundings of
the dtype at the output's scale, plus (float32) room for TF32 matmuls. The faults this catches (wrong codes,
scales, rows, a miscompiled kernel) are of order 1. Other dtypes get the bfloat16 value."""

_CASES = ((1, False, False, 1), (3, False, True, 1), (4, True, True, 1), (8, False, False, 1))
"""(bits, shared codebook, group scales, vector_dim) of the scalar check layers."""
_VECTOR_CASES = ((2, True, True, 2), (1, False, False, 4))
"""The vector-codebook check layers (4-bit codes of 2 and 4 values)."""
_ROWS, _COLUMNS, _GROUPS = 70, 100, 2  # no multiple of 8 (code blocks) or 64 (GPU tiles); groups of 50 codes


@dataclass(frozen=True)
class CheckLayer:
    """One small quantized layer in the fused ops' input format (``scales`` empty without groups)."""

    packed: torch.Tensor
    codebook: torch.Tensor
    scales: torch.Tensor
    rows: int
    n: int
    bits: int
    vector_dim: int = 1


Compare = Callable[[CheckLayer, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
"""``compare(layer, dtype) -> (kernel output, reference output)`` for one check layer."""


def check_layers(device: torch.device) -> list[CheckLayer]:
    """The self-test layers on ``device``: random codes, sorted random codebooks and scales in [0.5, 1.5), seeded.

    Args:
        device: where the kernel under test runs.

    Returns:
        One :class:`CheckLayer` per case: (1 bit, per-row codebook), (3 bits, per-row, group scales),
        (4 bits, shared codebook, group scales), (8 bits, per-row), (2 bits in 2-D, shared, group scales) and
        (1 bit in 4-D, per-row; flat (C, K * d) codebooks), each 70 x 100.
    """
    generator = torch.Generator().manual_seed(0)
    layers = []
    for bits, shared, grouped, dim in _CASES + _VECTOR_CASES:
        code_bits = bits * dim
        codes = torch.randint(0, 2**code_bits, (_ROWS * _COLUMNS // dim,), generator=generator)
        codebook = torch.randn(1 if shared else _ROWS, 2**code_bits * dim, generator=generator)
        codebook = codebook if dim > 1 else codebook.sort(dim=1).values
        scales = torch.rand(_ROWS, _GROUPS, generator=generator) + 0.5 if grouped else torch.empty(0)
        packed = pack_codes(codes, code_bits)
        tensors = (t.to(device) for t in (packed, codebook, scales))
        layers.append(CheckLayer(*tensors, rows=_ROWS, n=_COLUMNS, bits=bits, vector_dim=dim))
    return layers


def mismatch(out: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |out - expected| / max(max |expected|, 1)`` in float64; inf for another shape, nan for non-finite."""
    if out.shape != expected.shape:
        return math.inf
    expected = expected.detach().to(torch.float64)
    error = (out.detach().to(torch.float64) - expected).abs().max()
    return float(error / expected.abs().max().clamp_min(1.0))


_verdicts: dict[tuple[str, str, int | None, torch.dtype], bool] = {}
_lock = threading.Lock()


def kernel_verified(kernel: str, device: torch.device, dtype: torch.dtype, compare: Compare) -> bool:
    """Whether ``kernel`` may serve ``dtype`` on ``device``: self-tested on first use, remembered after.

    Args:
        kernel: the kernel's name for the messages and the memo (e.g. ``"cpu_kernels.linear"``).
        device: the device it is about to serve.
        dtype: the output dtype it is about to serve.
        compare: runs the kernel and the reference on one :class:`CheckLayer` (see :data:`Compare`).

    Returns:
        True when it matched the reference on every check layer; False (one warning logged) otherwise, or while
        ``torch.compile`` traces before an eager call has decided.
    """
    key = (kernel, device.type, device.index, dtype)
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    if torch.compiler.is_compiling():
        return False
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _self_test(kernel, device, dtype, compare)
        return _verdicts[key]


def _self_test(kernel: str, device: torch.device, dtype: torch.dtype, compare: Compare) -> bool:
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    try:
        with torch.no_grad():
            errors = [mismatch(*compare(layer, dtype)) for layer in check_layers(device)]
    except Exception as err:  # noqa: BLE001 - a kernel that raises is as unusable as one that is wrong
        logger.warning(
            "The OTQ kernel %s failed its self-test on %s for %s (%s: %s); that combination uses the PyTorch "
            "reference path for the rest of this process.",
            kernel, device, dtype, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
        )  # fmt: skip
        return False
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    if not worst <= tolerance:
        logger.warning(
            "The OTQ kernel %s disagrees with the PyTorch reference dequantization on %s for %s: max error %.3g of "
            "the output scale (tolerance %.0e). That combination uses the reference path for the rest of this "
            "process; please report it with your GPU/CPU model and torch version.",
            kernel, device, dtype, worst, tolerance,
        )  # fmt: skip
        return False
    logger.debug("OTQ kernel %s verified on %s for %s (max error %.3g).", kernel, device, dtype, worst)
    return True
