"""Driving the full-precision model along its own sampling trajectories and collecting layer statistics.

:func:`collect_statistics` runs the calibration batches through a pipeline (``FlowMatchPipeline`` with class
labels, a text-to-image pipeline with prompts) or a ``forward_fn`` of yours, with the
:class:`~.statistics.StatisticsCollector` hooks attached to the layers an :class:`~diffusers_otq.OTQConfig`
selects.

Determinism and processes: batch ``b`` always gets the same noise (``seed * 1_000_003 + b``), labels or
prompts, and its statistics are accumulated on their own. Under ``accelerate launch`` (or any initialised
``torch.distributed`` group) process ``r`` of ``w`` runs batches ``r, r + w, ...``; after each round of ``w``
batches every process gathers the round's batch statistics and adds them to its totals in batch order. The
totals are therefore the same float64 sums, in the same order, for any number of processes (given the same
torch thread count per process).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import OTQConfig
from ..convert import plan_layers
from ..noise_bands import call_timesteps
from .config import CalibrationConfig, CalibrationError
from .probes import ProbeInputs, eval_mode
from .processes import add_flat, gather_in_order, rank_and_world
from .statistics import (
    CalibrationStatistics,
    LayerStatistics,
    StatisticsCollector,
    layer_input_width,
    plan_gram_blocks,
)


__all__ = [
    "CalibrationBatches",
    "calibration_batches",
    "collect_statistics",
    "denoiser_of",
    "record_teacher_calls",
    "sampler_guidance",
    "selected_layers",
]

logger = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003
_DEFAULT_SAMPLES = 64
_CLASS_GUIDANCE = 2.0  # class-conditional default: guidance > 1 runs the conditional and the null branch


def denoiser_of(target: Any) -> nn.Module:
    """The denoiser of a pipeline (``transformer`` or ``unet``) or the module itself.

    Raises:
        CalibrationError: a pipeline without a ``transformer``/``unet`` component.
    """
    if isinstance(target, nn.Module):
        return target
    for name in ("transformer", "unet"):
        module = getattr(target, name, None)
        if isinstance(module, nn.Module):
            return module
    raise CalibrationError(
        f"{type(target).__name__} has no 'transformer' or 'unet' component to calibrate; pass the pipeline of a "
        "diffusion model, or the model itself with CalibrationConfig(forward_fn=..., num_batches=...)."
    )


def selected_layers(model: nn.Module, config: OTQConfig) -> dict[str, nn.Module]:
    """name -> module of every layer ``config`` quantizes in ``model`` (each module once, under its first name)."""
    skip = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    layers: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for layer in plan_layers(model, partial(config.layer_spec, skip=skip), warn=False):
        if id(layer.module) not in seen:
            seen.add(id(layer.module))
            layers[layer.name] = layer.module
    return layers


# ---------------------------------------------------------------------------------------- the batches


def _is_class_pipeline(pipe: Any) -> bool:
    return hasattr(pipe, "num_classes") and not hasattr(pipe, "encode_prompt")


def _call_parameters(pipe: Any) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def _batch_runner(
    target: Any, calibration: CalibrationConfig
) -> tuple[int, Callable[..., None], int | None, str, dict[str, Any]]:
    """``(num_batches, run(batch_index, size=None), denoiser calls per batch or None, description, resolved)``;
    ``resolved`` holds the sample count, steps and guidance actually used (defaults filled in).

    ``run(b, size)`` with ``size`` samples only exists for pipelines (the probe batch); None for ``forward_fn``.
    """
    c = calibration
    if c.forward_fn is not None:
        return c.num_batches, c.forward_fn, None, f"{c.num_batches} forward_fn batches", {}
    if isinstance(target, nn.Module):
        raise CalibrationError(
            f"calibrating a bare {type(target).__name__} needs CalibrationConfig(forward_fn=f, num_batches=N), where "
            "f(batch_index) runs the model; or pass its pipeline with class_labels or prompts."
        )
    name = type(target).__name__
    if _is_class_pipeline(target):
        if c.prompts is not None:
            raise CalibrationError(
                f"{name} is class-conditional and takes no prompts; pass class_labels (or nothing: every class "
                "in turn) instead of prompts."
            )
        classes = target.num_classes
        if c.class_labels is not None and classes == 0:
            raise CalibrationError(f"{name} has an unconditional denoiser; drop class_labels.")
        bad = [v for v in (c.class_labels or []) if not 0 <= v < classes]
        if bad:
            raise CalibrationError(f"class_labels {bad} are out of range; this model has {classes} classes.")
        labels = c.class_labels or list(range(classes))
        total = c.num_samples or _DEFAULT_SAMPLES
        steps = c.num_inference_steps or 15
        guidance = _CLASS_GUIDANCE if c.guidance_scale is None else c.guidance_scale

        def run(batch: int, size: int | None = None) -> None:
            start = batch * c.batch_size
            end = min((batch + 1) * c.batch_size, total) if size is None else start + size
            target(
                batch_size=end - start,
                class_labels=[labels[i % len(labels)] for i in range(start, end)] if classes else None,
                guidance_scale=guidance if classes else 1.0,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(c.seed * _SEED_STRIDE + batch),
                output_type="pt",
                **c.pipeline_kwargs,
            )

        calls = steps * (2 if "Heun" in type(target.scheduler).__name__ else 1)
        resolved = {"num_samples": total, "num_inference_steps": steps, "guidance_scale": guidance if classes else 1.0}
        description = f"{total} samples of {len(labels) or 1} class(es)"
        return math.ceil(total / c.batch_size), run, calls, description, resolved
    parameters = _call_parameters(target)
    if "prompt" not in parameters:
        raise CalibrationError(
            f"{name} takes neither class labels nor prompts; calibrate it with CalibrationConfig(forward_fn=..., "
            "num_batches=...)."
        )
    if c.class_labels is not None:
        raise CalibrationError(f"{name} is a text-to-image pipeline; pass prompts=[...] instead of class_labels.")
    if c.prompts is None:
        raise CalibrationError(
            f"{name} is a text-to-image pipeline: calibration needs prompts, e.g. "
            "CalibrationConfig(prompts=['a photo of a cat', ...])."
        )
    prompts = c.prompts
    total = c.num_samples or len(prompts)
    steps = c.num_inference_steps or 28
    output_type = "latent" if "output_type" in parameters else None

    def run(batch: int, size: int | None = None) -> None:
        start = batch * c.batch_size
        end = min((batch + 1) * c.batch_size, total) if size is None else start + size
        kwargs: dict[str, Any] = {
            "prompt": [prompts[i % len(prompts)] for i in range(start, end)],
            "num_inference_steps": steps,
            "generator": torch.Generator().manual_seed(c.seed * _SEED_STRIDE + batch),
        }
        if c.guidance_scale is not None:
            kwargs["guidance_scale"] = c.guidance_scale
        if output_type is not None:
            kwargs["output_type"] = output_type
        target(**kwargs, **c.pipeline_kwargs)

    resolved = {"num_samples": total, "num_inference_steps": steps, "guidance_scale": c.guidance_scale}
    description = f"{total} samples from {len(prompts)} prompt(s)"
    return math.ceil(total / c.batch_size), run, steps, description, resolved


@contextmanager
def _quiet_progress(target: Any) -> Iterator[None]:
    """Silence a pipeline's own per-step progress bar for the duration (restored afterwards)."""
    if not hasattr(target, "set_progress_bar_config"):
        yield
        return
    saved = dict(getattr(target, "_progress_bar_config", {}))
    target.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        target._progress_bar_config = saved


