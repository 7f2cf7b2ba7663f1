"""Give freed scratch memory back to the OS between layers (glibc only; a no-op elsewhere).

Quantizing a layer allocates and frees several tensors of the layer's size (sort, prefix sums, codes). glibc
raises its mmap threshold after such frees, so later scratch comes from the heap and stays resident after it
is freed: peak RSS of a layer-by-layer quantization then grows with the number of layers. ``malloc_trim``
after each layer returns those pages (measured: the RSS growth of quantize-on-load fell from 1.8x to 0.6x the
float checkpoint on a 2-block SD3 transformer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


__all__ = ["release_freed_memory"]


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def release_freed_memory() -> None:
    """Return free heap pages to the OS (``malloc_trim(0)``) when the C library supports it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
