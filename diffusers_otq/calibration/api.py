"""The user-facing entry points: :func:`quantize_model`, :func:`quantize_pipeline` and :func:`calibrate`.

``quantize_model`` is the one function for a model already in memory: data-free by default (the same codes as
quantize-on-load), activation-aware with ``statistics=``, and with ``OTQConfig(bits_per_weight=...)`` it first
allocates bits per layer. ``quantize_pipeline`` adds the calibration run: it samples with the pipeline's
full-precision denoiser, then quantizes that denoiser in place.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from ..api import quantize_model as _convert_model
from ..config import OTQConfig
from ..convert import LayerReport
from ..noise_bands import band_edges, call_timesteps, install_noise_band_router
from .allocation import CandidateTable, plan_bits
from .config import CalibrationConfig
from .fit import calibrated_quantizer
from .refine import RefineReport, TeacherCalls, refine_model, require_teacher
from .sampling import calibration_batches, collect_statistics, denoiser_of
from .sequential import quantize_sequentially
from .statistics import CalibrationStatistics


__all__ = ["calibrate", "quantize_model", "quantize_pipeline"]

logger = logging.getLogger(__name__)


def _config(config: OTQConfig | None, kwargs: dict[str, Any]) -> OTQConfig:
    if config is None:
        return OTQConfig(**kwargs)
    if kwargs:
        raise TypeError(f"Pass either an OTQConfig or its fields as keywords, not both (got {sorted(kwargs)}).")
    if not isinstance(config, OTQConfig):
        raise TypeError(
            f"config must be an OTQConfig, got {type(config).__name__} ({config!r}); e.g. OTQConfig(bits=3)."
        )
    return config


def quantize_model(
    model: nn.Module,
    config: OTQConfig | None = None,
    *,
    statistics: CalibrationStatistics | None = None,
    calibration: CalibrationConfig | None = None,
    teacher: TeacherCalls | None = None,
    candidates: CandidateTable | None = None,
    progress: bool = True,
    compute_metrics: bool = True,
    **config_kwargs: Any,
) -> list[LayerReport]:
    """Quantize ``model`` in place: every ``nn.Linear``/``nn.Conv2d`` that ``config`` selects becomes an OTQ layer.

    Args:
        model: any ``nn.Module``; a diffusers ``ModelMixin`` also gets its ``quantization_config`` and quantizer,
            so ``save_pretrained`` writes a checkpoint that reloads with plain ``from_pretrained``. Its
            ``_keep_in_fp32_modules`` stay float.
        config: the :class:`~diffusers_otq.OTQConfig`; or leave it out and pass its fields as keywords
            (``quantize_model(model, bits=3, modules_to_not_convert=["proj_out"])``). With ``bits_per_weight``
            the bits are allocated per layer first (:func:`~diffusers_otq.calibration.plan_bits`) and the saved
            config carries the plan.
        statistics: calibration statistics of this model (:func:`calibrate`, or
            ``CalibrationStatistics.load``); with them every layer is fitted to its output error on those
            inputs (activation-weighted codebooks, then error feedback when they hold a Gram). None: data-free.
        calibration: fit settings (damping, error feedback, refit rounds, sensitivity, refinement); defaults
            when None.
        teacher: the full-precision model's recorded calls and outputs, needed by ``calibration.refine_steps``
            (:func:`quantize_pipeline` records it; or ``TeacherCalls.record(float_model, calls)``).
        candidates: the candidate settings of this model measured before
            (:func:`~diffusers_otq.calibration.measure_candidates` with the same statistics): a bits budget is then
            allocated from them without fitting every candidate again (several budgets, one measurement).
        progress: show progress bars.
        compute_metrics: measure relative MSE and W2 per layer for the reports and log.

    Returns:
        One :class:`~diffusers_otq.LayerReport` per quantized module, in ``named_modules()`` order.

    Raises:
        TypeError: ``config`` is not an OTQConfig, or both ``config`` and keywords were given.
        ValueError: invalid options; the model is already quantized; a bits budget below what the model can reach;
            ``candidates`` measured on another model, or with statistics where none are given (or the reverse).

    Example:
        >>> import torch, diffusers_otq
        >>> from diffusers_otq import OTQConfig
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        >>> reports = diffusers_otq.quantize_model(model, OTQConfig(bits_per_weight=4.5), progress=False)
        >>> round(sum(r.bits_per_weight * r.parameters for r in reports) / sum(r.parameters for r in reports), 2) <= 4.5
        True
    """
    config = _config(config, config_kwargs)
    if statistics is None and calibration is not None and calibration.forward_fn is not None:
        if calibration.sequential:
            if candidates is not None:
                raise ValueError(
                    "candidates= measure a whole model's statistics; the sequential path measures each block's own. "
                    "Drop candidates, or pass CalibrationConfig(sequential=False)."
                )
            return _quantize_sequentially(model, model, config, calibration, progress, compute_metrics)
        statistics = collect_statistics(model, config, calibration)
    calibration = calibration or CalibrationConfig(progress=progress)
    started = time.perf_counter()
    config = _with_band_edges(config, calibration, teacher)
    provenance = dict(config.provenance or {})
    if statistics is not None:
        provenance["calibration"] = {**statistics.info, **_fit_record(calibration, statistics)}
    if config.bits_per_weight is not None:
        if candidates is None:
            plan = plan_bits(model, config, statistics, calibration, progress=progress)
        else:
            _check_candidates(candidates, model, statistics)
            plan = candidates.allocate(config.bits_per_weight)
        config = plan.resolved_config(config, provenance)
    elif provenance:
        config = OTQConfig.from_dict({**config.to_dict(), "provenance": provenance})
    if calibration.refine_steps:
        require_teacher(teacher)  # before any fitting
    quantizer = calibrated_quantizer(statistics, calibration) if statistics is not None else None
    reports = _convert_model(model, config, progress=progress, compute_metrics=compute_metrics, quantizer=quantizer)
    if config.noise_band_edges is not None:  # from here on each call decodes its band's codebooks
        install_noise_band_router(model, config.noise_band_edges)
    if calibration.refine_steps:
        report = refine_model(model, teacher, calibration)
        _record_refinement(model, report, calibration)
    logger.info("Quantized %s in %.1f s", type(model).__name__, time.perf_counter() - started)
    return reports


def _refuse_band_edges(config: OTQConfig) -> None:
    """Raise ``ValueError`` if ``config`` has noise-band edges: they are calibration's output, never its input."""
    if config.noise_band_edges is not None:
        raise ValueError(
            f"OTQConfig(noise_band_edges={config.noise_band_edges}) is written by calibration, not an input: pass "
            "CalibrationConfig(noise_bands=B) instead (the edges then split the teacher's timesteps), or drop it."
        )


