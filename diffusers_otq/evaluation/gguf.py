"""GGUF K- and i-quants with an importance matrix, by llama.cpp's own quantizer: calibrated peers of the evaluation.

GGUF is what people run for 2-bit Flux (Q2_K, Q3_K and the lattice i-quants IQ2_XS, IQ3_XXS). The quantizer is
ggml's C code, built from the llama-cpp-python source package by ``scripts/install_gguf.sh`` (not part of the
test command's install) into ``libggml-base.so``; this module calls it through ``ctypes``:

* ``ggml_quantize_chunk(type, src, dst, 0, rows, n_per_row, imatrix)`` quantizes the rows of a weight viewed as
  (out, in * kh * kw), each row cut into blocks along the input dimension (256 values for K- and i-quants), with
  the importance matrix ``imatrix`` (n_per_row,): the layer's per-input second moments ``E[x_j^2]`` from the same
  calibration statistics OTQ fits on (llama.cpp's ``imatrix`` tool sums the same squares);
* the type's ``to_float`` decodes the blocks back, and the evaluation runs the decoded float weights (what
  diffusers' GGUF layers compute with); every stored byte is counted (``ggml_row_size``).

Rows that the format's block does not divide take llama.cpp's own fallback (``tensor_type_fallback`` of
``llama-quant.cpp``): Q2_K/Q3_K -> Q4_0, IQ2_XS/IQ3_XXS -> IQ4_NL (32-value blocks), then float16. On the bundled
models, whose layers are 128-1152 inputs wide, most layers fall back; their bits are counted as stored.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


__all__ = ["GGUF_FORMATS", "GGUFFormat", "LIBRARY_ENV", "gguf_available", "gguf_quantize", "library_path"]

LIBRARY_ENV = "DIFFUSERS_OTQ_GGML_LIB"
"""Path of ``libggml-base.so``; default ``~/.cache/diffusers-otq/ggml/libggml-base.so`` (where
``scripts/install_gguf.sh`` puts it)."""

_F16, _Q4_0, _IQ4_NL = 1, 2, 20


@dataclass(frozen=True)
class GGUFFormat:
    """One GGUF quantization type: its ggml enum value, nominal bits and llama.cpp's fallback for rows its block
    does not divide."""

    ggml_type: int
    bits: int
    fallback: int


GGUF_FORMATS: dict[str, GGUFFormat] = {
    "gguf-q2_k": GGUFFormat(10, 2, _Q4_0),
    "gguf-q3_k": GGUFFormat(11, 3, _Q4_0),
    "gguf-iq2_xs": GGUFFormat(17, 2, _IQ4_NL),
    "gguf-iq3_xxs": GGUFFormat(18, 3, _IQ4_NL),
}


class _TypeTraits(ctypes.Structure):
    _fields_ = [  # struct ggml_type_traits of ggml.h
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def library_path() -> Path:
    """Where ``libggml-base.so`` is looked for (:data:`LIBRARY_ENV` or the install script's default)."""
    default = Path.home() / ".cache" / "diffusers-otq" / "ggml" / "libggml-base.so"
    return Path(os.environ.get(LIBRARY_ENV, default))


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = library_path()
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def gguf_available() -> bool:
    """Whether llama.cpp's quantizer is built (``bash scripts/install_gguf.sh``)."""
    return _library() is not None


def _stored_type(fmt: GGUFFormat, n_per_row: int, lib: ctypes.CDLL) -> int:
    """The type a row of ``n_per_row`` values is stored in: the format, else its fallback, else float16."""
    for ggml_type in (fmt.ggml_type, fmt.fallback):
        if n_per_row % lib.ggml_get_type_traits(ggml_type).contents.blck_size == 0:
            return ggml_type
    return _F16


def gguf_quantize(
    weight: torch.Tensor, name: str, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, int, str]:
    """Quantize the rows of ``weight`` (R, n) with GGUF format ``name`` and decode them back.

    Args:
        weight: (R, n) float weights (one output channel per row).
        name: one of :data:`GGUF_FORMATS`.
        importance: optional (n,) non-negative importance of each input (the importance matrix).

    Returns:
        ``(decoded (R, n) float32, stored bytes, the ggml type name used)``.

    Raises:
        RuntimeError: the quantizer is not built (run ``bash scripts/install_gguf.sh``).
        ValueError: an unknown format, a bad importance shape, or no importance for a type that needs one
            (IQ2_XS: llama.cpp refuses it too).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(
            f"llama.cpp's quantizer is not built: {library_path()} is missing. Run `bash scripts/install_gguf.sh` "
            f"(or set {LIBRARY_ENV} to a libggml-base.so)."
        )
    if name not in GGUF_FORMATS:
        raise ValueError(f"GGUF format {name!r} is unknown; expected one of {list(GGUF_FORMATS)}.")
    rows, n = weight.shape
    if importance is not None and tuple(importance.shape) != (n,):
        raise ValueError(f"importance has shape {tuple(importance.shape)}; expected ({n},), one per input.")
    ggml_type = _stored_type(GGUF_FORMATS[name], n, lib)
    traits = lib.ggml_get_type_traits(ggml_type).contents
    if importance is None and lib.ggml_quantize_requires_imatrix(ggml_type):  # ggml would abort the process
        raise ValueError(
            f"GGUF type {traits.type_name.decode()} ({name}) needs an importance matrix (importance=...)."
        )
    src = np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy())
    size = lib.ggml_row_size(ggml_type, n) * rows
    dst = (ctypes.c_uint8 * size)()
    imatrix = None
    if importance is not None:
        imatrix = np.ascontiguousarray(importance.detach().to(torch.float32).cpu().numpy())
    written = lib.ggml_quantize_chunk(ggml_type, src.ctypes.data, dst, 0, rows, n,
                                      None if imatrix is None else imatrix.ctypes.data)  # fmt: skip
    if written != size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {traits.type_name!r}, expected {size}.")
    decoded = np.empty(rows * n, dtype=np.float32)
    _ToFloat(traits.to_float)(ctypes.addressof(dst), decoded.ctypes.data, rows * n)
    return torch.from_numpy(decoded).view(rows, n), size, traits.type_name.decode()
