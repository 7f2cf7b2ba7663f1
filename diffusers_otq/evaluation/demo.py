"""``diffusers-otq demo``: the bundled models quantized the way this project recommends, beside the data-free
default and the libraries a user would pick instead, on the same noise.

For each bundled model, every variant samples the same images (same noise, labels, solver) and is compared with
the float32 model's samples:

* ``float32``: the reference;
* ``data-free ot-vp <b>-bit``: what ``OTQConfig(bits=b)`` (quantize on load) gives, per-channel codebooks;
* ``OTQ <B> b/w``: the project's best setting: calibrated on the model's own samples, per-layer bits under the
  budget ``B`` bits/weight, then refined against the full-precision velocity (``ot-vp+ref`` of the evaluation);
* the peers' own formats (:mod:`.peers`: HQQ, optimum-quanto, bitsandbytes NF4, SDNQ, ...) on the same
  Linear/Conv2d weights, at the widths nearest to ours.

Bits/weight count every stored bit (codes, codebooks, scales, zero-points; weights a peer format cannot store are
counted at 16 bits). Metrics: sample PSNR and SSIM against the float32 samples, class agreement (the fraction of
samples whose class, as the bundled classifier sees it, is the class of the float32 sample from the same noise)
and class accuracy against the requested labels. The calibration statistics are cached on disk, so a rerun
samples the full-precision model only for the reference images. :class:`DemoSettings` holds the sizes; the
defaults are shortened to run in minutes on 2 CPU cores, :meth:`DemoSettings.full` is the complete version.
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..calibration import CalibrationConfig, CalibrationStatistics, TeacherCalls, calibrate, measure_candidates
from ..config import OTQConfig
from ..functional.cpu_kernels import load as load_cpu_kernels
from ..pipeline import FlowMatchPipeline
from ..reference import PREFIX, resolve_reference
from .classifier import reference_classifier
from .image_metrics import psnr, ssim
from .peers import available_peer_formats, peer_format
from .variants import Variant, otq_config, quantize_variant


__all__ = [
    "DEMO_MODELS",
    "DEMO_PEERS",
    "DemoRow",
    "DemoSettings",
    "demo_model",
    "demo_models",
    "demo_summary",
    "demo_table",
    "model_label",
    "peer_label",
]

logger = logging.getLogger(__name__)

DEMO_MODELS: tuple[str, ...] = ("otq/fashion-mnist-unet", "otq/fashion-mnist-dit")
DEMO_PEERS: tuple[str, ...] = (
    "hqq-2",
    "hqq-3",
    "hqq-4",
    "quanto-int2",
    "quanto-int4",
    "bnb-nf4",
    "sdnq-uint2-codebook",
    "sdnq-uint3-codebook",
    "sdnq-uint4-codebook",
)
"""The peers shown by default: each library's formats nearest to 2, 3 and 4 bits/weight (SDNQ in its codebook
mode, its closest relative to ours)."""
BEST_METHOD = "ot-vp+ref"  # calibrated codes under the budget, then refinement (evaluation.variants.CALIBRATED)


@dataclass(frozen=True)
class DemoSettings:
    """The demo's sizes: what is sampled, and how much calibration and refinement the best setting gets.

    Attributes:
        num_images: samples per variant (class labels cycle over the classes), all from noise seed ``seed``.
        steps: Euler steps of every sample.
        guidance_scale: classifier-free guidance.
        seed: noise seed of the compared samples.
        budgets: bits/weight budgets of the best setting.
        data_free_bits: code widths of the data-free default.
        calibration_samples: samples of the calibration run (statistics for the fits and the allocation).
        refine_steps: refinement steps per budget.
        refine_samples: trajectories the refinement trains on.
        peers: peer formats to compare (those whose library is installed run).
    """

    num_images: int = 16
    steps: int = 15
    guidance_scale: float = 2.0
    seed: int = 0
    budgets: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)
    data_free_bits: tuple[int, ...] = (2, 3, 4)
    calibration_samples: int = 16
    refine_steps: int = 40
    refine_samples: int = 8
    peers: tuple[str, ...] = DEMO_PEERS

    @classmethod
    def full(cls) -> DemoSettings:
        """The complete version: the evaluation protocol's calibration and refinement (64 calibration samples,
        600 refinement steps on 32 trajectories) and 64 compared samples."""
        return cls(num_images=64, calibration_samples=64, refine_steps=600, refine_samples=32)

    def shortened(self) -> list[str]:
        """What these settings cut from :meth:`full`, one phrase each (empty for the full version)."""
        full = self.full()
        names = {
            "num_images": "compared samples",
            "calibration_samples": "calibration samples",
            "refine_steps": "refinement steps",
            "refine_samples": "refinement trajectories",
        }
        return [
            f"{label} {getattr(self, name)} (full: {getattr(full, name)})"
            for name, label in names.items()
            if getattr(self, name) < getattr(full, name)
        ]

    def calibration(self) -> CalibrationConfig:
        """The calibration of the best setting (sampling sizes and refinement); it samples with the solver settings
        of the compared samples, given explicitly so that cached statistics can be matched to them."""
        return CalibrationConfig(
            num_samples=self.calibration_samples,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            refine_steps=self.refine_steps,
            refine_samples=self.refine_samples,
            progress=False,
        )


@dataclass
class DemoRow:
    """One variant of one model, measured on the shared samples.

    Attributes:
        model: the bundled model's name.
        variant: the row label, e.g. ``"OTQ 2.5 b/w"`` or ``"HQQ 3-bit g64"``.
        kind: ``"float"``, ``"data-free"``, ``"best"`` or ``"peer"``.
        width: the nominal width: the code bits, or the budget of a ``"best"`` row (32 for the float model).
        bits_per_weight: every stored bit over the quantized weights (32 for the float model).
        model_mb: the whole denoiser's stored size in MB (everything left in float counted at 16 bits).
        psnr: sample PSNR (dB) against the float32 samples (``inf`` for the float model).
        ssim: sample SSIM against the float32 samples.
        agreement: fraction of samples classified as the float32 sample from the same noise (NaN: no classifier).
        accuracy: fraction of samples classified as their requested label (NaN: no classifier or labels).
        seconds: quantization time of this variant (the shared calibration and candidate fits not included).
        images: the samples ``(N, C, H, W)`` in ``[0, 1]``.
    """

    model: str
    variant: str
    kind: str
    width: float
    bits_per_weight: float
    model_mb: float
    psnr: float
    ssim: float
    agreement: float
    accuracy: float
    seconds: float
    images: torch.Tensor = field(repr=False)


@dataclass
class _Sampler:
    """Samples any denoiser with the demo's noise, labels and solver, and scores the samples."""

    pipe: FlowMatchPipeline
    settings: DemoSettings
    classifier: nn.Module | None
    labels: list[int] | None
    reference: torch.Tensor | None = None
    reference_classes: torch.Tensor | None = None

    def sample(self, denoiser: nn.Module) -> torch.Tensor:
        variant = FlowMatchPipeline(transformer=denoiser, scheduler=self.pipe.scheduler)
        variant.set_progress_bar_config(disable=True)
        s = self.settings
        generator = torch.Generator().manual_seed(s.seed)
        return variant(
            batch_size=s.num_images,
            class_labels=self.labels,
            guidance_scale=s.guidance_scale,
            num_inference_steps=s.steps,
            output_type="pt",
            generator=generator,
        ).images

    def classes(self, images: torch.Tensor) -> torch.Tensor | None:
        if self.classifier is None:
            return None
        with torch.no_grad():
            return self.classifier(images * 2 - 1).argmax(dim=1)

    def row(self, model: str, variant: str, kind: str, width: float, denoiser: nn.Module, summary: dict) -> DemoRow:
        images = self.sample(denoiser)
        if self.reference is None:
            self.reference, self.reference_classes = images, self.classes(images)
        classes = self.classes(images)
        agreement = accuracy = math.nan
        if classes is not None:
            agreement = (classes == self.reference_classes).float().mean().item()
            if self.labels is not None:
                accuracy = (classes == torch.tensor(self.labels)).float().mean().item()
        row = DemoRow(
            model=model,
            variant=variant,
            kind=kind,
            width=width,
            bits_per_weight=summary["bits_per_weight"],
            model_mb=summary["model_bytes"] / 1e6,
            psnr=psnr(images, self.reference).mean().item() if kind != "float" else math.inf,
            ssim=ssim(images, self.reference).mean().item(),
            agreement=agreement,
            accuracy=accuracy,
            seconds=summary.get("quantize_s", 0.0),
            images=images,
        )
        logger.info("%s %s: %.3f bits/weight, %.2f dB", model, variant, row.bits_per_weight, row.psnr)
        return row