def _with_band_edges(config: OTQConfig, calibration: CalibrationConfig, teacher: TeacherCalls | None) -> OTQConfig:
    """``config`` with the edges of ``calibration.noise_bands`` bands of the teacher's call timesteps (equal counts of
    distinct timesteps per band, :func:`~diffusers_otq.noise_bands.band_edges`); ``config`` itself with one band.

    Raises:
        ValueError: ``config`` already has edges (they are calibration's output), or a teacher call has no timestep.
        CalibrationError: bands without a teacher.
    """
    _refuse_band_edges(config)
    if calibration.noise_bands == 1:
        return config
    teacher = require_teacher(teacher)
    timesteps = [call_timesteps(args, kwargs) for args, kwargs in teacher.inputs.calls]
    if any(t is None for t in timesteps):
        raise ValueError(
            f"noise_bands={calibration.noise_bands} splits the teacher's calls by timestep, but some calls carry no "
            "'timestep' argument; bands need a denoiser called with its timestep."
        )
    edges = band_edges([float(v) for t in timesteps for v in t.unique()], calibration.noise_bands)
    logger.info("%d noise bands: timestep edges %s", calibration.noise_bands, [round(e, 4) for e in edges])
    return OTQConfig.from_dict({**config.to_dict(), "noise_band_edges": edges})


def _check_candidates(candidates: CandidateTable, model: nn.Module, statistics: CalibrationStatistics | None) -> None:
    candidates.check_model(model)
    if (candidates.sensitivity == "weights") != (statistics is None):
        measured = "without statistics" if candidates.sensitivity == "weights" else "with calibration statistics"
        given = "none are given" if statistics is None else "statistics are given"
        raise ValueError(
            f"the candidates were measured {measured}, but {given} now; measure them with the statistics this "
            "call quantizes with (measure_candidates(model, config, statistics))."
        )


