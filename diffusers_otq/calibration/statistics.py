"""Per-layer input statistics: the accumulators, the forward hooks that fill them, and their safetensors file.

:class:`LayerStatistics` holds, for one ``nn.Linear``/``nn.Conv2d`` with input rows of length ``n`` in ``G``
groups (G = 1 except for grouped convs), the float64 sums of :mod:`diffusers_otq.functional.moments`:

* ``sum_x``, ``sum_sq`` (G, n) and ``count`` (): ``E[x_j] = sum_x / count``, ``E[x_j^2] = sum_sq / count``;
* ``gram`` (tuple of (G, b_i, b_i) diagonal blocks, sum b_i = n), ``gram_sum`` (G, n) and ``gram_count`` ():
  ``E[x x^T]`` (and the mean of the same rows) on those blocks, or ``gram=None`` when only moments were
  recorded.

:class:`CalibrationStatistics` maps layer names to them and saves/loads one safetensors file (tensors plus a
JSON header; never pickles). :class:`StatisticsCollector` registers forward pre-hooks that add every input of
the selected layers to the current accumulators.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..functional.moments import ConvGeometry, InputMoments, NonFiniteInput, gram_block_sizes, input_moments
from ..functional.rotation import rotate_channel_gram, rotate_channel_vector
from .config import CalibrationConfig, CalibrationError
from .probes import ProbeInputs


__all__ = ["CalibrationStatistics", "LayerStatistics", "StatisticsCollector", "layer_input_width"]

logger = logging.getLogger(__name__)

_FORMAT = "diffusers-otq-calibration-statistics"
_VERSION = 1
_SEP = "::"


def layer_input_width(module: nn.Module) -> tuple[int, int]:
    """``(G, n)``: input groups and input-row length of a Linear (1, in) or Conv2d (groups, in/groups*kh*kw)."""
    if isinstance(module, nn.Conv2d):
        return module.groups, math.prod(module.weight.shape[1:])
    return 1, module.in_features


def _geometry(module: nn.Module) -> ConvGeometry | None:
    if not isinstance(module, nn.Conv2d):
        return None
    return ConvGeometry(
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation),
        groups=module.groups,
        padding_mode=module.padding_mode,
        reversed_padding=tuple(module._reversed_padding_repeated_twice),
    )


@dataclass
class LayerStatistics:
    """Accumulated input statistics of one layer (see the module docstring for the fields)."""

    sum_x: torch.Tensor
    sum_sq: torch.Tensor
    count: torch.Tensor
    gram: tuple[torch.Tensor, ...] | None
    gram_sum: torch.Tensor
    gram_count: torch.Tensor

    @classmethod
    def zeros(
        cls, groups: int, width: int, gram_blocks: list[int] | None, device: torch.device | str | None = None
    ) -> LayerStatistics:
        """Empty accumulators on ``device``; ``gram_blocks`` lists the diagonal block sizes (None: moments only)."""
        f64 = {"dtype": torch.float64, "device": device}
        gram = None if gram_blocks is None else tuple(torch.zeros(groups, b, b, **f64) for b in gram_blocks)
        zero = torch.zeros((), **f64)
        vector = torch.zeros(groups, width, **f64)
        return cls(vector, vector.clone(), zero.clone(), gram, vector.clone(), zero.clone())

    @classmethod
    def zeros_like(cls, other: LayerStatistics) -> LayerStatistics:
        """Zero accumulators with the layout and device of ``other``."""
        gram = None if other.gram is None else [b.shape[-1] for b in other.gram]
        return cls.zeros(other.groups, other.width, gram, other.sum_x.device)

    def to(self, device: torch.device | str) -> LayerStatistics:
        """The accumulators on ``device`` (``self`` when they are there already)."""
        if self.sum_x.device == torch.device(device):
            return self
        gram = None if self.gram is None else tuple(b.to(device) for b in self.gram)
        return LayerStatistics(
            self.sum_x.to(device), self.sum_sq.to(device), self.count.to(device), gram,
            self.gram_sum.to(device), self.gram_count.to(device),
        )  # fmt: skip

    @property
    def groups(self) -> int:
        return self.sum_sq.shape[0]

    @property
    def width(self) -> int:
        return self.sum_sq.shape[1]

    @property
    def seen(self) -> bool:
        """Whether any input reached the layer."""
        return bool(self.count > 0)

    @property
    def has_gram(self) -> bool:
        """Whether :meth:`gram_blocks` gives blocks (a Gram was recorded, from at least one row)."""
        return self.gram is not None and bool(self.gram_count > 0)

    def tensors(self) -> list[torch.Tensor]:
        """The accumulators in a fixed order (what distributed merging exchanges)."""
        return [self.sum_x, self.sum_sq, self.count, *(self.gram or ()), self.gram_sum, self.gram_count]

    def add_(self, other: LayerStatistics) -> None:
        """``self += other``, tensor by tensor (exactly the same layout)."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine += theirs

    def mean(self) -> torch.Tensor:
        """(G, n) float64 ``E[x_j]``."""
        return self.sum_x / self.count.clamp_min(torch.finfo(torch.float64).tiny)

    def second_moments(self, centered: bool = False) -> torch.Tensor:
        """(G, n) float64 ``E[x_j^2]`` (or the variance ``E[x_j^2] - E[x_j]^2`` when ``centered``)."""
        moments = self.sum_sq / self.count.clamp_min(torch.finfo(torch.float64).tiny)
        return (moments - self.mean().square()).clamp_min(0.0) if centered else moments

    def gram_blocks(self, group: int = 0, centered: bool = False) -> list[torch.Tensor] | None:
        """Diagonal blocks of ``E[x x^T]`` (or the covariance when ``centered``) of input group ``group``
        (float64), or None without a Gram."""
        if not self.has_gram:
            return None
        blocks = [block[group] / self.gram_count for block in self.gram]
        if not centered:
            return blocks
        mean = self.gram_sum[group] / self.gram_count
        out, start = [], 0
        for block in blocks:
            m = mean[start : start + block.shape[0]]
            out.append(block - torch.outer(m, m))
            start += block.shape[0]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def rotated(self, signs: torch.Tensor, block: int, taps: int, name: str = "layer") -> LayerStatistics:
        """The statistics of the rotated inputs ``x' = (R (x) I_taps) x`` (see :mod:`~diffusers_otq.structure`).

        Means and Gram blocks rotate exactly when every Gram block covers whole Hadamard blocks of channels
        (``block * taps`` inputs, aligned); the second moments become the diagonal of the rotated Gram, scaled
        to the rows ``sum_sq`` counts. Needs one input group and a Gram.

        Raises:
            CalibrationError: no Gram, several input groups, or Gram blocks that cut through a Hadamard block.
        """
        if self.gram is None or self.groups != 1:
            raise CalibrationError(
                f"layer {name!r}: a calibrated input rotation needs the Gram of one input group (gram='auto' or "
                "'full', groups=1); collect the statistics with a Gram, or disable the rotation for this layer."
            )
        span = block * taps
        starts = [0]
        for b in self.gram[:-1]:
            starts.append(starts[-1] + b.shape[-1])
        if any(start % span or b.shape[-1] % span for start, b in zip(starts, self.gram, strict=True)):
            raise CalibrationError(
                f"layer {name!r}: the Gram blocks {[b.shape[-1] for b in self.gram]} cut through the rotation's "
                f"Hadamard blocks of {block} channels x {taps} taps; use a smaller rotation_block or "
                "CalibrationConfig(max_gram_block=...) that is a multiple of it."
            )
        signs = signs.to(torch.float64).to(self.sum_x.device)
        gram = []
        for start, b in zip(starts, self.gram, strict=True):
            channel_signs = signs[start // taps : (start + b.shape[-1]) // taps]
            gram.append(rotate_channel_gram(b[0], channel_signs, block, taps)[None])
        diagonal = torch.cat([g[0].diagonal() for g in gram])[None]
        scale = self.count / self.gram_count.clamp_min(torch.finfo(torch.float64).tiny)
        return LayerStatistics(
            rotate_channel_vector(self.sum_x, signs, block, taps), diagonal * scale, self.count.clone(), tuple(gram),
            rotate_channel_vector(self.gram_sum, signs, block, taps), self.gram_count.clone(),
        )  # fmt: skip


class CalibrationStatistics(Mapping[str, LayerStatistics]):
    """Layer name -> :class:`LayerStatistics`, plus a JSON-safe ``info`` record of how they were collected.

    ``probes`` are the denoiser calls recorded for the bits allocator's velocity sensitivity (or None). Save
    with :meth:`save`, reload with :meth:`load` (safetensors; the reload is bit-identical).
    """

    def __init__(
        self,
        layers: Mapping[str, LayerStatistics],
        info: dict[str, Any] | None = None,
        probes: ProbeInputs | None = None,
    ) -> None:
        self._layers = dict(layers)
        self.info = dict(info or {})
        self.probes = probes

    def __getitem__(self, name: str) -> LayerStatistics:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        grams = sum(1 for s in self._layers.values() if s.gram is not None)
        return f"CalibrationStatistics({len(self)} layers, {grams} with a Gram, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._layers.values())

    SAMPLING_FIELDS: tuple[str, ...] = (
        "num_samples",
        "batch_size",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "gram",
    )
    """The :meth:`CalibrationConfig.describe` fields that decide what the statistics hold (the fit settings do not)."""

    def collected_with(self, calibration: CalibrationConfig) -> bool:
        """Whether these statistics were sampled with the settings of ``calibration`` (:data:`SAMPLING_FIELDS`),
        so a saved copy can stand in for a new collection. A setting left to the pipeline's default (None) matches
        nothing: the statistics record the value actually used, which the config does not know."""
        wanted = calibration.describe()
        return all(self.info.get(name) == wanted[name] for name in self.SAMPLING_FIELDS)

    def save(self, path: str | os.PathLike) -> None:
        """Write every accumulator to one safetensors file (JSON header with the layout and ``info``)."""
        from safetensors.torch import save_file

        tensors, layout = {}, []
        probe_layout = None
        if self.probes is not None and len(self.probes):
            tensors, probe_layout = self.probes.to_tensors()
        for name, stats in self._layers.items():
            if _SEP in name:
                raise CalibrationError(f"layer name {name!r} contains {_SEP!r}, which the statistics file reserves.")
            stats = stats.to("cpu")
            tensors[f"{name}{_SEP}sum_x"] = stats.sum_x.contiguous()
            tensors[f"{name}{_SEP}sum_sq"] = stats.sum_sq.contiguous()
            tensors[f"{name}{_SEP}count"] = stats.count.reshape(1)
            tensors[f"{name}{_SEP}gram_sum"] = stats.gram_sum.contiguous()
            tensors[f"{name}{_SEP}gram_count"] = stats.gram_count.reshape(1)
            for i, block in enumerate(stats.gram or ()):
                tensors[f"{name}{_SEP}gram{i}"] = block.contiguous()
            layout.append([name, None if stats.gram is None else len(stats.gram)])
        metadata = {
            "format": _FORMAT,
            "version": str(_VERSION),
            "layers": json.dumps(layout),  # [name, Gram blocks] in the statistics' order
            "info": json.dumps(self.info, sort_keys=True),
        }
        if probe_layout is not None:
            metadata["probes"] = probe_layout
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStatistics:
        """Read a file written by :meth:`save`.

        Raises:
            CalibrationError: not such a file, a newer version, or tensors missing/mis-shaped.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration statistics file {str(path)!r} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != _FORMAT:
                    raise CalibrationError(
                        f"{path} is not a diffusers-otq calibration statistics file (format "
                        f"{metadata.get('format')!r}); write one with CalibrationStatistics.save or --save-statistics."
                    )
                version = metadata.get("version", "")
                if not version.isdigit() or int(version) > _VERSION:
                    raise CalibrationError(
                        f"{path} has statistics format version {version!r}; this diffusers-otq reads up to "
                        f"{_VERSION}. Upgrade it: pip install -U diffusers-otq."
                    )
                layout = json.loads(metadata["layers"])
                info = json.loads(metadata.get("info", "{}"))
                keys = set(handle.keys())
                layers = {}
                for name, blocks in layout:

                    def get(part: str, name: str = name) -> torch.Tensor:
                        key = f"{name}{_SEP}{part}"
                        if key not in keys:
                            raise CalibrationError(f"{path}: tensor {key!r} is missing; the file is incomplete.")
                        return handle.get_tensor(key)

                    gram = None if blocks is None else tuple(get(f"gram{i}") for i in range(int(blocks)))
                    layers[name] = LayerStatistics(
                        get("sum_x"), get("sum_sq"), get("count")[0], gram, get("gram_sum"), get("gram_count")[0]
                    )
                probes = None
                if "probes" in metadata:
                    probe_tensors = {k: handle.get_tensor(k) for k in keys if k.startswith("__probe")}
                    probes = ProbeInputs.from_tensors(probe_tensors, metadata["probes"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CalibrationError(f"{path}: the header is not a valid statistics layout ({err}).") from None
        return cls(layers, info, probes)


class StatisticsCollector:
    """Forward pre-hooks that add each selected layer's inputs to per-batch float64 accumulators.

    Args:
        layers: name -> module (a module registered under several names is hooked once, under its first name).
        gram_blocks: name -> diagonal Gram block sizes, or None to record only second moments for that layer.
        max_gram_rows: input rows per call that enter the Gram.

    Usage::

        collector = StatisticsCollector(layers, gram_blocks, 2048)
        with collector.attached():
            collector.start_batch()
            run_the_model()
            batch_stats = collector.batch()     # name -> LayerStatistics of this batch
    """

    def __init__(
        self, layers: Mapping[str, nn.Module], gram_blocks: Mapping[str, list[int] | None], max_gram_rows: int
    ) -> None:
        self.layers = dict(layers)
        self.gram_blocks = dict(gram_blocks)
        self.max_gram_rows = max_gram_rows
        self.weight = 1.0  # set per denoiser call (timestep weighting)
        self.context = ""  # where we are, for error messages
        self._current: dict[str, LayerStatistics] = {}
        self._calls: dict[str, int] = {}
        self._last_moments: tuple[torch.Tensor, tuple, InputMoments] | None = None

    def start_batch(self) -> None:
        """Fresh zero accumulators for the next batch."""
        self._last_moments = None
        self._current = {}
        self._calls = {}
        for name, module in self.layers.items():
            groups, width = layer_input_width(module)
            device = module.weight.device  # accumulate where the activations are
            self._current[name] = LayerStatistics.zeros(groups, width, self.gram_blocks.get(name), device)
            self._calls[name] = 0

    def batch(self) -> dict[str, LayerStatistics]:
        """The accumulators of the batch since :meth:`start_batch`."""
        return self._current

    def _hook(self, name: str, module: nn.Module):
        geometry = _geometry(module)
        _, width = layer_input_width(module)
        blocks = self.gram_blocks.get(name)

        def hook(_module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if self.weight == 0:  # a call that adds nothing (e.g. a timestep weighted 0) is not even read
                self._calls[name] += 1
                return
            try:
                moments = self._moments(args[0], width, geometry, blocks, self._calls[name])
            except NonFiniteInput:
                raise CalibrationError(
                    f"layer {name!r} received NaN/Inf inputs during calibration ({self.context}); the full-precision "
                    "model overflows on these inputs. Calibrate in float32 (torch_dtype=torch.float32), or exclude "
                    "the layers before it."
                ) from None
            stats = self._current[name]
            moments.add_to(
                self.weight, stats.sum_x, stats.sum_sq, stats.count, stats.gram, stats.gram_sum, stats.gram_count
            )
            self._calls[name] += 1

        return hook

    def _moments(
        self, x: torch.Tensor, width: int, geometry: ConvGeometry | None, blocks: list[int] | None, call: int
    ) -> InputMoments:
        """:func:`input_moments` of ``x``, computed once for consecutive layers that read the same tensor with the
        same geometry, Gram layout and call count (an attention's query, key and value projections)."""
        key = (x._version, width, geometry, None if blocks is None else tuple(blocks), call)
        if self._last_moments is not None and self._last_moments[0] is x and self._last_moments[1] == key:
            return self._last_moments[2]
        moments = input_moments(x, width, geometry, blocks, self.max_gram_rows, call)
        self._last_moments = (x, key, moments)
        return moments

    @contextmanager
    def attached(self) -> Iterator[StatisticsCollector]:
        """Hooks registered inside the block, removed on exit (also after an error)."""
        handles = []
        seen: set[int] = set()
        try:
            for name, module in self.layers.items():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                handles.append(module.register_forward_pre_hook(self._hook(name, module)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._last_moments = None  # holds the last input and its scatter


def plan_gram_blocks(
    layers: Mapping[str, nn.Module], records_gram: bool, block_for: Any
) -> dict[str, list[int] | None]:
    """name -> diagonal block sizes of each layer's Gram (``block_for(width)`` = largest block), or None."""
    plan: dict[str, list[int] | None] = {}
    for name, module in layers.items():
        _, width = layer_input_width(module)
        plan[name] = gram_block_sizes(width, block_for(width)) if records_gram else None
    return plan
