"""Random SD3-style transformers at real widths and depths, for measuring calibrated quantization at scale.

There is no text encoder, VAE or pipeline here: a seeded :class:`diffusers.SD3Transformer2DModel` with PyTorch's
default initialisation (activations stay well scaled through the residual stream: the float velocity is checked
to be finite and non-trivial), driven by a small flow-matching Euler sampler over random latents with random
``encoder_hidden_states`` / ``pooled_projections`` per sample. ``scripts/bench_scale.py`` uses these pieces to
time data-free, calibrated, bits-budget and refined quantization in one process per variant:

* :func:`sd3_style_config` / :func:`build_sd3_style_model`: the model (SD3-medium's head size 64 and its
  4096-wide T5 and 2048-wide pooled CLIP inputs, any width and depth).
* :class:`SamplerSettings` / :func:`euler_trajectory` / :func:`calibration_forward_fn`: the sampler, the
  recorder of its denoiser calls and the ``forward_fn(batch_index)`` that :class:`~diffusers_otq.CalibrationConfig`
  takes.
* :class:`HeldOutCalls`: the float model's velocities on the calls of Euler trajectories from other seeds, and
  the relative velocity error ``sum ||v_q - v_fp||^2 / sum ||v_fp||^2`` of a quantized model on the same inputs.
* :class:`ScaleVariant` / :func:`quantize_scale_variant`: the four measured variants (data-free 3-bit, calibrated
  3-bit, a 2.5 bits/weight budget, the budget plus refinement) through either the two-step API
  (``calibrate`` then ``quantize_model(statistics=...)``) or the one-call API
  (``quantize_model(model, config, calibration=CalibrationConfig(forward_fn=...))``, detected by
  :func:`one_call_api_available`).
* :func:`measure_variant` / :func:`record_reference`: what one benchmark process does (build, quantize, peak RSS,
  bits per weight, velocity error), returning a JSON-safe dict.
* :func:`extrapolation_targets`: weight counts of SD3.5-large and Flux.1 (built on the meta device).
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..memory import release_freed_memory


__all__ = [
    "CALIBRATION_SEED",
    "HELDOUT_SEED",
    "SCALE_VARIANTS",
    "HeldOutCalls",
    "ProcessSpec",
    "SamplerSettings",
    "ScaleVariant",
    "VariantUnavailable",
    "build_sd3_style_model",
    "calibration_forward_fn",
    "euler_trajectory",
    "extrapolation_targets",
    "measure_variant",
    "one_call_api_available",
    "quantizable_weights",
    "quantize_scale_variant",
    "record_reference",
    "resolve_api",
    "run_worker",
    "sd3_style_config",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

HEAD_DIM = 64
"""SD3's attention head size: ``width = 64 * num_attention_heads`` (SD3-medium: 24 heads, width 1536)."""
T5_WIDTH = 4096
"""Width of SD3's ``encoder_hidden_states`` (T5-XXL), its ``joint_attention_dim``."""
POOLED_WIDTH = 2048
"""Width of SD3's ``pooled_projections`` (CLIP-L + CLIP-G pooled)."""
CALIBRATION_SEED = 10_000
"""Calibration trajectory ``b`` draws its noise and text states from ``Generator().manual_seed(10_000 + b)``."""
HELDOUT_SEED = 20_000
"""Held-out trajectory ``k`` uses seed ``20_000 + k``: never a calibration seed."""
APIS: tuple[str, ...] = ("one-call", "two-step")


# ------------------------------------------------------------------------------------------------ the model


