"""The fused CPU kernels equal the reference dequantization bit for bit, the tiled linear equals F.linear, the
lookup-table GEMV agrees to float tolerance, and machines without the kernels get the same bits from the
reference path."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers_otq import OTQLinear, quantize_tensor
from diffusers_otq.functional.dequant_ops import (
    dequantize_rows,
    fast_path_available,
    lut_gemv,
    reference_dequantize,
    tiled_linear,
)


pytestmark = pytest.mark.skipif(
    not fast_path_available(torch.device("cpu")), reason="the CPU kernels could not be built on this machine"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantized(bits: int, granularity: str, dtype: torch.dtype, shape: tuple[int, int] = (37, 96)):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(bits), dtype=torch.float32).to(dtype)
    return quantize_tensor(
        weight, bits=bits, granularity=granularity, group_size=32 if granularity == "group" else None
    )


def _args(q) -> tuple:
    scales = q.decoded_scales()
    return q.packed, q.codebook.float(), torch.empty(0) if scales is None else scales


@pytest.mark.parametrize(
    ("bits", "granularity", "dtype"), list(itertools.product(range(1, 9), ["channel", "group", "tensor"], DTYPES))
)
def test_fused_dequantization_equals_the_reference_bit_for_bit(
    bits: int, granularity: str, dtype: torch.dtype
) -> None:
    q = _quantized(bits, granularity, dtype)
    rows, n = q.rows
    packed, codebook, scales = _args(q)
    fast = dequantize_rows(packed, codebook, scales, rows, n, bits, dtype)
    reference = reference_dequantize(q.packed, q.codebook, q.decoded_scales(), rows, n, bits, dtype)
    assert fast.dtype == dtype and torch.equal(fast, reference)


@pytest.mark.parametrize(("bits", "granularity", "dtype", "tokens"),
                         list(itertools.product([2, 3, 4], ["channel", "group"], DTYPES, [1, 5, 300])))  # fmt: skip
def test_tiled_linear_equals_f_linear(bits: int, granularity: str, dtype: torch.dtype, tokens: int) -> None:
    q = _quantized(bits, granularity, dtype, shape=(300, 64))  # 300 rows: three tiles of 128, the last partial
    rows, n = q.rows
    packed, codebook, scales = _args(q)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(rows).to(dtype)
    weight = q.dequantize()
    out = tiled_linear(x, packed, codebook, scales, bias, rows, n, bits)
    expected = torch.nn.functional.linear(x, weight, bias)
    if dtype == torch.float32:
        assert torch.equal(out, expected)
    else:  # half-precision GEMMs may block the reduction differently for a tile than for the whole matrix
        torch.testing.assert_close(out, expected)
    assert torch.equal(tiled_linear(x, packed, codebook, scales, bias[:0], rows, n, bits), x @ weight.T)


@pytest.mark.parametrize(
    ("bits", "granularity", "tokens"), list(itertools.product([1, 3, 4, 8], ["channel", "group"], [1, 3]))
)
def test_lut_gemv_agrees_with_the_dequantized_matmul(bits: int, granularity: str, tokens: int) -> None:
    q = _quantized(bits, granularity, torch.float32, shape=(50, 96))
    rows, n = q.rows
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(lut_gemv(x, *_args(q), rows, n, bits), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "dim", "granularity"), [(2, 2, "group"), (4, 2, "channel"), (2, 4, "group"),
                                                        (1, 8, "channel")])  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_codebooks_through_every_fused_op(bits: int, dim: int, granularity: str, dtype: torch.dtype) -> None:
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(dim)).to(dtype)  # 300 rows: 3 tiles
    q = quantize_tensor(weight, bits=bits, granularity=granularity, group_size=32 if granularity == "group" else None,
                        vector_dim=dim)  # fmt: skip
    rows, n = q.rows
    codebook, scales = q.kernel_inputs()  # the flat (C, K * d) codebook
    reference = reference_dequantize(q.packed, codebook, scales, rows, n, bits, dtype, dim)
    assert torch.equal(dequantize_rows(q.packed, codebook, scales, rows, n, bits, dtype, dim), reference)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(rows).to(dtype)
    out = tiled_linear(x, q.packed, codebook, scales, bias, rows, n, bits, dim)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, reference, bias))
    x32, weight32 = x.float(), reference_dequantize(q.packed, codebook, scales, rows, n, bits, torch.float32, dim)
    torch.testing.assert_close(
        lut_gemv(x32, q.packed, codebook, scales, rows, n, bits, dim), x32 @ weight32.T, rtol=1e-5, atol=1e-5
    )  # the GEMV sums in float32, without rounding the weight


def test_the_layer_compiles_to_one_op_and_matches_eager() -> None:
    layer = OTQLinear.from_module(torch.nn.Linear(64, 48), bits=3, granularity="group", group_size=32)
    x = torch.randn(7, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


def test_without_the_kernels_the_reference_path_gives_the_same_bits(tmp_path) -> None:
    layer = OTQLinear.from_module(torch.nn.Linear(96, 40), bits=3, granularity="group", group_size=32)
    x = torch.randn(5, 96)
    torch.save({"state": layer.state_dict(), "x": x}, tmp_path / "case.pt")  # our own test data, not a user file
    with torch.no_grad():
        expected = layer(x)
    script = textwrap.dedent(
        f"""
        import logging, torch
        logging.basicConfig(level=logging.INFO)
        from diffusers_otq import OTQLinear
        torch.set_num_threads({torch.get_num_threads()})
        case = torch.load({str(tmp_path / "case.pt")!r})
        layer = OTQLinear.from_module(torch.nn.Linear(96, 40), bits=3, granularity="group", group_size=32)
        layer.load_state_dict(case["state"])
        with torch.no_grad():
            out = layer(case["x"]); layer(case["x"])
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "DIFFUSERS_OTQ_NO_CPU_KERNELS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("OTQ CPU kernels disabled") == 1  # said once
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