def _passes(layers: Mapping[str, nn.Module], blocks: Mapping[str, list[int] | None], budget: int, world: int):
    """Split the layers into sampling passes whose accumulators (totals and one batch, plus a flat copy and
    ``world`` gathered copies with several processes) stay below ``budget`` bytes; a layer larger than the
    budget gets a pass of its own."""
    passes: list[list[str]] = [[]]
    used = 0
    for name, module in layers.items():
        groups, width = layer_input_width(module)
        copies = 2 if world == 1 else 3 + world
        size = 8 * groups * (3 * width + 2 + sum(b * b for b in (blocks[name] or ()))) * copies
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return passes


# ---------------------------------------------------------------------------------------- driver


def collect_statistics(
    target: Any, config: OTQConfig, calibration: CalibrationConfig, *, model: nn.Module | None = None
) -> CalibrationStatistics:
    """Sample with the full-precision model and return the input statistics of every layer ``config`` selects.

    Args:
        target: a pipeline (``FlowMatchPipeline`` with class labels; SD3, Flux or any text-to-image pipeline
            with prompts) or, with ``calibration.forward_fn``, the model itself.
        config: the quantization config whose selected layers are recorded.
        calibration: what to sample and record (:class:`~.config.CalibrationConfig`).
        model: the denoiser to hook (default: the pipeline's ``transformer``/``unet``, or ``target``).

    Returns:
        :class:`~.statistics.CalibrationStatistics` keyed by layer name, with ``probes`` recorded from the first
        batch and an ``info`` record (settings, number of batches, passes, processes, seconds).

    Raises:
        CalibrationError: an empty or mismatched calibration set (prompts for a class-label pipeline and the
            reverse), NaN/Inf activations (names the layer), a selected layer no batch reached (names it;
            ``unseen_layers="data-free"`` drops it from the statistics instead).
    """
    model = model if model is not None else denoiser_of(target)
    layers = selected_layers(model, config)
    if not layers:
        raise CalibrationError(
            f"the config selects no nn.Linear/nn.Conv2d layer of {type(model).__name__}; nothing to calibrate."
        )
    num_batches, run_batch, calls_per_batch, description, resolved = _batch_runner(target, calibration)
    rank, world = rank_and_world()
    blocks = plan_gram_blocks(layers, calibration.records_gram, calibration.gram_block)
    passes = _passes(layers, blocks, calibration.max_statistics_bytes, world)
    scale = calibration.timestep_scale or (1.0 if "Flux" in type(target).__name__ else 1000.0)
    probes = ProbeInputs()
    totals: dict[str, LayerStatistics] = {}
    started = time.perf_counter()
    logger.info(
        "Calibrating %d layers of %s on %s (%d batches, %d pass(es), %d process(es))",
        len(layers), type(model).__name__, description, num_batches, len(passes), world,
    )  # fmt: skip
    bar = tqdm(
        total=num_batches * len(passes),
        desc="OTQ calibrate",
        unit="batch",
        disable=not calibration.progress or rank != 0,
    )
    for pass_index, names in enumerate(passes):
        # forward_fn calibrations record probes from batch 0; pipelines get a small probe batch below
        record = pass_index == 0 and calibration.forward_fn is not None and calibration.sensitivity == "velocity"
        tracker = _CallTracker(calibration, scale, probes if record else None)
        totals.update(
            _run_pass(model, target, run_batch, {n: layers[n] for n in names}, blocks, tracker, num_batches, bar)
        )
    bar.close()
    if calibration.sensitivity != "velocity":
        probes = None
    elif calibration.forward_fn is None:
        probes = _probe_batch(model, target, run_batch, num_batches, calls_per_batch, calibration)
    elif world > 1:
        shared = [probes]
        torch.distributed.broadcast_object_list(shared, src=0)  # batch 0 ran on rank 0
        probes = shared[0]
    totals = _check_seen(totals, calibration)
    info = {
        **calibration.describe(),
        **resolved,
        "num_batches": num_batches,
        "passes": len(passes),
        "processes": world,
        "seconds": round(time.perf_counter() - started, 3),
        "model": type(model).__name__,
        "layers": len(totals),
    }
    logger.info("Calibration statistics of %d layers in %.1f s", len(totals), info["seconds"])
    return CalibrationStatistics({name: totals[name] for name in layers if name in totals}, info, probes)


class _CallTracker:
    """Forward pre-hook on the denoiser: per call, sets the collector's timestep weight and the context its
    error messages quote, and records the calls of batch 0 into ``probes`` (when given)."""

    def __init__(self, calibration: CalibrationConfig, scale: float, probes: ProbeInputs | None) -> None:
        self.calibration = calibration
        self.scale = scale
        self.probes = probes
        self.collector: StatisticsCollector | None = None
        self.batch = -1
        self.call = 0

    def start(self, collector: StatisticsCollector, batch: int) -> None:
        self.collector, self.batch, self.call = collector, batch, 0

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.call
        self.call += 1
        sigma = _sigma(args, kwargs, self.scale)
        self.collector.weight = _timestep_weight(self.calibration, sigma)
        where = "" if sigma is None else f", sigma={sigma:.3f}"
        self.collector.context = f"batch {self.batch}, denoiser call {call}{where}"
        probes = self.probes
        if probes is not None and self.batch == 0 and len(probes) < self.calibration.num_probe_inputs:
            probes.record(args, kwargs)


def _run_pass(
    model: nn.Module,
    target: Any,
    run_batch: Callable[..., None],
    layers: dict[str, nn.Module],
    blocks: Mapping[str, list[int] | None],
    tracker: _CallTracker,
    num_batches: int,
    bar: Any,
) -> dict[str, LayerStatistics]:
    """One sampling pass over every batch with hooks on ``layers``: their summed statistics, in batch order
    (rounds of ``world`` batches, gathered across processes; see the module docstring)."""
    rank, world = rank_and_world()
    calibration = tracker.calibration
    collector = StatisticsCollector(layers, {n: blocks[n] for n in layers}, calibration.max_gram_rows)
    collector.start_batch()
    totals = {name: LayerStatistics.zeros_like(stats) for name, stats in collector.batch().items()}
    handle = model.register_forward_pre_hook(tracker, with_kwargs=True)
    try:
        with collector.attached(), _quiet_progress(target), eval_mode(model), torch.no_grad():
            for round_start in range(0, num_batches, world):
                batch = round_start + rank
                mine = None
                if batch < num_batches:
                    tracker.start(collector, batch)
                    collector.start_batch()
                    run_batch(batch)
                    mine = collector.batch()
                if world == 1:  # the same element-wise float64 additions, without a flat copy
                    for name, stats in totals.items():
                        stats.add_(mine[name])
                else:
                    for flat in gather_in_order(mine, totals, world):
                        add_flat(totals, flat)
                bar.update(min(world, num_batches - round_start))
    finally:
        handle.remove()
    return totals


