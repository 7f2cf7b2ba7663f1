"""Fused CPU kernels for packed codes, compiled on first use (``torch.utils.cpp_extension``), with a fallback.

Two kernels read the packed bit stream (layout in :mod:`.packing`: blocks of 8 codes in ``bits`` bytes, code
``k`` of a block at bit ``k * bits`` of the block's little-endian bytes) directly, with no index tensor:

* ``dequantize(packed, codebook, scales, rows, n, bits, dtype) -> (rows, n)``:
  ``w[r, j] = codebook[r or 0, code(r*n + j)] * scales[r, j // (n / G)]`` written straight in the output dtype,
  rows in parallel. Scratch: none beyond the output.
* ``gemv(x, packed, codebook, scales, rows, n, bits) -> (T, rows)`` for a few tokens, never building the weight:
  each code is looked up in the row's codebook (a few floats, held in cache/registers) and multiplied into the
  token sums, ``y[t, r] = sum_g scale[r, g] * sum_{j in g} codebook[r, code_rj] * x[t, j]`` (float32 within a
  group, float64 across groups).

Both decode whole blocks of 8 codes with compile-time shifts (one kernel instance per bit width). With vector
codebooks (``dim > 1``, flat codebook rows of ``K * dim`` floats) each ``bits * dim``-bit code writes (or
multiplies) the ``dim`` values of its codeword.

``linear`` multiplies tile by tile with those decoders (see :mod:`.dequant_ops`). ``dp_cuts`` is the exact
micro-bin DP of :func:`~.lloyd_max.lloyd_max_codebook`'s initialisation (rows in parallel, no (R, M, M) tensors),
with the PyTorch version's float32 arithmetic and tie-breaking, so both give the same bits.

``codebook`` and ``scales`` are float32 (``scales`` empty without group granularity); ``x`` and the GEMV output
are float32. The extension is built on first use, once per machine and Python/torch version, into
:func:`build_directory` (about a minute; one ``WARNING`` says so while it builds); the build is locked, bounded
and recovers from builds that were killed (:mod:`.kernel_build`). When it cannot be built or loaded in time,
:func:`load` returns None, the reason is logged once, and callers use the pure-PyTorch reference path.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

from . import kernel_build
from .kernel_build import KernelBuildError, build_timeout, load_extension


__all__ = ["build_directory", "load", "loaded"]

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <cstring>
#include <limits>
#include <algorithm>
#include <vector>

namespace {

inline uint64_t load_block(const uint8_t* packed, int64_t nbytes, int64_t block, int bits) {
  uint64_t window = 0;
  int64_t start = block * bits;
  int64_t avail = nbytes - start;
  std::memcpy(&window, packed + start, static_cast<size_t>(avail < bits ? avail : bits));  // little-endian
  return window;
}

// Calls fn(j, code) for codes [g0, g0 + count) of the stream, j = 0..count-1. Whole blocks of 8 are decoded with
// compile-time shifts (BITS is a template parameter), the ragged head and tail one block window at a time.
template <int BITS, typename Fn>
inline void for_codes(const uint8_t* packed, int64_t nbytes, int64_t g0, int64_t count, Fn&& fn) {
  constexpr uint64_t mask = (BITS == 8) ? 0xFFull : ((1ull << BITS) - 1);
  int64_t g = g0, j = 0;
  while (j < count && (g & 7)) {  // head: up to the next block boundary
    uint64_t window = load_block(packed, nbytes, g >> 3, BITS) >> ((g & 7) * BITS);
    int64_t take = std::min<int64_t>(8 - (g & 7), count - j);
    for (int64_t q = 0; q < take; ++q) { fn(j + q, static_cast<int>(window & mask)); window >>= BITS; }
    j += take; g += take;
  }
  const int64_t whole_end = count - ((count - j) & 7);
  const int64_t last_full = (nbytes / BITS);  // blocks whose BITS bytes are all present
  while (j < whole_end && (g >> 3) < last_full) {
    uint64_t window = 0;
    const int64_t start = (g >> 3) * BITS;
    if (start + 8 <= nbytes) {
      std::memcpy(&window, packed + start, 8);  // one 8-byte load; the bytes past the block are shifted away
    } else {
      std::memcpy(&window, packed + start, BITS);
    }
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) fn(j + q, static_cast<int>((window >> (q * BITS)) & mask));
    j += 8; g += 8;
  }
  while (j < count) {  // tail
    uint64_t window = load_block(packed, nbytes, g >> 3, BITS) >> ((g & 7) * BITS);
    int64_t take = std::min<int64_t>(8 - (g & 7), count - j);
    for (int64_t q = 0; q < take; ++q) { fn(j + q, static_cast<int>(window & mask)); window >>= BITS; }
    j += take; g += take;
  }
}

template <int BITS, typename out_t>
// Rows first_row .. first_row+rows of W into out (rows, n).
void dequantize_impl(const uint8_t* packed, int64_t nbytes, const float* codebook, int64_t cb_rows, int64_t k,
                     const float* scales, int64_t groups, int64_t rows, int64_t n, out_t* out, int64_t first_row = 0) {
  const int64_t parts = groups ? groups : 1, group = n / parts;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<out_t> table(static_cast<size_t>(k));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = first_row + i;
      const float* cb = codebook + (cb_rows == 1 ? 0 : r) * k;
      for (int64_t p = 0; p < parts; ++p) {
        out_t* dst = out + i * n + p * group;
        if (groups) {
          const float s = scales[r * groups + p];
          for (int64_t c = 0; c < k; ++c) table[c] = static_cast<out_t>(cb[c] * s);  // the group's scaled codebook
          for_codes<BITS>(packed, nbytes, r * n + p * group, group, [&](int64_t j, int code) { dst[j] = table[code]; });
        } else {
          for (int64_t c = 0; c < k; ++c) table[c] = static_cast<out_t>(cb[c]);
          for_codes<BITS>(packed, nbytes, r * n, n, [&](int64_t j, int code) { dst[j] = table[code]; });
        }
      }
    }
  });
}

template <int BITS, typename out_t>
// Vector codebooks: rows first_row .. first_row+rows of W into out (rows, n); each code (n / dim per row) writes
// dim values of its codeword, k = K * dim floats per (flat) codebook row.
void dequantize_vector_impl(const uint8_t* packed, int64_t nbytes, const float* codebook, int64_t cb_rows, int64_t k,
                            int64_t dim, const float* scales, int64_t groups, int64_t rows, int64_t n, out_t* out,
                            int64_t first_row = 0) {
  // No per-group table: a vector codebook has K * dim entries (1024 for 256 4-D codewords), more than a group of
  // 64 weights reads, so each weight is scaled as it is written (the same float32 product as a table entry).
  const int64_t parts = groups ? groups : 1, group = n / parts, vectors = n / dim, group_vectors = group / dim;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = first_row + i;
      const float* cb = codebook + (cb_rows == 1 ? 0 : r) * k;
      for (int64_t p = 0; p < parts; ++p) {
        out_t* dst = out + i * n + p * group;
        const float s = groups ? scales[r * groups + p] : 1.0f;
        for_codes<BITS>(packed, nbytes, r * vectors + p * group_vectors, group_vectors, [&](int64_t j, int code) {
          const float* v = cb + static_cast<int64_t>(code) * dim;
          out_t* o = dst + j * dim;
          if (groups) {
            for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<out_t>(v[e] * s);
          } else {
            for (int64_t e = 0; e < dim; ++e) o[e] = static_cast<out_t>(v[e]);
          }
        });
      }
    }
  });
}

template <int BITS>
void gemv_vector_impl(const float* xs, int64_t tokens, const uint8_t* packed, int64_t nbytes, const float* codebook,
                      int64_t cb_rows, int64_t k, int64_t dim, const float* scales, int64_t groups, int64_t rows,
                      int64_t n, float* ys) {
  const int64_t parts = groups ? groups : 1, group = n / parts, vectors = n / dim, group_vectors = group / dim;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> part(static_cast<size_t>(tokens));
    std::vector<double> acc(static_cast<size_t>(tokens));
    for (int64_t r = begin; r < end; ++r) {
      const float* cb = codebook + (cb_rows == 1 ? 0 : r) * k;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t p = 0; p < parts; ++p) {
        std::fill(part.begin(), part.end(), 0.0f);
        const int64_t col0 = p * group;
        for_codes<BITS>(packed, nbytes, r * vectors + p * group_vectors, group_vectors, [&](int64_t j, int code) {
          const float* v = cb + static_cast<int64_t>(code) * dim;
          for (int64_t t = 0; t < tokens; ++t) {
            const float* x = xs + t * n + col0 + j * dim;
            float sum = 0.0f;
            for (int64_t e = 0; e < dim; ++e) sum += v[e] * x[e];
            part[t] += sum;
          }
        });
        const double s = groups ? scales[r * groups + p] : 1.0;
        for (int64_t t = 0; t < tokens; ++t) acc[t] += s * part[t];
      }
      for (int64_t t = 0; t < tokens; ++t) ys[t * rows + r] = static_cast<float>(acc[t]);
    }
  });
}

template <int BITS>
void gemv_impl(const float* xs, int64_t tokens, const uint8_t* packed, int64_t nbytes, const float* codebook,
               int64_t cb_rows, int64_t k, const float* scales, int64_t groups, int64_t rows, int64_t n, float* ys) {
  const int64_t parts = groups ? groups : 1, group = n / parts;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> part(static_cast<size_t>(tokens));
    std::vector<double> acc(static_cast<size_t>(tokens));
    for (int64_t r = begin; r < end; ++r) {
      const float* cb = codebook + (cb_rows == 1 ? 0 : r) * k;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t p = 0; p < parts; ++p) {
        std::fill(part.begin(), part.end(), 0.0f);
        const int64_t col0 = p * group;
        if (tokens == 1) {
          float sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 independent chains, not one serial add
          const float* x = xs + col0;
          for_codes<BITS>(packed, nbytes, r * n + col0, group,
                          [&](int64_t j, int code) { sums[j & 7] += cb[code] * x[j]; });
          part[0] = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
        } else {
          for_codes<BITS>(packed, nbytes, r * n + col0, group, [&](int64_t j, int code) {
            const float w = cb[code];
            for (int64_t t = 0; t < tokens; ++t) part[t] += w * xs[t * n + col0 + j];
          });
        }
        const double s = groups ? scales[r * groups + p] : 1.0;
        for (int64_t t = 0; t < tokens; ++t) acc[t] += s * part[t];
      }
      for (int64_t t = 0; t < tokens; ++t) ys[t * rows + r] = static_cast<float>(acc[t]);
    }
  });
}

template <typename F>
void with_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "bits must be 1..8, got ", bits);
  }
}

}  // namespace

torch::Tensor dequantize(torch::Tensor packed, torch::Tensor codebook, torch::Tensor scales, int64_t rows,
                         int64_t n, int64_t bits, torch::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(codebook.dtype() == torch::kFloat32 && codebook.is_contiguous(), "codebook must be contiguous float32");
  const int64_t groups = scales.numel() ? scales.size(1) : 0;
  auto out = torch::empty({rows, n}, torch::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "otq_dequantize", [&] {
    with_bits(bits * dim, [&](auto b) {
      if (dim == 1) {
        dequantize_impl<decltype(b)::value, scalar_t>(packed.data_ptr<uint8_t>(), packed.numel(),
            codebook.data_ptr<float>(), codebook.size(0), codebook.size(1), groups ? scales.data_ptr<float>() : nullptr,
            groups, rows, n, out.data_ptr<scalar_t>());
      } else {
        dequantize_vector_impl<decltype(b)::value, scalar_t>(packed.data_ptr<uint8_t>(), packed.numel(),
            codebook.data_ptr<float>(), codebook.size(0), codebook.size(1), dim,
            groups ? scales.data_ptr<float>() : nullptr, groups, rows, n, out.data_ptr<scalar_t>());
      }
    });
  });
  return out;
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, torch::Tensor scales,
                   int64_t rows, int64_t n, int64_t bits, int64_t dim) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == n,
              "x must be contiguous float32 (T, n)");
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous(), "packed must be contiguous uint8");
  const int64_t groups = scales.numel() ? scales.size(1) : 0;
  auto y = torch::empty({x.size(0), rows}, x.options());
  with_bits(bits * dim, [&](auto b) {
    if (dim == 1) {
      gemv_impl<decltype(b)::value>(x.data_ptr<float>(), x.size(0), packed.data_ptr<uint8_t>(), packed.numel(),
          codebook.data_ptr<float>(), codebook.size(0), codebook.size(1), groups ? scales.data_ptr<float>() : nullptr,
          groups, rows, n, y.data_ptr<float>());
    } else {
      gemv_vector_impl<decltype(b)::value>(x.data_ptr<float>(), x.size(0), packed.data_ptr<uint8_t>(), packed.numel(),
          codebook.data_ptr<float>(), codebook.size(0), codebook.size(1), dim,
          groups ? scales.data_ptr<float>() : nullptr, groups, rows, n, y.data_ptr<float>());
    }
  });
  return y;
}

// x (T, n) @ W^T + bias -> (T, rows) in x's dtype (bias empty: none): W is dequantized `tile` rows at a time into a scratch buffer that is
// reused across tiles and calls (no fresh full-size weight, no page faults), each tile multiplied by at::mm.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, torch::Tensor scales,
                     torch::Tensor bias, int64_t rows, int64_t n, int64_t bits, int64_t tile, int64_t dim) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n && x.is_contiguous(), "x must be contiguous (T, n)");
  const int64_t groups = scales.numel() ? scales.size(1) : 0;
  auto y = torch::empty({x.size(0), rows}, x.options());
  thread_local torch::Tensor scratch;
  if (!scratch.defined() || scratch.numel() < tile * n || scratch.scalar_type() != x.scalar_type()) {
    scratch = torch::empty({tile * n}, x.options());
  }
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t count = std::min(tile, rows - r0);
    auto w = scratch.narrow(0, 0, count * n).view({count, n});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "otq_linear_tile", [&] {
      with_bits(bits * dim, [&](auto b) {  // rows r0 .. r0+count of W into the scratch
        if (dim == 1) {
          dequantize_impl<decltype(b)::value, scalar_t>(packed.data_ptr<uint8_t>(), packed.numel(),
              codebook.data_ptr<float>(), codebook.size(0), codebook.size(1),
              groups ? scales.data_ptr<float>() : nullptr, groups, count, n, w.data_ptr<scalar_t>(), r0);
        } else {
          dequantize_vector_impl<decltype(b)::value, scalar_t>(packed.data_ptr<uint8_t>(), packed.numel(),
              codebook.data_ptr<float>(), codebook.size(0), codebook.size(1), dim,
              groups ? scales.data_ptr<float>() : nullptr, groups, count, n, w.data_ptr<scalar_t>(), r0);
        }
      });
    });
    // as F.linear: addmm with the bias (same rounding), mm without
    y.narrow(1, r0, count).copy_(bias.numel() ? at::addmm(bias.narrow(0, r0, count), x, w.t()) : at::mm(x, w.t()));
  }
  return y;
}

// The exact K-cell DP over micro-bin edges of lloyd_max._dp_codebook, one row per task, float32 arithmetic in
// the same order as the PyTorch version (so the same bits): cost[i][j] = max(0, (wxx[j]-wxx[i]) - (wx[j]-wx[i])^2
// / max(w[j]-w[i], tiny)) for i < j (inf otherwise), D_1 = cost[0], D_k[j] = min_i D_{k-1}[i] + cost[i][j] with
// the first minimal i, backtracked to K+1 edge indices.
torch::Tensor dp_cuts(torch::Tensor cum_w, torch::Tensor cum_wx, torch::Tensor cum_wxx, int64_t levels) {
  TORCH_CHECK(cum_w.scalar_type() == torch::kFloat && cum_w.is_contiguous() && cum_w.dim() == 2,
              "cumulative sums must be contiguous float32 (R, M+1)");
  TORCH_CHECK(cum_wx.sizes() == cum_w.sizes() && cum_wxx.sizes() == cum_w.sizes() && cum_wx.is_contiguous() &&
              cum_wxx.is_contiguous() && cum_wx.scalar_type() == torch::kFloat &&
              cum_wxx.scalar_type() == torch::kFloat, "cumulative sums must share shape and dtype");
  TORCH_CHECK(levels >= 1, "levels must be >= 1");
  const int64_t rows = cum_w.size(0), m1 = cum_w.size(1);
  auto out = torch::empty({rows, levels + 1}, cum_w.options().dtype(torch::kLong));
  const float* W = cum_w.data_ptr<float>();
  const float* WX = cum_wx.data_ptr<float>();
  const float* WXX = cum_wxx.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  const float tiny = std::numeric_limits<float>::min();
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> cost(m1 * m1), best(m1), next(m1);
    std::vector<int32_t> arg(std::max<int64_t>(levels - 1, 1) * m1);
    for (int64_t r = r0; r < r1; ++r) {
      const float* w = W + r * m1;
      const float* wx = WX + r * m1;
      const float* wxx = WXX + r * m1;
      for (int64_t i = 0; i < m1; ++i) {
        float* c = cost.data() + i * m1;
        for (int64_t j = 0; j < m1; ++j) {
          float sw = w[j] - w[i];
          sw = sw < tiny ? tiny : sw;
          const float d = wx[j] - wx[i];
          float e = (wxx[j] - wxx[i]) - (d * d) / sw;
          e = e < 0.0f ? 0.0f : e;
          c[j] = i >= j ? inf : e;
        }
      }
      std::copy(cost.begin(), cost.begin() + m1, best.begin());
      for (int64_t k = 1; k < levels; ++k) {
        int32_t* a = arg.data() + (k - 1) * m1;
        float* nx = next.data();
        for (int64_t j = 0; j < m1; ++j) {
          nx[j] = best[0] + cost[j];
          a[j] = 0;
        }
        for (int32_t i = 1; i < static_cast<int32_t>(m1); ++i) {
          const float b = best[i];
          const float* c = cost.data() + i * m1;
          for (int64_t j = 0; j < m1; ++j) {  // branch-free (vectorised): float and int32 lanes of equal width
            const float v = b + c[j];
            const bool smaller = v < nx[j];  // strictly: the first minimal i is kept, as torch.min
            nx[j] = smaller ? v : nx[j];
            a[j] = smaller ? i : a[j];
          }
        }
        std::swap(best, next);
      }
      int64_t* o = O + r * (levels + 1);
      o[levels] = m1 - 1;
      for (int64_t k = levels - 1; k >= 1; --k) o[k] = arg[(k - 1) * m1 + o[k + 1]];
      o[0] = 0;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dp_cuts", &dp_cuts, "exact K-cell DP over micro-bin cumulative sums -> (R, K+1) edge indices");
  m.def("linear", &linear, "x (T, n) @ W^T -> (T, rows), W dequantized tile by tile into a reused scratch");
  m.def("dequantize", &dequantize, "packed codes -> weight (rows, n)");
  m.def("gemv", &gemv, "x (T, n) @ dequantized weight^T -> (T, rows), never building the weight");
}
"""