def sd3_style_config(
    width: int,
    depth: int,
    *,
    sample_size: int = 32,
    joint_attention_dim: int | None = None,
    pooled_projection_dim: int | None = None,
) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of a random SD3-style transformer ``width`` wide, ``depth`` blocks deep.

    Heads are 64 wide as in SD3 (``width`` must be a multiple of 64); 16 latent channels, patch size 2. The text
    inputs are SD3's (4096-wide T5 states, 2048-wide pooled CLIP), capped at 4x / 2x the width so that tiny test
    models stay tiny. ``caption_projection_dim`` equals the width (SD3 requires it).

    Raises:
        ValueError: ``width`` is not a positive multiple of 64, or ``depth < 1``.
    """
    if width < HEAD_DIM or width % HEAD_DIM:
        raise ValueError(f"width={width} must be a positive multiple of {HEAD_DIM} (SD3's head size), e.g. 1536.")
    if depth < 1:
        raise ValueError(f"depth={depth} must be at least 1 block.")
    return {
        "sample_size": sample_size,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": depth,
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": width // HEAD_DIM,
        "joint_attention_dim": joint_attention_dim or min(T5_WIDTH, 4 * width),
        "caption_projection_dim": width,
        "pooled_projection_dim": pooled_projection_dim or min(POOLED_WIDTH, 2 * width),
        "pos_embed_max_size": sample_size,  # >= sample_size / patch_size positions per side
    }


def build_sd3_style_model(config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A seeded ``SD3Transformer2DModel`` with PyTorch's default initialisation, in ``dtype``, in eval mode.

    The same ``config``, ``seed`` and ``dtype`` give the same weights in every process (see
    :func:`weights_fingerprint`).
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def quantizable_weights(model: nn.Module) -> int:
    """Elements of every ``nn.Linear`` / ``nn.Conv2d`` weight of ``model``: what OTQ quantizes."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))


def weights_fingerprint(model: nn.Module) -> float:
    """A float64 checksum of every parameter (equal models give equal fingerprints, bit for bit)."""
    with torch.no_grad():
        return float(sum(p.double().sum().item() + 1e-3 * p.double().abs().sum().item() for p in model.parameters()))