PEER_LIBRARIES: dict[str, str] = {"bitsandbytes": "bnb", "optimum-quanto": "quanto", "hqq": "HQQ", "sdnq": "SDNQ"}


def peer_label(name: str) -> str:
    """A peer format's row label: ``"HQQ 3-bit g64"``, ``"bnb NF4"``, ``"quanto int4"``, ``"SDNQ uint3 codebook"``."""
    fmt = peer_format(name)
    library = PEER_LIBRARIES.get(fmt.library, fmt.library)
    detail = name.split("-", 1)[1].replace("-", " ")
    if fmt.library == "hqq":
        detail = f"{detail}-bit g64"
    elif fmt.library == "bitsandbytes":
        detail = detail.upper()
    return f"{library} {detail}"


def _statistics(
    pipe: FlowMatchPipeline, model: str, calibration: CalibrationConfig, cache: Path | None
) -> CalibrationStatistics:
    """The model's calibration statistics: from ``cache`` when it holds a copy sampled with these settings."""
    path = None if cache is None else cache / f"{model_label(model)}-statistics.safetensors"
    if path is not None and path.is_file():
        statistics = CalibrationStatistics.load(path)
        if statistics.collected_with(calibration):
            logger.info("calibration statistics of %s from %s", model, path)
            return statistics
    statistics = calibrate(pipe, OTQConfig(bits=4), calibration)  # bits=4: every Linear/Conv2d
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        statistics.save(tmp)
        tmp.replace(path)
    return statistics


