"""``CalibrationConfig``: how to drive the full-precision model, what to record, and how to fit with it."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..options import check_noise_bands


__all__ = ["CalibrationConfig", "CalibrationError", "GRAM_MODES", "REFINE_SCOPES", "SENSITIVITIES", "UNSEEN_POLICIES"]

GRAM_MODES: tuple[str, ...] = ("auto", "full", "diagonal")
SENSITIVITIES: tuple[str, ...] = ("velocity", "output")
UNSEEN_POLICIES: tuple[str, ...] = ("error", "data-free")
REFINE_SCOPES: tuple[str, ...] = ("model", "blocks")
BLOCK_INPUTS: tuple[str, ...] = ("quantized", "float")


class CalibrationError(ValueError):
    """Calibration cannot proceed (bad inputs, NaN activations, a layer the sampling never reached, ...)."""


def _positive_int(value: Any, what: str, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{what}={value!r} must be a positive int, e.g. {what}={example}.")
    return value


def _non_negative_float(value: Any, what: str, example: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise CalibrationError(f"{what}={value!r} must be a finite number >= 0, e.g. {what}={example}.")
    return float(value)


@dataclass
class CalibrationConfig:
    """Calibration of OTQ codebooks on the activations the model sees along its own sampling trajectories.

    The full-precision pipeline samples from noise (with class labels, prompts, or a callable of yours);
    forward hooks record each to-be-quantized layer's input second moments ``E[x_j^2]`` and the Gram matrix
    ``E[x x^T]`` (no activation is stored). The fit then minimises each layer's *output* error on those inputs.

    Args:
        num_samples: images to sample (default: ``len(prompts)`` with prompts, else 64). With prompts, the
            prompts are cycled to this many.
        batch_size: images per pipeline call; the statistics are a fixed sum over batches in batch order, so
            they do not depend on how many processes share the work.
        class_labels: labels of a class-conditional pipeline (``FlowMatchPipeline``), cycled over the samples;
            default: every class in turn.
        prompts: text prompts for a text-to-image pipeline (SD3, Flux, ...).
        forward_fn: instead of a pipeline, ``forward_fn(batch_index)`` runs the model on batch ``batch_index``
            of ``num_batches`` (any inputs you like).
        num_batches: number of ``forward_fn`` batches.
        num_inference_steps: sampler steps per batch (default: 15 for ``FlowMatchPipeline``, 28 otherwise).
        guidance_scale: classifier-free guidance of the calibration samples (default: the pipeline's).
        pipeline_kwargs: extra keyword arguments for every pipeline call (e.g. ``height``, ``width``).
        seed: noise of batch ``b`` comes from ``torch.Generator().manual_seed(seed * 1_000_003 + b)``; use a seed
            your evaluation does not use.
        timestep_weighting: optional ``f(sigma) -> weight`` over noise levels ``sigma`` in [0, 1] (1 = noise); the
            statistics of a call at ``sigma`` count ``f(sigma)`` times. Default: every step counts once.
        timestep_scale: how to turn the denoiser's ``timestep`` argument into ``sigma`` (``sigma = timestep /
            timestep_scale``); default 1000, or 1 for Flux pipelines (which pass ``timestep / 1000``).
        gram: ``"full"`` (the whole ``n x n`` Gram), ``"diagonal"`` (second moments only: no error feedback) or
            ``"auto"`` (full up to ``max_gram_block`` inputs, block-diagonal above).
        max_gram_block: largest diagonal Gram block (inputs wider than this use equal blocks of at most it).
        max_gram_rows: input rows per layer call that enter the Gram (a fixed stride; second moments use all).
        max_statistics_bytes: the Gram accumulators of one sampling pass stay below this; more layers take
            more passes over the same samples (identical statistics, more time).
        error_feedback: GPTQ-style column sweep with codebook refits (needs the Gram); False: only the
            activation-weighted codebooks.
        damping: relative ridge of the Gram (``H + damping * mean(diag H) I``), and the floor of the importance
            weights.
        weight_ridge: relative weight-space penalty of the error-feedback objective: the fit minimises
            ``tr(D H D^T) + weight_ridge * mean(diag H) * ||D||^2`` over weight errors ``D``, which bounds ``D`` in
            the directions the calibration inputs never excite (e.g. a timestep embedding seen at few timesteps:
            without it such weights can drift by orders of magnitude and break other step counts).
        refit_rounds: at most this many sweep/refit alternations of the error feedback (the best result is kept).
        refit_codebooks: refit the codewords between sweeps (default). False keeps the stage-1 codebook and runs
            one sweep: with ``method="uniform"`` that is GPTQ (a min-max grid per row, error feedback, no refits),
            the calibrated peer of the evaluation.
        refit_tolerance: stop alternating once a round lowers the layer's output error by less than this
            fraction (rounds after the second).
        sweep_block: columns per lazy update of the sweep.
        act_order: sweep the columns by decreasing input energy ``H_jj`` (GPTQ's act-order) rather than in
            storage order.
        bias_correction: for layers with a bias, add the mean output error ``(W - Q) E[x]`` to the bias and fit
            against the input covariance (the bias is a float parameter either way: no extra storage).
        sensitivity: how the bits allocator predicts each layer's effect: ``"output"`` (default: the layer's
            relative output error on its calibration inputs, ``tr(dW H dW^T) / tr(W H W^T)``) or ``"velocity"``
            (additionally scaled per layer by the end-to-end velocity error with that layer alone quantized, on
            denoiser calls recorded during calibration). On both bundled models ``"output"`` gave the better
            samples at 2.1-3.0 bits/weight (results/evaluation), and it is twice as fast.
        num_probe_inputs: denoiser calls recorded for the ``"velocity"`` sensitivity (spread over the steps).
        num_probe_samples: samples of the extra pipeline batch those calls are recorded from (a small batch keeps
            the sensitivity measurement cheap; ``forward_fn`` calibrations record from their first batch). Probes
            are recorded only with ``sensitivity="velocity"``.
        unseen_layers: a selected layer no calibration input reached: ``"error"`` (default) or ``"data-free"``
            (quantize it without statistics, with a warning).
        refine_steps: Adam steps of refinement after quantization (0: none): with the codes frozen, codebooks,
            group-scale maxima, low-rank factors and biases are trained to match the full-precision model's
            velocity on its own trajectories (:mod:`diffusers_otq.calibration.refine`).
        refine_lr: Adam learning rate of refinement.
        refine_batch_size: rows of a recorded denoiser call per refinement step. Small batches, more steps: on
            the bundled DiT (2 b/w, guidance 2) 600 steps of 8 rows at ``refine_lr=2e-4`` gave 24.79 dB of
            sample PSNR where 300 steps of 16 rows at 1e-4 (the earlier defaults, the same compute) gave 23.90
            (results/two-bit.md).
        refine_samples: samples of the teacher batch whose denoiser calls (every step) refinement trains on. More
            trajectories pay only with more steps: on the bundled DiT at 2.0 bits/weight, 128 with 1200 steps gave
            27.88 dB of sample PSNR where 32 with 1200 steps or 128 with 600 gave 26.86-26.92 (results/two-bit.md
            section 3g); the reported loss then runs over 4 times the calls (raise ``refine_eval_every``).
        refine_eval_every: steps between measurements of the reported teacher loss (the best is kept).
        refine_float_params: refinement also trains the model's float parameters outside the quantized layers
            (embedding tables, norm affines, layers left in full precision; stored in full precision either way,
            so no stored bit changes). Off by default: on the bundled DiT it adds 0.2-0.4 dB of sample PSNR at
            every budget, on the bundled UNet it loses 1.2 dB at 3.05 bits/weight (its extra parameters are
            GroupNorm affines and a class embedding; the class embedding alone loses 3.9 dB: fitted to 32
            teacher trajectories, it overfits them; results/two-bit.md sections 3c and 3e).
        refine_scope: ``"model"`` (default: train all layers together on the velocity error; memory of a
            forward and backward of the whole model) or ``"blocks"`` (train one block at a time on its
            full-precision inputs and outputs, ``refine_steps`` steps each; memory of one block, for models whose
            backward does not fit; the teacher also keeps every block's inputs and outputs on the CPU).
        noise_bands: sets of codebooks per layer over the one set of codes, one per noise-level band
            (:mod:`diffusers_otq.noise_bands`); 1 (default): one set. With ``B > 1`` the teacher's calls are split
            into ``B`` bands of timesteps of (nearly) equal count, each layer gets ``B`` copies of its fitted
            codebooks, and refinement trains each band's copy on the calls of its band (biases, scales and
            low-rank factors stay shared); the edges go into ``OTQConfig.noise_band_edges`` and a bits budget
            counts every set. Each band gets ``refine_steps`` steps (refinement takes ``B`` times as long). Needs
            ``refine_steps > 0``, ``refine_scope="model"`` and ``sequential=False``. On the bundled DiT under a 2.1
            bits/weight budget 2 bands gave 26.51 dB of sample PSNR against 25.75 for one set (evaluation protocol,
            results/two-bit.md sections 3f and 4); below 2 bits/weight the second set costs more than it gives.
        sequential: calibrate block by block (default for :func:`~diffusers_otq.quantize_model` with a
            ``forward_fn`` and for :func:`~diffusers_otq.quantize_pipeline`): the float model runs its trajectories
            once, then each block in turn gets its statistics, bits plan, fits and refinement from its cached
            inputs, and its outputs feed the next block (:mod:`diffusers_otq.calibration.sequential`). Memory is one
            block's statistics plus the cached activations; ``refine_steps`` count per block. False: the statistics
            of every layer are collected in one sampling run, then every layer is fitted (needs memory for all
            statistics at once; precomputed ``statistics=`` use this path).
        block_inputs: what each block sees in the sequential path: ``"float"`` (default: the float model's own
            inputs, so every layer gets exactly the statistics of the whole-model collection) or ``"quantized"``
            (the outputs of the blocks before it, already quantized: each fit also absorbs the error arriving from
            earlier blocks, as GPTQ does). Measured on both bundled models at 3 bits (16 samples, sample PSNR):
            float 33.18 / 36.15 dB (DiT / UNet), quantized 32.41 / 35.07 dB.
        max_activation_bytes: cached activations of the sequential path kept in memory; above it they are spilled
            to disk as safetensors (in ``work_dir``, or a temporary folder).
        work_dir: a folder where the sequential path writes each finished block; rerunning the same call after an
            interruption resumes after the last finished block (the result is identical to an uninterrupted run).
        progress: show progress bars.
    """

    num_samples: int | None = None
    batch_size: int = 16
    class_labels: Sequence[int] | None = None
    prompts: Sequence[str] | None = None
    forward_fn: Callable[[int], Any] | None = None
    num_batches: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 1234
    timestep_weighting: Callable[[float], float] | None = None
    timestep_scale: float | None = None
    gram: str = "auto"
    max_gram_block: int = 2048
    max_gram_rows: int = 2048
    max_statistics_bytes: int = 4 << 30
    error_feedback: bool = True
    damping: float = 0.01
    weight_ridge: float = 0.001
    refit_rounds: int = 4
    refit_codebooks: bool = True
    refit_tolerance: float = 0.01
    sweep_block: int = 128
    act_order: bool = True
    bias_correction: bool = True
    sensitivity: str = "output"
    num_probe_inputs: int = 4
    num_probe_samples: int = 8
    unseen_layers: str = "error"
    refine_steps: int = 0
    refine_lr: float = 2e-4
    refine_batch_size: int = 8
    refine_samples: int = 32
    refine_eval_every: int = 100
    refine_float_params: bool = False
    refine_scope: str = "model"
    noise_bands: int = 1
    sequential: bool = True
    block_inputs: str = "float"
    max_activation_bytes: int = 4 << 30
    work_dir: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.prompts is not None:
            if isinstance(self.prompts, str) or not all(isinstance(p, str) for p in self.prompts):
                raise CalibrationError(
                    f"prompts={self.prompts!r} must be a list of strings, e.g. prompts=['a photo of a cat']."
                )
            self.prompts = list(self.prompts)
            if not self.prompts:
                raise CalibrationError("prompts=[] is an empty calibration set; give at least one prompt.")
        if self.class_labels is not None:
            labels = list(self.class_labels)
            if not labels or any(isinstance(v, bool) or not isinstance(v, int) for v in labels):
                raise CalibrationError(
                    f"class_labels={self.class_labels!r} must be a non-empty list of ints, e.g. [0, 1, 2]."
                )
            self.class_labels = labels
        if self.prompts is not None and self.class_labels is not None:
            raise CalibrationError(
                "give prompts (text-to-image pipelines) or class_labels (class-conditional), not both."
            )
        if self.forward_fn is not None:
            if not callable(self.forward_fn):
                raise CalibrationError(f"forward_fn={self.forward_fn!r} is not callable; pass f(batch_index).")
            if self.prompts is not None or self.class_labels is not None:
                raise CalibrationError("forward_fn runs the model itself; drop prompts/class_labels.")
            _positive_int(self.num_batches, "num_batches", 8)
        elif self.num_batches is not None:
            raise CalibrationError("num_batches only applies with forward_fn; use num_samples and batch_size.")
        if self.num_samples is not None:
            if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 0:
                raise CalibrationError(f"num_samples={self.num_samples!r} must be a positive int, e.g. 64.")
            if self.num_samples == 0:
                raise CalibrationError("num_samples=0 is an empty calibration set; use e.g. num_samples=64.")
        _positive_int(self.batch_size, "batch_size", 16)
        if self.num_inference_steps is not None:
            _positive_int(self.num_inference_steps, "num_inference_steps", 15)
        if self.guidance_scale is not None:
            _non_negative_float(self.guidance_scale, "guidance_scale", 2.0)
        if not isinstance(self.pipeline_kwargs, dict):
            raise CalibrationError(f"pipeline_kwargs={self.pipeline_kwargs!r} must be a dict of call arguments.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CalibrationError(f"seed={self.seed!r} must be a non-negative int.")
        if self.timestep_weighting is not None and not callable(self.timestep_weighting):
            raise CalibrationError("timestep_weighting must be a callable f(sigma) -> weight, or None.")
        if self.timestep_scale is not None and not _non_negative_float(self.timestep_scale, "timestep_scale", 1000):
            raise CalibrationError("timestep_scale must be > 0.")
        if self.gram not in GRAM_MODES:
            raise CalibrationError(f"gram={self.gram!r} is unknown; expected one of {list(GRAM_MODES)}.")
        _positive_int(self.max_gram_block, "max_gram_block", 2048)
        _positive_int(self.max_gram_rows, "max_gram_rows", 2048)
        _positive_int(self.max_statistics_bytes, "max_statistics_bytes", 4 << 30)
        if not isinstance(self.error_feedback, bool):
            raise CalibrationError(f"error_feedback={self.error_feedback!r} must be True or False.")
        if self.error_feedback and self.gram == "diagonal":
            raise CalibrationError(
                "error_feedback=True needs the Gram matrix, but gram='diagonal' records only second moments; "
                "use gram='auto' or error_feedback=False."
            )
        if _non_negative_float(self.damping, "damping", 0.01) <= 0:
            raise CalibrationError("damping must be > 0 (e.g. 0.01): the Gram of few inputs is singular.")
        if _non_negative_float(self.weight_ridge, "weight_ridge", 0.001) <= 0:
            raise CalibrationError(
                "weight_ridge must be > 0 (e.g. 0.001): without it the fit may move weights without bound in "
                "directions the calibration inputs never excite."
            )
        _positive_int(self.refit_rounds, "refit_rounds", 4)
        _non_negative_float(self.refit_tolerance, "refit_tolerance", 0.01)
        _positive_int(self.sweep_block, "sweep_block", 128)
        for flag in ("act_order", "bias_correction", "refit_codebooks", "refine_float_params"):
            if not isinstance(getattr(self, flag), bool):
                raise CalibrationError(f"{flag}={getattr(self, flag)!r} must be True or False.")
        if self.sensitivity not in SENSITIVITIES:
            raise CalibrationError(
                f"sensitivity={self.sensitivity!r} is unknown; expected one of {list(SENSITIVITIES)}."
            )
        _positive_int(self.num_probe_inputs, "num_probe_inputs", 4)
        _positive_int(self.num_probe_samples, "num_probe_samples", 8)
        if self.unseen_layers not in UNSEEN_POLICIES:
            raise CalibrationError(
                f"unseen_layers={self.unseen_layers!r} is unknown; expected one of {list(UNSEEN_POLICIES)}."
            )
        if self.refine_steps != 0:
            _positive_int(self.refine_steps, "refine_steps", 600)
        if _non_negative_float(self.refine_lr, "refine_lr", 2e-4) <= 0:
            raise CalibrationError(f"refine_lr={self.refine_lr!r} must be > 0, e.g. refine_lr=2e-4.")
        _positive_int(self.refine_batch_size, "refine_batch_size", 8)
        _positive_int(self.refine_samples, "refine_samples", 32)
        _positive_int(self.refine_eval_every, "refine_eval_every", 100)
        if not isinstance(self.sequential, bool):
            raise CalibrationError(f"sequential={self.sequential!r} must be True or False.")
        if self.block_inputs not in BLOCK_INPUTS:
            raise CalibrationError(
                f"block_inputs={self.block_inputs!r} is unknown; expected one of {list(BLOCK_INPUTS)}."
            )
        _positive_int(self.max_activation_bytes, "max_activation_bytes", 4 << 30)
        if self.work_dir is not None and not isinstance(self.work_dir, str | os.PathLike):
            raise CalibrationError(f"work_dir={self.work_dir!r} must be a folder path (str or Path), or None.")
        if self.refine_scope not in REFINE_SCOPES:
            raise CalibrationError(
                f"refine_scope={self.refine_scope!r} is unknown; expected one of {list(REFINE_SCOPES)}."
            )
        self._check_noise_bands()

    def _check_noise_bands(self) -> None:
        try:
            check_noise_bands(self.noise_bands)
        except ValueError as err:
            raise CalibrationError(str(err)) from None
        if self.noise_bands == 1:
            return
        needs = {"refine_steps > 0": self.refine_steps > 0, "refine_scope='model'": self.refine_scope == "model",
                 "sequential=False": not self.sequential}  # fmt: skip
        missing = [what for what, ok in needs.items() if not ok]
        if missing:
            raise CalibrationError(
                f"noise_bands={self.noise_bands} trains each band's codebooks on the teacher's calls of its band, "
                f"whole model at once; it needs {', '.join(missing)} (e.g. CalibrationConfig(noise_bands="
                f"{self.noise_bands}, refine_steps=600, sequential=False))."
            )

    @property
    def records_gram(self) -> bool:
        """Whether the Gram matrix is recorded (needed by error feedback; also sharpens the sensitivities)."""
        return self.gram != "diagonal"

    def gram_block(self, width: int) -> int:
        """The largest diagonal Gram block used for an input of ``width``."""
        return width if self.gram == "full" else min(width, self.max_gram_block)

    def describe(self) -> dict[str, Any]:
        """A JSON-safe record of the settings that shaped the statistics and the fit (for configs and cards)."""
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "source": (
                "prompts"
                if self.prompts is not None
                else "forward_fn"
                if self.forward_fn is not None
                else "class_labels"
            ),
            "num_prompts": None if self.prompts is None else len(self.prompts),
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "timestep_weighting": None if self.timestep_weighting is None else "custom",
            "gram": self.gram,
            "error_feedback": self.error_feedback,
            "damping": self.damping,
            "weight_ridge": self.weight_ridge,
            "refit_rounds": self.refit_rounds if self.error_feedback else 0,
            "refit_codebooks": self.refit_codebooks,
            "act_order": self.act_order,
            "bias_correction": self.bias_correction,
            "refine_steps": self.refine_steps,
            "refine_scope": self.refine_scope,
            "refine_float_params": self.refine_float_params,
            "noise_bands": self.noise_bands,
            "sequential": self.sequential,
            "block_inputs": self.block_inputs if self.sequential else None,
        }