def _record_refinement(model: nn.Module, report: RefineReport, calibration: CalibrationConfig) -> None:
    """Add the refinement settings and outcome to the saved config's provenance (cards show it)."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if not isinstance(config, OTQConfig):
        return
    record = {**report.describe(), "lr": calibration.refine_lr, "batch_size": calibration.refine_batch_size,
              "samples": calibration.refine_samples, "float_params": calibration.refine_float_params,
              "noise_bands": calibration.noise_bands}  # fmt: skip
    config.provenance = {**(config.provenance or {}), "refinement": record}


def _fit_record(calibration: CalibrationConfig, statistics: CalibrationStatistics) -> dict[str, Any]:
    """The fit settings actually used (they may differ from the ones the statistics were collected with)."""
    feedback = calibration.error_feedback and any(stats.gram is not None for stats in statistics.values())
    return {
        "error_feedback": feedback,
        "damping": calibration.damping,
        "refit_rounds": calibration.refit_rounds if feedback else 0,
        "act_order": calibration.act_order if feedback else False,
        "bias_correction": calibration.bias_correction,
    }


def calibrate(target: Any, config: OTQConfig, calibration: CalibrationConfig | None = None) -> CalibrationStatistics:
    """Sample with the full-precision model and return the input statistics of the layers ``config`` selects.

    ``target`` is a pipeline (class labels for ``FlowMatchPipeline``, prompts for SD3/Flux-style pipelines) or,
    with ``CalibrationConfig(forward_fn=..., num_batches=...)``, the model. Save the result with ``.save(path)``
    to quantize again later without sampling (``quantize_model(model, config, statistics=...)``).
    """
    return collect_statistics(target, config, calibration or CalibrationConfig())


def quantize_pipeline(
    pipe: Any,
    config: OTQConfig,
    calibration: CalibrationConfig | None = None,
    *,
    statistics: CalibrationStatistics | None = None,
    progress: bool = True,
    compute_metrics: bool = True,
) -> list[LayerReport]:
    """Calibrate on the pipeline's own samples, then quantize its denoiser (``transformer`` or ``unet``) in place.

    Args:
        pipe: a ``FlowMatchPipeline``, an SD3/Flux-style pipeline, or any pipeline with a ``transformer``/``unet``.
        config: the :class:`~diffusers_otq.OTQConfig` (``bits`` or a ``bits_per_weight`` budget).
        calibration: what to sample (class labels, prompts, steps, samples) and how to fit; None with no
            ``statistics``: quantize data-free (as quantize-on-load does).
        statistics: reuse statistics collected before (skips sampling).
        progress: show progress bars.
        compute_metrics: measure weight-error metrics per layer.

    Returns:
        One :class:`~diffusers_otq.LayerReport` per quantized module of the denoiser.

    Example:
        >>> import diffusers_otq
        >>> from diffusers_otq import CalibrationConfig, FlowMatchPipeline, OTQConfig
        >>> pipe = FlowMatchPipeline.from_pretrained("otq/fashion-mnist-dit")  # doctest: +SKIP
        >>> diffusers_otq.quantize_pipeline(pipe, OTQConfig(bits_per_weight=2.5),
        ...                                 CalibrationConfig(num_samples=64))  # doctest: +SKIP
        >>> pipe.save_pretrained("fm-dit-otq-2.5b")  # doctest: +SKIP
    """
    denoiser = denoiser_of(pipe)
    if statistics is None and calibration is not None and calibration.sequential:
        return _quantize_sequentially(pipe, denoiser, config, calibration, progress, compute_metrics)
    if statistics is None and calibration is not None:
        statistics = collect_statistics(pipe, config, calibration, model=denoiser)
    teacher = None
    if calibration is not None and calibration.refine_steps:
        teacher = TeacherCalls.from_pipeline(
            pipe, calibration, model=denoiser, blocks=calibration.refine_scope == "blocks"
        )
    return quantize_model(
        denoiser,
        config,
        statistics=statistics,
        calibration=calibration,
        teacher=teacher,
        progress=progress,
        compute_metrics=compute_metrics,
    )


def _quantize_sequentially(
    target: Any,
    model: nn.Module,
    config: OTQConfig,
    calibration: CalibrationConfig,
    progress: bool,
    compute_metrics: bool,
) -> list[LayerReport]:
    """The one-call path: calibration batches of ``target`` (a pipeline, or the model with ``forward_fn``), then
    :func:`~.sequential.quantize_sequentially` on ``model``."""
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            f"{type(model).__name__} is already quantized ({getattr(model, 'quantization_method', 'unknown')}); "
            "quantize the original float model instead (or call model.dequantize() first)."
        )
    _refuse_band_edges(config)  # (bands themselves need sequential=False)
    batches = calibration_batches(target, calibration)
    provenance = dict(config.provenance or {})
    provenance["calibration"] = {**batches.resolved, "num_batches": batches.num_batches, "model": type(model).__name__}
    logger.info("Calibrating %s block by block on %s", type(model).__name__, batches.description)
    with batches.quiet():
        report = quantize_sequentially(
            model, config, calibration, batches.run, batches.num_batches, batches.weight_of,
            progress=progress and calibration.progress, compute_metrics=compute_metrics, provenance=provenance,
        )  # fmt: skip
    return report.reports
