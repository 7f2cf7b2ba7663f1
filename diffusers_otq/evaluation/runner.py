"""Running the evaluation: full-precision reference samples, then one :class:`~.config.Unit` at a time.

Everything a process computes is a pure function of the config, the bundled models and the seeds, with a
fixed number of torch threads per process, so the rows do not depend on how many processes share the work
(timings aside). Two phases:

1. :func:`reference_jobs`: the full-precision samples every later comparison needs, one batch per job, cached
   as safetensors under ``<output>/cache/<model>/`` (images, plus their Inception features for FID batches).
2. :meth:`Evaluator.run_unit`: quantize a copy of the denoiser (:func:`~.variants.quantize_variant`) and
   compute the unit's metric sets against the cached reference.

Calibrated variants need the model's calibration statistics (:meth:`Evaluator.calibration_statistics`):
collected once per model with :func:`diffusers_otq.calibrate` on the full-precision pipeline (every
Linear/Conv2d, so one file serves every calibrated variant), cached as
``<output>/cache/<model>/calibration.safetensors`` and reused by later processes and reruns. Under several
processes the collection is collective (every process runs a share of the batches), so
:func:`calibration_models` tells ``scripts/evaluate.py`` which models to calibrate together before the units.

Noise of batch ``b`` of seed ``s`` comes from ``torch.Generator().manual_seed(s * 1_000_003 + b)``; labels
cycle through the classes by global sample index, so the full-precision and quantized models see identical
inputs batch by batch.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..calibration import CalibrationConfig, CalibrationStatistics, TeacherCalls
from .config import EvalConfig, Unit
from .image_metrics import ssim
from .peers import PeerUnavailable
from .probes import bottleneck_features, feature_agreement, pca_statistics, velocity_outputs
from .variants import CALIBRATED, family_of, quantize_variant


__all__ = ["CALIBRATION_NAME", "Evaluator", "ReferenceJob", "calibration_models", "reference_jobs", "slug"]

logger = logging.getLogger(__name__)
_SEED_STRIDE = 1_000_003
_NEEDS_SAMPLES = ("samples", "fid")
CALIBRATION_NAME = "calibration.safetensors"


# CalibrationConfig.describe() fields that shape the statistics: a cached file with other values is recomputed
def slug(model: str) -> str:
    """File-system name of a model: ``otq/fashion-mnist-unet`` -> ``otq-fashion-mnist-unet``."""
    return model.replace("/", "-").replace("\\", "-").strip("-.")


@dataclass(frozen=True)
class ReferenceJob:
    """One batch of full-precision samples: ``model``, ``seed``, Euler ``steps``, ``batch`` index, ``inception``."""

    model: str
    seed: int
    steps: int
    batch: int
    inception: bool


def _sample_counts(config: EvalConfig, units: list[Unit], model: str) -> dict[tuple[int, int], tuple[int, bool]]:
    """``(seed, steps) -> (images needed, whether FID features are needed)`` for ``model``."""
    needs: dict[tuple[int, int], tuple[int, bool]] = {}
    sizes, steps = config.sizes, config.sampling.steps
    for unit in units:
        if unit.model != model:
            continue
        for metric, seed in unit.tasks:
            if metric in _NEEDS_SAMPLES:
                count, fid = needs.get((seed, steps), (0, False))
                wanted = sizes.fid_samples if metric == "fid" else sizes.samples
                needs[(seed, steps)] = (max(count, wanted), fid or metric == "fid")
            elif metric == "steps":
                for k in sizes.steps_sweep:
                    count, fid = needs.get((seed, k), (0, False))
                    needs[(seed, k)] = (max(count, sizes.steps_samples), fid)
    return needs


def calibration_models(units: Sequence[Unit], done: set[str]) -> list[str]:
    """The models (in unit order) with a calibrated unit that still has a task whose row key is not in ``done``."""
    return list(dict.fromkeys(unit.model for unit in units if unit.calibrated and unit.pending(done)))


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def reference_jobs(config: EvalConfig, units: list[Unit]) -> list[ReferenceJob]:
    """Every full-precision batch the units need, in a fixed order (shard them with ``jobs[rank::world]``)."""
    jobs = []
    batch_size, fid_images = config.sampling.batch_size, config.sizes.fid_samples
    for model in config.models:
        for (seed, steps), (count, fid) in sorted(_sample_counts(config, units, model).items()):
            for batch in range(math.ceil(count / batch_size)):
                jobs.append(ReferenceJob(model, seed, steps, batch, fid and batch * batch_size < fid_images))
    return jobs


class Evaluator:
    """Computes reference batches and unit rows for one process.

    Args:
        config: the evaluation config.
        output_dir: results directory; samples go to ``samples/``, the reference cache to ``cache/``.
        stats_cache: where test-set Inception statistics are cached (shared between runs).
    """

    def __init__(self, config: EvalConfig, output_dir: Path, stats_cache: Path) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.stats_cache = Path(stats_cache)
        self._pipes: dict = {}
        self._probe_reference: dict = {}
        self._statistics: dict[str, CalibrationStatistics] = {}
        self._teachers: dict[tuple[str, int], TeacherCalls] = {}
        self._inception = None

    # ------------------------------------------------------------------------------------------ shared state

    def pipeline(self, model: str):
        """The full-precision pipeline of ``model`` (float32, loaded once per process)."""
        if model not in self._pipes:
            from ..pipeline import FlowMatchPipeline

            pipe = FlowMatchPipeline.from_pretrained(model, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[model] = pipe
        return self._pipes[model]

    def _dataset(self, model: str) -> str:
        from ..reference import reference_info

        info = reference_info(model)
        if info is None:
            raise ValueError(
                f"{model!r} is not a bundled reference pipeline (no reference.json); the evaluation needs its "
                "dataset and classifier. Use one of diffusers_otq.reference_models()."
            )
        return info["dataset"]

    def inception(self):
        if self._inception is None:
            from .fid import InceptionFeatures

            self._inception = InceptionFeatures(batch_size=50)
        return self._inception

    def _null_label(self, model: str) -> int | None:
        classes = self.pipeline(model).num_classes
        return classes if classes else None

    def _probe_images(self, model: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's probe inputs in [0, 1]: the first test images, and a seed-0 random subset for latents."""
        from .datasets import load_dataset

        images, _ = load_dataset(self._dataset(model), "test")
        images = images / 2 + 0.5
        count = min(self.config.sizes.latent_images, len(images))
        subset = np.random.default_rng(0).choice(len(images), size=count, replace=False)
        return images[: self.config.sizes.probe_images], images[torch.from_numpy(np.sort(subset))]

    def probe_reference(self, model: str) -> dict:
        """Full-precision velocity outputs and bottleneck features on the probe images (once per process)."""
        if model not in self._probe_reference:
            velocity_images, latent_images = self._probe_images(model)
            denoiser, null = self.pipeline(model).transformer, self._null_label(model)
            self._probe_reference[model] = {
                "velocity_images": velocity_images,
                "latent_images": latent_images,
                "velocity": velocity_outputs(denoiser, velocity_images, null),
                "latent": bottleneck_features(denoiser, latent_images, null),
            }
        return self._probe_reference[model]

    # ------------------------------------------------------------------------------------------ calibration

    def calibration_path(self, model: str) -> Path:
        """The cache file of ``model``'s calibration statistics: ``<output>/cache/<slug>/calibration.safetensors``."""
        return self.output_dir / "cache" / slug(model) / CALIBRATION_NAME

    def calibration_statistics(self, model: str, *, collective: bool = False) -> CalibrationStatistics:
        """The calibration statistics of ``model``: from memory, else from the cache file, else collected.

        Collecting samples ``config.calibration.num_samples`` images with the full-precision pipeline (the
        sampler's steps and guidance, noise from ``config.calibration.seed``) and records the inputs of every
        Linear/Conv2d (:func:`diffusers_otq.calibrate` with ``OTQConfig(bits=4)``); the file is written atomically
        (a temporary file per process, then ``os.replace``) and reused by later processes and reruns, unless the
        settings it records differ from the config's (then it is collected again). The statistics of a file
        and of a fresh collection are identical, so rows do not depend on which one a process used.

        Args:
            model: the model name of the config.
            collective: every process of a multi-process run calls this together (as ``scripts/evaluate.py``
                does before the units); collecting is then shared out over the processes.

        Raises:
            RuntimeError: the statistics must be collected, several processes run, and ``collective`` is False
                (one process alone would wait forever for the others).
        """
        if model in self._statistics:
            return self._statistics[model]
        calibration = self.config.calibration_config()
        path = self.calibration_path(model)
        statistics = CalibrationStatistics.load(path) if path.is_file() else None
        if statistics is not None and not statistics.collected_with(calibration):
            logger.warning("%s was collected with other calibration settings; collecting it again", path)
            statistics = None
        if statistics is None:
            if _world_size() > 1 and not collective:
                raise RuntimeError(
                    f"the calibration statistics of {model} ({path}) are missing, and collecting them takes every "
                    "process of this run together; run the calibration phase first (scripts/evaluate.py does: "
                    "Evaluator.calibration_statistics(model, collective=True) on every process)."
                )
            statistics = self._calibrate(model, calibration, path)
        self._statistics[model] = statistics
        return statistics

    def teacher(self, model: str, method: str) -> TeacherCalls:
        """The full-precision denoiser's calls and outputs along the ``refine_samples`` trajectories of ``method``'s
        calibration (:meth:`~diffusers_otq.calibration.refine.TeacherCalls.from_pipeline`, noise of its own), once
        per process and trajectory count; deterministic, so every process and rerun refines against the same
        teacher."""
        calibration = CALIBRATED[method].calibration(self.config.calibration_config())
        key = (model, calibration.refine_samples)
        if key not in self._teachers:
            fp = self.pipeline(model)
            self._teachers[key] = TeacherCalls.from_pipeline(fp, calibration, model=fp.transformer)
        return self._teachers[key]

    def _calibrate(self, model: str, calibration: CalibrationConfig, path: Path) -> CalibrationStatistics:
        from ..calibration import calibrate
        from ..config import OTQConfig

        statistics = calibrate(self.pipeline(model), OTQConfig(bits=4), calibration)  # bits=4: every Linear/Conv2d
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # each process its own, then one atomic rename
        statistics.save(tmp)
        os.replace(tmp, path)
        seconds = statistics.info.get("seconds", math.nan)
        logger.info("calibration statistics of %s: %d layers in %.1f s -> %s", model, len(statistics), seconds, path)
        return statistics

    # ------------------------------------------------------------------------------------------ sampling

    def _labels(self, model: str, batch: int) -> torch.Tensor | None:
        classes = self.pipeline(model).num_classes
        size = self.config.sampling.batch_size
        return (torch.arange(batch * size, (batch + 1) * size) % classes) if classes else None

    def _generate(self, pipe, model: str, seed: int, steps: int, batch: int) -> torch.Tensor:
        labels = self._labels(model, batch)
        return pipe(
            batch_size=self.config.sampling.batch_size,
            class_labels=labels,
            guidance_scale=self.config.sampling.guidance_scale if labels is not None else 1.0,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + batch),
            output_type="pt",
        ).images.float()

    def _cache_path(self, job: ReferenceJob) -> Path:
        return (
            self.output_dir / "cache" / slug(job.model) / f"fp-s{job.seed}-k{job.steps}-b{job.batch:04d}.safetensors"
        )

    def run_reference_job(self, job: ReferenceJob) -> None:
        """Generate (and for FID batches embed) one full-precision batch, unless it is cached already."""
        path = self._cache_path(job)
        if path.is_file():
            return
        tensors = {"images": self._generate(self.pipeline(job.model), job.model, job.seed, job.steps, job.batch)}
        if job.inception:
            tensors["inception"] = torch.from_numpy(self.inception()(tensors["images"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    def _reference(self, model: str, seed: int, steps: int, count: int, key: str = "images") -> torch.Tensor:
        size = self.config.sampling.batch_size
        parts = []
        for batch in range(math.ceil(count / size)):
            path = self._cache_path(ReferenceJob(model, seed, steps, batch, False))
            if not path.is_file():
                raise FileNotFoundError(f"reference batch {path} is missing; the reference phase did not finish.")
            parts.append(load_file(str(path))[key])
        return torch.cat(parts)[:count]

    def _samples(self, pipe, model: str, seed: int, steps: int, count: int) -> torch.Tensor:
        size = self.config.sampling.batch_size
        batches = [self._generate(pipe, model, seed, steps, b) for b in range(math.ceil(count / size))]
        return torch.cat(batches)[:count]

    # ------------------------------------------------------------------------------------------ metrics

    def _classes(self, model: str, images: torch.Tensor, judge: str) -> torch.Tensor | None:
        """(N,) classes ``judge`` (one of :data:`~.classifier.JUDGES`) predicts for ``images``, or None without that
        classifier (or a class-conditional model)."""
        from .classifier import reference_classifier

        classifier = reference_classifier(model, judge)
        if classifier is None or not self.pipeline(model).num_classes:
            return None
        with torch.no_grad():
            return torch.cat([classifier(b * 2 - 1).argmax(1) for b in images.split(500)])

    def _class_metrics(self, model: str, images: torch.Tensor, reference: torch.Tensor | None) -> dict[str, float]:
        """Per judge: ``class_accuracy`` (the label the sample was generated for) and, against the float model's
        samples from the same noise (``reference``), ``class_agreement`` (the class predicted for both is the same);
        the ``"plain"`` judge's keys end in ``_plain``. NaN where a classifier is missing."""
        metrics = {}
        for judge in ("bundled", "plain"):
            suffix = "" if judge == "bundled" else f"_{judge}"
            predicted = self._classes(model, images, judge)
            if predicted is None:
                metrics[f"class_accuracy{suffix}"] = math.nan
                if reference is not None:
                    metrics[f"class_agreement{suffix}"] = math.nan
                continue
            labels = torch.arange(len(images)) % self.pipeline(model).num_classes
            metrics[f"class_accuracy{suffix}"] = (predicted == labels).double().mean().item()
            if reference is not None:
                agreed = predicted == self._classes(model, reference, judge)
                metrics[f"class_agreement{suffix}"] = agreed.double().mean().item()
        return metrics

    def _test_statistics(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        from .fid import dataset_statistics

        return dataset_statistics(
            self._dataset(model), self.stats_cache, self.inception(), self.config.sizes.fid_test_images
        )

    def _fid(self, model: str, features: np.ndarray, reference: np.ndarray | None) -> dict:
        from .fid import feature_statistics, frechet_distance

        mu, sigma = feature_statistics(features)
        mu_test, sigma_test = self._test_statistics(model)
        result = {"fid_vs_test": frechet_distance(mu, sigma, mu_test, sigma_test), "num_samples": len(features)}
        if reference is not None:
            result["fid_vs_fp"] = frechet_distance(mu, sigma, *feature_statistics(reference))
        return result

    def _save_grid(self, unit: Unit, images: torch.Tensor) -> str:
        from PIL import Image

        fields = unit.row_fields()
        name = f"{fields['method']}-{fields['granularity']}-{fields['bits']}-{fields['scope']}.png"
        path = self.output_dir / "samples" / slug(unit.model) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        row = images[: self.config.sizes.grid_images]
        strip = torch.cat(list(row), dim=-1)  # (C, H, W * n)
        array = (strip.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
        return str(path.relative_to(self.output_dir))

    # ------------------------------------------------------------------------------------------ units

    def run_unit(self, unit: Unit, skip: set[str]) -> list[dict]:
        """Rows of every task of ``unit`` whose key is not in ``skip``."""
        fields = unit.row_fields()
        pending = unit.pending(skip)
        if not pending:
            return []
        family = family_of(unit.method)
        base = {**fields, "family": family}
        fp = self.pipeline(unit.model)
        pipe = type(fp)(transformer=copy.deepcopy(fp.transformer), scheduler=copy.deepcopy(fp.scheduler))
        pipe.set_progress_bar_config(disable=True)
        rows: list[dict] = []
        weights_metrics: dict | None = None
        if unit.variant is not None:
            try:
                statistics = self.calibration_statistics(unit.model) if unit.calibrated else None
                refined = unit.method in CALIBRATED and CALIBRATED[unit.method].refine  # GGUF peers: statistics only
                teacher = self.teacher(unit.model, unit.method) if refined else None
                start = time.perf_counter()  # the weights row's time is the quantization's, not the calibration's
                weights_metrics = quantize_variant(
                    pipe.transformer,
                    unit.variant,
                    statistics=statistics,
                    calibration=self.config.calibration_config(),
                    teacher=teacher,
                )
            except PeerUnavailable as err:
                return _failed_rows(base, pending, "unavailable", str(err))
            except Exception as err:  # a broken variant must not stop the run; its rows record why
                logger.error("%s: quantization failed:\n%s", unit.row_fields(), traceback.format_exc())
                return _failed_rows(base, pending, "error", f"{type(err).__name__}: {err}")
            weights_elapsed = time.perf_counter() - start
        generated: dict[int, torch.Tensor] = {}
        for metric, seed in pending:
            start = time.perf_counter()
            row = {**base, "metric_set": metric, "seed": seed, "status": "ok"}
            try:
                if metric == "weights":
                    if weights_metrics is None:
                        continue  # the reference has no weight error
                    row["metrics"], elapsed = weights_metrics, weights_elapsed
                else:
                    row["metrics"] = self._metric(unit, pipe, metric, seed, generated)
                    elapsed = time.perf_counter() - start
            except Exception as err:  # one broken cell must not stop the run; the row records why
                logger.error("%s %s seed %d failed:\n%s", unit.row_fields(), metric, seed, traceback.format_exc())
                row.update(status="error", error=f"{type(err).__name__}: {err}", metrics={})
                elapsed = time.perf_counter() - start
            row["elapsed_s"] = elapsed
            rows.append(row)
        return rows

    def _metric(self, unit: Unit, pipe, metric: str, seed: int, generated: dict[int, torch.Tensor]) -> dict:
        model, sizes, steps = unit.model, self.config.sizes, self.config.sampling.steps
        if metric == "probe":
            return self._probe(unit, pipe.transformer)
        if metric in _NEEDS_SAMPLES:
            if seed not in generated:
                wanted = max(
                    sizes.samples if ("samples", seed) in unit.tasks else 0,
                    sizes.fid_samples if ("fid", seed) in unit.tasks else 0,
                )
                generated[seed] = (
                    self._reference(model, seed, steps, wanted)
                    if unit.variant is None
                    else self._samples(pipe, model, seed, steps, wanted)
                )
            images = generated[seed]
        if metric == "samples":
            images = images[: sizes.samples]
            reference = None if unit.variant is None else self._reference(model, seed, steps, len(images))
            result = {**self._class_metrics(model, images, reference), "num_samples": len(images), "steps": steps}
            if reference is not None:
                result["psnr"] = _batch_psnr(images, reference)
                result["ssim"] = ssim(images, reference).mean().item()
            if seed == 0:
                result["grid"] = self._save_grid(unit, images)
            return result
        if metric == "fid":
            images = images[: sizes.fid_samples]
            reference = None
            if unit.variant is not None:
                reference = self._reference(model, seed, steps, len(images), key="inception").numpy()
                features = self.inception()(images)
            else:
                features = self._reference(model, seed, steps, len(images), key="inception").numpy()
            return self._fid(model, features, reference)
        if metric == "steps":
            sweep = {"steps": list(sizes.steps_sweep), "psnr": [], "ssim": []}
            for k in sizes.steps_sweep:
                reference = self._reference(model, seed, k, sizes.steps_samples)
                images = self._samples(pipe, model, seed, k, sizes.steps_samples)
                sweep["psnr"].append(_batch_psnr(images, reference))
                sweep["ssim"].append(ssim(images, reference).mean().item())
            return sweep
        raise ValueError(f"unknown metric set {metric!r}")

    def _probe(self, unit: Unit, denoiser) -> dict:
        reference = self.probe_reference(unit.model)
        null = self._null_label(unit.model)
        latent = bottleneck_features(denoiser, reference["latent_images"], null)
        result = {**pca_statistics(latent), "num_images": len(latent)}
        if unit.variant is not None:
            velocity = velocity_outputs(denoiser, reference["velocity_images"], null)
            result["velocity_psnr"] = _batch_psnr(velocity, reference["velocity"])
            result["velocity_ssim"] = ssim(velocity, reference["velocity"], padding="zero").mean().item()
            result.update(feature_agreement(reference["latent"], latent))
        return result


def _failed_rows(base: dict, pending: list[tuple[str, int]], status: str, error: str) -> list[dict]:
    """One row per pending task of a unit whose variant could not be built."""
    return [
        {**base, "metric_set": m, "seed": s, "status": status, "error": error, "metrics": {}, "elapsed_s": 0.0}
        for m, s in pending
    ]


def _batch_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """``10 log10(1 / MSE)`` with one MSE over the whole batch (the paper's definition, peak 1.0)."""
    mse = (images.double() - reference.double()).square().mean().item()
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf
