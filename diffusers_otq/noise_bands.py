"""Codebooks per noise-level band: one set of codes, a few sets of codebooks, the denoiser's timestep picks the set.

A flow-matching denoiser sees very different activations at high and low noise, and at two bits one set of
codewords is a compromise between them. The codes are the expensive part of a quantized weight (``b`` bits per
weight); codebooks are small (``K`` values per row or per tensor). So a model may store ``B`` sets of codebooks
over the same codes, one per band of timesteps, refined each on the teacher's calls of its band
(``CalibrationConfig(noise_bands=B)``), and every denoiser call decodes with the set of its timestep's band.

The bands are cut at ``edges``, ``B - 1`` ascending timestep values in the units the denoiser is called with
(``timestep`` keyword, or its second positional argument, as diffusers' denoisers take it): band ``b`` holds the
calls with ``edges[b - 1] <= t < edges[b]``, so band 0 holds the smallest timesteps. The model's
``OTQConfig.noise_band_edges`` stores them (format version 7); :func:`install_noise_band_router` registers the
forward pre-hook that reads each call's timestep and sets :attr:`~diffusers_otq.OTQLinear.noise_band` on every OTQ
layer with bands (loading a checkpoint with edges installs it). All rows of one call must fall in one band (a
sampler calls its denoiser with one timestep per step). What reads a layer's weight outside a call
(``layer.weight``, ``dequantize()``, merging a LoRA) sees the band the layer last decoded (band 0 at first);
:func:`set_noise_band` picks one.

Example:
    >>> band_edges([1000.0, 750.0, 500.0, 250.0], bands=2)
    [625.0]
    >>> band_index(torch.tensor([800.0]), [625.0]), band_index(torch.tensor([100.0]), [625.0])
    (1, 0)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layers import OTQLayerMixin
from .options import MAX_NOISE_BANDS, check_noise_bands


__all__ = [
    "band_edges",
    "band_index",
    "call_timesteps",
    "check_band_edges",
    "install_noise_band_router",
    "remove_noise_band_router",
    "set_noise_band",
]

_ROUTER_ATTRIBUTE = "_otq_noise_band_router"


def call_timesteps(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The timesteps of one denoiser call as a 1-D float64 CPU tensor (one per row, or one for the whole call),
    from its ``timestep`` keyword or else its second positional argument; None when the call carries none."""
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    real = isinstance(timestep, torch.Tensor) and not timestep.dtype.is_complex and timestep.dtype != torch.bool
    if real and timestep.numel():
        return timestep.detach().reshape(-1).to("cpu", torch.float64)
    if isinstance(timestep, int | float) and not isinstance(timestep, bool):
        return torch.tensor([float(timestep)], dtype=torch.float64)
    return None


def check_band_edges(edges: object, what: str = "noise_band_edges") -> list[float]:
    """``edges`` as a list of floats if it is a strictly ascending list of 1 to ``MAX_NOISE_BANDS - 1`` finite
    numbers; else raise.

    Raises:
        ValueError: naming the value and what is expected.
    """
    numbers = isinstance(edges, list | tuple) and all(
        isinstance(e, int | float) and not isinstance(e, bool) and math.isfinite(e) for e in edges
    )
    values = [float(e) for e in edges] if numbers else []  # type: ignore[union-attr]
    if 0 < len(values) < MAX_NOISE_BANDS and all(a < b for a, b in zip(values, values[1:], strict=False)):
        return values
    raise ValueError(
        f"{what}={edges!r} must be a strictly ascending list of 1 to {MAX_NOISE_BANDS - 1} finite timesteps "
        "separating the noise bands (e.g. [500.0]); calibration writes it (CalibrationConfig(noise_bands=2)), so "
        "leave it unset otherwise."
    )


