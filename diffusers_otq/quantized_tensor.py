"""The packed storage format (:class:`QuantizedTensor`) and :func:`quantize_tensor`, the one way to fill it.

Layout of a weight of shape ``S`` with ``numel`` elements, ``b`` bits and ``K = min(2**b, n)`` codewords:

* rows: the weight viewed as ``(R, n)``; ``R = S[0]`` and ``n = numel / S[0]`` for ``"channel"`` and
  ``"group"`` (the input dimension of a conv weight ``(out, in, kh, kw)`` is ``in * kh * kw``), ``R = 1`` for
  ``"tensor"`` and for 1-D weights (one codebook, as in the paper).
* ``packed``: uint8 ``(ceil(numel * b / 8),)``, the codes of all elements in row-major order, bit-packed
  with the layout of :mod:`diffusers_otq.functional.packing` (no per-row padding).
* ``codebook``: ``(C, K)`` ascending rows in 16-bit (fp16, bf16 for bf16 weights) or fp32; ``C = R`` for
  per-channel codebooks, ``C = 1`` for one codebook per tensor.
* ``"group"`` only: the row is cut into contiguous groups of ``group_size`` values, each divided by its absmax
  scale before fitting (the codebook holds normalised values); scales are 8-bit log codes ``(R, n / group_size)``
  plus ``(R,)`` fp32 row maxima and one fp32 step (:mod:`diffusers_otq.functional.scales`).

Vector codebooks (``vector_dim = d > 1``, format version 5): each row is cut into ``n / d`` consecutive vectors,
``packed`` holds ``R * n / d`` codes of ``b * d`` bits and ``codebook`` is ``(C, K, d)`` with
``K = min(2**(b * d), vectors per codebook)`` (:mod:`diffusers_otq.functional.vector_codebooks`); group sizes are
multiples of ``d``, so a vector shares one scale.

int8 codebooks (``codebook_dtype=torch.int8``, format version 6): ``codebook`` holds int8 codewords and
``codebook_scale`` ``(C,)`` float32 one scale per codebook; the codewords are ``codebook * codebook_scale``
(:mod:`diffusers_otq.functional.codebook_storage`). Every consumer reads them through
:attr:`QuantizedTensor.flat_codebook`, which decodes.

Codebooks per noise-level band (``noise_bands = B > 1``, format version 7): the codes are shared, and ``codebook``
stacks ``B`` sets of codebooks, ``(B * C, K[, d])`` with band ``b``'s in rows ``b * C .. (b + 1) * C - 1``
(``codebook_scale`` ``(B * C,)`` likewise). :attr:`QuantizedTensor.noise_band` picks the set every read decodes
(:mod:`diffusers_otq.noise_bands` sets it from the denoiser's timestep); every set is counted in ``nbytes``.

``dequantize()`` is ``codebook[c, code] * scale`` reshaped to ``S``. Every byte of these tensors is counted
in :attr:`QuantizedTensor.nbytes`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from functools import partial

import torch

from .functional.codebook_storage import decode_scaled_codebook, encode_scaled_codebook
from .functional.dequant_ops import dequantize_rows, reference_dequantize
from .functional.fitters import EFFORTS, fit_codebook, stretch_to_variance
from .functional.packing import pack_codes, packed_num_bytes, unpack_codes
from .functional.parallel import fit_workers, run_tasks
from .functional.scales import GroupScales, decode_group_scales, encode_group_scales
from .functional.vector_codebooks import (
    FULL_KMEANS,
    START_KMEANS,
    nearest_codewords,
    scalar_view_codes,
    weighted_kmeans,
)
from .options import (
    DEFAULT_METHOD,
    SCALED_CODEBOOK_DTYPES,
    LayerSpec,
    check_bits,
    check_codebook_dtype,
    check_codebook_scope,
    check_granularity,
    check_group_size,
    check_method,
    check_vector_dim,
)


__all__ = [
    "QuantizedTensor",
    "check_weight",
    "quantize_tensor",
    "row_layout",
    "storage_layout",
    "resolve_codebook_dtype",
]

logger = logging.getLogger(__name__)

_ELEMENTS_PER_CHUNK = 1 << 22  # rows are fitted in chunks of about this many values to bound scratch memory
_ROWS_ELEMENTS_PER_TASK = 1 << 19  # smaller chunks when several threads fit side by side (load balance, memory)
_FLOAT16_MAX = torch.finfo(torch.float16).max
_FLOAT16_TINY = torch.finfo(torch.float16).tiny  # smallest normal float16


def row_layout(shape: tuple[int, ...], granularity: str) -> tuple[int, int]:
    """``(R, n)``: the row view of a weight of ``shape`` (see the module docstring)."""
    numel = math.prod(shape)
    if granularity == "tensor" or len(shape) < 2:
        return 1, numel
    return shape[0], numel // shape[0]


def resolve_codebook_dtype(
    codebook_dtype: torch.dtype | None, weight_dtype: torch.dtype, granularity: str
) -> torch.dtype:
    """The codebook storage dtype: ``codebook_dtype`` if given, else float16 (bfloat16 for bfloat16 weights).

    Group codebooks hold normalised values in [-1, 1], where float16 is the more precise 16-bit type.
    """
    if codebook_dtype is not None:
        return codebook_dtype
    if granularity != "group" and weight_dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float16


def storage_layout(
    shape: tuple[int, ...], spec: LayerSpec, codebook_dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``name -> (shape, dtype)`` of every tensor :func:`quantize_tensor` stores for a weight of ``shape``.

    ``packed`` is ``(ceil(numel * bits / 8),)`` uint8; ``codebook`` is ``(C, min(2**bits, values per codebook))``;
    group granularity adds ``scale_codes (R, n / group_size)`` uint8, ``scale_max (R,)`` and ``scale_step (1,)``
    float32; an int8 codebook adds ``codebook_scale (C,)`` float32. ``spec.noise_bands = B`` stacks ``B`` sets of
    codebooks (and their scales): ``(B * C, K)``.

    Example:
        >>> from diffusers_otq.options import LayerSpec
        >>> storage_layout((32, 64), LayerSpec(bits=3), torch.float16)["codebook"]
        ((32, 8), torch.float16)
    """
    rows, n = row_layout(shape, spec.granularity)
    d = spec.vector_dim
    if spec.granularity == "group" and spec.codebook_scope == "tensor":
        codebook_rows, values_per_codebook = 1, rows * n
    else:
        codebook_rows, values_per_codebook = rows, n
    levels = min(1 << (spec.bits * d), values_per_codebook // d)
    codebook_rows *= spec.noise_bands
    layout = {
        "packed": ((packed_num_bytes(rows * n // d, spec.bits * d),), torch.uint8),
        "codebook": ((codebook_rows, levels) + ((d,) if d > 1 else ()), codebook_dtype),
    }
    if codebook_dtype in SCALED_CODEBOOK_DTYPES:
        layout["codebook_scale"] = ((codebook_rows,), torch.float32)
    if spec.granularity == "group":
        layout["scale_codes"] = ((rows, n // spec.group_size), torch.uint8)
        layout["scale_max"] = ((rows,), torch.float32)
        layout["scale_step"] = ((1,), torch.float32)
    return layout


@dataclass
class QuantizedTensor:
    """A weight stored as packed low-bit codes plus codebooks (and group scales).

    Attributes:
        packed: (ceil(numel * bits / 8),) uint8 bit-packed codes (one ``bits * vector_dim``-bit code per vector).
        codebook: (C, K) codewords, ascending along dim 1; (C, K, d) vectors with ``vector_dim = d > 1``; int8
            integers with ``codebook_scale`` (read the codewords with :attr:`flat_codebook`).
        shape: shape of the original weight.
        dtype: dtype of the original weight (the default of :meth:`dequantize`).
        bits: code width, 1..8.
        method: the codebook fitter that produced it.
        granularity: "tensor", "channel" or "group".
        group_size: values per scale group (granularity "group" only).
        scale_codes: (R, n / group_size) uint8 log-domain scale codes (granularity "group" only).
        scale_max: (R,) float32 largest group scale of each row (granularity "group" only).
        scale_step: (1,) float32 log2 step between scale codes (granularity "group" only).
        vector_dim: codeword dimension ``d`` (1: scalar codebooks).
        codebook_scale: (C,) float32 scale of each int8 codebook (None: the codebook holds the codewords).
        noise_bands: sets of codebooks stacked in ``codebook`` (and ``codebook_scale``) over the shared codes, one
            per noise-level band: ``(B * C, K[, d])``.
        noise_band: the set every read (:attr:`flat_codebook`, :meth:`dequantize`, the kernels) decodes.

    Example:
        >>> import torch
        >>> from diffusers_otq import quantize_tensor
        >>> q = quantize_tensor(torch.randn(64, 128), bits=3)
        >>> q.dequantize().shape, q.dequantize().dtype
        (torch.Size([64, 128]), torch.float32)
        >>> q.bits_per_weight  # 3 bits of code + 8 fp16 codewords per row of 128 weights
        4.0
    """

    packed: torch.Tensor
    codebook: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    method: str
    granularity: str
    group_size: int | None = None
    scale_codes: torch.Tensor | None = None
    scale_max: torch.Tensor | None = None
    scale_step: torch.Tensor | None = None
    vector_dim: int = 1
    codebook_scale: torch.Tensor | None = None
    noise_bands: int = 1
    noise_band: int = 0

    @property
    def code_bits(self) -> int:
        """Bits of one stored code: ``bits * vector_dim``."""
        return self.bits * self.vector_dim

    @property
    def flat_codebook(self) -> torch.Tensor:
        """(C, K * d) the codewords with each row's vectors laid end to end (the codebook itself when d = 1):
        value ``i`` of vector ``k`` is entry ``k * d + i``, where :func:`scalar_view_codes` points. An int8
        codebook is decoded (float32 ``codebook * codebook_scale``); with noise bands, those of :attr:`noise_band`."""
        book, scale = self.codebook, self.codebook_scale
        if self.noise_bands > 1:
            if not 0 <= self.noise_band < self.noise_bands:
                raise IndexError(
                    f"noise_band={self.noise_band} is out of range for a weight with {self.noise_bands} noise bands; "
                    f"expected 0..{self.noise_bands - 1}."
                )
            per_band = book.shape[0] // self.noise_bands
            rows = slice(self.noise_band * per_band, (self.noise_band + 1) * per_band)
            book, scale = book[rows], None if scale is None else scale[rows]
        if scale is not None:
            book = decode_scaled_codebook(book, scale)
        return book.reshape(book.shape[0], -1)

    def with_noise_bands(self, bands: int) -> QuantizedTensor:
        """A copy whose codebooks (and int8 scales) are repeated into ``bands`` identical sets over the same codes
        (the start that refinement per band trains from); ``self`` when ``bands`` is its own count.

        Raises:
            ValueError: ``self`` already has another number of bands.
        """
        if bands == self.noise_bands:
            return self
        if self.noise_bands != 1:
            raise ValueError(f"the weight already has {self.noise_bands} noise bands; cannot make it {bands}.")
        scale = None if self.codebook_scale is None else self.codebook_scale.repeat(bands)
        book = self.codebook.repeat(bands, *(1,) * (self.codebook.dim() - 1))
        return replace(self, codebook=book, codebook_scale=scale, noise_bands=bands, noise_band=0)

    @property
    def numel(self) -> int:
        """Number of weights represented."""
        return math.prod(self.shape)

    @property
    def rows(self) -> tuple[int, int]:
        """``(R, n)`` row view of the weight."""
        return row_layout(tuple(self.shape), self.granularity)

    @property
    def nbytes(self) -> int:
        """Every stored byte: packed codes + codebooks + scale codes + scale metadata."""
        total = self.packed.numel() * self.packed.element_size()
        total += self.codebook.numel() * self.codebook.element_size()
        for t in (self.codebook_scale, self.scale_codes, self.scale_max, self.scale_step):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        """``nbytes * 8 / numel``: effective bits per weight including all metadata."""
        return self.nbytes * 8 / self.numel

    def codes(self) -> torch.Tensor:
        """(R, n / d) uint8 codeword indices, unpacked (one per vector of ``d`` consecutive values)."""
        rows, n = self.rows
        return unpack_codes(self.packed, self.code_bits, self.numel // self.vector_dim).view(
            rows, n // self.vector_dim
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct the weight: ``codebook[c, code] * scale``, shape :attr:`shape`, dtype ``dtype`` or :attr:`dtype`."""
        out_dtype = self.dtype if dtype is None else dtype
        rows, n = self.rows
        if self.needs_grad:  # refinement trains codebooks/scales: the differentiable reference path
            weight = reference_dequantize(self.packed, self.flat_codebook, self.decoded_scales(), rows, n, self.bits,
                                          out_dtype, self.vector_dim)  # fmt: skip
        else:
            weight = dequantize_rows(
                self.packed, *self.kernel_inputs(), rows, n, self.bits, out_dtype, self.vector_dim
            )
        return weight.reshape(self.shape)

    @property
    def needs_grad(self) -> bool:
        """Whether gradients must flow into the codebook or the group scales (the fused ops have no backward)."""
        trained = (t for t in (self.codebook, self.scale_max, self.scale_step) if t is not None)
        return torch.is_grad_enabled() and any(t.requires_grad for t in trained)

    def kernel_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codebook, scales)`` as the fused ops take them: float32, the codebook flat (C, K * d), ``scales``
        (R, G) or empty without groups."""
        scales = self.decoded_scales()
        codebook = self.flat_codebook.to(torch.float32)
        return codebook, codebook.new_empty(0) if scales is None else scales

    def decoded_scales(self) -> torch.Tensor | None:
        """(R, G) float32 group scales, or None without group granularity."""
        if self.scale_codes is None:
            return None
        return decode_group_scales(self.scale_codes, self.scale_max, self.scale_step)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name: ``packed``, ``codebook``, ``codebook_scale`` (int8 codebooks) and, for
        groups, ``scale_codes/max/step``."""
        out = {"packed": self.packed, "codebook": self.codebook}
        if self.codebook_scale is not None:
            out["codebook_scale"] = self.codebook_scale
        if self.scale_codes is not None:
            out.update(scale_codes=self.scale_codes, scale_max=self.scale_max, scale_step=self.scale_step)
        return out

    @classmethod
    def empty(
        cls,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        spec: LayerSpec,
        *,
        device: torch.device | str = "meta",
    ) -> QuantizedTensor:
        """Uninitialised storage with the exact layout :func:`quantize_tensor` produces (for loading checkpoints)."""
        codebook_dtype = resolve_codebook_dtype(spec.codebook_dtype, dtype, spec.granularity)
        tensors = {
            name: torch.empty(tensor_shape, dtype=tensor_dtype, device=device)
            for name, (tensor_shape, tensor_dtype) in storage_layout(shape, spec, codebook_dtype).items()
        }
        return cls(
            shape=torch.Size(shape),
            dtype=dtype,
            bits=spec.bits,
            method=spec.method,
            granularity=spec.granularity,
            group_size=spec.group_size,
            vector_dim=spec.vector_dim,
            noise_bands=spec.noise_bands,
            **tensors,
        )

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every stored tensor on ``device`` (values unchanged)."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return replace(self, **moved)


def _describe(name: str | None) -> str:
    return f"weight of layer {name!r}" if name else "the tensor"


def check_weight(weight: object, what: str) -> torch.Tensor:
    """Return ``weight`` if it is a finite, non-empty, floating-point tensor with values; else raise.

    Args:
        weight: The candidate tensor (any shape with at least one dimension).
        what: How error messages name it, e.g. ``"weight of layer 'proj'"``.

    Raises:
        TypeError: not a tensor, not floating point, or an 8-bit float (already quantized).
        ValueError: 0-d, empty, on the meta device, or holding NaN/Inf.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(weight).__name__}.")
    if not weight.dtype.is_floating_point:
        raise TypeError(
            f"{what} has dtype {weight.dtype}; only floating-point tensors can be quantized "
            "(convert with .float() first, or leave integer tensors unquantized)."
        )
    if weight.dtype.itemsize == 1:  # float8 variants: already quantized, and most torch ops refuse them
        raise TypeError(
            f"{what} has dtype {weight.dtype}, an 8-bit float format that is already quantized; OTQ fits float16, "
            "bfloat16, float32 or float64 weights. Convert it first (weight.to(torch.bfloat16)), or leave the "
            "layer out (modules_to_not_convert)."
        )
    if weight.dim() == 0:
        raise ValueError(f"{what} is 0-d (a scalar); quantize tensors with at least one dimension.")
    if weight.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(weight.shape)}); there is nothing to quantize.")
    if weight.device.type == "meta":
        raise ValueError(f"{what} is on the meta device and holds no values; load its weights before quantizing.")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{what} contains {bad} NaN/Inf value(s) out of {weight.numel()}; a codebook cannot represent them. "
            "Fix the checkpoint, or exclude this layer (modules_to_not_convert)."
        )
    return weight


def _check_float16_range(peak: torch.Tensor, requested: torch.dtype | None, what: str) -> torch.dtype:
    """float16 when every row's absmax (``peak``) lies in float16's normal range (or is 0), else float32 for a
    default (``requested`` None) codebook dtype; an explicit float16 that cannot hold the rows is an error.

    Above 65504 float16 overflows to Inf; below 2**-14 (6.1e-05) it is subnormal and a row of ~1e-8 rounds to 0.
    """
    nonzero = peak[peak > 0]
    if nonzero.numel() == 0:
        return torch.float16
    low, high = float(nonzero.min()), float(nonzero.max())
    if high <= _FLOAT16_MAX and low >= _FLOAT16_TINY:
        return torch.float16
    if requested is None:
        logger.info("%s has rows with absmax %.3g..%.3g, outside float16's range: its codebooks are stored in "
                    "float32.", what, low, high)  # fmt: skip
        return torch.float32
    raise ValueError(
        f"{what} has rows with absmax from {low:.4g} to {high:.4g}, which float16 codebooks cannot hold (overflow "
        f"above {_FLOAT16_MAX}, precision lost below {_FLOAT16_TINY:.3g}); pass codebook_dtype=torch.float32 (or "
        "leave codebook_dtype unset to choose it automatically)."
    )


def _check_storable(peak: torch.Tensor, storage: torch.dtype, weight_dtype: torch.dtype, what: str) -> None:
    """Refuse rows whose absmax (``peak``) ``storage`` cannot hold: above its largest value (the codebook or the
    float32 group scales would be Inf), or nonzero below its smallest normal value when the weight's own dtype holds
    such values as normal numbers (only float64 weights: they would lose their precision or round to 0).

    OTQ stores codebooks in float16, bfloat16 or float32 and group scales in float32, so a float64 weight beyond
    float32's range (about 1e-38 to 3.4e38) cannot be stored; float16 is handled by :func:`_check_float16_range`.
    """
    nonzero = peak[peak > 0]
    if nonzero.numel() == 0:
        return
    limits, own = torch.finfo(storage), torch.finfo(weight_dtype)
    low, high = float(nonzero.min()), float(nonzero.max())
    if high <= limits.max and (low >= limits.tiny or own.tiny >= limits.tiny):
        return
    raise ValueError(
        f"{what} has rows with absmax from {low:.4g} to {high:.4g} ({weight_dtype}), beyond what its {storage} "
        f"codebooks or scales can hold (overflow to Inf above {limits.max:.4g}, precision lost below "
        f"{limits.tiny:.4g}); OTQ stores codebooks in float16, bfloat16 or float32 (float64 is not supported). "
        "Rescale the weight into float32's range (a power of two, compensated where the model uses the output), or "
        "leave this layer in float (modules_to_not_convert)."
    )


def _nearest_codes(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(R, n) index of the nearest codeword of each value (ties to the lower one); codebook rows ascending."""
    cb = codebook.to(values.dtype)
    midpoints = ((cb[:, 1:] + cb[:, :-1]) * 0.5).contiguous()  # (C, K-1)
    if midpoints.shape[0] == 1:  # one shared codebook: a 1-D boundary list serves every row
        return torch.searchsorted(midpoints[0], values)
    return torch.searchsorted(midpoints, values)


def _row_chunks(values: torch.Tensor) -> tuple[range, int, int]:
    """``(chunk starts, rows per chunk, worker threads)`` for row-wise work on ``values`` (R, n): chunks of about
    ``_ELEMENTS_PER_CHUNK`` values on one thread, smaller ones (``_ROWS_ELEMENTS_PER_TASK``) when several threads
    share the rows."""
    rows, n = values.shape
    workers = fit_workers(values.device)
    chunk = max(1, (_ROWS_ELEMENTS_PER_TASK if workers > 1 else _ELEMENTS_PER_CHUNK) // n)
    return range(0, rows, chunk), chunk, workers


def _fit_rows(
    values: torch.Tensor,
    bits: int,
    method: str,
    weights: torch.Tensor | None,
    storage_dtype: torch.dtype,
    what: str,
    effort: str = "full",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every row of ``values`` (R, n) with the fitter's ``effort``; return the stored codebook (R, K) and uint8
    codes (R, n).

    Rows are fitted in chunks of about ``_ROWS_ELEMENTS_PER_TASK`` values, side by side on the CPU cores torch may
    use (:func:`~diffusers_otq.functional.parallel.run_tasks`). Every fitter treats rows independently, so the
    result is the same bits for any chunking and thread count.
    """
    rows, n = values.shape
    levels = 1 << bits
    codes = torch.empty(rows, n, dtype=torch.uint8, device=values.device)
    starts, chunk, workers = _row_chunks(values)

    def fit_chunk(start: int) -> torch.Tensor:
        x = values[start : start + chunk]
        if n <= levels:  # as many codewords as values: store the row itself, losslessly
            sorted_x, order = x.sort(dim=1, stable=True)
            codebook = sorted_x
            chunk_codes = torch.empty_like(order)
            chunk_codes.scatter_(1, order, torch.arange(n, device=x.device).expand_as(order))
        else:
            w = None if weights is None else weights[start : start + chunk]
            fit = fit_codebook(x, levels, method, w, effort)
            codebook = fit.codebook
            chunk_codes = fit.codes
        if storage_dtype == torch.float16 and bool(codebook.abs().amax() > _FLOAT16_MAX):
            raise ValueError(
                f"{what} has codewords up to {codebook.abs().amax().item():.4g}, beyond the float16 range "
                f"({_FLOAT16_MAX}); pass codebook_dtype=torch.float32 (or torch.bfloat16)."
            )
        stored = codebook.to(storage_dtype)
        if chunk_codes is None:
            chunk_codes = _nearest_codes(x, stored)
        codes[start : start + chunk] = chunk_codes  # disjoint rows per task
        return stored

    return torch.cat(run_tasks([partial(fit_chunk, start) for start in starts], workers)), codes


def _fit_shared(
    values: torch.Tensor,
    bits: int,
    method: str,
    weights: torch.Tensor | None,
    storage_dtype: torch.dtype,
    what: str,
    effort: str = "full",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One codebook for all normalised values of the tensor; returns the (1, K) codebook and (R, n) codes.

    ``"ot"`` and ``"ot-vp"`` fit Lloyd-Max on an evenly strided subsample of at most 2**22 values (the
    nearest-codeword assignment then covers every value; ``"ot-vp"`` stretches the codebook with the moments of
    all values), which bounds time and memory on large matrices; the other methods need every value.
    """
    flat = values.reshape(1, -1)
    flat_weights = None if weights is None else weights.reshape(1, -1)
    stride = -(-flat.shape[1] // _ELEMENTS_PER_CHUNK)
    if method not in ("ot", "ot-vp") or stride == 1 or flat.shape[1] <= (1 << bits):
        codebook, codes = _fit_rows(flat, bits, method, flat_weights, storage_dtype, what, effort)
        return codebook, codes.view(values.shape)
    sample_weights = None if flat_weights is None else flat_weights[:, ::stride].contiguous()
    codebook, _ = _fit_rows(flat[:, ::stride].contiguous(), bits, "ot", sample_weights, storage_dtype, what, effort)
    codes = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
    starts, chunk, workers = _row_chunks(values)

    def assign(start: int) -> None:
        codes[start : start + chunk] = _nearest_codes(values[start : start + chunk], codebook)  # disjoint rows

    run_tasks([partial(assign, start) for start in starts], workers)
    if method == "ot-vp":
        codebook = stretch_to_variance(values, codebook.float(), codes, weights).to(storage_dtype)
    return codebook, codes


_KMEANS_SAMPLES_PER_CODEWORD = 256  # a shared vector codebook is fitted on at most this many vectors per codeword
_KMEANS_MIN_SAMPLE = 1 << 16  # (strided), and never fewer than this many (or all: every layer of the bundled models)


def _fit_vectors(
    values: torch.Tensor,
    bits: int,
    vector_dim: int,
    method: str,
    weights: torch.Tensor | None,
    storage_dtype: torch.dtype,
    shared: bool,
    what: str,
    effort: str = "full",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector codebooks of the rows of ``values`` (R, n): ``(codebook (C, K, d) in storage_dtype, codes (R, n / d)
    uint8)``, one codebook per row or (``shared``) one for all rows (fitted on a strided sample of
    ``max(256 K, 2**16)`` vectors at most, assigned on all: k-means costs O(N K d) per round).

    Weighted k-means (:func:`~diffusers_otq.functional.vector_codebooks.weighted_kmeans`) with ``weights`` per
    value; ``"ot-vp"`` then stretches the codewords about the mean to keep the variance (as its scalar form does).
    Codes are assigned against the codebook rounded to its storage dtype. Rows are independent, so row chunks run
    side by side with the same bits for any thread count.
    """
    rows, n = values.shape
    d = vector_dim
    m = n // d
    kmeans_effort = START_KMEANS if effort == "start" else FULL_KMEANS
    points = values.reshape(rows, m, d)
    point_weights = None if weights is None else weights.reshape(rows, m, d)
    if shared:
        flat = points.reshape(1, rows * m, d)
        flat_weights = None if point_weights is None else point_weights.reshape(1, rows * m, d)
        levels = min(1 << (bits * d), rows * m)
        sample = max(_KMEANS_SAMPLES_PER_CODEWORD * levels, _KMEANS_MIN_SAMPLE)
        stride = max(1, -(-(rows * m) // sample))
        sample_weights = None if flat_weights is None else flat_weights[:, ::stride]
        codebook = weighted_kmeans(flat[:, ::stride], levels, sample_weights, kmeans_effort).to(storage_dtype)
        codes = nearest_codewords(flat, codebook.to(values.dtype), flat_weights).reshape(rows, m)
    else:
        levels = min(1 << (bits * d), m)
        codebook = torch.empty(rows, levels, d, dtype=storage_dtype, device=values.device)
        codes = torch.empty(rows, m, dtype=torch.int64, device=values.device)
        starts, chunk, workers = _row_chunks(values)

        def fit_chunk(start: int) -> None:
            part = slice(start, start + chunk)
            w = None if point_weights is None else point_weights[part]
            stored = weighted_kmeans(points[part], levels, w, kmeans_effort).to(storage_dtype)
            codebook[part] = stored  # disjoint rows per task
            codes[part] = nearest_codewords(points[part], stored.to(values.dtype), w)

        run_tasks([partial(fit_chunk, start) for start in starts], workers)
    if method == "ot-vp":
        flat_book = codebook.reshape(codebook.shape[0], -1).to(values.dtype)
        stretched = stretch_to_variance(values, flat_book, scalar_view_codes(codes, d), weights)
        if storage_dtype == torch.float16 and bool(stretched.abs().amax() > _FLOAT16_MAX):
            raise ValueError(
                f"{what} has codewords up to {stretched.abs().amax().item():.4g}, beyond the float16 range "
                f"({_FLOAT16_MAX}); pass codebook_dtype=torch.float32 (or torch.bfloat16)."
            )
        codebook = stretched.reshape(codebook.shape).to(storage_dtype)
    return codebook, codes.to(torch.uint8)


def _encode_scaled(
    values: torch.Tensor,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    vector_dim: int,
    weights: torch.Tensor | None,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(int8 codebook, (C,) float32 scales, codes)`` of a float32 fit of the rows of ``values`` (R, n): the
    codebook encoded (:func:`~diffusers_otq.functional.codebook_storage.encode_scaled_codebook`) and the codes
    assigned again against the decoded codewords, as every fit assigns against its stored codebook."""
    stored, scale = encode_scaled_codebook(codebook)
    decoded = decode_scaled_codebook(stored, scale).to(values.dtype)
    rows, n = values.shape
    if vector_dim == 1:
        return stored, scale, _nearest_codes(values, decoded).to(torch.uint8)
    d = vector_dim
    points = values.reshape(rows, n // d, d)
    point_weights = None if weights is None else weights.reshape(rows, n // d, d)
    if shared or decoded.shape[0] == 1:
        flat_weights = None if point_weights is None else point_weights.reshape(1, -1, d)
        codes = nearest_codewords(points.reshape(1, -1, d), decoded, flat_weights).reshape(rows, n // d)
    else:
        codes = nearest_codewords(points, decoded, point_weights)
    return stored, scale, codes.to(torch.uint8)


def _relative_importance(
    importance: torch.Tensor | None, method: str, rows: int, n: int, what: str
) -> torch.Tensor | None:
    """``importance`` as (R, n) or (1, n) work-dtype weights with mean 1, or None when it is absent or constant."""
    if importance is None:
        return None
    if method not in ("ot", "ot-vp"):
        raise ValueError(
            f"{what}: importance weights are only used by the 'ot' and 'ot-vp' fitters, got method={method!r}; "
            "drop importance or use method='ot-vp'."
        )
    if not isinstance(importance, torch.Tensor) or importance.shape not in ((n,), (rows, n)):
        shape = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise ValueError(
            f"{what}: importance has shape {shape}; expected ({n},) (one per input) or ({rows}, {n}) (one per weight)."
        )
    imp = importance.detach().to(torch.float64)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError(f"{what}: importance must be finite and non-negative (got NaN/Inf or negative values).")
    mean = imp.mean()
    if not bool(mean > 0):
        raise ValueError(f"{what}: importance is all zero; every error would be free. Pass positive weights.")
    imp = (imp / mean).reshape(-1, n)
    if bool((imp == imp.reshape(-1)[0]).all()):
        return None  # constant: the unweighted fit, exactly
    return imp


def quantize_tensor(
    weight: torch.Tensor,
    bits: int = 4,
    method: str = DEFAULT_METHOD,
    granularity: str = "channel",
    group_size: int | None = None,
    *,
    codebook_dtype: torch.dtype | None = None,
    codebook_scope: str = "tensor",
    importance: torch.Tensor | None = None,
    name: str | None = None,
    effort: str = "full",
    vector_dim: int = 1,
) -> QuantizedTensor:
    """Quantize a floating-point tensor to ``bits``-bit codes plus codebooks.

    Args:
        weight: floating tensor with at least one dimension; dim 0 is the output channel.
        bits: code width, 1..8; every codebook has ``K = min(2**bits, n)`` codewords.
        method: codebook fitter, one of ``"ot-vp"`` (default: W2-optimal cells, variance-preserving codewords),
            ``"ot"`` (W2-optimal, lowest weight MSE), ``"ot-equal-mass"`` (the paper's),
            ``"uniform"``, ``"piecewise"``, ``"log2"`` (the paper's baselines); see
            :mod:`diffusers_otq.functional.fitters`.
        granularity: ``"tensor"`` (one codebook), ``"channel"`` (one per output channel, the paper's choice)
            or ``"group"`` (absmax scale per ``group_size`` values along the input dimension, codebook over the
            normalised values).
        group_size: values per scale group; must divide the input dimension (``granularity="group"`` only).
        codebook_dtype: storage dtype of the codebooks: float16, bfloat16 or float32. Default: bfloat16 for
            bfloat16 weights, float16 otherwise, and float32 for a tensor with rows beyond float16's normal range
            (absmax above 65504 or below 6.1e-05). Rows with at most ``2**bits`` values (and constant rows) are
            reproduced exactly whenever the codebook dtype can represent their values (always for fp16/bf16
            weights with the default, and for any weight with float32); with ``"group"`` this holds for
            per-channel codebooks, while a shared codebook reproduces constant rows to its resolution.
        codebook_scope: for ``"group"``: one normalised codebook shared by the whole tensor (``"tensor"``, the
            default: it measured lower error at equal bits per weight, see results/bench_quantize.md; ``"ot"``
            fits it on a strided subsample of <= 2**22 values) or one per output channel (``"channel"``).
        importance: optional non-negative weight of each value's squared error, shape ``(n,)`` (one per input
            of the row view, e.g. the calibration second moments ``E[x_j^2]``, so the fit minimises the
            expected output error ``sum_j E[x_j^2] (w_rj - q_rj)^2`` under uncorrelated inputs) or ``(R, n)`` (one
            per weight). Only ``"ot"`` and ``"ot-vp"`` use it (weighted Lloyd-Max, weighted moments for the
            variance stretch). It is divided by its mean first, so a constant importance gives exactly the
            unweighted fit.
        name: layer name used in error messages.
        effort: ``"full"`` (default) or ``"start"``: a coarser, several times faster ``"ot"``/``"ot-vp"`` fit for
            a result that only starts a calibrated fit (error feedback with codebook refits replaces codes and
            codewords); see :data:`~diffusers_otq.functional.fitters.EFFORTS`.
        vector_dim: codeword dimension ``d`` in (1, 2, 4, 8): ``d`` consecutive values of a row share one
            ``bits * d``-bit code into a codebook of ``2**(bits * d)`` vectors fitted by weighted k-means
            (:mod:`diffusers_otq.functional.vector_codebooks`); ``bits * d <= 8``, methods ``"ot"``/``"ot-vp"``,
            and ``d`` must divide the row length and ``group_size``.

    Returns:
        The :class:`QuantizedTensor` on the device of ``weight``.

    Raises:
        TypeError: ``weight`` is not a floating tensor, or ``bits`` is not an int.
        ValueError: bad bits/method/granularity/group_size/codebook options; 0-d, empty, meta or non-finite weight;
            rows or codewords outside the range of an explicitly requested float16 codebook; float64 rows beyond
            what float32 (and bfloat16) codebooks and float32 group scales can hold (absmax above ~3.4e38 or
            below ~1.2e-38).
    """
    what = _describe(name)
    check_bits(bits)
    check_method(method)
    check_granularity(granularity)
    check_codebook_dtype(codebook_dtype)
    check_codebook_scope(codebook_scope)
    try:
        check_vector_dim(vector_dim, bits, method, granularity, group_size)
    except ValueError as err:
        raise ValueError(f"{_describe(name)}: {err}") from None
    if effort not in EFFORTS:
        raise ValueError(f"{what}: effort={effort!r} is unknown; expected one of {list(EFFORTS)}.")
    weight = check_weight(weight, what)
    shape = tuple(weight.shape)
    rows, n = row_layout(shape, granularity)
    try:
        check_group_size(granularity, group_size, n)
    except ValueError as err:
        raise ValueError(f"{what} (shape {shape}): {err}") from None
    if n % vector_dim:
        raise ValueError(
            f"{what} (shape {shape}) has rows of {n} values, not a multiple of vector_dim={vector_dim}; use a "
            "vector_dim that divides it (or 1), or leave this layer out (modules_to_not_convert)."
        )
    relative_importance = _relative_importance(importance, method, rows, n, what)

    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = weight.detach().reshape(rows, n).to(work_dtype)
    row_peak = x.abs().amax(dim=1)
    storage_dtype = resolve_codebook_dtype(codebook_dtype, weight.dtype, granularity)
    scaled = storage_dtype in SCALED_CODEBOOK_DTYPES  # int8: fitted in float32, then encoded with a scale
    if scaled:
        storage_dtype = torch.float32
    if storage_dtype == torch.float16 and granularity != "group":  # group codebooks hold values in [-1, 1]
        storage_dtype = _check_float16_range(row_peak, codebook_dtype, what)
    _check_storable(row_peak, torch.float32 if granularity == "group" else storage_dtype, weight.dtype, what)
    scales: GroupScales | None = None
    weights = None
    if granularity == "group":
        groups = n // group_size
        scales = encode_group_scales(x.view(rows, groups, group_size).abs().amax(dim=2))
        decoded = decode_group_scales(scales.codes, scales.row_max, scales.step, work_dtype)  # (R, G)
        expanded = decoded[:, :, None].expand(rows, groups, group_size).reshape(rows, n)
        x = torch.where(expanded > 0, x / expanded.masked_fill(expanded == 0, 1.0), torch.zeros_like(x))
        if method in ("ot", "ot-vp"):  # the error of a normalised value costs scale^2 in the weight
            # Only ratios of weights matter: divide by a power of two (per codebook: per row, or one for a shared
            # codebook) so that scale^2 neither overflows at 1e20 nor flushes to zero at 1e-20.
            peak = decoded.amax(dim=1, keepdim=True) if codebook_scope == "channel" else decoded.amax().reshape(1, 1)
            weights = torch.ldexp(expanded, -torch.frexp(peak).exponent).square()
        del expanded
    if relative_importance is not None:
        relative_importance = relative_importance.to(work_dtype).expand(rows, n)
        weights = relative_importance if weights is None else weights * relative_importance

    shared = granularity == "group" and codebook_scope == "tensor"
    if vector_dim > 1:
        codebook, codes = _fit_vectors(x, bits, vector_dim, method, weights, storage_dtype, shared or rows == 1,
                                       what, effort)  # fmt: skip
    elif shared:
        codebook, codes = _fit_shared(x, bits, method, weights, storage_dtype, what, effort)
    else:
        codebook, codes = _fit_rows(x, bits, method, weights, storage_dtype, what, effort)
    codebook_scale = None
    if scaled:
        codebook, codebook_scale, codes = _encode_scaled(x, codebook, codes, vector_dim, weights, shared)
    return QuantizedTensor(
        packed=pack_codes(codes, bits * vector_dim),
        codebook=codebook,
        shape=torch.Size(shape),
        dtype=weight.dtype,
        bits=bits,
        method=method,
        granularity=granularity,
        group_size=group_size,
        scale_codes=None if scales is None else scales.codes,
        scale_max=None if scales is None else scales.row_max,
        scale_step=None if scales is None else scales.step,
        vector_dim=vector_dim,
        codebook_scale=codebook_scale,
    )