def extrapolation_targets() -> dict[str, dict[str, Any]]:
    """Name -> ``{"width", "blocks", "parameters", "weights"}`` of SD3.5-large and Flux.1-dev, counted on the meta
    device (no memory): ``weights`` are the ``nn.Linear``/``nn.Conv2d`` elements OTQ quantizes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    sd35 = sd3_style_config(2432, 38, sample_size=128) | {"pos_embed_max_size": 192, "qk_norm": "rms_norm"}
    flux = {"guidance_embeds": True}  # FluxTransformer2DModel's defaults are Flux.1's: 19 + 38 blocks, width 3072
    targets = {}
    with torch.device("meta"):
        for name, cls, config, width, blocks in (
            ("SD3.5-large", SD3Transformer2DModel, sd35, 2432, 38),
            ("Flux.1-dev", FluxTransformer2DModel, flux, 3072, 57),
        ):
            model = cls(**config)
            targets[name] = {
                "width": width,
                "blocks": blocks,
                "parameters": sum(p.numel() for p in model.parameters()),
                "weights": quantizable_weights(model),
            }
    return targets


# ---------------------------------------------------------------------------------------------- the sampler


@dataclass(frozen=True)
class SamplerSettings:
    """A flow-matching Euler sampler over random latents with random text states.

    ``steps`` Euler steps from ``sigma = 1`` (noise) to 0 with ``x <- x + (sigma_next - sigma) * v`` and
    ``timestep = 1000 * sigma`` (SD3's convention); ``batch_size`` samples per trajectory, each with its own
    ``text_tokens`` x ``joint_attention_dim`` ``encoder_hidden_states`` and pooled projection, all drawn from
    ``torch.Generator().manual_seed(seed)``.
    """

    steps: int = 8
    batch_size: int = 2
    text_tokens: int = 77

    def describe(self) -> str:
        """E.g. ``"8 Euler steps, batch 2, 77 text tokens"``."""
        return f"{self.steps} Euler steps, batch {self.batch_size}, {self.text_tokens} text tokens"


def _model_inputs(model: nn.Module, settings: SamplerSettings, seed: int) -> tuple[torch.Tensor, ...]:
    """``(latents, encoder_hidden_states, pooled_projections)`` of one trajectory, in the model's dtype."""
    config = model.config
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    side, batch = config.sample_size, settings.batch_size
    latents = torch.randn(batch, config.in_channels, side, side, generator=generator)
    context = torch.randn(batch, settings.text_tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    return latents.to(dtype), context.to(dtype), pooled.to(dtype)


@torch.no_grad()
def euler_trajectory(
    model: nn.Module, settings: SamplerSettings, seed: int, record: list[dict[str, torch.Tensor]] | None = None
) -> torch.Tensor:
    """Run the Euler sampler of ``settings`` with ``model`` from seed ``seed`` and return the final latents.

    With ``record``, every denoiser call is appended to it as ``{"hidden_states", "encoder_hidden_states",
    "pooled_projections", "timestep", "velocity"}`` (detached copies; the velocity is the model's output).
    """
    x, context, pooled = _model_inputs(model, settings, seed)
    sigmas = torch.linspace(1.0, 0.0, settings.steps + 1)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        timestep = torch.full((settings.batch_size,), 1000.0 * sigma)
        velocity = model(
            hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep
        ).sample
        if record is not None:
            record.append(
                {
                    "hidden_states": x.clone(),
                    "encoder_hidden_states": context,
                    "pooled_projections": pooled,
                    "timestep": timestep,
                    "velocity": velocity.clone(),
                }
            )
        x = x + (sigma_next - sigma) * velocity
    return x


def calibration_forward_fn(
    model: nn.Module, settings: SamplerSettings, seed: int = CALIBRATION_SEED
) -> Callable[[int], None]:
    """``forward_fn(batch_index)`` for :class:`~diffusers_otq.CalibrationConfig`: batch ``b`` is one Euler
    trajectory of ``settings`` from seed ``seed + b`` (``steps`` denoiser calls of ``batch_size`` samples)."""

    def forward_fn(batch_index: int) -> None:
        euler_trajectory(model, settings, seed + batch_index)

    return forward_fn


# ---------------------------------------------------------------------------------- held-out velocity error


@dataclass
class HeldOutCalls:
    """The denoiser calls of held-out Euler trajectories and the float model's velocity on each.

    Record them from the float model (:meth:`record`), keep them across processes (:meth:`save` /
    :meth:`load`), and score a quantized copy on exactly the same inputs (:meth:`velocity_error`): the quantized
    model is teacher-forced along the float model's trajectories.
    """

    calls: list[dict[str, torch.Tensor]] = field(default_factory=list)
    fingerprint: float | None = None  # weights_fingerprint of the float model that produced the velocities

    @classmethod
    def record(
        cls, model: nn.Module, settings: SamplerSettings, trajectories: int, seed: int = HELDOUT_SEED
    ) -> HeldOutCalls:
        """Every call of ``trajectories`` Euler trajectories from seeds ``seed``, ``seed + 1``, ..."""
        calls: list[dict[str, torch.Tensor]] = []
        for k in range(trajectories):
            euler_trajectory(model, settings, seed + k, record=calls)
        return cls(calls, weights_fingerprint(model))

    def save(self, path: str | os.PathLike) -> None:
        """Write the calls and the fingerprint with ``torch.save`` (tensors and a float only)."""
        torch.save({"calls": self.calls, "fingerprint": self.fingerprint}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeldOutCalls:
        """Read what :meth:`save` wrote."""
        data = torch.load(path, weights_only=True)
        return cls(data["calls"], data["fingerprint"])

    def velocity_stats(self) -> dict[str, float]:
        """``rms`` of the recorded velocities and ``variation``, the relative change of the velocity between the
        first and the last call (both > 0 for a model that depends on its inputs)."""
        velocities = [call["velocity"].double() for call in self.calls]
        rms = math.sqrt(sum(float(v.pow(2).sum()) for v in velocities) / sum(v.numel() for v in velocities))
        first, last = velocities[0], velocities[-1]
        variation = float((first - last).norm() / first.norm().clamp_min(1e-30))
        return {"rms": rms, "variation": variation}

    def check_velocity(self, min_rms: float = 1e-3, max_rms: float = 1e3, min_variation: float = 1e-3) -> None:
        """Refuse a float model whose velocity is not finite or trivial (a constant, zero or exploding output).

        Raises:
            RuntimeError: a NaN/Inf velocity, an RMS outside ``[min_rms, max_rms]``, or a velocity that does not
                change along the trajectory.
        """
        if not all(bool(torch.isfinite(call["velocity"]).all()) for call in self.calls):
            raise RuntimeError("the float model's velocity has NaN/Inf values: the random init is badly scaled.")
        stats = self.velocity_stats()
        if not min_rms <= stats["rms"] <= max_rms:
            raise RuntimeError(
                f"the float model's velocity RMS is {stats['rms']:.3g}, outside [{min_rms}, {max_rms}]."
            )
        if stats["variation"] < min_variation:
            raise RuntimeError(
                f"the float model's velocity barely changes along a trajectory (relative change "
                f"{stats['variation']:.2g}): the model ignores its inputs."
            )

    @torch.no_grad()
    def velocity_error(self, model: nn.Module) -> float:
        """``sum ||v_q - v_fp||^2 / sum ||v_fp||^2`` of ``model`` over the recorded calls (float64 sums)."""
        error = reference = 0.0
        for call in self.calls:
            inputs = {key: value for key, value in call.items() if key != "velocity"}
            velocity = model(**inputs).sample.double()
            target = call["velocity"].double()
            error += float((velocity - target).pow(2).sum())
            reference += float(target.pow(2).sum())
        return error / reference


# ------------------------------------------------------------------------------------------------ variants


class VariantUnavailable(RuntimeError):
    """The requested API cannot run this variant (e.g. refinement of a ``forward_fn`` calibration, two-step)."""


@dataclass(frozen=True)
class ScaleVariant:
    """One measured way to quantize: a fixed bit width or a bits/weight budget, calibrated or not, refined or not.

    ``refine_steps`` are Adam steps per block: the one-call (sequential) path refines each block as it goes, and
    ``refine_scope="blocks"`` asks the same of a whole-model path.
    """

    name: str
    bits: int | None = None
    bits_per_weight: float | None = None
    calibrated: bool = False
    refine_steps: int = 0

    def otq_config(self) -> Any:
        """The :class:`~diffusers_otq.OTQConfig` of this variant."""
        from ..config import OTQConfig

        if self.bits_per_weight is not None:
            return OTQConfig(bits_per_weight=self.bits_per_weight)
        return OTQConfig(bits=self.bits)

    def calibration_config(self, forward_fn: Callable[[int], Any], num_batches: int) -> Any:
        """The :class:`~diffusers_otq.CalibrationConfig` of this variant over ``num_batches`` ``forward_fn`` batches."""
        from ..calibration import CalibrationConfig

        refine = {"refine_steps": self.refine_steps, "refine_scope": "blocks"} if self.refine_steps else {}
        return CalibrationConfig(forward_fn=forward_fn, num_batches=num_batches, progress=False, **refine)


SCALE_VARIANTS: dict[str, ScaleVariant] = {
    v.name: v
    for v in (
        ScaleVariant("data-free", bits=3),
        ScaleVariant("calibrated-3bit", bits=3, calibrated=True),
        ScaleVariant("budget-2.5", bits_per_weight=2.5, calibrated=True),
        ScaleVariant("budget-2.5+refine50", bits_per_weight=2.5, calibrated=True, refine_steps=50),
    )
}
"""The benchmark's variants by name, in table order."""


def one_call_api_available() -> bool:
    """Whether ``quantize_model(model, config, calibration=CalibrationConfig(forward_fn=f, num_batches=n))``
    calibrates by itself (the one-call API), checked by running it on a tiny SD3-style model.

    ``quantize_model`` has long taken ``calibration=`` for the *fit settings* only: without ``statistics`` it then
    quantizes data-free and never calls ``forward_fn``. So the signature alone cannot tell; the probe counts the
    ``forward_fn`` calls.
    """
    from .. import quantize_model

    if "calibration" not in inspect.signature(quantize_model).parameters:
        return False
    settings = SamplerSettings(steps=1, batch_size=1, text_tokens=4)
    model = build_sd3_style_model(sd3_style_config(64, 1, sample_size=8))
    forward = calibration_forward_fn(model, settings)
    calls = 0

    def counting(batch_index: int) -> None:
        nonlocal calls
        calls += 1
        forward(batch_index)

    variant = SCALE_VARIANTS["calibrated-3bit"]
    try:
        quantize_model(
            model,
            variant.otq_config(),
            calibration=variant.calibration_config(counting, 1),
            progress=False,
            compute_metrics=False,
        )
    except Exception as error:  # noqa: BLE001 - any failure means "not usable"; say why
        logger.warning("one-call API probe failed (%s: %s); using the two-step API", type(error).__name__, error)
        return False
    return calls > 0


def resolve_api(requested: str | None) -> str:
    """``requested`` (``"one-call"`` or ``"two-step"``) or, when None, ``"one-call"`` if available else two-step.

    Raises:
        ValueError: an unknown API name.
    """
    if requested is None:
        return "one-call" if one_call_api_available() else "two-step"
    if requested not in APIS:
        raise ValueError(f"api={requested!r} is unknown; expected one of {list(APIS)}.")
    return requested


def quantize_scale_variant(
    model: nn.Module,
    variant: ScaleVariant,
    forward_fn: Callable[[int], Any],
    num_batches: int,
    *,
    api: str,
) -> dict[str, float]:
    """Quantize ``model`` in place as ``variant``; the calibrated variants through ``api``.

    * ``"two-step"``: ``statistics = calibrate(model, config, calibration)`` then
      ``quantize_model(model, config, statistics=statistics, calibration=calibration)``; refinement is not
      available there for ``forward_fn`` calibrations (the library records no teacher from them).
    * ``"one-call"``: ``quantize_model(model, config, calibration=calibration)`` calibrates, allocates, fits and
      refines in one call.

    Returns:
        ``{"calibrate_s", "forward_calls"}``: seconds spent inside ``forward_fn`` (the sampling the library asked
        for, hooks included), so that ``total - calibrate_s`` is the quantization proper with either API, and how
        many times it was called; two-step also gives ``calibrate_call_s``, the whole ``calibrate`` call.

    Raises:
        VariantUnavailable: refinement with the two-step API.
        RuntimeError: the one-call API never called ``forward_fn`` (a library whose ``quantize_model`` takes
            ``calibration=`` for fit settings only quantizes data-free then: refused, never reported as calibrated).
    """
    from .. import calibrate, quantize_model

    config = variant.otq_config()
    if not variant.calibrated:
        quantize_model(model, config, progress=False, compute_metrics=False)
        return {"calibrate_s": 0.0, "forward_calls": 0}
    sampling = 0.0
    calls = 0

    def timed(batch_index: int) -> Any:
        nonlocal sampling, calls
        calls += 1
        start = time.perf_counter()
        try:
            return forward_fn(batch_index)
        finally:
            sampling += time.perf_counter() - start

    calibration = variant.calibration_config(timed, num_batches)
    if api == "one-call":
        quantize_model(model, config, calibration=calibration, progress=False, compute_metrics=False)
        if not calls:
            raise RuntimeError(
                "quantize_model(..., calibration=CalibrationConfig(forward_fn=...)) never called forward_fn: this "
                "diffusers_otq quantized data-free. Use --api two-step."
            )
        return {"calibrate_s": sampling, "forward_calls": calls}
    if variant.refine_steps:
        raise VariantUnavailable(
            "refinement of a forward_fn calibration needs the one-call API (the two-step path records no teacher "
            "from forward_fn)"
        )
    start = time.perf_counter()
    statistics = calibrate(model, config, calibration)
    calibrate_call = time.perf_counter() - start
    quantize_model(
        model, config, statistics=statistics, calibration=calibration, progress=False, compute_metrics=False
    )
    return {"calibrate_s": sampling, "forward_calls": calls, "calibrate_call_s": calibrate_call}


# ------------------------------------------------------------------------------------ one benchmark process


def _status_kib(field_name: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":"))


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs``); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _stored_bits(model: nn.Module) -> tuple[float, int]:
    """``(bits per weight, weights)`` over every OTQ layer: codes, codebooks, scales, low-rank factors counted."""
    from ..layers import OTQConv2d, OTQLinear

    layers = [m for m in model.modules() if isinstance(m, OTQLinear | OTQConv2d)]
    weights = sum(m.weight_shape.numel() for m in layers)
    return sum(m.nbytes for m in layers) * 8 / max(weights, 1), weights


@dataclass(frozen=True)
class ProcessSpec:
    """What one benchmark process builds and measures (JSON-safe; passed from the script to its workers)."""

    width: int
    depth: int
    variant: str
    api: str
    reference: str  # the held-out calls file written by record_reference
    dtype: str = "float32"
    seed: int = 0
    threads: int = 2
    sample_size: int = 32
    calibration_batches: int = 2
    calibration: SamplerSettings = SamplerSettings()
    heldout_trajectories: int = 2
    heldout: SamplerSettings = SamplerSettings(batch_size=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessSpec:
        """Inverse of ``asdict``."""
        data = dict(data)
        for key in ("calibration", "heldout"):
            if isinstance(data.get(key), dict):
                data[key] = SamplerSettings(**data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict`` of the spec."""
        return asdict(self)

    def build(self) -> nn.Module:
        """The float model of this spec."""
        config = sd3_style_config(self.width, self.depth, sample_size=self.sample_size)
        return build_sd3_style_model(config, seed=self.seed, dtype=getattr(torch, self.dtype))


def _build(spec: ProcessSpec) -> tuple[nn.Module, dict[str, Any]]:
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    model = spec.build()
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": quantizable_weights(model),
        "fingerprint": weights_fingerprint(model),
        "build_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
    }
    info["float32_mib"] = info["parameters"] * 4 / 2**20
    return model, info


def record_reference(spec: ProcessSpec) -> dict[str, Any]:
    """Build the float model of ``spec``, record its held-out calls into ``spec.reference`` and check them.

    Returns:
        Parameter and weight counts, the weights' fingerprint, the velocity RMS and variation, and seconds per
        held-out denoiser call.

    Raises:
        RuntimeError: the float velocity is not finite or trivial (:meth:`HeldOutCalls.check_velocity`).
    """
    model, info = _build(spec)
    start = time.perf_counter()
    heldout = HeldOutCalls.record(model, spec.heldout, spec.heldout_trajectories)
    info["float_call_s"] = (time.perf_counter() - start) / len(heldout.calls)
    heldout.check_velocity()
    heldout.save(spec.reference)
    return {**info, **{f"velocity_{k}": v for k, v in heldout.velocity_stats().items()}}


def measure_variant(spec: ProcessSpec) -> dict[str, Any]:
    """Build the float model of ``spec``, quantize it as ``spec.variant`` and measure it.

    Peak RSS is the process's ``VmHWM`` reset right before quantizing (after the model is built and the
    held-out calls loaded); its excess over the RSS at that point is the extra memory quantization needed.

    Returns:
        ``seconds`` (calibration included), ``calibrate_s`` (inside ``forward_fn``), ``quantize_s`` (the rest),
        ``base_rss_mib``, ``peak_rss_mib``, ``peak_extra_mib``, ``bits_per_weight``, ``velocity_error``, the
        model's counts; or ``{"unavailable": reason}`` for a variant the API cannot run.

    Raises:
        RuntimeError: the model differs from the reference's (a non-deterministic build).
    """
    model, info = _build(spec)
    heldout = HeldOutCalls.load(spec.reference)
    if heldout.fingerprint != info["fingerprint"]:
        raise RuntimeError(
            f"the {spec.width} x {spec.depth} model built here (fingerprint {info['fingerprint']!r}) differs from the "
            f"one whose held-out velocities are in {spec.reference} ({heldout.fingerprint!r})."
        )
    variant = SCALE_VARIANTS[spec.variant]
    forward_fn = calibration_forward_fn(model, spec.calibration)
    gc.collect()
    release_freed_memory()
    base = _status_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    cpu_start = time.process_time()
    start = time.perf_counter()
    try:
        timings = quantize_scale_variant(model, variant, forward_fn, spec.calibration_batches, api=spec.api)
    except VariantUnavailable as error:
        return {**info, "unavailable": str(error)}
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    peak = _status_kib("VmHWM")
    bits, weights = _stored_bits(model)
    eval_start = time.perf_counter()
    error = heldout.velocity_error(model)
    return {
        **info,
        **timings,
        "seconds": seconds,
        "cpu_s": cpu_seconds,  # every thread's CPU time (inflated by OpenMP spinning on an oversubscribed machine)
        "quantize_s": seconds - timings["calibrate_s"],
        "base_rss_mib": base / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_extra_mib": (peak - base) / 1024,
        "peak_exact": exact_peak,  # False: VmHWM could not be reset, the peak includes the build
        "bits_per_weight": bits,
        "quantized_weights": weights,
        "velocity_error": error,
        "eval_s": time.perf_counter() - eval_start,
        "load_after": os.getloadavg()[0],
    }


def run_worker(kind: str, spec: dict[str, Any] | None, threads: int, log_level: int, connection: Any) -> None:
    """Entry point of one benchmark process: run ``kind`` and send ``{"ok": result}`` or ``{"error", "traceback"}``
    through ``connection`` (a ``multiprocessing`` pipe end).

    ``kind``: ``"probe"`` (:func:`resolve_api` with no request), ``"targets"`` (:func:`extrapolation_targets`),
    ``"reference"`` (:func:`record_reference`) or ``"variant"`` (:func:`measure_variant`) of ``spec``.
    """
    import traceback

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    try:
        if kind == "probe":
            result: Any = {"api": resolve_api(None)}
        elif kind == "targets":
            result = extrapolation_targets()
        elif kind == "reference":
            result = record_reference(ProcessSpec.from_dict(spec or {}))
        elif kind == "variant":
            result = measure_variant(ProcessSpec.from_dict(spec or {}))
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
        connection.send({"ok": result})
    except BaseException as error:  # noqa: BLE001 - report every failure to the parent, then exit
        connection.send({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
    finally:
        connection.close()