def band_edges(timesteps: Sequence[float], bands: int) -> list[float]:
    """The ``bands - 1`` edges that split the distinct values of ``timesteps`` into ``bands`` runs of (nearly)
    equal length, each edge halfway between the last value of one run and the first of the next.

    Args:
        timesteps: the timesteps the denoiser is called with (e.g. every call of the teacher's trajectories).
        bands: the number of bands, 2 to 16.

    Raises:
        ValueError: ``bands`` out of range, or fewer distinct timesteps than bands.
    """
    check_noise_bands(bands)
    values = sorted({float(t) for t in timesteps})
    if bands < 2 or len(values) < bands:
        raise ValueError(
            f"noise_bands={bands} needs at least 2 bands and as many distinct timesteps; the calls carry "
            f"{len(values)} ({values[:6]}{' ...' if len(values) > 6 else ''}). Use fewer bands or more sampling steps."
        )
    cuts = [round(i * len(values) / bands) for i in range(1, bands)]
    return [(values[c - 1] + values[c]) / 2 for c in cuts]


def band_index(timesteps: torch.Tensor, edges: Sequence[float]) -> int:
    """The band of a call whose rows have ``timesteps`` (1-D): the number of edges at or below them.

    Raises:
        ValueError: the rows fall in different bands.
    """
    low, high = float(timesteps.min()), float(timesteps.max())
    band = bisect.bisect_right(edges, low)
    if bisect.bisect_right(edges, high) != band:
        raise ValueError(
            f"one denoiser call has timesteps from {low:g} to {high:g}, across the noise-band edges {list(edges)}; "
            "a model with codebooks per noise band decodes one band per call. Call it with one timestep per batch "
            "(as samplers do), or split the batch by band."
        )
    return band


def _banded_layers(model: nn.Module) -> list[OTQLayerMixin]:
    return [m for m in model.modules() if isinstance(m, OTQLayerMixin) and m.noise_bands > 1]


def set_noise_band(model: nn.Module, band: int) -> None:
    """Make every OTQ layer of ``model`` with noise bands decode band ``band``'s codebooks (e.g. to call the model
    without a timestep, or to inspect one band's weights with ``dequantize``).

    Raises:
        IndexError: a layer has no band ``band``.
    """
    for layer in _banded_layers(model):
        layer.set_noise_band(band)


class _Router:
    """The forward pre-hook: route each call to the band of its timestep."""

    def __init__(self, edges: list[float]) -> None:
        self.edges = edges

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        layers = _banded_layers(module)
        if not layers:  # dequantized since (model.dequantize()): nothing to route
            return
        timesteps = call_timesteps(args, kwargs)
        if timesteps is None:
            raise ValueError(
                f"{type(module).__name__} has codebooks per noise band (edges {self.edges}) and picks them from the "
                "call's timestep, but this call passes none (no 'timestep' keyword or second positional argument). "
                "Pass the timestep, or remove_noise_band_router(model) and set_noise_band(model, band) yourself."
            )
        band = band_index(timesteps, self.edges)
        for layer in layers:
            layer.set_noise_band(band)


def install_noise_band_router(model: nn.Module, edges: Sequence[float]) -> None:
    """Register (or replace) the forward pre-hook on ``model`` that sets the noise band of every OTQ layer with
    bands from each call's timestep (see the module docstring).

    Raises:
        ValueError: ``edges`` invalid, or an OTQ layer of ``model`` holds another number of bands than
            ``len(edges) + 1``.
    """
    edges = check_band_edges(list(edges))
    wrong = sorted({m.noise_bands for m in model.modules() if isinstance(m, OTQLayerMixin)} - {len(edges) + 1})
    if wrong:
        raise ValueError(
            f"noise_band_edges {edges} make {len(edges) + 1} bands, but OTQ layers of {type(model).__name__} hold "
            f"{wrong} sets of codebooks; the config and the weights disagree (re-save the model)."
        )
    remove_noise_band_router(model)
    handle = model.register_forward_pre_hook(_Router(edges), with_kwargs=True)
    object.__setattr__(model, _ROUTER_ATTRIBUTE, handle)


def remove_noise_band_router(model: nn.Module) -> bool:
    """Remove the router :func:`install_noise_band_router` registered on ``model``; whether there was one."""
    handle: Any = model.__dict__.pop(_ROUTER_ATTRIBUTE, None)
    if handle is None:
        return False
    handle.remove()
    return True