def demo_model(model: str, settings: DemoSettings, cache: Path | None = None) -> tuple[list[DemoRow], dict]:
    """Quantize one bundled model every way the demo shows and measure each variant on the same samples.

    Args:
        model: a bundled name (``"otq/fashion-mnist-unet"``) or a pipeline folder with a class-conditional
            denoiser.
        settings: sizes of the run.
        cache: folder for the calibration statistics (reused by later runs with the same settings); None: none.

    Returns:
        The rows (float, data-free, best, peers, in that order) and a record of the shared one-off work
        (``calibrate_s``, ``candidates_s``, ``teacher_s``, ``peers_missing``).
    """
    load_cpu_kernels()  # the first use on a machine builds them (about a minute): before anything is timed
    pipe = FlowMatchPipeline.from_pretrained(resolve_reference(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fp = pipe.transformer.eval()
    classes = pipe.num_classes
    labels = [i % classes for i in range(settings.num_images)] if classes else None
    sampler = _Sampler(pipe, settings, reference_classifier(model), labels)
    float_bytes = sum(t.numel() * t.element_size() for t in fp.state_dict().values())
    rows = [sampler.row(model, "float32", "float", 32, fp, {"bits_per_weight": 32.0, "model_bytes": float_bytes})]

    def quantized(variant: Variant, **kwargs: object) -> tuple[nn.Module, dict]:
        denoiser = copy.deepcopy(fp)
        return denoiser, quantize_variant(denoiser, variant, **kwargs)

    for bits in settings.data_free_bits:
        denoiser, summary = quantized(Variant("ot-vp", "channel", bits))
        rows.append(sampler.row(model, f"data-free ot-vp {bits}-bit", "data-free", bits, denoiser, summary))

    record: dict = {}
    if settings.budgets:
        calibration = settings.calibration()
        start = time.perf_counter()
        statistics = _statistics(pipe, model, calibration, cache)
        record["calibrate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        teacher = TeacherCalls.from_pipeline(pipe, calibration, model=fp)
        record["teacher_s"] = time.perf_counter() - start
        start = time.perf_counter()
        config = otq_config(Variant(BEST_METHOD, "mixed", settings.budgets[0]))
        candidates = measure_candidates(fp, config, statistics, replace(calibration, refine_steps=0), progress=False)
        record["candidates_s"] = time.perf_counter() - start
        for budget in settings.budgets:
            denoiser, summary = quantized(
                Variant(BEST_METHOD, "mixed", budget),
                statistics=statistics,
                calibration=calibration,
                teacher=teacher,
                candidates=candidates,
            )
            rows.append(sampler.row(model, f"OTQ {budget:g} b/w", "best", budget, denoiser, summary))

    available = set(available_peer_formats()) if settings.peers else set()
    record["peers_missing"] = sorted({peer_format(n).library for n in settings.peers if n not in available})
    for name in settings.peers:
        if name in available:
            bits = peer_format(name).bits
            denoiser, summary = quantized(Variant(name, "native", bits))
            rows.append(sampler.row(model, peer_label(name), "peer", bits, denoiser, summary))
    return rows, record


def demo_models(
    models: Sequence[str], settings: DemoSettings, cache: Path | None = None, jobs: int = 1
) -> list[tuple[list[DemoRow], dict]]:
    """:func:`demo_model` for each model, ``jobs`` models at a time in worker processes.

    The work of one model (small fits, short Python loops) keeps about one core busy, so on a machine with
    ``jobs`` cores, ``jobs`` single-threaded processes finish sooner than one process with ``jobs`` threads. The
    results do not depend on ``jobs``: every model is sampled and fitted the same way either way.

    Args:
        models: bundled names or pipeline folders.
        settings: sizes of the run.
        cache: folder for the calibration statistics.
        jobs: worker processes (1: in this process, with torch's threads).

    Returns:
        ``(rows, record)`` per model, in the order of ``models``.
    """
    jobs = max(1, min(jobs, len(models)))
    if jobs == 1:
        return [demo_model(model, settings, cache) for model in models]
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # a forked torch process can deadlock in its thread pools
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads, level)) as pool:
        return list(pool.map(partial(demo_model, settings=settings, cache=cache), models))


def _worker_init(threads: int, level: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(message)s")


def model_label(model: str) -> str:
    """A model's short name: ``"fashion-mnist-dit"`` for ``"otq/fashion-mnist-dit"``, the folder name for a path."""
    return model.removeprefix(PREFIX) if model.startswith(PREFIX) else Path(model).name


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


SUMMARY_SERIES: dict[str, str] = {"best": "**OTQ calibrated + budget + refined**", "data-free": "OTQ data-free"}


def demo_summary(rows: Sequence[DemoRow]) -> str:
    """The headline: one markdown table per model, a row per method family (ours, then each peer library) and a
    column per nominal width, each cell ``"PSNR dB (bits/weight)"``.

    Args:
        rows: the demo's rows (any models).
    """
    widths = sorted({r.width for r in rows if r.kind != "float"})
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        cells: dict[str, dict[float, str]] = {family: {} for family in SUMMARY_SERIES.values()}  # ours first
        for r in rows:
            if r.model != model or r.kind == "float":
                continue
            family = SUMMARY_SERIES.get(r.kind, r.variant.split()[0])
            cells.setdefault(family, {})[r.width] = f"{r.psnr:.1f} ({r.bits_per_weight:.2f})"
        header = "| " + model_label(model) + " | " + " | ".join(f"{w:g} bits" for w in widths) + " |"
        out += [header, "|---" * (len(widths) + 1) + "|"]
        out += ["| " + f + " | " + " | ".join(c.get(w, "") for w in widths) + " |" for f, c in cells.items() if c]
        out.append("")
    return "\n".join(out).rstrip()


def demo_table(rows: Sequence[DemoRow]) -> str:
    """The rows as one markdown table (model, variant, bits/weight, size, PSNR, SSIM, agreement, accuracy, time)."""
    header = "| model | variant | bits/weight | model MB | sample PSNR dB | SSIM | class agreement | class acc. | quantize s |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.variant if r.kind != "best" else f"**{r.variant}**"
        seconds = "" if r.kind == "float" else f"{r.seconds:.1f}"
        psnr_text = "inf" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
        lines.append(
            f"| {model_label(r.model)} | {name} | {r.bits_per_weight:.3f} | {r.model_mb:.2f} | {psnr_text} | "
            f"{r.ssim:.4f} | {_percent(r.agreement)} | {_percent(r.accuracy)} | {seconds} |"
        )
    return "\n".join(lines)
