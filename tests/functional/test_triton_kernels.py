"""The Triton kernel, run in Triton's interpreter on CPU tensors: equal to F.linear on the reference weight for
every bit width, granularity and dtype, ragged shapes, and the layer dispatch. Skipped where Triton is absent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_otq import OTQLinear, quantize_tensor
from diffusers_otq.functional import dequant_ops, triton_kernels
from diffusers_otq.functional.dequant_ops import reference_dequantize
from diffusers_otq.functional.triton_kernels import triton_available, triton_linear


pytest.importorskip("triton")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the output scale


def _kernel_args(q, out_features: int, in_features: int) -> tuple:  # noqa: ANN001 - a QuantizedTensor
    codebook, scales = q.kernel_inputs()
    return q.packed, codebook, scales, out_features, in_features, q.bits


def _check(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == expected.shape
    scale = expected.float().abs().amax().clamp_min(1.0)
    error = (y.float() - expected.float()).abs().amax()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} at output scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_equals_linear_on_the_reference_weight(interpreter: None, bits: int, granularity: str,
                                               dtype: torch.dtype) -> None:  # fmt: skip
    generator = torch.Generator().manual_seed(bits)
    out_features, in_features = 70, 96  # neither a multiple of the 64-wide tiles
    weight = torch.randn(out_features, in_features, generator=generator)
    q = quantize_tensor(weight, bits, "ot", granularity, 32 if granularity == "group" else None)
    packed, codebook, scales, rows, n, bits = _kernel_args(q, out_features, in_features)
    reference = reference_dequantize(packed, codebook, scales, *q.rows, bits, torch.float32).reshape(rows, n)
    x = torch.randn(5, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator)
    y = triton_linear(x, packed, codebook, scales, bias, rows, n, bits)
    _check(y, F.linear(x.float(), reference, bias).to(dtype), dtype)


@pytest.mark.parametrize(
    ("bits", "dim", "granularity"), [(2, 2, "channel"), (2, 2, "group"), (2, 4, "group"), (1, 8, "channel")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vector_codebooks_equal_linear_on_the_reference_weight(interpreter: None, bits: int, dim: int,
                                                              granularity: str, dtype: torch.dtype) -> None:  # fmt: skip
    generator = torch.Generator().manual_seed(bits * dim)
    out_features, in_features = 70, 96  # neither a multiple of the 64-wide tiles
    weight = torch.randn(out_features, in_features, generator=generator)
    group = 32 if granularity == "group" else None
    q = quantize_tensor(weight, bits, "ot", granularity, group, vector_dim=dim)
    codebook, scales = q.kernel_inputs()
    assert codebook.shape[1] == q.codebook.shape[1] * dim
    reference = reference_dequantize(q.packed, codebook, scales, out_features, in_features, bits, torch.float32, dim)
    x = torch.randn(5, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator)
    y = triton_linear(x, q.packed, codebook, scales, bias, out_features, in_features, bits, dim)
    _check(y, F.linear(x.float(), reference, bias).to(dtype), dtype)


@pytest.mark.parametrize("tokens", [1, 17, 40, 130])
def test_ragged_token_counts_and_no_bias(interpreter: None, tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    weight = torch.randn(130, 100, generator=generator)
    q = quantize_tensor(weight, 3, "ot-vp", "channel")
    packed, codebook, scales, rows, n, bits = _kernel_args(q, 130, 100)
    x = torch.randn(tokens, 100, generator=generator)
    y = triton_linear(x, packed, codebook, scales, x.new_empty(0), rows, n, bits)
    _check(y, F.linear(x, q.dequantize(torch.float32)), torch.float32)


def test_the_layer_runs_the_kernel_and_matches_the_reference_path(
    interpreter: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = OTQLinear.from_module(torch.nn.Linear(96, 70), bits=3, granularity="group", group_size=32)
    x = torch.randn(3, 4, 96)
    calls = []
    original = triton_kernels.triton_linear
    monkeypatch.setattr(dequant_ops, "triton_linear", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        y = layer(x)
    assert calls, "the layer did not take the Triton path"
    expected = F.linear(x, layer.dequantize_weight(), layer.bias)
    _check(y, expected, torch.float32)


def test_not_available_on_cpu_without_the_interpreter_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DIFFUSERS_OTQ_NO_TRITON", "1")
    triton_kernels._triton_importable.cache_clear()
    try:
        assert not triton_available(torch.device("cpu"))
    finally:
        triton_kernels._triton_importable.cache_clear()
