"""The kernel self-test: healthy kernels pass silently and serve; a kernel whose output is corrupted (the loaded
module's function, or the Triton launcher, replaced by one that returns shifted output) or that raises logs ONE
warning per (kernel, device, dtype) and every op, the layer and its compiled graph give the reference result."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from diffusers_otq import OTQLinear, quantize_tensor
from diffusers_otq.functional import dequant_ops, kernel_check
from diffusers_otq.functional.cpu_kernels import load
from diffusers_otq.functional.dequant_ops import (
    dequantize_rows,
    fast_path_available,
    lut_gemv,
    reference_dequantize,
    tiled_linear,
)
from diffusers_otq.functional.kernel_check import TOLERANCE, check_layers, kernel_verified, mismatch


needs_cpu_kernels = pytest.mark.skipif(
    not fast_path_available(torch.device("cpu")), reason="the CPU kernels could not be built on this machine"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Every test decides anew, and no verdict of a corrupted kernel outlives its test."""
    verdicts: dict = {}
    monkeypatch.setattr(kernel_check, "_verdicts", verdicts)
    return verdicts


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == kernel_check.__name__ and r.levelno >= logging.WARNING]


def _shifted(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The kernel with its output shifted by one column: the kind of fault a wrong offset or a bad build causes."""

    def corrupted(*args: object) -> torch.Tensor:
        return function(*args).roll(1, dims=-1)

    return corrupted


def _weight(granularity: str = "group") -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(3)
    q = quantize_tensor(torch.randn(40, 96, generator=generator), bits=3, granularity=granularity,
                        group_size=32 if granularity == "group" else None)  # fmt: skip
    codebook, scales = q.kernel_inputs()
    return q.packed, codebook, scales, *q.rows, q.bits


def _run(op: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The op on a real quantized weight and what the reference path gives for it."""
    packed, codebook, scales, rows, n, bits = _weight()
    reference = reference_dequantize(packed, codebook, scales, rows, n, bits, dtype)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(4)).to(dtype)
    if op == "dequantize":
        return dequantize_rows(packed, codebook, scales, rows, n, bits, dtype), reference
    if op == "linear":
        bias = torch.randn(rows, generator=torch.Generator().manual_seed(5)).to(dtype)
        return tiled_linear(x, packed, codebook, scales, bias, rows, n, bits), F.linear(x, reference, bias)
    return lut_gemv(x, packed, codebook, scales, rows, n, bits), x @ reference.T


CPU_CASES = [("dequantize", d) for d in DTYPES] + [("linear", d) for d in DTYPES] + [("gemv", torch.float32)]


@needs_cpu_kernels
@pytest.mark.parametrize(("kernel", "dtype"), CPU_CASES, ids=str)
def test_a_corrupted_cpu_kernel_warns_once_and_the_op_gives_the_reference(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, fresh_verdicts: dict, kernel: str,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    monkeypatch.setattr(load(), kernel, _shifted(getattr(load(), kernel)))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            out, expected = _run(kernel, dtype)
            assert out.dtype == expected.dtype and torch.equal(out, expected)
    (message,) = _warnings(caplog)
    assert f"cpu_kernels.{kernel}" in message and " cpu " in message and str(dtype) in message
    error = float(message.split("max error ")[1].split(" ")[0])
    assert error > TOLERANCE[dtype]
    assert fresh_verdicts == {(f"cpu_kernels.{kernel}", "cpu", None, dtype): False}


@needs_cpu_kernels
def test_each_dtype_is_decided_and_reported_on_its_own(caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(load(), "dequantize", _shifted(load().dequantize))
    with caplog.at_level(logging.WARNING):
        for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
            out, expected = _run("dequantize", dtype)
            assert torch.equal(out, expected)
    messages = _warnings(caplog)
    assert len(messages) == 2 and "torch.float32" in messages[0] and "torch.bfloat16" in messages[1]


@needs_cpu_kernels
def test_the_layer_and_its_compiled_graph_give_the_reference_when_the_kernel_is_corrupted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = OTQLinear.from_module(torch.nn.Linear(96, 70), bits=3, granularity="group", group_size=32)
    x = torch.randn(2, 7, 96)
    monkeypatch.setattr(load(), "linear", _shifted(load().linear))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        expected = F.linear(x, layer.dequantize_weight(), layer.bias)
        assert torch.equal(layer(x), expected)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), expected)
    (message,) = _warnings(caplog)
    assert "cpu_kernels.linear" in message and "torch.float32" in message


