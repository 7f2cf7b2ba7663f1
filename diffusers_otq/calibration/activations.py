"""Cached activations of a block-by-block calibration: in memory up to a budget, spilled to disk above it.

The sequential calibration (:mod:`.sequential`) keeps, for every recorded denoiser call, the tensors that still
have to reach a later block: the denoiser's own inputs and what the model computes between blocks (recorded
once), and the outputs of the blocks already processed (float and quantized). :class:`ActivationStore` holds
them by key. While the tensors in memory stay below ``max_bytes`` a new one stays in memory; above, it is
written to its own safetensors file in the spill folder and read back on :meth:`~ActivationStore.get`. Nothing
is pickled; a spilled tensor reads back bit-identical.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


__all__ = ["ActivationStore"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ActivationStore:
    """Tensors by string key: in memory up to ``max_bytes``, then one safetensors file per tensor on disk.

    Args:
        max_bytes: bytes of tensors kept in memory; a tensor that would exceed it goes to disk.
        folder: where spilled tensors go (created on first spill); None: a temporary folder, removed by
            :meth:`close`.
    """

    def __init__(self, max_bytes: int, folder: str | Path | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self._folder = None if folder is None else Path(folder)
        self._owns_folder = folder is None
        self._memory: dict[str, torch.Tensor] = {}
        self._spilled: dict[str, tuple[Path, tuple[int, ...]]] = {}  # key -> (file, strides)
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.spilled_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._spilled

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def keys(self) -> list[str]:
        """Every stored key (in memory first, then spilled)."""
        return [*self._memory, *self._spilled]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store a detached CPU copy of ``tensor``, with its strides, under ``key`` (replacing any stored under it)."""
        if key in self:
            self.pop(key)
        # the same strides (channels-last stays channels-last): kernels may round differently on another layout
        tensor = tensor.detach().to("cpu", copy=True)
        size = tensor.numel() * tensor.element_size()
        if self.memory_bytes + size <= self.max_bytes:
            self._memory[key] = tensor
            self.memory_bytes += size
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            return
        path = self._spill_folder() / f"{_UNSAFE.sub('_', key)}-{len(self._spilled)}.safetensors"
        save_file({"tensor": tensor.contiguous()}, str(path))
        self._spilled[key] = (path, tensor.stride())
        self.spilled_bytes += size

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` (a spilled one is read back from its file).

        Raises:
            KeyError: nothing is stored under ``key``.
        """
        if key in self._memory:
            return self._memory[key]
        if key in self._spilled:
            path, stride = self._spilled[key]
            return _fresh(load_file(str(path))["tensor"], stride)
        raise KeyError(f"no cached activation {key!r}")

    def pop(self, key: str) -> None:
        """Forget ``key`` (its memory or its file); a missing key is ignored."""
        tensor = self._memory.pop(key, None)
        if tensor is not None:
            self.memory_bytes -= tensor.numel() * tensor.element_size()
        spilled = self._spilled.pop(key, None)
        if spilled is not None:
            spilled[0].unlink(missing_ok=True)

    def save(self, path: str | Path, keys: list[str]) -> None:
        """Write the tensors under ``keys`` to one safetensors file (their strides in its metadata), atomically."""
        path = Path(path)
        tensors = {key: self.get(key) for key in keys}
        strides = {key: list(tensor.stride()) for key, tensor in tensors.items()}
        temporary = path.with_suffix(".tmp")
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(temporary), {"strides": json.dumps(strides)})
        os.replace(temporary, path)

    def load(self, path: str | Path) -> None:
        """Add every tensor of a file written by :meth:`save`, with its strides."""
        with safe_open(str(path), "pt") as file:
            strides = json.loads((file.metadata() or {}).get("strides", "{}"))
        for key, tensor in load_file(str(path)).items():
            self.put(key, _fresh(tensor, tuple(strides.get(key, tensor.stride()))))

    def close(self) -> None:
        """Drop every tensor; remove the spill folder when this store created it."""
        for key in self.keys():
            self.pop(key)
        if self._owns_folder and self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _spill_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="otq-activations-"))
        if not self._spilled:
            self._folder.mkdir(parents=True, exist_ok=True)
            logger.info("Cached activations exceed %.0f MiB; spilling to %s", self.max_bytes / 2**20, self._folder)
        return self._folder


def _fresh(tensor: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """A copy of a tensor read from a file in torch's own (aligned) memory, with ``stride``: matrix kernels may
    round differently on a buffer at another alignment or with other strides, and the replay must be exact."""
    return torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype).copy_(tensor)