def _probe_batch(
    model: nn.Module,
    target: Any,
    run_batch: Callable[..., None],
    index: int,
    calls_per_batch: int | None,
    calibration: CalibrationConfig,
) -> ProbeInputs:
    """Record ``num_probe_inputs`` denoiser calls, evenly spread over the steps, of one small extra batch of
    ``num_probe_samples`` (batch index ``index``: its own noise). Every process runs it, so all hold the same."""
    every = max(1, (calls_per_batch or 1) // calibration.num_probe_inputs)
    return _record_calls(
        model, target, run_batch, index, calibration.num_probe_samples,
        keep=lambda seen, kept: seen % every == 0 and kept < calibration.num_probe_inputs,
    )  # fmt: skip


def _record_calls(
    model: nn.Module,
    target: Any,
    run_batch: Callable[..., None],
    index: int,
    size: int,
    keep: Callable[[int, int], bool],
) -> ProbeInputs:
    """Run batch ``index`` of ``size`` samples and record the denoiser calls ``keep(calls seen, calls kept)``
    selects (eval mode, no grad, progress bars quiet)."""
    calls = ProbeInputs()
    seen = {"n": 0}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if keep(seen["n"], len(calls)):
            calls.record(args, kwargs)
        seen["n"] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _quiet_progress(target), eval_mode(model), torch.no_grad():
            run_batch(index, size=size)
    finally:
        handle.remove()
    return calls


@dataclass(frozen=True)
class CalibrationBatches:
    """How to run the calibration batches of a target: ``run(b)`` runs batch ``b`` of ``num_batches`` through the
    float model (a pipeline's sampling, or your ``forward_fn``); ``weight_of(args, kwargs)`` is a denoiser call's
    timestep weight and a description of it; ``resolved`` the sample count, steps and guidance actually used."""

    num_batches: int
    run: Callable[[int], Any]
    description: str
    resolved: dict[str, Any]
    weight_of: Callable[[tuple, dict], tuple[float, str]]
    target: Any

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """The target pipeline's own progress bars silenced inside the block."""
        with _quiet_progress(self.target):
            yield


def calibration_batches(target: Any, calibration: CalibrationConfig) -> CalibrationBatches:
    """The :class:`CalibrationBatches` of ``target`` (a pipeline, or a model with ``calibration.forward_fn``).

    Raises:
        CalibrationError: as :func:`collect_statistics` (a bare model without ``forward_fn``, labels for a
            text-to-image pipeline and the reverse, ...).
    """
    num_batches, run_batch, _, description, resolved = _batch_runner(target, calibration)
    scale = calibration.timestep_scale or (1.0 if "Flux" in type(target).__name__ else 1000.0)

    def weight_of(args: tuple, kwargs: dict) -> tuple[float, str]:
        sigma = _sigma(args, kwargs, scale)
        return _timestep_weight(calibration, sigma), ("" if sigma is None else f", sigma={sigma:.3f}")

    return CalibrationBatches(num_batches, run_batch, description, resolved, weight_of, target)


_TEACHER_BATCH = 1 << 20  # batch index of the teacher's trajectories: noise no statistics batch uses


def record_teacher_calls(
    target: Any, calibration: CalibrationConfig, *, model: nn.Module | None = None
) -> ProbeInputs:
    """Every denoiser call of one sampling run of ``calibration.refine_samples`` samples (class labels or prompts,
    as calibration samples them; its own noise), recorded for refinement. ``target`` must be a pipeline.

    Raises:
        CalibrationError: ``target`` is a bare model or a ``forward_fn`` calibration (no trajectories to record).
    """
    if calibration.forward_fn is not None or isinstance(target, nn.Module):
        raise CalibrationError(
            "refinement needs a teacher: the full-precision pipeline's own trajectories. Pass the pipeline "
            "(quantize_pipeline(pipe, config, CalibrationConfig(refine_steps=...))), not a bare model or forward_fn."
        )
    model = model if model is not None else denoiser_of(target)
    _, run_batch, _, _, _ = _batch_runner(target, calibration)
    calls = _record_calls(
        model, target, run_batch, _TEACHER_BATCH, calibration.refine_samples, lambda seen, kept: True
    )
    if not calls:
        raise CalibrationError(f"sampling with {type(target).__name__} never called its denoiser; nothing to learn.")
    return calls


def sampler_guidance(target: Any, calibration: CalibrationConfig) -> float | None:
    """The classifier-free guidance scale ``s`` with which ``target``'s sampler combines the two halves of each
    denoiser call of :func:`record_teacher_calls`, or None where its calls are not guided in that layout.

    A class-conditional pipeline (:class:`~diffusers_otq.FlowMatchPipeline`) sampling with ``s != 1`` calls its
    denoiser on ``2B`` rows: the ``B`` conditional ones, then the same latents with the null class, and steps
    with ``v = v_null + s (v_cond - v_null)``. None for ``s = 1``, unconditional models, text-to-image
    pipelines (their batch layouts differ: refinement then trains each branch's velocity) and ``forward_fn``.
    """
    if calibration.forward_fn is not None or isinstance(target, nn.Module) or not _is_class_pipeline(target):
        return None
    if not target.num_classes:
        return None
    scale = _CLASS_GUIDANCE if calibration.guidance_scale is None else float(calibration.guidance_scale)
    return None if scale == 1.0 else scale


def _sigma(args: tuple, kwargs: dict, scale: float) -> float | None:
    timesteps = call_timesteps(args, kwargs)
    return None if timesteps is None else float(timesteps[0]) / scale


def _timestep_weight(calibration: CalibrationConfig, sigma: float | None) -> float:
    if calibration.timestep_weighting is None:
        return 1.0
    if sigma is None:
        raise CalibrationError(
            "timestep_weighting is set, but the denoiser call carries no 'timestep' argument to weight by."
        )
    weight = calibration.timestep_weighting(sigma)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
        raise CalibrationError(f"timestep_weighting({sigma:.4f}) returned {weight!r}; expected a finite number >= 0.")
    return float(weight)


def _check_seen(totals: dict[str, LayerStatistics], calibration: CalibrationConfig) -> dict[str, LayerStatistics]:
    unseen = [name for name, stats in totals.items() if not stats.seen]
    if not unseen:
        return totals
    if calibration.unseen_layers == "error":
        raise CalibrationError(
            f"{len(unseen)} selected layer(s) received no input during calibration: {', '.join(unseen)}. The "
            "sampling never runs them (or only with zero timestep weight). Exclude them with "
            "modules_to_not_convert, or pass CalibrationConfig(unseen_layers='data-free') to quantize them "
            "without statistics."
        )
    logger.warning("No calibration input reached %s; they are quantized data-free.", ", ".join(unseen))
    return {name: stats for name, stats in totals.items() if stats.seen}
