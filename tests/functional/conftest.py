"""Fixtures shared by the functional tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from diffusers_otq.functional import triton_kernels


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Triton's interpreter for CPU tensors (the kernel is jitted on first use, after the variable is set)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DIFFUSERS_OTQ_NO_TRITON", raising=False)
    triton_kernels._kernel.cache_clear()
    triton_kernels._triton_importable.cache_clear()
    yield
    triton_kernels._kernel.cache_clear()
    triton_kernels._triton_importable.cache_clear()