@needs_cpu_kernels
def test_a_kernel_that_raises_is_reported_once_and_not_used(caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("illegal instruction in the test")

    monkeypatch.setattr(load(), "dequantize", broken)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            out, expected = _run("dequantize", torch.float16)
            assert torch.equal(out, expected)
    (message,) = _warnings(caplog)
    assert "cpu_kernels.dequantize failed its self-test" in message and "illegal instruction in the test" in message


@needs_cpu_kernels
@pytest.mark.parametrize(("kernel", "dtype"), CPU_CASES, ids=str)
def test_healthy_cpu_kernels_pass_silently_and_serve(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, fresh_verdicts: dict, kernel: str,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    calls = []
    original = getattr(load(), kernel)
    monkeypatch.setattr(load(), kernel, lambda *args: calls.append(1) or original(*args))
    with caplog.at_level(logging.DEBUG, logger=kernel_check.__name__):
        _run(kernel, dtype)  # the self-test, then the op
        checked = len(calls)
        out, expected = _run(kernel, dtype)
    assert not _warnings(caplog)
    assert fresh_verdicts == {(f"cpu_kernels.{kernel}", "cpu", None, dtype): True}
    assert checked == len(check_layers(torch.device("cpu"))) + 1 and len(calls) == checked + 1  # the kernel served
    torch.testing.assert_close(out, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_the_triton_kernel_passes_silently_and_a_corrupted_one_falls_back(
    interpreter: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, fresh_verdicts: dict
) -> None:
    torch.manual_seed(0)
    layer = OTQLinear.from_module(torch.nn.Linear(96, 70), bits=3, granularity="group", group_size=32)
    x = torch.randn(5, 96)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        expected = F.linear(x, layer.dequantize_weight(), layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert not _warnings(caplog) and fresh_verdicts[("triton_kernels.linear", "cpu", None, torch.float32)]

        fresh_verdicts.clear()
        monkeypatch.setattr(dequant_ops, "triton_linear", _shifted(dequant_ops.triton_linear))
        for _ in range(2):  # the CPU kernels or the reference path: F.linear on the reference weight either way
            assert torch.equal(layer(x), expected)
    (message,) = _warnings(caplog)
    assert "triton_kernels.linear" in message and " cpu " in message and "torch.float32" in message


def test_while_tracing_an_undecided_kernel_is_not_used(monkeypatch: pytest.MonkeyPatch, fresh_verdicts: dict) -> None:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def compare(layer: kernel_check.CheckLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("no self-test while tracing")

    assert kernel_verified("any", torch.device("cpu"), torch.float32, compare) is False
    assert fresh_verdicts == {}


def test_check_layers_cover_bit_widths_codebooks_and_scales() -> None:
    layers = check_layers(torch.device("cpu"))
    assert [(layer.bits, layer.vector_dim) for layer in layers] == [(1, 1), (3, 1), (4, 1), (8, 1), (2, 2), (1, 4)]
    assert {layer.codebook.shape[0] == 1 for layer in layers} == {True, False}
    assert {layer.scales.numel() > 0 for layer in layers} == {True, False}
    for layer in layers:
        assert layer.n % 8 and layer.n % 64 and layer.rows % 64  # ragged for the code blocks and GPU tiles
        code_bits = layer.bits * layer.vector_dim
        assert layer.packed.dtype == torch.uint8 and layer.codebook.shape[1] == 2**code_bits * layer.vector_dim
        assert layer.packed.numel() == (layer.rows * layer.n // layer.vector_dim * code_bits + 7) // 8


def test_mismatch_is_relative_to_the_output_scale() -> None:
    expected = torch.tensor([[4.0, -2.0], [0.5, 1.0]])
    assert mismatch(expected.clone(), expected) == 0.0
    assert mismatch(expected + torch.tensor([[0.0, 0.4], [0.0, 0.0]]), expected) == pytest.approx(0.1)
    assert mismatch(torch.tensor([0.25]), torch.tensor([0.0])) == 0.25  # small outputs: absolute
    assert mismatch(expected[:1], expected) == math.inf
    assert math.isnan(mismatch(torch.full((2, 2), math.nan), expected))