_DISABLE_ENV = "DIFFUSERS_OTQ_NO_CPU_KERNELS"
_NAME = "diffusers_otq_cpu"
_CFLAGS = ("-O3", "-ffp-contract=off")  # no FMA: the same bits as PyTorch
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def build_directory() -> Path:
    """Where the kernels are (or will be) built for this Python and torch: see
    :func:`~.kernel_build.build_directory`. Deleting it forces a rebuild on the next first use."""
    return kernel_build.build_directory(_NAME, _SOURCE, _CFLAGS)


def load() -> ModuleType | None:
    """The compiled kernels, built on first call; None (reason logged once) when they cannot be used.

    Set ``DIFFUSERS_OTQ_NO_CPU_KERNELS=1`` to use the reference path only, and
    ``DIFFUSERS_OTQ_KERNEL_BUILD_TIMEOUT`` to bound the first use (waiting for another process's build plus
    building, default 600 s).

    Raises:
        ValueError: ``DIFFUSERS_OTQ_KERNEL_BUILD_TIMEOUT`` is not a positive number of seconds.
    """
    if "module" in _state:  # every forward asks: no lock once decided
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
            logger.info("OTQ CPU kernels disabled by %s; using the PyTorch reference dequantization.", _DISABLE_ENV)
        else:
            timeout = build_timeout()
            try:
                module = load_extension(_NAME, _SOURCE, _CFLAGS, what="OTQ CPU kernels", timeout=timeout)
                logger.info("OTQ CPU kernels loaded (fused dequantization and lookup-table GEMV).")
            except KernelBuildError as err:  # the message says why, where and what to do
                logger.warning(
                    "OTQ CPU kernels unavailable: %s. Using the slower PyTorch reference dequantization.", err
                )
            except Exception as err:  # noqa: BLE001 - any other load failure means: use the reference path
                logger.warning(
                    "OTQ CPU kernels could not be loaded (%s: %s); using the slower PyTorch reference dequantization.",
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
        _state["module"] = module
        return module


def loaded() -> ModuleType | None:
    """The kernels if :func:`load` already built them, else None (never builds; safe while tracing)."""
    return _state.get("module")
