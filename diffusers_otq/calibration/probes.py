"""Recorded denoiser inputs ("probes") and the end-to-end velocity error of a model on them.

During calibration a few denoiser calls of the first batch are recorded as they happen (positional and
keyword arguments, tensors cloned). The bits allocator replays them to measure how much the model's output
moves when one layer alone is quantized. Probes save into the statistics file: tensors as safetensors
entries, everything else as JSON (calls with other argument types are not recorded).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


__all__ = ["ProbeInputs", "eval_mode", "model_output", "velocity_error"]

_SEP = "::"


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _recordable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or _is_json(value)


@dataclass
class ProbeInputs:
    """Recorded ``(args, kwargs)`` of denoiser calls."""

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Keep a detached copy of one call; returns False (and keeps nothing) for unsupported argument types."""
        if not all(_recordable(v) for v in (*args, *kwargs.values())):
            return False

        def copy(value: Any) -> Any:
            return value.detach().clone() if isinstance(value, torch.Tensor) else value

        self.calls.append((tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}))
        return True

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], str]:
        """``(tensors, layout_json)`` for a safetensors file; the layout holds every non-tensor value."""
        tensors: dict[str, torch.Tensor] = {}
        layout = []
        for i, (args, kwargs) in enumerate(self.calls):
            entry: dict[str, Any] = {"args": [], "kwargs": {}}
            for j, value in enumerate(args):
                entry["args"].append(self._store(tensors, f"__probe{i}{_SEP}arg{j}", value))
            for name, value in kwargs.items():
                entry["kwargs"][name] = self._store(tensors, f"__probe{i}{_SEP}kw{_SEP}{name}", value)
            layout.append(entry)
        return tensors, json.dumps(layout)

    @staticmethod
    def _store(tensors: dict[str, torch.Tensor], key: str, value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"tensor": key}
        return {"value": value}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layout: str) -> ProbeInputs:
        """Inverse of :meth:`to_tensors`."""

        def load(item: dict[str, Any]) -> Any:
            return tensors[item["tensor"]] if "tensor" in item else item["value"]

        calls = []
        for entry in json.loads(layout):
            args = tuple(load(item) for item in entry["args"])
            calls.append((args, {name: load(item) for name, item in entry["kwargs"].items()}))
        return cls(calls)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (no dropout: calibration inputs and probes are deterministic),
    restored to its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_output(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The denoiser's prediction for one recorded call (``.sample`` of an output object, or its first item); the
    recorded tensors are moved to the model's device first (a statistics file holds them on the CPU)."""
    device = next(model.parameters()).device

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    out = model(*(move(a) for a in args), **{k: move(v) for k, v in kwargs.items()})
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list):
        return out[0]
    return out


@torch.no_grad()
def velocity_error(
    model: nn.Module,
    probes: ProbeInputs,
    reference: list[torch.Tensor],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """``sum ||v - v_ref||^2 / sum ||v_ref||^2`` of ``model`` over the probe calls against ``reference`` outputs,
    after ``transform`` of both (e.g. the guided combination of a call's two halves; None: as they are)."""
    num = den = 0.0
    for (args, kwargs), ref in zip(probes.calls, reference, strict=True):
        out = model_output(model, args, kwargs).to(torch.float64)
        ref64 = ref.to(device=out.device, dtype=torch.float64)
        if transform is not None:
            out, ref64 = transform(out), transform(ref64)
        num += float((out - ref64).square().sum())
        den += float(ref64.square().sum())
    return num / den if den > 0 else 0.0
